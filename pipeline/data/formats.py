"""Datasets as users have them: COCO instances JSON, the ultralytics YOLO-txt layout (data yaml) and Pascal VOC
(Annotations/*.xml, JPEGImages/, ImageSets/Main/<split>.txt).

All three are read into one in-memory form (`Dataset`), validated, and written back out as YOLO txt (what the
ultralytics trainer wants) or COCO JSON (what pycocotools wants). Class names, COCO category ids and image file
names survive the round trip.

Dirty boxes, as hand-labelled sets carry them, do not refuse a dataset: a box with no area is dropped, one that lies
past the image border (by more than rounding, less than half the image) is clipped to it, and each annotation file
that needed it gets one warning line (`Dataset.warnings`; counted in `Dataset.dirty`). `strict=True` refuses them
instead. Everything else that is wrong (unknown classes, non-finite numbers, a box far outside the image, a missing
or undecodable image) is refused with one line naming the file.

Ignore regions (COCO `iscrowd`, VOC `difficult`) are kept as `Image.crowd`: the COCO ground truth carries them with
iscrowd=1, so pycocotools ignores the detections that land on them; they are not training labels.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from xml.etree import ElementTree

import cv2
import numpy as np
import yaml

from pipeline.core.errors import UserError
from pipeline.core.store import atomic_dir, sha256_json

IMG_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
EDGE_TOL_PX = 1.0  # COCO boxes may overhang the image by rounding; more than this is an error
EDGE_TOL_NORM = 1e-3
FAR_FRAC = 0.5  # a box reaching past the border by more than this fraction of the image is wrong data, not dirt


@dataclass
class Image:
    path: Path
    width: int
    height: int
    id: int
    boxes: list[tuple[int, float, float, float, float]] = field(default_factory=list)  # (class idx, x, y, w, h) px
    crowd: list[tuple[int, float, float, float, float]] = field(default_factory=list)  # ignore regions, same form
    # The name the dataset knows the image by: a COCO file's own file_name (it may hold folders), or the path
    # under its split's image folder for the YOLO layout. Converted copies keep it, folders included.
    file_name: str = ""

    def __post_init__(self):
        self.file_name = self.file_name or self.path.name


@dataclass
class Dataset:
    names: list[str]
    splits: dict[str, list[Image]]
    source: Path
    category_ids: list[int] | None = None  # COCO id for each class index (None: idx + 1)
    warnings: list[str] = field(default_factory=list)  # one line per annotation file whose boxes were fixed
    dirty: dict = field(default_factory=lambda: {"clipped": 0, "dropped": 0, "files": 0})

    def cat_id(self, idx: int) -> int:
        return self.category_ids[idx] if self.category_ids else idx + 1

    @property
    def nc(self) -> int:
        return len(self.names)

    def split(self, name: str) -> list[Image]:
        if name not in self.splits:
            raise UserError(f"dataset has no '{name}' split (has {sorted(self.splits)})", self.source)
        imgs = self.splits[name]
        if not imgs:
            raise UserError(f"the '{name}' split is empty: no images", self.source)
        return imgs

    def coco_dict(self, split: str) -> dict:
        return self.coco_dict_of(self.split(split))

    def coco_dict_of(self, images_of: list) -> dict:
        """COCO instances JSON of these images (any of the dataset's): boxes, and difficult/crowd objects as
        iscrowd=1 ignore regions."""
        images, anns = [], []
        for im in images_of:
            images.append({"id": im.id, "file_name": im.file_name, "width": im.width, "height": im.height})
            for crowd, group in ((0, im.boxes), (1, im.crowd)):
                for c, x, y, w, h in group:
                    anns.append({"id": len(anns) + 1, "image_id": im.id, "category_id": self.cat_id(c),
                                 "bbox": [x, y, w, h], "area": w * h, "iscrowd": crowd})
        cats = [{"id": self.cat_id(i), "name": n} for i, n in enumerate(self.names)]
        return {"images": images, "annotations": anns, "categories": cats}

    def digest(self, split: str) -> str:
        """Digest of a split's content: image bytes (by file digest) and labels."""
        from pipeline.core.store import sha256_file

        return sha256_json({"names": self.names,
                            "images": [(sha256_file(im.path), im.boxes, *([im.crowd] if im.crowd else []))
                                       for im in self.split(split)]})


def _image_size(path: Path, source: Path) -> tuple[int, int]:
    if not path.is_file():
        raise UserError(f"image missing: {path}", source)
    data = np.fromfile(str(path), dtype=np.uint8)
    img = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if img is None:
        raise UserError(f"image does not decode: {path}", source)
    return img.shape[1], img.shape[0]


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class BoxFixer:
    """Applies the dirty-box rule (module docstring) to one dataset's boxes and keeps the warning lines."""

    def __init__(self, strict: bool, source: Path):
        self.strict, self.source = strict, source
        self.counts = {"clipped": 0, "dropped": 0, "files": 0}
        self.warnings: list[str] = []
        self._pending: dict[str, list[str]] = {}

    def box(self, c: int, x: float, y: float, w: float, h: float, im: Image, nc: int, where: str, file: str,
            what: str = "", source: Path | None = None) -> tuple | None:
        """The box to keep (as it is, or clipped), or None when it is dropped. `where` names the box in a
        refusal, `file` the annotation file its warning line names, `what` the box as the file writes it,
        `source` the file a refusal names (default: the dataset's)."""
        src = source or self.source
        if not 0 <= c < nc:
            raise UserError(f"{where}: class id {c} is not in 0..{nc - 1} (nc={nc})", src)
        if not np.isfinite([x, y, w, h]).all():
            raise UserError(f"{where}: bbox {[x, y, w, h]} holds a non-finite number", src)
        what = what or f"[x={x:g}, y={y:g}, w={w:g}, h={h:g}]"
        W, H = im.width, im.height
        if x < -FAR_FRAC * W or y < -FAR_FRAC * H or x + w > (1 + FAR_FRAC) * W or y + h > (1 + FAR_FRAC) * H:
            raise UserError(f"{where}: bbox {what} lies far outside the {W}x{H} image (wrong coordinates?)",
                            src)
        if w <= 0 or h <= 0:
            if self.strict:
                raise UserError(f"{where}: degenerate bbox {what} (no area; data.strict refuses it)", src)
            return self._fix(file, f"{what} has no area: dropped", "dropped")
        t = EDGE_TOL_PX
        if x >= -t and y >= -t and x + w <= W + t and y + h <= H + t:
            return (c, x, y, w, h)
        if self.strict:
            raise UserError(f"{where}: bbox {what} lies outside the {W}x{H} image (data.strict refuses it)",
                            src)
        x0, y0, x1, y1 = max(x, 0.0), max(y, 0.0), min(x + w, float(W)), min(y + h, float(H))
        if x1 <= x0 or y1 <= y0:
            return self._fix(file, f"{what} lies wholly outside the {W}x{H} image: dropped", "dropped")
        self._fix(file, f"{what} reaches past the {W}x{H} image: clipped to [x={x0:g}, y={y0:g}, "
                        f"w={x1 - x0:g}, h={y1 - y0:g}]", "clipped")
        return (c, x0, y0, x1 - x0, y1 - y0)

    def _fix(self, file: str, line: str, kind: str) -> None:
        self.counts[kind] += 1
        self._pending.setdefault(file, []).append(line)
        return None

    def finish(self, ds: Dataset) -> Dataset:
        """Write the warning lines (one per file) and the counts into `ds`."""
        for file, lines in self._pending.items():
            more = f"; and {len(lines) - 3} more" if len(lines) > 3 else ""
            self.warnings.append(f"{file}: box " + "; box ".join(lines[:3]) + more)
        self.counts["files"] = len(self._pending)
        ds.warnings, ds.dirty = self.warnings, dict(self.counts)
        return ds


# ----------------------------------------------------------------------------------------------- COCO JSON
def read_coco_split(ann_file: Path, images_dir: Path | None = None,
                    names: list[str] | None = None, category_ids: list[int] | None = None,
                    fixer: BoxFixer | None = None):
    """Read one COCO instances JSON. Returns (images, names, category_ids)."""
    ann_file = Path(ann_file)
    if not ann_file.is_file():
        raise UserError("annotation file not found", ann_file)
    try:
        d = json.loads(ann_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"not valid JSON ({e})", ann_file) from None
    if not isinstance(d, dict) or not all(k in d for k in ("images", "annotations", "categories")):
        raise UserError("not a COCO instances file: needs 'images', 'annotations' and 'categories'", ann_file)
    for k in ("images", "annotations", "categories"):
        if not isinstance(d[k], list):
            raise UserError(f"'{k}' must be a list, got {type(d[k]).__name__}", ann_file)
    for c in d["categories"]:
        if not isinstance(c, dict) or not _is_int(c.get("id")) or not isinstance(c.get("name"), str):
            raise UserError(f"category {str(c)[:80]} needs an integer 'id' and a string 'name'", ann_file)
    if not d["categories"]:
        raise UserError("no categories", ann_file)
    if len({c["id"] for c in d["categories"]}) != len(d["categories"]):
        raise UserError("duplicate category ids", ann_file)
    cats = sorted(d["categories"], key=lambda c: c["id"])
    if names is None:
        names = [c["name"] for c in cats]
        category_ids = [c["id"] for c in cats]
    cid_to_idx = {cid: i for i, cid in enumerate(category_ids or range(1, len(names) + 1))}
    for c in cats:
        if c["id"] not in cid_to_idx:
            raise UserError(f"category {c['id']} ({c.get('name')}) is not in the dataset's classes", ann_file)
    if images_dir is None:
        images_dir = ann_file.parent
    images: dict[int, Image] = {}
    names_seen: dict[str, int] = {}
    for rec in d["images"]:
        if not isinstance(rec, dict) or not _is_int(rec.get("id")) or not isinstance(rec.get("file_name"), str):
            raise UserError(f"image entry {str(rec)[:80]} needs an integer 'id' and a string 'file_name'", ann_file)
        iid, fname = rec["id"], rec["file_name"]
        if iid in images:
            raise UserError(f"duplicate image id {iid} ({fname})", ann_file)
        if fname in names_seen:
            raise UserError(f"images {names_seen[fname]} and {iid} have the same file_name {fname}", ann_file)
        names_seen[fname] = iid
        p = Path(images_dir) / fname
        w, h = _image_size(p, ann_file)
        if rec.get("width") is not None or rec.get("height") is not None:
            dw, dh = rec.get("width"), rec.get("height")
            if not (_is_int(dw) and _is_int(dh)):
                raise UserError(f"image {iid} ({fname}): width and height must be integers, got {dw!r} x {dh!r}",
                                ann_file)
            if (dw, dh) != (w, h):
                hint = (" (swapped: an EXIF orientation tag rotates the image; bake the rotation into the file)"
                        if (dw, dh) == (h, w) else "")
                raise UserError(f"image {iid} ({fname}) says {dw}x{dh} but the file decodes to {w}x{h}{hint}",
                                ann_file)
        images[iid] = Image(path=p, width=w, height=h, id=iid, file_name=fname)
    for a in d["annotations"]:
        if not isinstance(a, dict):
            raise UserError(f"annotation {str(a)[:80]} is not an object", ann_file)
        if not _is_int(a.get("image_id")) or not _is_int(a.get("category_id")):
            raise UserError(f"annotation {a.get('id')}: image_id and category_id must be integers, got "
                            f"{a.get('image_id')!r} and {a.get('category_id')!r}", ann_file)
        bbox = a.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_num(v) for v in bbox)):
            raise UserError(f"annotation {a.get('id')}: bbox must be 4 numbers [x, y, w, h], got {bbox!r}", ann_file)
        if a.get("image_id") not in images:
            raise UserError(f"annotation {a.get('id')} points at unknown image id {a.get('image_id')}", ann_file)
        if a.get("category_id") not in cid_to_idx:
            raise UserError(f"annotation {a.get('id')} points at unknown category id {a.get('category_id')}",
                            ann_file)
        im = images[a["image_id"]]
        x, y, w, h = (float(v) for v in a["bbox"])
        c = cid_to_idx[a["category_id"]]
        if a.get("iscrowd", 0):  # an ignore region: kept for scoring, clipped silently, never a training label
            x0, y0 = max(x, 0.0), max(y, 0.0)
            x1, y1 = min(x + w, float(im.width)), min(y + h, float(im.height))
            if x1 > x0 and y1 > y0:
                im.crowd.append((c, x0, y0, x1 - x0, y1 - y0))
            continue
        fixer = fixer or BoxFixer(True, ann_file)
        box = fixer.box(c, x, y, w, h, im, len(names), f"annotation {a.get('id')} ({im.file_name})",
                        f"{ann_file} ({im.file_name})", f"{a.get('id')} {[x, y, w, h]}", ann_file)
        if box is not None:
            im.boxes.append(box)
    return list(images.values()), names, category_ids


