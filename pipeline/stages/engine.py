"""`engine` stage: strongly typed ONNX per variant, checked here; the TensorRT build where TensorRT is.

Dev-box half (a content-addressed record, like export and quantize):
- `base-fp16.onnx` / `pruned-fp16.onnx` from the base and the pruned FP32 exports (pipeline.quant.fp16: FP16 where
  the ONNX schema allows it, FP32 I/O, the head decode FP32);
- `pruned-int8-fp16.onnx` (else `base-int8-fp16.onnx`): the quantize stage's Q/DQ file (pruned-int8, else base-int8)
  with its float parts FP16 (the variants are the table's in pipeline/core/variants.py);
- each checked against the ONNX operator table of the TensorRT the recipe targets (`engine.tensorrt`, JetPack 6's
  10.3 by default; pipeline.quant.trt_ops) and its explicit-quantization and strong-typing rules (trt_check), and
  against the FP32 ONNX on ONNX Runtime. ONNX Runtime's CPU has no FP16 kernel for most of these ops (the record
  names them; it inserts FP32 casts around them), so the gate is the same graph with its weights and activations
  rounded to FP16, in FP32 (fp16.convert(emulate=True)); the real file's ORT numbers are recorded beside.

Device half: with tensorrt importable, every variant is built (strongly typed, Polygraphy) into a plan cache keyed by
(ONNX sha256, build spec, TensorRT, device, SM, L4T). Without it the stage stops with one line after the record is
written, so the ONNX files are kept: exit 2 for that reason only.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx

from pipeline.core import variants as V
from pipeline.core.console import detail
from pipeline.core.errors import UserError
from pipeline.core.stage import Context, StageResult, console, run_stage
from pipeline.core.store import StageRecord
from pipeline.quant import trt_ops
from pipeline.stages.variants import wanted

VERSION = 3  # 3: files named by their variants (pipeline/core/variants.py)
# The parity checks compare a strongly typed file with its FP32 model on PARITY_IMAGES eval images. They catch a
# broken conversion (a layer lost, a wrong cast, an FP16 overflow), not FP16's or INT8's own rounding, which differs
# from model to model and input size to input size; bench's mAP of each variant is the finer check. A broken
# conversion moves most outputs, so each check reads a high percentile; the maximum over every anchor of 16 images is
# bounded only loosely, for it is one anchor's rounding (a large box whose regression sits on a rounding edge) and
# grows with the image count. Each tolerance is 4x the largest honest value measured on 16 images (benchmarks/
# RESULTS.md, 2026-12-08): the shipped synthetic base and pruned model at 320 px; on the BCCD photos at 416 px the
# YOLO11n, YOLOv8n and YOLO26n bases and seven pruned models (two 0.33x YOLO11n seeds, three YOLOv8n cuts, two YOLO26n
# cuts); the FP16-rounded graph and ONNX Runtime's own FP16 file alike. Non-finite outputs always fail.
PARITY_IMAGES = 16
LIVE = 0.25  # anchors scoring above this in FP32 are those that can become detections
# Box coordinates of live anchors, abs difference as a fraction of the input size. 99th percentile: measured
# 2.4e-5 to 3.2e-4 (the largest: a pruned YOLOv8n; 0.13 px at 416). Maximum: 1.0e-4 to 3.1e-3 (the largest: one
# anchor of a pruned YOLO26n, 1.30 px on a 117x153 px box; YOLOv8n's base 2.4e-3).
FP16_BOX_P99_FRAC = 1.3e-3
FP16_BOX_MAX_FRAC = 1.25e-2
# Class scores (probabilities), abs difference. 99th percentile over live anchors: measured 7.8e-4 to 1.1e-2 (a
# pruned YOLO26n). Maximum over every anchor: 4.4e-3 to 4.3e-2 (the same model; YOLO26n's base 4.0e-2).
FP16_SCORE_P99 = 4.5e-2
FP16_SCORE_MAX = 0.17
# INT8 with FP16 around it: its output error vs FP32 (score-weighted, pipeline.quant.ort_qdq.output_error's
# measure) may be at most INT8_FP16_RATIO times the INT8 file's own (FP32 around the Q/DQ). Not additive: FP16 in
# front of a QuantizeLinear moves values across rounding boundaries, so the excess scales with the INT8 error itself
# (FP16 alone adds ~1e-4 of it, recorded beside). Measured on 16 images: YOLO11n 0.93-1.22x, YOLOv8n 1.03-1.06x,
# YOLO26n 1.32-1.60x (three cuts: its INT8 error is small, the float class convs kept); 1.52x once on 4 images. A
# layer lost in the file reads 2.4x, so 2.0 sits between: 1.25x the largest honest value, a thin margin for YOLO26n.
# Percentiles of the output difference cannot replace it: the INT8+FP16 file differs from the INT8 one by about as
# much as INT8 from FP32 (rounding flips at the quantizers), a lost layer included.
INT8_FP16_RATIO = 2.0


def _outputs(path: Path, x: np.ndarray) -> list[np.ndarray]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    name = s.get_inputs()[0].name
    return [s.run(None, {name: xi[None]})[0] for xi in x]


def ort_cpu_missing_fp16(model: onnx.ModelProto) -> list[str]:
    """Op types of `model`'s FP16 nodes for which ONNX Runtime's CPU provider registers no float16 kernel."""
    from onnx import TensorProto
    from onnxruntime.capi import _pybind_state as C

    have = {d.op_name for d in C.get_all_opkernel_def() if d.provider == "CPUExecutionProvider"
            and any("tensor(float16)" in v for v in d.type_constraints.values())}
    m = onnx.shape_inference.infer_shapes(model)
    half = {v.name for v in m.graph.value_info if v.type.tensor_type.elem_type == TensorProto.FLOAT16}
    half |= {t.name for t in m.graph.initializer if t.data_type == TensorProto.FLOAT16}
    ops = {n.op_type for n in m.graph.node if n.op_type != "Cast" and any(i in half for i in n.input)}
    return sorted(ops - have)


def _diff(ref: list[np.ndarray], got: list[np.ndarray]) -> dict:
    """FP16 parity statistics: box coordinates of live anchors (px) and class scores, maxima and 99th percentiles,
    and the count of non-finite values where FP32 is finite."""
    box, score, score_live, nonfinite = [], [], [], 0
    for a, b in zip(ref, got):
        a, b = a[0], b[0]  # (4 + nc, anchors)
        nonfinite += int((np.isfinite(a) & ~np.isfinite(b)).sum())
        d = np.abs(a - b)
        live = a[4:].max(0) > LIVE
        box.append(d[:4][:, live].ravel())
        score.append(d[4:].ravel())
        score_live.append(d[4:][:, live].ravel())
    box, score, score_live = (np.nan_to_num(np.concatenate(v), nan=np.inf) for v in (box, score, score_live))

    def q(v, p):
        return float(np.percentile(v, p)) if v.size else 0.0

    return {"box_px_live": float(box.max(initial=0.0)), "box_px_live_p99": q(box, 99),
            "score": float(score.max(initial=0.0)), "score_live_p99": q(score_live, 99), "nonfinite": nonfinite}


def fp16_parity_failure(d: dict, imgsz: int) -> str | None:
    """What of `_diff`'s statistics breaks a tolerance, in words; None when none does."""
    limits = [("box_px_live_p99", FP16_BOX_P99_FRAC * imgsz, "px, 99th percentile of live anchors' box coordinates"),
              ("box_px_live", FP16_BOX_MAX_FRAC * imgsz, "px, the largest live anchor's box coordinate"),
              ("score_live_p99", FP16_SCORE_P99, "99th percentile of live anchors' class scores"),
              ("score", FP16_SCORE_MAX, "the largest class score of any anchor")]
    if d["nonfinite"]:
        return f"{d['nonfinite']} non-finite values where FP32 is finite (an FP16 overflow)"
    bad = [f"{d[k]:.3g} > {lim:.3g} ({what})" for k, lim, what in limits if not d[k] <= lim]
    return "; ".join(bad) or None


