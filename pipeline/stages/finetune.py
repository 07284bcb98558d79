"""`finetune` stage: the pruned model trained on the run's data by the stock ultralytics trainer (through its
`get_model` hook, so the pruned architecture is what trains), optionally distilled from the unpruned model (a KD
loss on the Detect head's outputs, and/or ultralytics' own feature distillation). Refuses a result whose
architecture is not the pruned one; saves FP32. A run cut off (kill, Ctrl-C) resumes from its last epoch: the
trainer's work directory is keyed by the stage's inputs and config and kept until the stage completes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from pipeline.core.errors import UserError
from pipeline.core.stage import Context, StageResult, console, run_stage
from pipeline.core.store import StageRecord, sha256_file, sha256_json

VERSION = 2


def run(ctx: Context) -> StageRecord:
    c = ctx.recipe.finetune
    config = {**c.model_dump(exclude={"distill": c.distill.key_excludes()}), "imgsz": ctx.recipe.model.imgsz}
    inputs = {"model": ctx.output("prune", "model"), "history": ctx.output("prune", "history"),
              "data": ctx.output("data", "yolo")}
    if c.distill.enabled:
        inputs["teacher"] = ctx.output("load", "model")

    def fn(ctx: Context, out: Path, inputs) -> StageResult:
        from pipeline.adapters import ultralytics_yolo as ua
        from pipeline.stages.load import family

        fam = family(ctx)
        pruned = ua.load_detection_model(inputs["model"])
        want = fam.signature(pruned)
        key = sha256_json({"config": config, "model": sha256_file(inputs["model"]),
                           "teacher": sha256_file(inputs["teacher"]) if "teacher" in inputs else None})
        work = ctx.run_dir / ".work" / f"finetune-{key[:16]}"
        if (work / "weights" / "last.pt").is_file():
            console.print(f"  resuming the interrupted fine-tune in {work}")
        kd = ua.Distill(inputs["teacher"], **c.distill.trainer_args()) if "teacher" in inputs else None
        opts = ua.TrainOptions(c.epochs, ctx.recipe.model.imgsz, {**c.trainer_args(), **fam.train_args}, distill=kd)
        last = ua.finetune(inputs["model"], inputs["data"] / "data.yaml", work, opts)
        model = ua.load_detection_model(last)
        if fam.signature(model) != want:
            raise UserError("the fine-tuned checkpoint does not have the pruned architecture: refusing it", last)
        model.names = pruned.names
        ua.save_checkpoint(model, out / "model.pt", pruning={"history_file": "history.json"})
        shutil.copyfile(inputs["history"], out / "history.json")
        history = ua.training_history(work)
        stats = ua.model_stats(model, ctx.recipe.model.imgsz, fam)
        (out / "model.json").write_text(json.dumps({**stats, "history": history}, indent=1))
        shutil.rmtree(work, ignore_errors=True)
        return StageResult(outputs={"model": "model.pt", "history": "history.json", "info": "model.json"},
                           metrics={"final_val": history[-1] if history else None, "epochs": len(history),
                                    **stats},
                           requested={"distill": c.distill.enabled, "epochs": c.epochs},
                           effective={"distill": c.distill.enabled, "epochs": len(history), "weights": "fp32"},
                           summary=f"{len(history)} epochs" + (f", last val mAP50-95 {history[-1]['map50_95']:.4f}"
                                                              if history else "")
                           + (", distilled" if c.distill.enabled else ""))

    return run_stage(ctx, "finetune", VERSION, config, inputs, fn)