def read_coco(root: Path, strict: bool = False) -> Dataset:
    """A COCO dataset: a directory with annotations/instances_<split>.json and images/<split>/ (or <split>/),
    or one instances JSON file (a single 'val' split, images beside it or in ../images/val)."""
    root = Path(root)
    if root.is_file():
        ann_files = {"val": root}
        base = root.parent.parent if root.parent.name == "annotations" else root.parent
    else:
        ann_dir = root / "annotations"
        ann_files = {}
        for f in sorted(ann_dir.glob("instances_*.json")) if ann_dir.is_dir() else []:
            split = f.stem[len("instances_"):]
            ann_files["train" if split.startswith("train") else "val" if split.startswith("val") else split] = f
        if not ann_files:
            raise UserError("not a dataset: no data.yaml (YOLO), annotations/instances_<split>.json (COCO) or "
                            "Annotations/ (Pascal VOC) in it", root)
        base = root
    names = category_ids = None
    splits = {}
    fixer = BoxFixer(strict, root)
    for split, f in ann_files.items():
        stem = f.stem[len("instances_"):] if f.stem.startswith("instances_") else split
        cands = [base / "images" / stem, base / stem, base / "images" / split, base / "images", f.parent]
        img_dir = next((c for c in cands if c.is_dir()), f.parent)
        imgs, names, category_ids = read_coco_split(f, img_dir, names, category_ids, fixer)
        splits[split] = imgs
    return fixer.finish(Dataset(names=names, splits=splits, source=root, category_ids=category_ids))


