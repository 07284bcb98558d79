"""Datasets as users have them: COCO instances JSON and the ultralytics YOLO-txt layout (data yaml).

Both are read into one in-memory form (`Dataset`), validated, and written back out in either layout:
the ultralytics trainer wants YOLO txt, pycocotools wants COCO JSON. Class names, COCO category ids and
image file names survive the round trip.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import yaml

from pipeline.core.errors import UserError
from pipeline.core.store import atomic_dir, sha256_json

IMG_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
EDGE_TOL_PX = 1.0  # COCO boxes may overhang the image by rounding; more than this is an error
EDGE_TOL_NORM = 1e-3


@dataclass
class Image:
    path: Path
    width: int
    height: int
    id: int
    boxes: list[tuple[int, float, float, float, float]] = field(default_factory=list)  # (class idx, x, y, w, h) px
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
        images, anns = [], []
        for im in self.split(split):
            images.append({"id": im.id, "file_name": im.file_name, "width": im.width, "height": im.height})
            for c, x, y, w, h in im.boxes:
                anns.append({"id": len(anns) + 1, "image_id": im.id, "category_id": self.cat_id(c),
                             "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
        cats = [{"id": self.cat_id(i), "name": n} for i, n in enumerate(self.names)]
        return {"images": images, "annotations": anns, "categories": cats}

    def digest(self, split: str) -> str:
        """Digest of a split's content: image bytes (by file digest) and labels."""
        from pipeline.core.store import sha256_file

        return sha256_json({"names": self.names,
                            "images": [(sha256_file(im.path), im.boxes) for im in self.split(split)]})


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


def _check_box(c: int, x: float, y: float, w: float, h: float, im: Image, nc: int, where: str, source: Path) -> None:
    if not 0 <= c < nc:
        raise UserError(f"{where}: class id {c} is not in 0..{nc - 1} (nc={nc})", source)
    if not np.isfinite([x, y, w, h]).all():
        raise UserError(f"{where}: bbox {[x, y, w, h]} holds a non-finite number", source)
    if w <= 0 or h <= 0:
        raise UserError(f"{where}: degenerate bbox {[x, y, w, h]} (width and height must be > 0)", source)
    if x < -EDGE_TOL_PX or y < -EDGE_TOL_PX or x + w > im.width + EDGE_TOL_PX or y + h > im.height + EDGE_TOL_PX:
        raise UserError(f"{where}: bbox [x={x:g}, y={y:g}, w={w:g}, h={h:g}] lies outside the "
                        f"{im.width}x{im.height} image", source)


# ----------------------------------------------------------------------------------------------- COCO JSON
def read_coco_split(ann_file: Path, images_dir: Path | None = None,
                    names: list[str] | None = None, category_ids: list[int] | None = None):
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
        if a.get("iscrowd", 0):
            continue
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
        _check_box(c, x, y, w, h, im, len(names), f"annotation {a.get('id')} ({im.path.name})", ann_file)
        im.boxes.append((c, x, y, w, h))
    return list(images.values()), names, category_ids


def read_coco(root: Path) -> Dataset:
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
            raise UserError("no annotations/instances_<split>.json found", root)
        base = root
    names = category_ids = None
    splits = {}
    for split, f in ann_files.items():
        stem = f.stem[len("instances_"):] if f.stem.startswith("instances_") else split
        cands = [base / "images" / stem, base / stem, base / "images" / split, base / "images", f.parent]
        img_dir = next((c for c in cands if c.is_dir()), f.parent)
        imgs, names, category_ids = read_coco_split(f, img_dir, names, category_ids)
        splits[split] = imgs
    return Dataset(names=names, splits=splits, source=root, category_ids=category_ids)


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


def read_yolo(data_yaml: Path) -> Dataset:
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
    for split in ("train", "val", "test"):
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
                    if not 0 <= c < len(names):
                        raise UserError(f"{where}: class id {c} >= nc={len(names)}" if c >= 0 else
                                        f"{where}: negative class id {c}", data_yaml)
                    if bw <= 0 or bh <= 0:
                        raise UserError(f"{where}: degenerate bbox (w={bw:g}, h={bh:g})", data_yaml)
                    t = EDGE_TOL_NORM
                    if cx - bw / 2 < -t or cy - bh / 2 < -t or cx + bw / 2 > 1 + t or cy + bh / 2 > 1 + t:
                        raise UserError(f"{where}: bbox {cx:g} {cy:g} {bw:g} {bh:g} lies outside the image "
                                        f"(normalized coordinates must stay in [0, 1])", data_yaml)
                    im.boxes.append((c, (cx - bw / 2) * w, (cy - bh / 2) * h, bw * w, bh * h))
            imgs.append(im)
        splits["train" if split == "train" else split] = imgs
    cids = d.get("coco_category_ids")
    if cids is not None and not (isinstance(cids, list) and len(cids) == len(names) and all(_is_int(c) for c in cids)
                                 and len(set(cids)) == len(cids)):
        raise UserError(f"'coco_category_ids' must list {len(names)} distinct integers (one per name), got "
                        f"{str(cids)[:80]}", data_yaml)
    return Dataset(names=names, splits=splits, source=data_yaml, category_ids=list(cids) if cids else None)


# --------------------------------------------------------------------------------------------------- both
def load_dataset(path: str | Path) -> Dataset:
    p = Path(path)
    if not p.exists():
        raise UserError("data path not found", p)
    if p.suffix in (".yaml", ".yml"):
        return read_yolo(p)
    if p.is_dir() and (p / "data.yaml").is_file() and not (p / "annotations").is_dir():
        return read_yolo(p / "data.yaml")
    return read_coco(p)


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
