"""`load` stage: a user's YOLO11 `.pt`, or a `.yaml` architecture built with the dataset's class count,
re-saved as an FP32 ultralytics checkpoint with its parameter and MAC counts."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.core.errors import UserError
from pipeline.core.stage import Context, StageResult, run_stage
from pipeline.core.store import StageRecord
from pipeline.stages import data as data_stage

VERSION = 1


def weights_spec(ctx: Context) -> str:
    w = ctx.recipe.model.weights or ctx.recipe.model.arch
    if not str(w).endswith((".yaml", ".yml")) and not Path(w).is_file():
        hint = " (the default base model: `make base` trains it)" if "models/base" in str(w) else ""
        raise UserError(f"model file not found{hint}", w)
    return w


def run(ctx: Context) -> StageRecord:
    spec = weights_spec(ctx)
    meta = data_stage.meta(ctx)
    config = {"model": ctx.recipe.model.model_dump(), "names": meta["names"]}
    inputs = {} if spec.endswith((".yaml", ".yml")) else {"weights": Path(spec)}

    def fn(ctx: Context, out: Path, inputs) -> StageResult:
        from pipeline.adapters import ultralytics_yolo as ua

        if "weights" in inputs:
            model = ua.load_detection_model(inputs["weights"])
            nc = int(model.model[-1].nc)
            if nc != len(meta["names"]):
                raise UserError(f"the model predicts {nc} classes but the dataset has {len(meta['names'])}",
                                inputs["weights"])
        else:
            model = ua.build_from_yaml(spec, nc=len(meta["names"]), names=meta["names"])
        stats = ua.model_stats(model, ctx.recipe.model.imgsz)
        ua.save_checkpoint(model, out / "model.pt")
        info = {**stats, "nc": len(meta["names"]), "names": ua.names_of(model) or meta["names"], "source": spec}
        (out / "model.json").write_text(json.dumps(info, indent=1))
        return StageResult(outputs={"model": "model.pt", "info": "model.json"}, metrics=stats)

    return run_stage(ctx, "load", VERSION, config, inputs, fn)