def _weighted_error(ref: list[np.ndarray], got: list[np.ndarray], imgsz: int) -> float:
    """pipeline.quant.ort_qdq.output_error's measure, on outputs already computed."""
    tot = 0.0
    for f, q in zip(ref, got):
        f, q = f[0], q[0]
        w = f[4:].max(0)
        w = np.where(w > 0.01, w, 0.0)
        e = ((q[:4] - f[:4]) ** 2).sum(0) / imgsz**2 + ((q[4:] - f[4:]) ** 2).sum(0)
        tot += float((w * e).sum() / (w.sum() + 1e-12))
    return tot / len(ref)


def make_variant(kind: str, src: Path, dest: Path, fp32_ref: Path, x: np.ndarray, imgsz: int, work: Path, fam,
                 exclude: list[str] | tuple = ("detect-decode",), tensorrt: str = "10.3") -> dict:
    """Write one strongly typed variant (kind 'fp16': from an FP32 ONNX; 'int8': from a Q/DQ ONNX) and check it:
    TensorRT `tensorrt`'s operator table and rules, then ORT parity against `fp32_ref` on images `x` (N, 3, H, W).
    Returns its metrics; raises UserError when it breaks a TensorRT rule or the tolerance."""
    from pipeline.quant import fp16

    keep = fam.float_decode_nodes(onnx.load(str(src)), list(exclude))
    rep = fp16.convert_file(src, dest, keep)
    emu = work / f"{dest.stem}.emulated.onnx"
    fp16.convert_file(src, emu, keep, emulate=True)
    mx = trt_ops.matrix(tensorrt)
    v = trt_ops.check_file(dest, tensorrt, require_reduced=True)
    if v:
        raise UserError(f"{dest.name}, made from it: {mx.label} would not build the strongly typed {kind} model "
                        f"({len(v)} violation(s)), first: {v[0]}", src)
    ref = _outputs(fp32_ref, x)
    real, emulated = _outputs(dest, x), _outputs(emu, x)
    info = {"kind": kind, "source": src.name, **rep.as_dict(), "trt_check": f"passed ({mx.label})",
            "ort_cpu_missing_fp16": ort_cpu_missing_fp16(onnx.load(str(dest))), "parity_images": len(x)}
    if kind == "fp16":
        d_emu, d_real = _diff(ref, emulated), _diff(ref, real)
        info.update({"parity_emulated": d_emu, "parity_ort": d_real,
                     "weighted_error": {"emulated": _weighted_error(ref, emulated, imgsz),
                                        "ort": _weighted_error(ref, real, imgsz)},
                     "tolerance": {"box_px_live_p99": FP16_BOX_P99_FRAC * imgsz,
                                   "box_px_live": FP16_BOX_MAX_FRAC * imgsz, "score_live_p99": FP16_SCORE_P99,
                                   "score": FP16_SCORE_MAX, "live_score": LIVE}})
        for label, d in (("FP16-rounded graph", d_emu), ("ONNX Runtime's FP16 file", d_real)):
            why = fp16_parity_failure(d, imgsz)
            if why:
                raise UserError(f"{dest.name}, made from it: FP16 output differs from FP32 ({label}, {len(x)} "
                                f"images): {why}", src)
    else:
        # what FP16 alone does to the same FP32 model (its float parts rounded, no Q/DQ), measured the same way
        fp16_ref = work / f"{dest.stem}.fp16-alone.emulated.onnx"
        fp16.convert_file(fp32_ref, fp16_ref, fam.float_decode_nodes(onnx.load(str(fp32_ref)), list(exclude)),
                          emulate=True)
        e_fp16 = _weighted_error(ref, _outputs(fp16_ref, x), imgsz)
        base = _weighted_error(ref, _outputs(src, x), imgsz)
        e_emu, e_real = _weighted_error(ref, emulated, imgsz), _weighted_error(ref, real, imgsz)
        ratio = max(e_emu, e_real) / max(base, 1e-30)
        info.update({"int8_error": base, "fp16_alone_error": e_fp16, "int8_fp16_error_emulated": e_emu,
                     "int8_fp16_error_ort": e_real, "ratio_to_int8_error": ratio,
                     "tolerance": {"ratio_to_int8_error": INT8_FP16_RATIO}})
        if not ratio <= INT8_FP16_RATIO:
            raise UserError(f"{dest.name}, made from it: INT8 with FP16 around it is {ratio:.2f}x the FP32-around "
                            f"INT8 error vs FP32 (> {INT8_FP16_RATIO}x; FP16 alone adds {e_fp16:.1e} to {base:.1e})",
                            src)
    return info


