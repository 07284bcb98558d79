"""`data` stage: the built-in synthetic dataset, or a user's COCO / YOLO dataset, validated and laid out both
ways: yolo/data.yaml for the ultralytics trainer and validator, coco/ as COCO JSON; and the one evaluation set
(eval/: the bench split's images with their digests and the dataset's own ids, and its ground truth) that bench,
calibration and the deploy bundle read. The converted YOLO copy numbers images in file order; the eval set keeps
the source's ids, so predictions can never be paired with another image's ground truth."""

from __future__ import annotations

import json
from pathlib import Path

from rich.markup import escape

from pipeline.core.errors import UserError
from pipeline.core.stage import Context, StageResult, console, run_stage
from pipeline.core.store import StageRecord
from pipeline.data.evalset import EvalSet, write_eval_set
from pipeline.data.formats import Dataset, load_dataset, write_coco, write_yolo
from pipeline.data.synthetic import SynthSpec, generate

VERSION = 2  # 2: the eval set (the source's image ids, not the YOLO copy's file order)


def _user_dataset(ctx: Context) -> Dataset:
    d = ctx.recipe.data
    return load_dataset(d.source, strict=d.strict, names=d.names)


def warn_dirty(ds: Dataset) -> None:
    """One warning line per annotation file whose boxes were clipped or dropped."""
    for w in ds.warnings:
        console.print(f"[yellow]warning:[/yellow] {escape(w)}")
    if ds.warnings:
        c = ds.dirty
        console.print(f"{ds.source}: {c['dropped']} box(es) dropped and {c['clipped']} clipped in {c['files']} "
                      f"file(s) (data.strict: true refuses them instead)")


def run(ctx: Context) -> StageRecord:
    src = ctx.recipe.data.source
    if src == "synthetic":
        config = {"source": "synthetic", "spec": SynthSpec(**ctx.recipe.data.synthetic.model_dump()).as_dict()}
    else:
        ds = _user_dataset(ctx)  # validates: a bad dataset fails here, before anything is written
        warn_dirty(ds)
        config = {"source": str(Path(src).resolve()), "content": {s: ds.digest(s) for s in ds.splits}}
    sel = ctx.recipe.data.selection
    if sel.images:  # only then: runs without a selection split keep their keys
        config["selection"] = sel.model_dump()

    def fn(ctx: Context, out: Path, inputs) -> StageResult:
        if src == "synthetic":
            generate(out / "synthetic", SynthSpec(**ctx.recipe.data.synthetic.model_dump()))
            d = load_dataset(out / "synthetic")
        else:
            d = _user_dataset(ctx)
        split = ctx.recipe.bench.split
        if not d.splits.get(split):  # a user's dataset was checked before any stage ran; the synthetic one here
            raise UserError(f"bench.split '{split}': the dataset has no images in it (its splits: "
                            f"{', '.join(f'{k} {len(v)}' for k, v in d.splits.items())})", ctx.recipe_path)
        outputs = {"yolo": "yolo", "coco": "coco", "eval": "eval", "meta": "dataset.json"}
        if sel.images:
            d = carve_selection(d, split, sel.images, sel.seed, blame=ctx.recipe_path)
        write_yolo(d, out / "yolo")
        write_coco(d, out / "coco")
        for name, sp in (("eval", split), ("selection", "selection")):
            if sp not in d.splits:
                continue
            (out / name).mkdir()
            write_eval_set(d, sp, out / name, lambda im, sp=sp: out / "yolo" / "images" / sp / im.file_name)
            EvalSet.load(out / name)  # read back as every consumer will: digests, ids, sizes
            outputs[name] = name
        meta = {"names": d.names, "category_ids": [d.cat_id(i) for i in range(d.nc)],
                "splits": {s: len(v) for s, v in d.splits.items()},
                "boxes": {s: sum(len(i.boxes) for i in v) for s, v in d.splits.items()},
                "ignore_regions": {s: sum(len(i.crowd) for i in v) for s, v in d.splits.items()},
                "dirty_boxes": d.dirty}
        if sel.images:
            meta["selection"] = {**sel.model_dump(), "carved_from": "train"}
        (out / "dataset.json").write_text(json.dumps(meta, indent=1))
        sp = meta["splits"]
        summary = (", ".join(f"{sp[k]} {k}" for k in sp) + f" images, {sum(meta['boxes'].values())} boxes, "
                   f"{len(d.names)} classes")
        return StageResult(outputs=outputs, metrics=meta, summary=summary)

    return run_stage(ctx, "data", VERSION, config, {}, fn)


def dataset(ctx: Context) -> Dataset:
    """The run's dataset, read back from the data stage's YOLO layout (for training-side uses: its image ids follow
    file order; anything scored against ground truth reads `eval_set`), with its selection split where it has one."""
    from pipeline.data.formats import read_yolo

    return read_yolo(ctx.output("data", "yolo") / "data.yaml", extra_splits=("selection",))


def eval_set(ctx: Context, verify: bool = True) -> EvalSet:
    """The run's evaluation set: images, their digests and the dataset's own ids, with their ground truth."""
    return EvalSet.load(ctx.output("data", "eval"), verify=verify)


def carve_selection(d: Dataset, eval_split: str, n: int, seed: int, blame: Path | str | None = None) -> Dataset:
    """`d` with a seeded sample of n train images (none whose content is in the eval split) moved to a 'selection'
    split: what the recipe's choices are compared on, never trained on. Too few train images is an error naming
    `blame` (the recipe that sets the key) or else the dataset."""
    import dataclasses

    import numpy as np

    from pipeline.core.store import sha256_file

    train = d.split("train")
    evals = {sha256_file(im.path) for im in d.splits.get(eval_split, [])}
    order = np.random.default_rng(seed).permutation(len(train))
    picked = [int(i) for i in order if sha256_file(train[i].path) not in evals][:n]
    if len(picked) < n or len(train) - n < 1:
        raise UserError(f"data.selection.images={n}: the train split has {len(train)} images ({len(picked)} not in "
                        f"the '{eval_split}' split); keep some to train on", blame or d.source)
    chosen = set(picked)
    return dataclasses.replace(d, splits={**d.splits, "train": [im for i, im in enumerate(train) if i not in chosen],
                                          "selection": [train[i] for i in sorted(chosen)]})


def preflight(ctx: Context) -> None:
    """A dataset of the user's is read and checked before any stage writes anything (one line naming the file)."""
    if ctx.recipe.data.source != "synthetic":
        d = ctx.recipe.data
        load_dataset(d.source, strict=d.strict, names=d.names).split(ctx.recipe.bench.split)


def held_out_images(ctx: Context, n: int, seed: int, why: str = "prune.mode/steps"):
    """(a seeded sample of n train images that are not in the eval split (checked by content hash), the dataset)."""
    import numpy as np

    from pipeline.core.store import sha256_file

    ds = dataset(ctx)
    if "train" not in ds.splits or not ds.split("train"):
        raise UserError(f"{why} need train images to measure accuracy on; the dataset has none",
                        ctx.recipe.data.source)
    eval_hashes = set(eval_set(ctx, verify=False).hashes())  # the images bench scores, by content
    train = ds.split("train")
    order = np.random.default_rng(seed).permutation(len(train))
    picked = [train[i] for i in order if sha256_file(train[i].path) not in eval_hashes][:n]
    return picked, ds


def meta(ctx: Context) -> dict:
    return json.loads(ctx.output("data", "meta").read_text())
