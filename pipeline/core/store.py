"""Artifacts, digests, atomic writes and stage records.

Every file a stage produces is written under a temporary name in the same directory and renamed into place;
the stage record is written last and is the commit point. A crash or Ctrl-C mid-stage leaves the previous
good state (old outputs and old record) intact.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


IGNORED_SUFFIXES = (".cache",)  # ultralytics writes labels/*.cache beside a dataset's labels: not content


def sha256_tree(path: str | Path) -> str:
    """Digest of a directory: relative names and contents of every file, in sorted order (symlinks followed;
    ultralytics' label caches left out)."""
    p = Path(path)
    if p.is_file():
        return sha256_file(p)
    h = hashlib.sha256()
    for f in sorted(x for x in p.rglob("*") if x.is_file() and not x.name.endswith(IGNORED_SUFFIXES)):
        h.update(str(f.relative_to(p)).encode() + b"\0" + sha256_file(f).encode())
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


@contextlib.contextmanager
def atomic_path(dest: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temp file path beside `dest`; on success rename it onto `dest`, on failure delete it."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=suffix or dest.suffix or ".tmp", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # as an ordinary write would leave it (mkstemp's is 0600)
    try:
        yield tmp
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(dest: str | Path) -> Iterator[Path]:
    """Yield an empty temp directory beside `dest`; on success swap it in for `dest`."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        yield tmp
        old = None
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old.{os.getpid()}")
            os.replace(dest, old)
        os.replace(tmp, dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_json(dest: str | Path, obj: Any) -> Path:
    with atomic_path(dest) as tmp:
        tmp.write_text(json.dumps(obj, indent=1, default=str))
    return Path(dest)


@dataclass
class Artifact:
    kind: str
    path: str
    digest: str
    size: int

    @classmethod
    def of(cls, kind: str, path: str | Path) -> Artifact:
        p = Path(path)
        size = p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
        return cls(kind=kind, path=str(p), digest=sha256_tree(p), size=size)


@dataclass
class StageRecord:
    stage: str
    stage_version: int
    key: str
    config: dict
    inputs: dict[str, dict] = field(default_factory=dict)
    outputs: dict[str, dict] = field(default_factory=dict)
    env: dict = field(default_factory=dict)
    requested: dict = field(default_factory=dict)
    effective: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    started: float = 0.0
    finished: float = 0.0

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> StageRecord:
        return cls(**d)


LOCK = ".lock"


@contextlib.contextmanager
def run_lock(run_dir: str | Path, command: str = "yolo-edge") -> Iterator[None]:
    """Hold the run directory's lock for the block: a second command on the same directory is refused at once, in one
    line naming the holder (a process killed while holding it frees it). Inside the lock, the temporary directories a
    killed run left behind (`.<stage>.xxxx`, `.<stage>.old.<pid>`) are removed: nothing else can be writing them."""
    import fcntl
    import time

    from pipeline.core.errors import UserError

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    f = open(run_dir / LOCK, "a+")  # noqa: SIM115 - held for the block
    try:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise UserError(f"the run directory is in use by {holder}: wait for it to finish, or give this one "
                            f"another --run-dir", run_dir) from None
        f.seek(0)
        f.truncate()
        f.write(f"{command} (pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')})")
        f.flush()
        for stale in run_dir.glob(".*"):
            if stale.is_dir() and stale.name not in (".work",) and not stale.name.startswith(".."):
                shutil.rmtree(stale, ignore_errors=True)
        yield
    finally:
        f.close()


def disk_fault(path: str | Path, message: str = "") -> int | None:
    """The errno a failed write under `path` most likely met when the error itself does not say (torch.save and
    other C++ writers report a full disk as a RuntimeError, numpy as an OSError without errno): ENOSPC when the
    message says the space ran out or under 1 MiB is free, EROFS when the file system is mounted read-only; None
    otherwise."""
    import errno

    low = message.lower()
    if "no space left" in low or "not enough free space" in low or "file write failed" in low and \
            "space" in low:
        return errno.ENOSPC
    if "read-only file system" in low:
        return errno.EROFS
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    if st.f_flag & os.ST_RDONLY:
        return errno.EROFS
    if st.f_bavail * st.f_frsize < (1 << 20):
        return errno.ENOSPC
    return None
