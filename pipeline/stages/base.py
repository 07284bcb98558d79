"""`make base`: train the default base model (YOLO11n from its yaml) on the run's dataset with the stock
trainer, and ship it as models/base/<name>.pt (FP32) with its training history beside it, so a fresh clone's
`make pipeline` need not spend an hour of CPU on it and anyone can reproduce it."""

from __future__ import annotations

import csv
import json
import shutil
import tempfile
from pathlib import Path

from pipeline.core.stage import Context, console, lib_versions
from pipeline.core.store import atomic_path, sha256_file


def train_base(ctx: Context, dest: Path, epochs: int | None = None) -> Path:
    from pipeline.adapters import ultralytics_yolo as ua

    b = ctx.recipe.base
    epochs = epochs or b.epochs
    data_yaml = ctx.output("data", "yolo") / "data.yaml"
    work = Path(tempfile.mkdtemp(prefix="base-", dir=ctx.run_dir))
    console.print(f"training {ctx.recipe.model.arch} for {epochs} epochs at {ctx.recipe.model.imgsz}px on {data_yaml}")
    best = ua.train(ctx.recipe.model.arch, data_yaml, work / "train", epochs=epochs, imgsz=ctx.recipe.model.imgsz,
                    batch=b.batch, seed=b.seed, workers=b.workers, device=b.device, patience=0)
    history = []
    with open(work / "train" / "results.csv") as f:
        for row in csv.DictReader(f):
            history.append({"epoch": int(float(row["epoch"])), "map50_95": float(row["metrics/mAP50-95(B)"]),
                            "map50": float(row["metrics/mAP50(B)"])})
    with atomic_path(dest) as tmp:
        shutil.copyfile(best, tmp)
    meta = {"arch": ctx.recipe.model.arch, "imgsz": ctx.recipe.model.imgsz, "epochs": epochs, "batch": b.batch,
            "seed": b.seed, "data": ctx.recipe.data.model_dump(), "sha256": sha256_file(dest), "history": history,
            "env": lib_versions()}
    with atomic_path(dest.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps(meta, indent=1))
    shutil.rmtree(work, ignore_errors=True)
    return dest
