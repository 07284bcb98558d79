"""The deploy bundle's manifest: what it holds and how the device checks it. Standard library only: both the dev box
(pipeline.stages.bundle writes it) and the Jetson (yolo-edge-device verifies it) import this.

    <bundle>/manifest.json   format, project (version, git commit), recipe digest, every file's sha256 and size,
                             the variants (file, precision, dev-box mAP, MACs), classes, input, pre/post-processing,
                             bench settings, the eval set, the wheel
    <bundle>/models/*.onnx   the variants' ONNX files
    <bundle>/eval/           eval_set.json (base "."), ground_truth.json, images/
    <bundle>/wheels/*.whl    the project's own wheel (the device installs exactly this version)

No pickle crosses: a file that is one (by name or by content, zip members included) is refused when the bundle is
made and again when it is verified.
"""

from __future__ import annotations

import json
import os
import tarfile
import zipfile
from pathlib import Path

from pipeline.core.errors import UserError
from pipeline.core.store import sha256_file

FORMAT = 1  # manifest format; a device refuses a newer one
SCHEMA = "yolo-edge/bundle"
MANIFEST = "manifest.json"
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz")


def _is_pickle_bytes(head: bytes) -> bool:
    # protocol 2+ starts with PROTO (0x80) and the protocol number; protocol 0/1 pickles of a dict/list start with
    # '(' / '}' / ']' and end with '.', which this project's JSON/ONNX files never do at offset 0 as raw bytes with
    # 0x80.
    return len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def pickle_reason(path: Path) -> str | None:
    """Why `path` is (or holds) a pickle, or None. Checks the name, the first bytes, and the members of zip files
    (a torch checkpoint is a zip holding data.pkl; a wheel is a zip too)."""
    name = path.name.lower()
    if name.endswith(PICKLE_SUFFIXES):
        return f"a pickle-format file ({path.suffix}) cannot go into a bundle: no .pt, no torch.load on the device"
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        return f"cannot be read ({e})"
    if _is_pickle_bytes(head):
        return "is a Python pickle (its first bytes are a pickle header)"
    if head[:2] == b"PK" and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            for m in z.namelist():
                if m.lower().endswith(PICKLE_SUFFIXES[:6]):
                    return f"holds a pickle ({m}): a torch checkpoint or pickled object cannot go into a bundle"
    return None


def refuse_pickles(root: Path) -> None:
    for f in sorted(p for p in Path(root).rglob("*") if p.is_file()):
        why = pickle_reason(f)
        if why:
            raise UserError(why, f)


def file_table(root: Path) -> dict[str, dict]:
    """{relative path: {sha256, size}} of every file under root except the manifest itself."""
    root = Path(root)
    out = {}
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = f.relative_to(root).as_posix()
        if rel != MANIFEST:
            out[rel] = {"sha256": sha256_file(f), "size": f.stat().st_size}
    return out


def digest(root: str | Path) -> str:
    """The bundle's identity: the sha256 of its manifest (which holds every other file's sha256)."""
    return sha256_file(Path(root) / MANIFEST)


def read(root: Path) -> dict:
    f = Path(root) / MANIFEST
    if not f.is_file():
        raise UserError("not a yolo-edge bundle: manifest.json is missing", f)
    try:
        m = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"manifest.json is not valid JSON ({e})", f) from None
    if not isinstance(m, dict) or m.get("schema") != SCHEMA or not isinstance(m.get("format"), int):
        raise UserError(f"not a yolo-edge bundle manifest (schema {m.get('schema') if isinstance(m, dict) else m!r})",
                        f)
    if m["format"] > FORMAT:
        raise UserError(f"bundle manifest format {m['format']} is newer than this runtime reads ({FORMAT}): install "
                        f"the bundle's own wheel (wheels/) or a newer yolo-edge", f)
    return m


def verify(root: str | Path) -> dict:
    """Check a bundle directory against its manifest before anything in it is used: every listed file present with
    its size and sha256, no file that is not listed, no pickle, every variant's file listed. Returns the manifest;
    raises UserError (one line, naming the file) on the first problem."""
    root = Path(root)
    m = read(root)
    files = m.get("files") or {}
    for rel, meta in files.items():
        p = root / rel
        if os.path.isabs(rel) or ".." in Path(rel).parts:
            raise UserError("manifest names a path outside the bundle", rel)
        if not p.is_file():
            raise UserError("file listed in the manifest is missing from the bundle", p)
        size = p.stat().st_size
        if size != meta["size"]:
            raise UserError(f"size {size} bytes, the manifest says {meta['size']}: truncated or altered", p)
        if sha256_file(p) != meta["sha256"]:
            raise UserError("sha256 differs from the manifest's: the file was altered after the bundle was made", p)
    for f in sorted(x for x in root.rglob("*") if x.is_file() or x.is_symlink()):
        rel = f.relative_to(root).as_posix()
        if rel != MANIFEST and rel not in files:
            raise UserError("file not listed in the manifest: a bundle holds exactly what its manifest lists", f)
    for v in m.get("variants") or []:
        if v.get("file") not in files:
            raise UserError(f"variant '{v.get('name')}' names {v.get('file')}, which the bundle does not hold",
                            root / str(v.get("file")))
    refuse_pickles(root)
    return m


def unpack(archive: Path, dest_parent: Path) -> Path:
    """Extract a bundle .tar.gz (regular files and directories only, no absolute or '..' paths) beside itself or into
    dest_parent; returns the bundle directory."""
    archive = Path(archive)
    with tarfile.open(archive, "r:gz") as t:
        tops = set()
        for mem in t.getmembers():
            parts = Path(mem.name).parts
            if mem.name.startswith("/") or ".." in parts or not (mem.isfile() or mem.isdir()):
                raise UserError(f"archive member {mem.name!r} is not a plain file inside the bundle", archive)
            tops.add(parts[0])
        if len(tops) != 1:
            raise UserError(f"archive holds {len(tops)} top-level entries, a bundle has one directory", archive)
        top = Path(dest_parent) / tops.pop()
        if not top.is_dir():
            t.extractall(dest_parent)  # members checked above
    return top


def resolve(bundle: str | Path) -> Path:
    """A bundle directory from a directory or a .tar.gz path."""
    p = Path(bundle)
    if p.is_file() and p.name.endswith((".tar.gz", ".tgz")):
        return unpack(p, p.parent)
    if p.is_file():
        raise UserError("not a bundle: a bundle is a directory or a .tar.gz (runs/<run>/bundle/)", p)
    if not p.is_dir():
        raise UserError("no such bundle (a directory or a .tar.gz)", p)
    return p
