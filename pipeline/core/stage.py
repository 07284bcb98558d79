"""Running a stage: content-addressed skip, atomic outputs, the record as commit point.

A stage is a function `fn(ctx, out: Path, inputs: dict[str, Path]) -> StageResult` that writes its files into
`out` (a fresh temp directory). Its key is the digest of (stage name, stage version, config, input digests):
paths never enter it. When the key equals the key of the record already in `runs/<run>/<stage>/` and the
recorded outputs still have their digests, the stage is skipped. Otherwise the new directory, record
included, replaces the old one in a single rename; a crash or Ctrl-C before that leaves the old one intact.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import platform
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from pipeline.core.config import Recipe
from pipeline.core.console import captured, console
from pipeline.core.errors import UserError
from pipeline.core.store import Artifact, StageRecord, atomic_dir, sha256_json, sha256_tree

__all__ = ["Context", "StageResult", "console", "lib_versions", "run_stage", "CURRENT", "fault"]
# The stage running now and its log, for the one line an interrupt or a fault prints (cli.main)
CURRENT: dict = {"stage": None, "log": None, "finished": None}
# Faults of the machine, not of the pipeline: a stage that meets one stops with one line (cli.main prints it)
FAULTS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exhausted",
          errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
          errno.EPERM: "operation not permitted", errno.EIO: "an I/O error"}
LIBS = ("torch", "torchvision", "ultralytics", "torch-pruning", "onnx", "onnxruntime", "onnxslim", "pycocotools",
        "numpy", "opencv-python-headless", "yolo-edge")


def lib_versions() -> dict:
    out = {}
    for name in LIBS:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return {"python": platform.python_version(), "platform": platform.platform(), **out}


@dataclass
class StageResult:
    outputs: dict[str, str]  # name -> file name inside the stage directory
    metrics: dict = field(default_factory=dict)
    requested: dict = field(default_factory=dict)
    effective: dict = field(default_factory=dict)
    summary: str = ""  # the stage's key numbers, for its result line


@dataclass
class Context:
    run_dir: Path
    recipe: Recipe
    recipe_path: Path
    force: bool = False

    def stage_dir(self, stage: str) -> Path:
        return self.run_dir / stage

    def record(self, stage: str) -> StageRecord | None:
        p = self.stage_dir(stage) / "record.json"
        if not p.is_file():
            return None
        try:
            return StageRecord.from_json(json.loads(p.read_text()))
        except (json.JSONDecodeError, TypeError):
            return None

    def output(self, stage: str, name: str) -> Path:
        rec = self.record(stage)
        if rec is None or name not in rec.outputs:
            from pipeline.core.errors import UserError

            raise UserError(f"stage '{stage}' has not produced '{name}' yet: run `yolo-edge run --stages {stage}` "
                            f"(or `make {stage}`) first", self.run_dir)
        return self._resolve(stage, rec.outputs[name])

    def _resolve(self, stage: str, art: dict) -> Path:
        """An output's path in this run directory (records keep it relative to the stage, so a run directory that
        is moved or copied keeps its cache and never reads another directory's files)."""
        return self.stage_dir(stage) / art["rel"] if "rel" in art else Path(art["path"])


def _outputs_intact(ctx: Context, stage: str, rec: StageRecord) -> bool:
    for a in rec.outputs.values():
        p = ctx._resolve(stage, a)
        if not p.exists() or sha256_tree(p) != a["digest"]:
            return False
    return True


def fault(e: BaseException, stage: str | None, where: str | Path | None) -> UserError | None:
    """A machine fault (a full disk, a read-only file system...) as the one-line error that says which stage stopped
    and that what was written before is intact; None for anything else. An OSError says its errno; another error (a
    C++ writer's RuntimeError) counts as the fault the disk under `where` is in (store.disk_fault), if any."""
    from pipeline.core.store import disk_fault

    if isinstance(e, OSError) and e.errno in FAULTS:
        code, at = e.errno, e.filename or where
    elif isinstance(e, Exception) and where is not None:  # numpy's "Not enough free space" has no errno
        code, at = disk_fault(where, str(e)), where
    else:
        return None
    what = FAULTS.get(code)
    if what is None:
        return None
    return UserError(f"{what} ({os.strerror(code)}" + (f": {at}" if at else "") + ")"
                     + (f": the {stage} stage stopped, its temporary files removed; earlier results are intact"
                        if stage else ""), where)