def parity_inputs(ctx: Context, n: int = PARITY_IMAGES) -> np.ndarray:
    import cv2

    from pipeline.eval.detect import PrePost, letterbox
    from pipeline.stages.export import parity_images

    pp = PrePost(imgsz=ctx.recipe.model.imgsz)
    return np.concatenate([letterbox(cv2.imread(str(p)), pp)[0] for p in parity_images(ctx, n)])


def strongly_typed(ctx: Context, parity_n: int = PARITY_IMAGES) -> StageRecord:
    """The dev-box half: the strongly typed ONNX files and their parity, as the `engine` record."""
    from pipeline.stages.load import family

    jobs = wanted(ctx, "engine")
    inputs = {}
    for v in jobs:  # its source file, and the FP32 file it is checked against
        src = V.get(v.made_from)
        ref = src if src.precision == "fp32" else V.get(src.made_from)
        inputs[f"{v.name}.src"] = ctx.output(src.stage, src.output)
        inputs[f"{v.name}.ref"] = ctx.output(ref.stage, ref.output)
    mx = trt_ops.matrix(ctx.recipe.engine.tensorrt)
    config = {"variants": sorted(v.name for v in jobs), "exclude": list(ctx.recipe.quantize.exclude),
              "parity_images": parity_n, "imgsz": ctx.recipe.model.imgsz,
              "tolerance": [FP16_BOX_P99_FRAC, FP16_BOX_MAX_FRAC, FP16_SCORE_P99, FP16_SCORE_MAX, LIVE,
                            INT8_FP16_RATIO],
              "tensorrt": {"version": mx.version, "table": mx.digest}}

    def fn(ctx: Context, out: Path, inputs) -> StageResult:
        import shutil

        fam = family(ctx)
        x = parity_inputs(ctx, parity_n)
        work = out / ".work"
        work.mkdir()
        outputs, metrics, effective = {}, {}, {}
        for v in jobs:
            name, kind = v.output, v.precision  # fp16 (from an FP32 file) | int8 (a Q/DQ file, FP16 around it)
            info = make_variant(kind, inputs[f"{v.name}.src"], out / f"{name}.onnx", inputs[f"{v.name}.ref"], x,
                                ctx.recipe.model.imgsz, work, fam, ctx.recipe.quantize.exclude, mx.version)
            outputs[name] = f"{name}.onnx"
            metrics[name] = info
            effective[name] = {"precision": "fp16" if kind == "fp16" else "int8-qdq+fp16", "io": "fp32",
                               "fp32_nodes": info["fp32_float_nodes"], "strongly_typed": True}
            detail(f"  {name}: {info['fp16_nodes']} FP16 nodes, {info['fp32_float_nodes']} FP32 float nodes; "
                          + (f"parity {info['parity_emulated']['box_px_live']:.3f} px / "
                             f"{info['parity_emulated']['score']:.1e}" if kind == "fp16" else
                             f"error {info['int8_fp16_error_emulated']:.2e} vs INT8 {info['int8_error']:.2e}"))
        shutil.rmtree(work)
        (out / "strongly_typed.json").write_text(json.dumps(metrics, indent=1))
        return StageResult(outputs=outputs, metrics=metrics,
                           requested={v.output: v.precision for v in jobs},
                           effective=effective, summary=f"{len(outputs)} strongly typed files ({', '.join(outputs)}),"
                                                        f" each parsed by the {mx.label} table")

    return run_stage(ctx, "engine", VERSION, config, inputs, fn)


