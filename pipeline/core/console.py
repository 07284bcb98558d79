"""What an operator sees, and what goes to the logs.

The project's own lines: `console.print` (rich, on stderr) for a stage's start and result lines and the warnings the
project has not handled, `detail` for everything else it has to say (the search's trials, the scan's groups...),
`task` for progress (on a terminal a bar with an ETA; elsewhere, CI, cron or a pipe, a few plain milestone lines and
no redraws).

While a stage runs inside `captured(log_path)`, everything else written to the process's stdout and stderr — by
ultralytics, ONNX Runtime, Torch-Pruning, torch, Polygraphy; through Python's streams, its logging handlers, or the
file descriptors themselves (C++ code, child processes) — goes to that log, each line timestamped, and not to the
terminal; the project's own lines go to both. `set_verbose(True)` (`-v`) streams the log to the terminal as well. A
warning line the project prints again is shown once, and its count at the end of the stage.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
import time
from pathlib import Path

from rich.console import Console

# soft_wrap: a line longer than the terminal (or than the 80 columns rich assumes off a terminal: a pipe, a log)
# stays one line, so a log or a grep reads it whole
console = Console(stderr=True, highlight=False, soft_wrap=True)
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_STATE: dict = {"verbose": False, "sink": None, "term": None, "term_console": None, "warned": {}}


def set_verbose(on: bool) -> None:
    _STATE["verbose"] = bool(on)


def verbose() -> bool:
    return _STATE["verbose"]


def capturing() -> bool:
    return _STATE["sink"] is not None


class _Sink:
    """A stage's log file: whole lines, each with a timestamp and where it came from; carriage-return redraws (a
    library's progress bar) keep only their last state. Thread-safe; with `echo`, lines are copied to it too."""

    def __init__(self, path: Path, echo=None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(self.path, "a", encoding="utf-8", errors="replace")  # noqa: SIM115 - closed by close()
        self.echo = echo
        self.lock = threading.Lock()
        self.partial: dict[str, str] = {}
        self.error: OSError | None = None  # a write that failed (a full disk): kept for the stage to report

    def _line(self, tag: str, text: str) -> None:
        text = _ANSI.sub("", text).rstrip()
        if not text:
            return
        try:
            self.f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} [{tag}] {text}\n")
            self.f.flush()
        except OSError as e:  # the log must never be what stops a stage: the stage's own writes will say why
            self.error = e

    def write(self, tag: str, data: str) -> None:
        with self.lock:
            buf = self.partial.get(tag, "") + data
            *lines, rest = buf.split("\n")
            for ln in lines:
                self._line(tag, ln.rsplit("\r", 1)[-1])
            self.partial[tag] = rest
            if self.echo is not None:
                try:
                    self.echo.write(data)
                    self.echo.flush()
                except (OSError, ValueError):
                    pass

    def project(self, text: str) -> None:
        """A line the project printed on the terminal too."""
        with self.lock:
            for ln in str(text).splitlines():
                self._line("yolo-edge", ln)

    def close(self) -> None:
        with self.lock:
            for tag, rest in self.partial.items():
                self._line(tag, rest.rsplit("\r", 1)[-1])
            self.partial = {}
            try:
                self.f.close()
            except OSError as e:
                self.error = e


class _Stream:
    """A text stream (sys.stdout / sys.stderr / a logging handler's) that writes into the sink."""

    def __init__(self, sink: _Sink, tag: str, fd: int | None = None):
        self.sink, self.tag, self._fd = sink, tag, fd
        self.encoding = "utf-8"
        self.errors = "replace"

    def write(self, s) -> int:
        s = s.decode("utf-8", "replace") if isinstance(s, bytes) else str(s)
        self.sink.write(self.tag, s)
        return len(s)

    def writelines(self, lines) -> None:
        for ln in lines:
            self.write(ln)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        if self._fd is None:
            raise OSError("no file descriptor")
        return self._fd

    @property
    def buffer(self):
        return self


class _Tee:
    """The project's console while captured: the terminal, and the log (without colour codes)."""

    def __init__(self, term, sink: _Sink):
        self.term, self.sink = term, sink

    def write(self, s: str) -> int:
        try:
            self.term.write(s)
        except (OSError, ValueError):
            pass
        self.sink.project(s)
        return len(s)

    def flush(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.term.flush()

    def isatty(self) -> bool:
        try:
            return self.term.isatty()
        except (AttributeError, ValueError):
            return False

    def fileno(self) -> int:
        return self.term.fileno()


def _terminal():
    """The stream the operator sees: sys.stderr as it is now (a test runner's, or a dup of file descriptor 2, which
    the capture is about to point at the log). Returns (stream, whether this function opened it)."""
    err = sys.stderr
    try:
        if err.fileno() == 2:
            return os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace"), True
    except (AttributeError, OSError, ValueError):
        pass
    return err, False


def _stream_handlers() -> list[tuple[str, logging.StreamHandler]]:
    """(logger name, handler) of every handler that writes to a stream (not a file), root's included."""
    loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                       if isinstance(lg, logging.Logger)]
    return [(lg.name, h) for lg in loggers for h in lg.handlers
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]


def _set_stream(h: logging.StreamHandler, stream) -> None:
    """A handler's stream swapped without flushing the old one (logging's setStream does: a stream a test runner has
    closed since would raise)."""
    h.acquire()
    try:
        h.stream = stream
    finally:
        h.release()