# ------------------------------------------------------------------------------------------------ YOLO txt
def _yolo_names(d: dict, src: Path) -> list[str]:
    names = d.get("names")
    if isinstance(names, dict):
        if not all(_is_int(k) or (isinstance(k, str) and k.isdigit()) for k in names):
            raise UserError(f"'names' keys must be class indices 0..{len(names) - 1}, got {list(names)[:5]}", src)
        keys = sorted(int(k) for k in names)
        if keys != list(range(len(keys))):
            raise UserError(f"'names' keys must be 0..{len(keys) - 1}", src)
        return [str(names[k]) for k in keys]
    if isinstance(names, list) and names:
        return [str(n) for n in names]
    raise UserError("data yaml has no 'names'", src)


def _list_images(entry, root: Path, src: Path) -> list[Path]:
    paths = []
    for e in entry if isinstance(entry, list) else [entry]:
        if not isinstance(e, str):
            raise UserError(f"a split must name a folder, an image list file or a list of them, got {e!r}", src)
        p = Path(e)
        p = p if p.is_absolute() else root / p
        if p.is_dir():
            paths += sorted(q for q in p.rglob("*") if q.suffix.lower() in IMG_EXTS)
        elif p.is_file() and p.suffix == ".txt":
            paths += [Path(ln.strip()) if Path(ln.strip()).is_absolute() else (p.parent / ln.strip())
                      for ln in _text(p, src).splitlines() if ln.strip()]
        else:
            raise UserError(f"data path not found: {p}", src)
    return paths


