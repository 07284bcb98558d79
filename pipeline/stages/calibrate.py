"""`calibrate` stage: the INT8 calibration set, preprocessed exactly as the device will (letterbox, RGB, /255),
written once as calib.npy with a digest over the image bytes and the preprocessing spec.

Images come from the train split (a seeded sample) or a list under calib/; never from the evaluation split:
any overlap with the images bench evaluates is refused by content hash. A second, disjoint set of images
("tuning") with its COCO ground truth serves the accuracy-aware INT8 search, so no decision is ever made on the
evaluation images: the selection split where the recipe carves one (data.selection: images no training saw, so
the search's drop estimate is not flattered by images the model fitted), else a sample of the other train images.
The stage key covers the images' contents, so a calibration tensor whose images changed is rebuilt, never reused
by path."""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np

from pipeline.core.errors import UserError
from pipeline.core.stage import Context, StageResult, run_stage
from pipeline.core.store import StageRecord, sha256_file, sha256_json

VERSION = 2


def _list_file_images(path: Path) -> list[Path]:
    """The images a calibration list names (one path a line, relative to the list; # comments), each checked to be
    an image that decodes (the CLI's preflight calls this before any stage writes anything)."""
    if not path.is_file():
        raise UserError("calibration image list not found", path)
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise UserError("not a calibration image list (a text file of image paths, one a line)", path) from None
    out = []
    for ln in text.splitlines():
        ln = ln.strip()
        if ln and not ln.startswith("#"):
            p = Path(ln) if Path(ln).is_absolute() else path.parent / ln
            if not p.is_file():
                raise UserError(f"calibration image missing: {p}", path)
            data = np.fromfile(str(p), dtype=np.uint8)
            if not data.size or cv2.imdecode(data, cv2.IMREAD_COLOR) is None:
                raise UserError(f"calibration image does not decode as an image: {p}", path)
            out.append(p)
    if not out:
        raise UserError("the calibration image list names no images", path)
    return out


def select(ctx: Context):
    """(calibration images, tuning images as dataset Images) — validated, before anything is written."""
    from pipeline.stages.data import dataset, eval_set

    c = ctx.recipe.calib
    ds = dataset(ctx)
    eval_hashes = eval_set(ctx, verify=False).hashes()  # the images bench scores, by content
    train = ds.split("train") if "train" in ds.splits else []
    rng = np.random.default_rng(c.seed)
    order = rng.permutation(len(train)) if train else np.array([], int)
    if c.source == "train":
        if not train:
            raise UserError("calib.source is 'train' but the dataset has no train images: name a list of calibration "
                            "images (calib.source: calib/<list>.txt) or add a train split", ctx.recipe.data.source)
        calib = [train[i].path for i in order[: c.count]]
    else:
        calib = _list_file_images(Path(c.source))[: c.count]
    for p in calib:
        h = sha256_file(p)
        if h in eval_hashes:
            raise UserError(f"calibration image {p} is also an evaluation image ({eval_hashes[h]}): calibrating on "
                            f"the images bench scores would leak them", c.source if c.source != "train" else p)
    if len(calib) < c.min_count and not c.force:
        raise UserError(f"only {len(calib)} calibration images (< calib.min_count={c.min_count}): INT8 ranges from "
                        f"so few images are unreliable; add images or set calib.force=true",
                        ctx.recipe_path if c.source == "train" else c.source)
    if tuning_from(ds) == "selection":  # data.selection: never trained on (carve_selection keeps eval images out)
        rest = ds.split("selection")
    elif c.source == "train":
        rest = [train[i] for i in order[c.count:]]
    else:
        calib_h = {sha256_file(p) for p in calib}
        rest = [train[i] for i in order if sha256_file(train[i].path) not in calib_h]
    tuning = [im for im in rest if sha256_file(im.path) not in eval_hashes][: c.tuning_images]
    return calib, tuning, ds


def tuning_from(ds) -> str:
    """Where the accuracy-aware search's tuning images come from: the selection split where the run carves one."""
    return "selection" if "selection" in ds.splits else "train"


def preflight(ctx: Context) -> None:
    """A calibration list of the user's (calib.source): images that decode, checked before any stage writes."""
    if ctx.recipe.calib.source != "train":
        _list_file_images(Path(ctx.recipe.calib.source))


