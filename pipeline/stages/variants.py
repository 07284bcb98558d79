"""A run's variants, from the table in pipeline/core/variants.py: which ones its recipe asks for (what the quantize
and engine stages make), which ones its records hold (what bench scores and the bundle carries), and how each is
described in the report."""

from __future__ import annotations

from pipeline.core import variants as V
from pipeline.core.stage import Context


def _pruned(ctx: Context) -> bool:
    return ctx.recipe.prune.enabled and ctx.record("export-pruned") is not None


def _has(ctx: Context, v: V.Variant) -> bool:
    rec = ctx.record(v.stage)
    return rec is not None and v.output in rec.outputs


def wanted(ctx: Context, stage: str) -> list[V.Variant]:
    """The variants `stage` (quantize or engine) makes for this run: those the recipe asks for whose source the
    run has."""
    q, pruned = ctx.recipe.quantize, _pruned(ctx)
    ask = {V.BASE_INT8: q.enabled, V.PRUNED_INT8_PTQ: q.enabled and pruned,
           V.PRUNED_INT8: q.enabled and pruned and q.accuracy_aware.enabled and q.backend == "onnxruntime",
           V.ULTRALYTICS_INT8: q.enabled and pruned and q.peer,
           V.BASE_FP16: True, V.PRUNED_FP16: pruned}
    if stage == "engine":  # INT8 with FP16 around it: of the pruned model's accuracy-aware file, else the base's
        ask[V.PRUNED_INT8_FP16] = q.enabled and pruned and _has(ctx, V.PRUNED_INT8)
        ask[V.BASE_INT8_FP16] = q.enabled and not ask[V.PRUNED_INT8_FP16] and _has(ctx, V.BASE_INT8)
    return [v for v in V.made_by(stage) if ask.get(v)]


def present(ctx: Context) -> list[V.Variant]:
    """The variants this run has: every table entry whose stage's record holds its file (the quantize and engine
    stages only while the recipe enables them), then the end-to-end graphs of those that have one."""
    have = []
    for v in V.CATALOG:
        if v.model == "pruned" and not ctx.recipe.prune.enabled:
            continue
        if v.stage == "quantize" and not ctx.recipe.quantize.enabled:
            continue
        if _has(ctx, v):
            have.append(v)
    if ctx.recipe.export.e2e.enabled:
        names = {v.name for v in have}
        have += [e for e in V.E2E if e.made_from in names]
    return have


def post_of(v: V.Variant, fam) -> str:
    """The post-processing of a variant's file: the family's, except a file that outputs detections already
    (ultralytics' own export of a model with an end-to-end head)."""
    return fam.exported_post if v.method == "ultralytics" else fam.post


def note(ctx: Context, v: V.Variant, fam) -> str:
    """How a variant was made, in words, for the report."""
    if v.role == "e2e":
        h, w = ctx.recipe.export.e2e.frame_hw
        tail = "NMS" if fam.post == "nms" else "top-K selection (no NMS)"
        return (f"end to end in one ONNX: uint8 BGR {w}x{h} frame in, letterbox + {v.made_from} + {tail} inside, "
                f"EfficientNMS-layout detections out; timed per camera frame (engine = end-to-end); mAP from the same "
                f"graph built for each val image's size")
    if v == V.PRUNED_FP32:
        return _pruned_note(ctx)
    ort_note = "INT8 Q/DQ; ONNX Runtime CPU latency of INT8 is not representative of TensorRT"
    if v.method in ("ptq", "accuracy-aware"):
        q = ctx.record("quantize")
        how = (f"plain PTQ ({q.requested.get('backend', 'onnxruntime')}, {q.requested.get('method')})"
               if v.method == "ptq" else "accuracy-aware PTQ")
        return f"{how}, {ort_note}"
    if v.method == "ultralytics":
        return "peer: ultralytics export(format='onnx', quantize=8), same calibration images"
    if v.method == "fp16":
        m = ctx.record("engine").metrics.get(v.output, {})
        par = m.get("parity_emulated", {})
        return (f"strongly typed FP16 (FP32 I/O, head decode FP32; what TensorRT builds): vs its FP32 "
                f"{par.get('box_px_live', float('nan')):.3f} px / {par.get('score', float('nan')):.1e} "
                f"(FP16-rounded graph); ONNX Runtime CPU lacks FP16 kernels for "
                f"{', '.join(m.get('ort_cpu_missing_fp16', [])) or 'none'} and runs them in FP32 here")
    if v.method == "int8-fp16":
        m = ctx.record("engine").metrics.get(v.output, {})
        return (f"strongly typed INT8 Q/DQ with FP16 around it (what TensorRT builds): output error vs FP32 "
                f"{m.get('int8_fp16_error_emulated', float('nan')):.2e} (FP16-rounded) against "
                f"{m.get('int8_error', float('nan')):.2e} with FP32 around the Q/DQ")
    return ""


def _pruned_note(ctx: Context) -> str:
    f, pr = ctx.recipe.finetune, ctx.recipe.prune
    kd, sp = f.distill, pr.sparsity
    fade = next((p for p in sp.phases if p.fade), None) if sp.enabled else None
    note = ""
    if sp.enabled:
        note = (f"sparsity-trained {sum(p.epochs for p in sp.phases)} epochs (group regularization"
                + (f"; the planned cut's channels faded to zero over {fade.fade} of {fade.epochs} epochs"
                   if fade else "")
                + (f", then held at zero for {hold} more" if (hold := sum(p.epochs for p in sp.phases if p.hold))
                   else "") + "), then ")
    if fade:
        note += f"pruned (DepGraph, {pr.mode} mode, the cut the fade trained toward)"
    else:
        note += f"pruned (DepGraph, {pr.mode} mode{', features reconstructed' if pr.reconstruct.enabled else ''})"
    note += f" + fine-tuned {f.epochs} epochs (stock trainer, nbs {f.nbs})"
    if kd.enabled:
        note += (f", distilled from base-fp32 (head KD {kd.head_weight}, feature {kd.feature_weight}"
                 + (f", channel-wise {kd.channel_weight}" if kd.channel_weight else "") + ")")
    return note