def _text(path: Path, where: Path) -> str:
    try:
        return Path(path).read_text()
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text file", where) from None


def label_path(img: Path) -> Path:
    s = str(img)
    sa, sb = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    return Path(sb.join(s.rsplit(sa, 1))).with_suffix(".txt")


def read_yolo(data_yaml: Path, strict: bool = False, extra_splits: tuple[str, ...] = ()) -> Dataset:
    """A YOLO data yaml's train, val and test splits (and `extra_splits`, where the yaml names them: a run's own copy
    carries its selection split)."""
    data_yaml = Path(data_yaml)
    if not data_yaml.is_file():
        raise UserError("data yaml not found", data_yaml)
    try:
        d = yaml.safe_load(_text(data_yaml, data_yaml))
    except yaml.YAMLError as e:
        raise UserError(f"not valid YAML ({str(e).splitlines()[0]})", data_yaml) from None
    if not isinstance(d, dict):
        raise UserError("data yaml is not a mapping", data_yaml)
    names = _yolo_names(d, data_yaml)
    root = data_yaml.parent
    if d.get("path") is not None and not isinstance(d.get("path"), str):
        raise UserError(f"'path' must be a folder, got {d.get('path')!r}", data_yaml)
    if d.get("path"):
        root = Path(d["path"]) if Path(d["path"]).is_absolute() else data_yaml.parent / d["path"]
    splits = {}
    fixer = BoxFixer(strict, data_yaml)
    for split in ("train", "val", "test", *extra_splits):
        if not d.get(split):
            continue
        imgs = []
        paths = _list_images(d[split], root, data_yaml)
        top = Path(os.path.commonpath([str(p.parent) for p in paths])) if paths else root
        for i, p in enumerate(paths):
            w, h = _image_size(p, data_yaml)
            im = Image(path=p, width=w, height=h, id=i + 1, file_name=p.relative_to(top).as_posix())
            lp = label_path(p)
            if lp.is_file():
                for ln_no, ln in enumerate(_text(lp, data_yaml).splitlines(), 1):
                    parts = ln.split()
                    if not parts:
                        continue
                    where = f"{lp}:{ln_no}"
                    if len(parts) != 5:
                        raise UserError(f"{where}: expected 'class cx cy w h', got {len(parts)} fields", data_yaml)
                    try:
                        vals = [float(v) for v in parts]
                    except ValueError:
                        raise UserError(f"{where}: not numbers: {ln.strip()}", data_yaml) from None
                    if not all(math.isfinite(v) for v in vals):
                        raise UserError(f"{where}: non-finite number in '{ln.strip()}'", data_yaml)
                    if not vals[0].is_integer():
                        raise UserError(f"{where}: class id {parts[0]} is not an integer", data_yaml)
                    c, cx, cy, bw, bh = int(vals[0]), *vals[1:]
                    if c < 0:
                        raise UserError(f"{where}: negative class id {c}", data_yaml)
                    if c >= len(names):
                        raise UserError(f"{where}: class id {c} >= nc={len(names)}", data_yaml)
                    if bw <= 0 or bh <= 0:
                        x, y = cx * w, cy * h  # no area: its corner is where it sits
                    else:
                        x, y = (cx - bw / 2) * w, (cy - bh / 2) * h
                    t = EDGE_TOL_NORM
                    if (bw > 0 and bh > 0 and cx - bw / 2 >= -t and cy - bh / 2 >= -t and cx + bw / 2 <= 1 + t
                            and cy + bh / 2 <= 1 + t):
                        im.boxes.append((c, x, y, bw * w, bh * h))  # inside (normalized rounding allowed)
                        continue
                    box = fixer.box(c, x, y, bw * w, bh * h, im, len(names), where, str(lp),
                                    f"line {ln_no} '{ln.strip()}'")
                    if box is not None:
                        im.boxes.append(box)
            imgs.append(im)
        splits["train" if split == "train" else split] = imgs
    cids = d.get("coco_category_ids")
    if cids is not None and not (isinstance(cids, list) and len(cids) == len(names) and all(_is_int(c) for c in cids)
                                 and len(set(cids)) == len(cids)):
        raise UserError(f"'coco_category_ids' must list {len(names)} distinct integers (one per name), got "
                        f"{str(cids)[:80]}", data_yaml)
    return fixer.finish(Dataset(names=names, splits=splits, source=data_yaml,
                                category_ids=list(cids) if cids else None))