class _FdCapture:
    """File descriptors 1 and 2 pointed at a pipe that a thread drains into the sink (C-level and child output)."""

    def __init__(self, sink: _Sink):
        self.sink = sink
        self.saved: dict[int, int] = {}
        self.thread = None
        self.w = None

    def start(self) -> None:
        for fd in (1, 2):
            try:
                os.fstat(fd)
            except OSError:
                return
        r, self.w = os.pipe()
        for fd in (1, 2):
            self.saved[fd] = os.dup(fd)
        sys.stdout.flush() if hasattr(sys.stdout, "flush") else None
        for fd in (1, 2):
            os.dup2(self.w, fd)

        def drain():
            with os.fdopen(r, "rb", buffering=0) as f:
                while True:
                    chunk = f.read(65536)
                    if not chunk:
                        break
                    self.sink.write("output", chunk.decode("utf-8", "replace"))

        self.thread = threading.Thread(target=drain, name="yolo-edge-log", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        if self.w is None:
            return
        for fd, saved in self.saved.items():
            os.dup2(saved, fd)
            os.close(saved)
        os.close(self.w)
        self.thread.join(timeout=10)
        self.w = None


@contextlib.contextmanager
def captured(log_path: Path):
    """For the block, everything but the project's console goes to `log_path` (appended; see the module docstring).
    Nested blocks reuse the outer one's log."""
    if _STATE["sink"] is not None:
        yield _STATE["sink"]
        return
    term, opened = _terminal()
    sink = _Sink(log_path, echo=term if _STATE["verbose"] else None)
    fdc = _FdCapture(sink)
    saved_std = sys.stdout, sys.stderr
    saved_handlers = [(name, h, h.stream) for name, h in _stream_handlers()]
    saved_file = console._file
    try:
        fdc.start()
        sys.stdout, sys.stderr = _Stream(sink, "stdout", fdc.w), _Stream(sink, "stderr", fdc.w)
        for name, h, _ in saved_handlers:
            _set_stream(h, _Stream(sink, name.split(".")[0] or "log"))
        console.file = _Tee(term, sink)
        _STATE.update(sink=sink, term=term, term_console=Console(file=term, highlight=False, soft_wrap=True), warned={})
        yield sink
    finally:
        warned = _STATE["warned"]
        _STATE.update(sink=None, term=None, term_console=None, warned={})
        console.file = saved_file
        for _, h, stream in saved_handlers:
            _set_stream(h, stream)
        sys.stdout, sys.stderr = saved_std
        fdc.stop()
        for text, n in warned.items():
            if n > 1:
                console.print(f"[yellow]  (the warning above came {n} times: {text[:80]}...)[/]")
        sink.close()
        if opened:
            with contextlib.suppress(OSError):
                term.close()


def detail(msg: str) -> None:
    """A line of the project's that only the log needs (and the terminal with -v, or outside a stage)."""
    sink = _STATE["sink"]
    if sink is None:
        console.print(msg)
        return
    sink.project(msg)
    if _STATE["verbose"]:
        with contextlib.suppress(OSError, ValueError):
            _STATE["term"].write(_ANSI.sub("", str(msg)) + "\n")


def warn(msg: str) -> None:
    """A warning the project has not handled: on the terminal once per stage; a repeat is counted (the count is
    shown when the stage ends) and logged."""
    warned = _STATE["warned"]
    key = _ANSI.sub("", msg)
    if key in warned and _STATE["sink"] is not None:
        warned[key] += 1
        _STATE["sink"].project(msg)
        return
    warned[key] = 1
    console.print(f"[yellow]{msg}[/]")


class _Task:
    def __init__(self, label: str, total: int | None, bar, task_id):
        self.label, self.total, self.bar, self.id = label, total, bar, task_id
        self.done, self.t0, self.said, self.start = 0, time.time(), set(), None

    def resumed_at(self, done: int) -> None:
        """The work goes on from `done` units finished earlier (a resumed training): the ETA is the rate since then."""
        self.start = self.done = done
        if self.bar is not None and done:
            self.bar.reset(self.id, completed=done)

    def advance(self, n: int = 1, note: str = "") -> None:
        self.update(self.done + n, note)

    def update(self, done: int, note: str = "") -> None:
        self.done = done
        if self.bar is not None:
            self.bar.update(self.id, completed=done, note=note)
        sink = _STATE["sink"]
        if sink is not None:
            sink.project(f"{self.label}: {done}/{self.total or '?'}" + (f" {note}" if note else ""))
        if self.bar is None and self.total:
            frac, el, start = done / self.total, time.time() - self.t0, self.start or 0
            marks = [m for m in (0.25, 0.5, 0.75) if frac >= m and m not in self.said]
            if marks and el >= 20 and start < done < self.total:  # one line for the marks passed since the last
                self.said.update(marks)
                eta = el * (self.total - done) / (done - start)
                console.print(f"  {self.label}: {done}/{self.total} ({eta / 60:.0f} min left)" if eta >= 90 else
                              f"  {self.label}: {done}/{self.total} ({eta:.0f} s left)")


@contextlib.contextmanager
def task(label: str, total: int | None = None):
    """Progress of a long piece of work: `advance()` each unit. A bar with an ETA on a terminal (transient); elsewhere
    at most three plain lines (a quarter, half and three quarters done, once it has taken 20 s); the log gets every
    step."""
    term_console = _STATE["term_console"] or console
    interactive = term_console.is_terminal
    if not interactive:
        yield _Task(label, total, None, None)
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("  {task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  TextColumn("{task.fields[note]}"), console=term_console, transient=True) as bar:
        yield _Task(label, total, bar, bar.add_task(label, total=total, note=""))
