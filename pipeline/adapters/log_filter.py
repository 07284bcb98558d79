"""Collapse the lines ultralytics logs once per parameter into one summary line each.

Its trainer walks every parameter in `_setup_train` and logs, per parameter, "Freezing layer '...'" (the DFL, the
teacher of a distillation: hundreds of lines) and "setting 'requires_grad=True' for frozen layer '...'" (a resumed
run: ultralytics saves last.pt with its weights frozen, ~200 lines for a YOLO11n). `collapsed_repeats()` puts a
logging.Filter on ultralytics' logger for the duration of a call (nothing of ultralytics is patched): it holds such
lines back and, when a line of another kind comes (or the call ends), lets one summary line through instead,
"214 frozen-layer notices collapsed: ultralytics set requires_grad=True on all 214 parameters (model.0.conv.weight
... model.23.cv3.2.2.bias)". A notice that comes only once is let through as it was.
"""

from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass, field

# (kind, the per-parameter line, the summary: {n} lines, {first} and {last} parameter named)
REPEATED = (
    ("frozen", re.compile(r"^setting 'requires_grad=True' for frozen layer '(?P<name>[^']*)'"),
     "{n} frozen-layer notices collapsed: ultralytics set requires_grad=True on all {n} parameters "
     "({first} ... {last})"),
    ("freezing", re.compile(r"^Freezing layer '(?P<name>[^']*)'"),
     "{n} freezing notices collapsed: ultralytics froze {n} parameters ({first} ... {last})"),
)


@dataclass
class _Run:
    first: logging.LogRecord
    names: list[str] = field(default_factory=list)


class CollapseRepeats(logging.Filter):
    """Holds back the per-parameter lines of REPEATED; `flush()` lets one line per kind through. `counts` keeps how
    many of each kind it collapsed (or let through alone) over its life."""

    def __init__(self, logger: logging.Logger):
        super().__init__()
        self.logger = logger
        self.pending: dict[str, _Run] = {}  # in the order each kind first came
        self.counts: dict[str, int] = {}
        self._emitting = False

    def filter(self, record: logging.LogRecord) -> bool:
        if self._emitting:
            return True
        try:
            msg = record.getMessage()
        except Exception:  # a record that does not format is not this filter's to judge
            return True
        for kind, pattern, _ in REPEATED:
            m = pattern.match(msg)
            if m:
                run = self.pending.setdefault(kind, _Run(first=record))
                run.names.append(m["name"])
                self.counts[kind] = self.counts.get(kind, 0) + 1
                return False
        self.flush()  # a line of another kind: the summaries come first, where the notices would have been
        return True

    def flush(self) -> None:
        pending, self.pending = self.pending, {}
        templates = {kind: summary for kind, _, summary in REPEATED}
        for kind, run in pending.items():
            self._emitting = True
            try:
                if len(run.names) == 1:
                    self.logger.handle(run.first)
                else:
                    self.logger.log(run.first.levelno, templates[kind].format(
                        n=len(run.names), first=run.names[0], last=run.names[-1]))
            finally:
                self._emitting = False


@contextlib.contextmanager
def collapsed_repeats(logger: logging.Logger | str = "ultralytics"):
    """For the duration of the block, `logger`'s per-parameter notices come out as one summary line per kind."""
    logger = logging.getLogger(logger) if isinstance(logger, str) else logger
    f = CollapseRepeats(logger)
    logger.addFilter(f)
    try:
        yield f
    finally:
        logger.removeFilter(f)
        f.flush()


class _Drop(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return False


@contextlib.contextmanager
def silenced(logger: logging.Logger | str = "ultralytics"):
    """Nothing `logger` logs in the block comes out (a check that repeats work a stage will do, and log, again)."""
    logger = logging.getLogger(logger) if isinstance(logger, str) else logger
    f = _Drop()
    logger.addFilter(f)
    try:
        yield
    finally:
        logger.removeFilter(f)