# ---------------------------------------------------------------------------------------------- Pascal VOC
VOC_SKIP_SPLITS = ("trainval",)  # the union of train and val: read only when neither of them is there


def is_voc(p: Path) -> bool:
    return Path(p).is_dir() and (Path(p) / "Annotations").is_dir()


def _voc_text(node, tag: str, xml: Path, need: bool = True) -> str | None:
    el = node.find(tag)
    if el is None or el.text is None or not el.text.strip():
        if need:
            raise UserError(f"<{tag}> missing in <{node.tag}>", xml)
        return None
    return el.text.strip()


def _voc_num(node, tag: str, xml: Path, where: str) -> float:
    t = _voc_text(node, tag, xml)
    try:
        v = float(t)
    except ValueError:
        raise UserError(f"{where}: <{tag}> is not a number: {t!r}", xml) from None
    if not math.isfinite(v):
        raise UserError(f"{where}: <{tag}> is not finite: {t!r}", xml)
    return v


def _voc_split_files(root: Path) -> dict[str, Path]:
    """ImageSets/Main/<split>.txt, leaving out the per-class lists (<class>_<split>.txt) and trainval when train
    or val is there."""
    main = root / "ImageSets" / "Main"
    files = {f.stem: f for f in sorted(main.glob("*.txt")) if "_" not in f.stem} if main.is_dir() else {}
    if not files:
        raise UserError("a VOC directory needs ImageSets/Main/<split>.txt (train.txt, val.txt, test.txt, ...)", root)
    if "train" in files or "val" in files:
        for k in VOC_SKIP_SPLITS:
            files.pop(k, None)
    return files