@contextlib.contextmanager
def interrupts_held():
    """Ctrl-C (SIGINT) held back for the block and delivered when it ends: a stage's swap into place and the
    bookkeeping after it are never cut in half. Outside the main thread (signals go to it alone) a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list = []
    before = signal.signal(signal.SIGINT, lambda sig, frame: pending.append(frame))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)
        if pending and callable(before):
            before(signal.SIGINT, pending[0])
        elif pending and before == signal.SIG_DFL:
            raise KeyboardInterrupt


def _keep_failed_log(ctx: Context, stage: str, log: Path, e: BaseException) -> Path | None:
    """A failed stage's log, kept beside its directory (which keeps its last good state) as <stage>.failed.log; a
    stage stopped before its log was opened leaves one that names what stopped it."""
    dest = ctx.run_dir / f"{stage}.failed.log"
    try:
        if log.is_file():
            shutil.copyfile(log, dest)
        else:
            dest.write_text(f"the {stage} stage stopped before its log was opened: {type(e).__name__}: {e}\n")
        return dest
    except OSError:
        return None


def run_stage(ctx: Context, stage: str, version: int, config: dict, inputs: dict[str, Path],
              fn: Callable[[Context, Path, dict[str, Path]], StageResult]) -> StageRecord:
    in_arts = {k: Artifact.of(k, p) for k, p in inputs.items()}
    key = sha256_json({"stage": stage, "version": version, "config": config,
                       "inputs": {k: a.digest for k, a in in_arts.items()}})
    old = ctx.record(stage)
    if old and old.key == key and not ctx.force and _outputs_intact(ctx, stage, old):
        console.print(f"[green]✓[/] {stage}: cached (inputs, config and stage version unchanged; key {key[:12]})")
        return old
    final = ctx.stage_dir(stage)
    console.print(f"[cyan]▶[/] {stage}: running")
    started = time.time()
    held = contextlib.ExitStack()
    try:
        with atomic_dir(final) as tmp:
            log = tmp / "log.txt"  # what every library printed while the stage ran (the stage directory's log.txt)
            CURRENT.update(stage=stage, log=None, finished=None)
            try:  # the record is written inside: an interrupt while it is hashed still leaves the failed log
                with captured(log):
                    res = fn(ctx, tmp, inputs)
                _write_record(ctx, stage, version, key, config, in_arts, res, tmp, final, started)
            except BaseException as e:  # noqa: BLE001 - annotated and re-raised: the one line names the log
                kept = _keep_failed_log(ctx, stage, log, e)
                CURRENT.update(log=kept)
                if not isinstance(e, UserError) and (f := fault(e, stage, ctx.run_dir)) is not None:
                    f.log = str(kept) if kept else None
                    raise f from None
                if isinstance(e, UserError) and kept is not None:
                    e.log = str(kept)
                raise
            held.enter_context(interrupts_held())  # the swap into place and the bookkeeping after it run whole
        CURRENT.update(stage=None, log=None, finished=stage)  # (kept on a failure: cli.main names the stage and log)
        with contextlib.suppress(OSError):  # an earlier failure's log, now history, would mislead
            (ctx.run_dir / f"{stage}.failed.log").unlink(missing_ok=True)
    except OSError as e:  # the temporary directory, the swap into place or the record met a full or read-only disk
        f = fault(e, stage, ctx.run_dir)
        if f is None:
            raise
        f.log = f.log or (str(CURRENT["log"]) if CURRENT.get("stage") == stage and CURRENT.get("log") else None)
        raise f from None
    finally:
        held.close()  # a Ctrl-C that came during the swap is raised here, after the stage is committed
    rec = ctx.record(stage)
    console.print(f"[green]✓[/] {stage}: " + (f"{res.summary}; " if res.summary else "")
                  + f"done in {rec.finished - started:.1f}s")
    return rec


def _write_record(ctx: Context, stage: str, version: int, key: str, config: dict, in_arts: dict, res: StageResult,
                  tmp: Path, final: Path, started: float) -> None:
    """The outputs' digests and the record, written last into the stage's new directory (the commit point)."""
    outs = {}
    for name, rel in res.outputs.items():
        a = Artifact.of(name, tmp / rel)
        a.path = str(final / rel)
        outs[name] = {**a.__dict__, "rel": str(rel)}
    rec = StageRecord(stage=stage, stage_version=version, key=key, config=config,
                      inputs={k: a.__dict__ for k, a in in_arts.items()}, outputs=outs, env=lib_versions(),
                      requested=res.requested, effective=res.effective, metrics=res.metrics,
                      started=started, finished=time.time())
    (tmp / "record.json").write_text(json.dumps(rec.to_json(), indent=1, default=str))
