"""The evaluation set: one artifact, written once by the data stage, that everything which scores a model or must
keep away from the scored images reads (bench, the calibration overlap check, the prune stage's held-out sample,
the deploy bundle, the device bench). Images and ground truth are written together, so they cannot drift apart.

    <data stage>/eval/eval_set.json     split, names, category ids, and per image: the file (relative to the data
                                        stage's directory), its sha256, its COCO id, file_name, width, height
    <data stage>/eval/ground_truth.json COCO instances JSON of exactly those images, with the dataset's own image
                                        and category ids (a user's COCO file keeps its ids end to end)

numpy-free, torch-free: the Jetson side reads it as it is.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.errors import UserError
from pipeline.core.store import sha256_file, sha256_json

SCHEMA = "yolo-edge/eval-set/1"


@dataclass(frozen=True)
class EvalImage:
    path: str  # where it opens from here
    id: int  # the dataset's own image id (COCO's, or file order for the YOLO layout)
    file_name: str = ""
    width: int = 0
    height: int = 0
    sha256: str = ""


@dataclass
class EvalSet:
    split: str
    names: list[str]
    category_ids: list[int]  # COCO category id of each class index
    images: list[EvalImage]
    ground_truth: dict
    root: Path  # the directory eval_set.json lives in

    @property
    def digest(self) -> str:
        return sha256_json({"images": [(i.sha256, i.id, i.file_name) for i in self.images],
                            "ground_truth": self.ground_truth})

    def hashes(self) -> dict[str, str]:
        """sha256 -> file name of every evaluation image (for overlap checks by content)."""
        return {i.sha256: i.file_name for i in self.images}

    @classmethod
    def load(cls, root: str | Path, verify: bool = True) -> EvalSet:
        """Read an eval set; with verify, every image is re-hashed and every ground-truth image must be listed
        with the same id, file name and size (a mismatch is an error, never a silent re-pairing)."""
        root = Path(root)
        f = root / "eval_set.json"
        if not f.is_file():
            raise UserError("eval set not found (run the data stage)", f)
        meta = json.loads(f.read_text())
        if meta.get("schema") != SCHEMA:
            raise UserError(f"not an eval set of schema {SCHEMA} (got {meta.get('schema')!r})", f)
        gt = json.loads((root / meta["ground_truth"]).read_text())
        base = root / meta.get("base", "..")
        images = []
        for rec in meta["images"]:
            p = Path(os.path.normpath(base / rec["file"]))
            if verify:
                if not p.is_file():
                    raise UserError(f"evaluation image {rec['file_name']} is missing: {p}", f)
                if sha256_file(p) != rec["sha256"]:
                    raise UserError(f"evaluation image {rec['file_name']} changed since the eval set was written "
                                    f"(sha256 differs): re-run the data stage", p)
            images.append(EvalImage(str(p), rec["id"], rec["file_name"], rec["width"], rec["height"], rec["sha256"]))
        es = cls(split=meta["split"], names=meta["names"], category_ids=meta["category_ids"], images=images,
                 ground_truth=gt, root=root)
        es.check()
        return es

    def check(self) -> None:
        """The ground truth describes exactly these images, by id, file name and size."""
        gt_imgs = {g["id"]: g for g in self.ground_truth["images"]}
        if len(gt_imgs) != len(self.images):
            raise UserError(f"ground truth lists {len(gt_imgs)} images, the eval set {len(self.images)}", self.root)
        for im in self.images:
            g = gt_imgs.get(im.id)
            if g is None or (g["file_name"], g["width"], g["height"]) != (im.file_name, im.width, im.height):
                raise UserError(f"eval set image {im.id} ({im.file_name}) does not match the ground truth's "
                                f"{g and (g['file_name'], g['width'], g['height'])}", self.root)
        cats = sorted(c["id"] for c in self.ground_truth["categories"])
        if cats != sorted(self.category_ids):
            raise UserError(f"ground truth categories {cats} differ from the eval set's {self.category_ids}", self.root)


def write_eval_set(ds, split: str, dest: Path, locate) -> dict:
    """Write eval_set.json + ground_truth.json of `ds`'s split into `dest` (an existing directory).
    `locate(image) -> Path` says where each image opens (e.g. inside the data stage's converted copy); paths are
    stored relative to dest's parent. Returns eval_set.json's content."""
    images = ds.split(split)
    gt = ds.coco_dict(split)
    recs = []
    for im in images:
        p = Path(locate(im))
        recs.append({"file": os.path.relpath(p, dest.parent), "sha256": sha256_file(p), "id": im.id,
                     "file_name": im.file_name, "width": im.width, "height": im.height})
    meta = {"schema": SCHEMA, "split": split, "names": ds.names, "category_ids": [ds.cat_id(i) for i in range(ds.nc)],
            "base": "..", "ground_truth": "ground_truth.json", "images": recs}
    (dest / "ground_truth.json").write_text(json.dumps(gt))
    (dest / "eval_set.json").write_text(json.dumps(meta, indent=1))
    return meta