def _voc_image(root: Path, stem: str, node, xml: Path) -> tuple[Path, str]:
    """Where a VOC image opens: JPEGImages/<filename> as the XML names it, else JPEGImages/<id>.<ext>."""
    fname = _voc_text(node, "filename", xml, need=False)
    if fname and (root / "JPEGImages" / fname).is_file():
        return root / "JPEGImages" / fname, fname
    for ext in IMG_EXTS:
        for e in (ext, ext.upper()):
            if (root / "JPEGImages" / (stem + e)).is_file():
                return root / "JPEGImages" / (stem + e), stem + e
    raise UserError(f"image missing: no JPEGImages/{fname or stem + '.jpg'} for {stem}", xml)


def read_voc(root: Path, strict: bool = False, names: list[str] | None = None) -> Dataset:
    """A Pascal VOC directory: Annotations/<id>.xml, JPEGImages/, ImageSets/Main/<split>.txt (one id a line).

    Boxes: VOC's devkit counts pixels from 1 and its xmax/ymax are inclusive, so a box covers xmax - xmin + 1
    pixels; in COCO's 0-based continuous coordinates that is [xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1].
    A box with xmax <= xmin or ymax <= ymin was drawn with no extent: it counts as having no area (dropped with a
    warning; refused with strict). `difficult` objects become ignore regions (iscrowd=1 in the COCO ground truth:
    pycocotools neither rewards nor punishes detections on them, as VOC's own evaluation leaves them out) and are
    not training labels. Classes: `names` (the recipe's data.names) in its order when given, and an object of
    another class is refused; otherwise every class the split files' annotations use, sorted by name.
    Image ids: 1, 2, ... in each split file's order; file names are VOC's own (JPEGImages/<filename>)."""
    root = Path(root)
    fixer = BoxFixer(strict, root)
    parsed: dict[str, list[tuple[str, Path]]] = {}
    for split, f in _voc_split_files(root).items():
        ids = [ln.split()[0] for ln in _text(f, f).splitlines() if ln.strip()]
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise UserError(f"image id {dup} is listed twice", f)
        parsed[split] = [(i, root / "Annotations" / f"{i}.xml") for i in ids]
    objects: dict[Path, tuple] = {}
    seen: set[str] = set()
    for split, items in parsed.items():
        for stem, xml in items:
            if xml in objects:
                continue
            if not xml.is_file():
                raise UserError(f"annotation missing for image id {stem}: {xml}", root / "ImageSets" / "Main" /
                                f"{split}.txt")
            try:
                node = ElementTree.parse(xml).getroot()
            except ElementTree.ParseError as e:
                raise UserError(f"not valid XML ({e})", xml) from None
            if node.tag != "annotation":
                raise UserError(f"not a VOC annotation: the root element is <{node.tag}>", xml)
            objs = []
            for k, o in enumerate(node.findall("object"), 1):
                where = f"object {k}"
                cls = _voc_text(o, "name", xml)
                b = o.find("bndbox")
                if b is None:
                    raise UserError(f"{where} ({cls}): <bndbox> missing", xml)
                v = [_voc_num(b, t, xml, f"{where} ({cls})") for t in ("xmin", "ymin", "xmax", "ymax")]
                diff = (_voc_text(o, "difficult", xml, need=False) or "0") not in ("0", "false", "False")
                objs.append((cls, v, diff))
                seen.add(cls)
            objects[xml] = (node, objs)
    if names is None:
        names = sorted(seen)
        if not names:
            raise UserError("no objects in any annotation: the class list cannot be read (name it in the recipe's "
                            "data.names)", root)
    else:
        names = [str(n) for n in names]
        unknown = sorted(seen - set(names))
        if unknown:
            xml = next(x for x, (_, objs) in objects.items() if any(o[0] in unknown for o in objs))
            raise UserError(f"class {unknown[0]!r} is not in data.names {names}", xml)
    idx = {n: i for i, n in enumerate(names)}
    splits = {}
    for split, items in parsed.items():
        imgs = []
        for i, (stem, xml) in enumerate(items, 1):
            node, objs = objects[xml]
            path, fname = _voc_image(root, stem, node, xml)
            w, h = _image_size(path, xml)
            size = node.find("size")
            if size is not None and _voc_text(size, "width", xml, need=False):
                dw, dh = (_voc_text(size, t, xml) for t in ("width", "height"))
                if (dw, dh) != (str(w), str(h)) and (dw, dh) != ("0", "0"):
                    raise UserError(f"<size> says {dw}x{dh} but {path.name} decodes to {w}x{h}", xml)
            im = Image(path=path, width=w, height=h, id=i, file_name=fname)
            for k, (cls, (x0, y0, x1, y1), diff) in enumerate(objs, 1):
                box = (idx[cls], x0 - 1, y0 - 1, x1 - x0 + 1 if x1 > x0 else 0.0, y1 - y0 + 1 if y1 > y0 else 0.0)
                what = f"{cls} [{x0:g}, {y0:g}, {x1:g}, {y1:g}]"
                if diff:
                    b = BoxFixer(False, root).box(*box, im, len(names), f"object {k}", str(xml), what)
                    if b is not None:
                        im.crowd.append(b)
                    continue
                b = fixer.box(*box, im, len(names), f"{xml}: object {k}", str(xml), what)
                if b is not None:
                    im.boxes.append(b)
            imgs.append(im)
        splits[split] = imgs
    return fixer.finish(Dataset(names=names, splits=splits, source=root))


