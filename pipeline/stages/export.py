"""`export` stage: static-shape ONNX of an upstream checkpoint, checked by onnx.checker, with ONNX Runtime vs
PyTorch output parity measured on real letterboxed images and recorded."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np

from pipeline.core.errors import UserError
from pipeline.core.stage import Context, StageResult, run_stage
from pipeline.core.store import StageRecord
from pipeline.eval.detect import PrePost, letterbox

VERSION = 3  # 3: parity on 8 images


def parity_images(ctx: Context, n: int = 8) -> list[Path]:
    from pipeline.stages.data import eval_set

    return [Path(im.path) for im in eval_set(ctx, verify=False).images[:n]]


def export_checked(weights: Path, dest: Path, imgsz: int, opset: int, simplify: bool, images: list[Path],
                   atol: float, fam, dfl_last_axis: bool = False) -> dict:
    """Export the family's deployed form of `weights`, then check: onnx.checker, and ONNX Runtime vs that form of the
    *original* PyTorch model on real images (so an export-time rewrite is checked too)."""
    import tempfile

    import onnx

    from pipeline.adapters import ultralytics_yolo as ua
    from pipeline.backends.onnxruntime import OnnxRuntimeRunner

    rewrites = []
    with tempfile.TemporaryDirectory() as td:
        m = fam.deploy_form(ua.load_detection_model(weights))
        if dfl_last_axis:
            from pipeline.adapters.blocks import rewrite_dfl

            if rewrite_dfl(m):
                rewrites.append("dfl_last_axis")
        ua.export_onnx(ua.save_checkpoint(m, Path(td) / "deployed.pt"), dest, imgsz=imgsz, opset=opset,
                       simplify=simplify)
    m = onnx.load(str(dest))
    onnx.checker.check_model(m, full_check=True)
    torch_model = fam.deploy_form(ua.load_detection_model(weights))
    runner = OnnxRuntimeRunner(dest, threads=2)
    diffs, px = [], []
    for p in images:
        x, _ = letterbox(cv2.imread(str(p)), PrePost(imgsz=imgsz))
        ref = ua.torch_forward(torch_model, x)
        got = runner.infer({runner.input_name: x})[0]
        d = np.abs(ref - got)
        px.append(float(d.max()))
        # (1, 4 + nc, anchors): boxes in pixels, scores in [0, 1]. Boxes are compared in units of the input size,
        # so the tolerance means the same for both (1e-3 = 0.32 px at 320) and float32 rounding of a coordinate
        # near 320 px cannot fail an exact export.
        if d.ndim == 3 and d.shape[1] > 4:
            d[:, :4] /= imgsz
        diffs.append(float(d.max()))
    worst = max(diffs)
    if worst > atol:
        raise UserError(f"ONNX Runtime output differs from PyTorch by {worst:.2e} (> {atol:g}; boxes in units of "
                        f"the {imgsz}px input, scores as probabilities)", dest)
    opsets = {o.domain or "ai.onnx": o.version for o in m.opset_import}
    return {"opset": opsets.get("ai.onnx"), "checker": "passed", "family": fam.name, "parity_max_abs_diff": worst,
            "parity_max_abs_diff_px": max(px), "rewrites": rewrites,
            "parity_images": len(images), "inputs": [[d.dim_value for d in i.type.tensor_type.shape.dim]
                                                     for i in m.graph.input]}


def run(ctx: Context, source_stage: str = "load", stage_name: str = "export") -> StageRecord:
    from pipeline.stages.load import family

    cfg = ctx.recipe.export
    fam = family(ctx)
    # e2e: bench builds those
    config = {**cfg.model_dump(exclude={"e2e"}), "imgsz": ctx.recipe.model.imgsz, "parity_images": 8,
              **({"family": fam.name} if fam.name != "yolo11" else {})}  # YOLO11's key as before the families
    inputs = {"model": ctx.output(source_stage, "model")}

    def fn(ctx: Context, out: Path, inputs) -> StageResult:
        metrics = export_checked(inputs["model"], out / "model.onnx", ctx.recipe.model.imgsz, cfg.opset,
                                 cfg.simplify, parity_images(ctx, 8), cfg.parity_atol, fam, cfg.dfl_last_axis)
        (out / "export.json").write_text(json.dumps(metrics, indent=1))
        return StageResult(outputs={"onnx": "model.onnx"}, metrics=metrics,
                           requested={"opset": cfg.opset}, effective={"opset": metrics["opset"]},
                           summary=f"opset {metrics['opset']}, ONNX Runtime vs PyTorch "
                                   f"{metrics['parity_max_abs_diff']:.1e} on {metrics['parity_images']} images")

    return run_stage(ctx, stage_name, VERSION, config, inputs, fn)


def run_all(ctx: Context) -> list[StageRecord]:
    """Export every model the run has: the base (load) and, when pruning ran, the fine-tuned pruned model."""
    recs = [run(ctx)]
    if ctx.recipe.prune.enabled and ctx.record("finetune") is not None:
        recs.append(run(ctx, source_stage="finetune", stage_name="export-pruned"))
    return recs
