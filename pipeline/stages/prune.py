"""`prune` stage: structured DepGraph pruning of the loaded model to a MACs target (or channel ratio).

Writes pruned.pt (an FP32 ultralytics checkpoint that plain `YOLO(path)` loads), history.json (Torch-Pruning's
pruning history: replayed on the base model it rebuilds the pruned architecture) and plan.json (the spec, the
search trials, requested vs effective MACs, and every conv's channel counts)."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.core.stage import Context, StageResult, console, run_stage
from pipeline.core.store import StageRecord

VERSION = 1


def spec_of(ctx: Context):
    from pipeline.adapters.yolo11_prune import PruneSpec

    c = ctx.recipe.prune
    if c.ratio is not None:
        return PruneSpec(ratio=c.ratio, importance=c.importance, global_pruning=c.global_pruning,
                         isomorphic=c.isomorphic, round_to=c.round_to, max_layer_ratio=c.max_layer_ratio)
    return PruneSpec(macs_target=c.macs_target, tolerance=c.tolerance, importance=c.importance,
                     global_pruning=c.global_pruning, isomorphic=c.isomorphic, round_to=c.round_to,
                     max_layer_ratio=c.max_layer_ratio)


def run(ctx: Context) -> StageRecord:
    spec = spec_of(ctx)
    from pipeline.adapters import yolo11_prune as yp

    config = {**ctx.recipe.prune.model_dump(), "imgsz": ctx.recipe.model.imgsz}
    inputs = {"model": ctx.output("load", "model")}

    def fn(ctx: Context, out: Path, inputs) -> StageResult:
        from pipeline.adapters import ultralytics_yolo as ua

        model = ua.load_detection_model(inputs["model"])
        grads_fn = None
        if spec.importance == "taylor":
            grads_fn = ua.taylor_grads_fn(ctx.output("data", "yolo") / "data.yaml", ctx.recipe.model.imgsz,
                                          ctx.recipe.prune.taylor_batches)
        pruned, history, info = yp.prune(model, ctx.recipe.model.imgsz, spec, grads_fn=grads_fn,
                                         log=lambda s: console.print(s))
        pruned.names = model.names
        meta = {"spec": spec.__dict__, **info}
        ua.save_checkpoint(pruned, out / "pruned.pt", pruning={"history_file": "history.json", "spec": spec.__dict__,
                                                               "macs_fraction": info["macs_fraction"]})
        yp.save_history(history, out / "history.json")
        (out / "plan.json").write_text(json.dumps({**meta, "channels": yp.channel_report(pruned)}, indent=1))
        (out / "model.json").write_text(json.dumps({"params": info["params"], "macs": info["macs"]}, indent=1))
        console.print(f"  pruned to {info['macs_fraction']:.3f}x MACs, {info['params_fraction']:.3f}x params "
                      f"in {info['seconds']:.1f}s")
        requested = {"macs_target": spec.macs_target, "ratio": spec.ratio, "round_to": spec.round_to}
        effective = {"macs_fraction": info["macs_fraction"], "channel_ratio": info["channel_ratio"],
                     "round_to": spec.round_to}
        return StageResult(outputs={"model": "pruned.pt", "history": "history.json", "plan": "plan.json",
                                    "info": "model.json"},
                           metrics={k: v for k, v in info.items() if k != "trials"},
                           requested=requested, effective=effective)

    return run_stage(ctx, "prune", VERSION, config, inputs, fn)