# --------------------------------------------------------------------------------------------------- all
def load_dataset(path: str | Path, strict: bool = False, names: list[str] | None = None) -> Dataset:
    """Read a dataset in any of the three layouts (module docstring). `names` orders a VOC set's classes (the
    other layouts carry their own list and must agree with it)."""
    p = Path(path)
    if not p.exists():
        raise UserError("data path not found", p)
    if p.suffix in (".yaml", ".yml"):
        ds = read_yolo(p, strict)
    elif p.is_dir() and (p / "data.yaml").is_file() and not (p / "annotations").is_dir():
        ds = read_yolo(p / "data.yaml", strict)
    elif p.is_dir() and not (p / "annotations").is_dir() and not is_voc(p) and (yamls := _yolo_yamls(p)):
        if len(yamls) > 1:
            raise UserError(f"a YOLO directory with {len(yamls)} data yamls ({', '.join(y.name for y in yamls)}): "
                            f"give the one to read", p)
        ds = read_yolo(yamls[0], strict)  # ultralytics' own sets name it after the set (coco8.yaml)
    elif is_voc(p):
        return read_voc(p, strict, names)
    elif p.is_file() and p.suffix.lower() != ".json":
        raise UserError("not a dataset: expected a YOLO data yaml, a COCO directory or instances JSON, or a Pascal "
                        "VOC directory", p)
    else:
        ds = read_coco(p, strict)
    if names is not None and [str(n) for n in names] != ds.names:
        if sorted(str(n) for n in names) != sorted(ds.names):
            raise UserError(f"data.names {list(names)} differs from the dataset's own classes {ds.names}", p)
        ds = reordered(ds, [str(n) for n in names])
    return ds