def build_spec(precision: str, workspace_mib: int = 2048, dla_core: int = -1, opt_level: int = 3):
    from pipeline.backends.tensorrt import BuildSpec

    return BuildSpec(precision=precision, workspace_mib=workspace_mib, dla_core=dla_core,
                     builder_optimization_level=opt_level)


def trtexec_lines(ctx: Context, workspace_mib: int = 2048, dla_core: int = -1, opt_level: int = 3) -> list[str]:
    from pipeline.backends.tensorrt import trtexec_command

    rec = ctx.record("engine")
    if rec is None:
        raise UserError("stage 'engine' has not produced its ONNX files yet: run `yolo-edge stage engine` first")
    plans = ctx.run_dir / "engines"
    out = []
    for name in rec.outputs:
        spec = build_spec(V.get(name).precision, workspace_mib, dla_core, opt_level)
        out.append(trtexec_command(ctx.output("engine", name), spec, plans / f"{name}.plan", plans / "timing.cache"))
    return out


def run(ctx: Context, workspace_mib: int = 2048, dla_core: int = -1, opt_level: int = 3,
        require_build: bool = True) -> StageRecord:
    """The strongly typed files, then the engines. Without TensorRT: a one-line UserError when the build was asked
    for (`make engine`), else (inside `yolo-edge run`) one line saying the build runs on the device."""
    rec = strongly_typed(ctx)
    from pipeline.backends.tensorrt import EngineBuilder, tensorrt_available

    ok, why = tensorrt_available()
    if not ok and not require_build:
        console.print(f"[dim]engine: strongly typed ONNX files written ({', '.join(rec.outputs)}); no TensorRT "
                      f"engine built here ({why}): `make engine` on the device builds them[/dim]")
        return rec
    if not ok:
        raise UserError(f"wrote the strongly typed ONNX files ({', '.join(rec.outputs)}) to {ctx.stage_dir('engine')};"
                        f" building the TensorRT engines needs TensorRT (JetPack on the device): {why}")
    plans = ctx.run_dir / "engines"
    builder = EngineBuilder()
    for name in rec.outputs:
        spec = build_spec(V.get(name).precision, workspace_mib, dla_core, opt_level)
        plan = builder.build(ctx.output("engine", name), spec, plans, plans / "timing.cache")
        console.print(f"  {name}: {plan}")
    return rec