def run(ctx: Context) -> StageRecord:
    from pipeline.eval.detect import PrePost

    calib, tuning, ds = select(ctx)
    spec = PrePost.from_recipe(ctx.recipe)
    config = {**ctx.recipe.calib.model_dump(), "prepost": spec.as_dict()}
    source = tuning_from(ds)
    if source == "selection":  # only then: runs without a selection split keep their keys
        config["tuning_from"] = source
    inputs = {"data": ctx.output("data", "yolo")}
    if ctx.recipe.calib.source != "train":
        inputs["list"] = Path(ctx.recipe.calib.source)

    def fn(ctx: Context, out: Path, inputs) -> StageResult:
        from pipeline.eval.detect import letterbox

        arr = np.concatenate([letterbox(cv2.imread(str(p)), spec)[0] for p in calib]).astype(np.float32)
        np.save(out / "calib.npy", arr)
        # paths relative to the run directory: a run (or clone) that moves keeps working from the cache
        imgs = [{"path": run_relative(ctx, p), "sha256": sha256_file(p)} for p in calib]
        digest = sha256_json({"images": [i["sha256"] for i in imgs], "prepost": spec.as_dict()})
        (out / "calib.json").write_text(json.dumps({"digest": digest, "images": imgs, "prepost": spec.as_dict(),
                                                    "shape": list(arr.shape)}, indent=1))
        (out / "calib_images.txt").write_text("\n".join(run_relative(ctx, p) for p in calib) + "\n")
        gt = {"images": [], "annotations": [], "categories": [{"id": ds.cat_id(i), "name": n}
                                                               for i, n in enumerate(ds.names)]}
        for im in tuning:
            gt["images"].append({"id": im.id, "file_name": run_relative(ctx, im.path), "width": im.width,
                                 "height": im.height})
            for c, x, y, w, h in im.boxes:
                gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": im.id,
                                          "category_id": ds.cat_id(c), "bbox": [x, y, w, h], "area": w * h,
                                          "iscrowd": 0})
        (out / "tuning_gt.json").write_text(json.dumps(gt))
        return StageResult(outputs={"calib": "calib.npy", "meta": "calib.json", "tuning": "tuning_gt.json",
                                    "list": "calib_images.txt"},
                           metrics={"images": len(calib), "tuning_images": len(tuning), "digest": digest,
                                    "tuning_from": source},
                           summary=f"{len(calib)} calibration images, {len(tuning)} tuning images "
                                   f"({source}, not eval)")

    return run_stage(ctx, "calibrate", VERSION, config, inputs, fn)


def run_relative(ctx: Context, path) -> str:
    return os.path.relpath(os.path.abspath(path), os.path.abspath(ctx.run_dir))


def resolve(ctx: Context, path: str) -> Path:
    """A path stored by this stage (relative to the run directory) as a path that opens here."""
    return Path(path) if os.path.isabs(path) else Path(os.path.abspath(ctx.run_dir)) / path


def ultralytics_calib_yaml(ctx: Context, dest_dir: Path) -> Path:
    """A data yaml whose train/val split is exactly the calibration images (absolute paths, written where it is
    used): ultralytics' INT8 exporter calibrates on a data yaml's split."""
    from pipeline.stages.data import dataset

    lst = ctx.output("calibrate", "list").read_text().split()
    dest_dir = Path(os.path.abspath(dest_dir))
    (dest_dir / "calib_images.txt").write_text("\n".join(str(resolve(ctx, p)) for p in lst) + "\n")
    y = dest_dir / "calib_data.yaml"
    y.write_text(json.dumps({"train": str(dest_dir / "calib_images.txt"), "val": str(dest_dir / "calib_images.txt"),
                             "names": dict(enumerate(dataset(ctx).names))}))
    return y


def verify(ctx: Context) -> dict:
    """Re-hash the calibration images: a calib.npy whose images changed must not be used."""
    meta = json.loads(ctx.output("calibrate", "meta").read_text())
    for im in meta["images"]:
        p = resolve(ctx, im["path"])
        if not p.is_file() or sha256_file(p) != im["sha256"]:
            raise UserError(f"calibration image {im['path']} changed since calib.npy was made: re-run calibrate "
                            f"(`make calibrate`)", ctx.output("calibrate", "calib"))
    return meta