def _yolo_yamls(d: Path) -> list[Path]:
    """The YOLO data yamls at the top of directory `d`: yaml files with a `names` key beside an images/ folder."""
    if not (d / "images").is_dir():
        return []
    found = []
    for f in sorted([*d.glob("*.yaml"), *d.glob("*.yml")]):
        try:
            doc = yaml.safe_load(f.read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            continue
        if isinstance(doc, dict) and "names" in doc:
            found.append(f)
    return found


def reordered(ds: Dataset, names: list[str]) -> Dataset:
    """The dataset with its classes in the order of `names` (the same names): every box's class index remapped, each
    class keeping its own category id."""
    import dataclasses

    new = {n: i for i, n in enumerate(names)}
    old_to_new = [new[n] for n in ds.names]

    def remap(boxes):
        return [(old_to_new[c], *rest) for c, *rest in boxes]

    splits = {k: [dataclasses.replace(im, boxes=remap(im.boxes), crowd=remap(im.crowd)) for im in v]
              for k, v in ds.splits.items()}
    cat_ids = [ds.cat_id(ds.names.index(n)) for n in names]
    return dataclasses.replace(ds, names=list(names), splits=splits, category_ids=cat_ids)


def _link(target: Path, link: Path) -> None:
    """Relative symlink: it survives the rename of the temp directory it is made in."""
    os.symlink(os.path.relpath(Path(target).resolve(), link.parent.resolve()), link)


def _place(split_dir: Path, im: Image, ds: Dataset) -> Path:
    """Where a converted copy puts an image: its file_name under the split folder, sub-folders kept."""
    rel = Path(im.file_name)
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise UserError(f"image file_name {im.file_name!r} must be a relative path inside the image folder",
                        ds.source)
    dest = split_dir / rel
    if dest.exists() or dest.is_symlink():
        raise UserError(f"two images named {im.file_name} in one split", ds.source)
    dest.parent.mkdir(parents=True, exist_ok=True)
    return dest


def write_coco(ds: Dataset, dest: Path) -> Path:
    """COCO layout: annotations/instances_<split>.json + images/<split>/ (symlinks to the originals)."""
    with atomic_dir(dest) as tmp:
        (tmp / "annotations").mkdir()
        for split in ds.splits:
            (tmp / "images" / split).mkdir(parents=True)
            for im in ds.splits[split]:
                _link(im.path, _place(tmp / "images" / split, im, ds))
            (tmp / "annotations" / f"instances_{split}.json").write_text(json.dumps(ds.coco_dict(split)))
    return Path(dest)


def write_yolo(ds: Dataset, dest: Path) -> Path:
    """YOLO layout: images/<split>/ (symlinks), labels/<split>/*.txt, data.yaml. Returns the data.yaml path."""
    with atomic_dir(dest) as tmp:
        meta = {"names": dict(enumerate(ds.names))}  # no 'path': readers take the yaml's own directory
        if ds.category_ids:
            meta["coco_category_ids"] = list(ds.category_ids)
        for split, imgs in ds.splits.items():
            (tmp / "images" / split).mkdir(parents=True)
            (tmp / "labels" / split).mkdir(parents=True)
            stems = set()
            for im in imgs:
                place = _place(tmp / "images" / split, im, ds)
                stem = place.with_suffix("").relative_to(tmp / "images" / split).as_posix()
                if stem in stems:  # a.jpg and a.png would share labels/a.txt
                    raise UserError(f"two images named {stem}.* in split {split}: their labels would collide",
                                    ds.source)
                stems.add(stem)
                _link(im.path, place)
                lines = [f"{c} {(x + w / 2) / im.width:.10f} {(y + h / 2) / im.height:.10f} "
                         f"{w / im.width:.10f} {h / im.height:.10f}" for c, x, y, w, h in im.boxes]
                lab = tmp / "labels" / split / (stem + ".txt")
                lab.parent.mkdir(parents=True, exist_ok=True)
                lab.write_text("\n".join(lines) + "\n" * bool(lines))
            meta[split] = f"images/{split}"
        (tmp / "data.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))
    return Path(dest) / "data.yaml"
