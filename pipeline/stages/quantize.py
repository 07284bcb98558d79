"""`quantize` stage: INT8 explicit Q/DQ ONNX of the base and the pruned model, checked against TensorRT's rules.

The variants it makes are the table's (pipeline/core/variants.py) that the recipe asks for, each written as
`<variant>.onnx`:
- base-int8 and pruned-int8-ptq: plain post-training quantization with the recipe's calibration method;
- pruned-int8: accuracy-aware: nodes ranked by the error they add (per-layer error vs FP32 on calibration
  images) are shortlisted, and those whose return to float brings the score-weighted detector output closest
  to FP32 return to float, `step` at a time, until the mAP50-95 drop on the held-out tuning images
  is within `max_drop` (and at least `min_float` are float) or `max_float` nodes are float; every step
  recorded;
- pruned-ultralytics-int8 (the peer): ultralytics' own INT8 ONNX export of the same pruned model, calibrated on
  the same images. It is benchmarked, and the project's TensorRT check says why TensorRT would refuse it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx

from pipeline.core import variants as V
from pipeline.core.console import detail
from pipeline.core.errors import UserError
from pipeline.core.stage import Context, StageResult, run_stage
from pipeline.core.store import StageRecord
from pipeline.stages.variants import post_of, wanted

VERSION = 8  # 8: files named by their variants (pipeline/core/variants.py)


def _tuning_dets(onnx_path: Path, gt: dict, ctx: Context) -> list[dict]:
    from pipeline.backends.onnxruntime import OnnxRuntimeRunner
    from pipeline.eval.measure import EvalImage, accuracy
    from pipeline.stages.calibrate import resolve
    from pipeline.stages.load import prepost

    images = [EvalImage(str(resolve(ctx, im["file_name"])), im["id"]) for im in gt["images"]]
    cat_ids = [c["id"] for c in gt["categories"]]
    _, dets = accuracy(OnnxRuntimeRunner(onnx_path, threads=ctx.recipe.bench.threads), images, gt, cat_ids,
                       prepost(ctx), label=f"tuning {onnx_path.name}")
    return dets


def accuracy_aware(fp32: Path, dest: Path, cache: Path, method: str, exclude: list[str], op_types: tuple,
                   calib: np.ndarray, gt: dict, ctx: Context, work: Path) -> dict:
    from pipeline.eval.coco import paired_drop
    from pipeline.quant import ort_qdq as oq

    cfg = ctx.recipe.quantize.accuracy_aware
    ref_dets = _tuning_dets(fp32, gt, ctx)
    trial = work / "trial.onnx"
    oq.quantize(fp32, trial, cache, method, exclude, op_types)

    def measure(path: Path) -> dict:
        # the drop on the tuning images and its noise (half-sample standard error): the search stops only when
        # drop + noise_z * se is within the budget, not on an estimate noisier than the budget itself
        d = paired_drop(gt, ref_dets, _tuning_dets(path, gt, ctx))
        d["bound"] = d["drop"] + cfg.noise_z * (0.0 if d["se"] != d["se"] else d["se"])
        return d

    m = measure(trial)
    ref, cur = m["ref"], m["cur"]
    steps = [{"float_nodes": [], "tuning_map50_95": cur, "drop": m["drop"], "se": m["se"], "bound": m["bound"]}]
    detail(f"  accuracy-aware: FP32 {ref:.4f}, all-INT8 {cur:.4f} on {len(gt['images'])} tuning images "
                  f"(drop {100 * m['drop']:.2f} ± {100 * m['se']:.2f} pt)")
    if m["bound"] > cfg.max_drop or cfg.min_float > 0:
        cands = oq.quantized_nodes(onnx.load(str(trial)), op_types)
        errs = oq.layer_errors(fp32, trial, calib, cands)
        ranking = sorted(errs, key=errs.get, reverse=True)
        probe = calib[: cfg.probe_images]
        ref_out = oq.reference_outputs(fp32, probe)
        floated: list[str] = []
        base_err = oq.output_error(ref_out, trial, probe)
        while ((m["bound"] > cfg.max_drop or len(floated) < cfg.min_float) and len(floated) < cfg.max_float
               and ranking):
            # the layer-error ranking proposes candidates; the detector output decides: each is floated alone and
            # those that bring the score-weighted output closest to FP32 are kept. Candidates that change nothing a
            # detection depends on (a branch whose anchors never score) are passed over.
            scored = []
            while ranking and len(scored) < cfg.step:
                shortlist, ranking = ranking[: cfg.shortlist], ranking[cfg.shortlist:]
                for n in shortlist:
                    oq.quantize(fp32, trial, cache, method, exclude + floated + [n], op_types)
                    e = oq.output_error(ref_out, trial, probe)
                    if e < base_err:
                        scored.append((e, n))
            if not scored:
                break
            scored.sort()
            take = [n for _, n in scored[: cfg.step]]
            ranking = [n for _, n in scored[cfg.step:]] + ranking
            floated += take
            oq.quantize(fp32, trial, cache, method, exclude + floated, op_types)
            base_err = oq.output_error(ref_out, trial, probe)
            m = measure(trial)
            cur = m["cur"]
            steps.append({"float_nodes": list(take), "added_error": [errs[n] for n in take],
                          "output_error_after": base_err, "tuning_map50_95": cur, "drop": m["drop"], "se": m["se"],
                          "bound": m["bound"]})
            detail(f"  +{len(take)} float ({', '.join(take)}): {cur:.4f} (drop {100 * m['drop']:.2f} ± "
                          f"{100 * m['se']:.2f} pt)")
    shutil.copyfile(trial, dest)
    return {"tuning_fp32_map50_95": ref, "tuning_int8_map50_95": cur, "tuning_images": len(gt["images"]),
            "tuning_drop": m["drop"], "tuning_drop_se": m["se"], "noise_z": cfg.noise_z,
            "within_budget": m["bound"] <= cfg.max_drop, "max_drop": cfg.max_drop,
            "float_nodes": [n for s in steps for n in s["float_nodes"]], "steps": steps}


def run(ctx: Context) -> StageRecord:
    from pipeline.stages.calibrate import verify

    q = ctx.recipe.quantize
    if q.backend == "modelopt":
        from pipeline.quant.modelopt_backend import ensure_available, method_for

        method_for(q.method)
        ensure_available()
    verify(ctx)
    config = {**q.model_dump(), "imgsz": ctx.recipe.model.imgsz, "opset": ctx.recipe.export.opset}
    jobs = wanted(ctx, "quantize")
    config["variants"] = [v.name for v in jobs]
    inputs = {"calib": ctx.output("calibrate", "calib"), "tuning": ctx.output("calibrate", "tuning"),
              "calib_data": ctx.output("calibrate", "list")}
    for v in jobs:  # each variant's FP32 source (and, for ultralytics' own export, its checkpoint)
        src = V.get(v.made_from)
        inputs[src.name] = ctx.output(src.stage, src.output)
        if v.method == "ultralytics":
            inputs[f"{src.name}.pt"] = ctx.output(src.stats_stage, "model")

    def fn(ctx: Context, out: Path, inputs) -> StageResult:
        from pipeline.quant import ort_qdq as oq
        from pipeline.quant import trt_check
        from pipeline.stages.load import family

        fam = family(ctx)
        calib = np.load(inputs["calib"])
        gt = json.loads(inputs["tuning"].read_text())
        work = out / ".work"
        work.mkdir()
        outputs, metrics, effective = {}, {}, {}
        caches = {}
        for v in jobs:
            fp32, name = inputs[v.made_from], f"{v.output}.onnx"
            if v.method == "ultralytics":  # the peer: ultralytics' own INT8 export of the same checkpoint
                from pipeline.adapters import ultralytics_yolo as ua
                from pipeline.stages.calibrate import ultralytics_calib_yaml

                peer = ua.export_int8_onnx(inputs[f"{v.made_from}.pt"], out / name, imgsz=ctx.recipe.model.imgsz,
                                           data_yaml=ultralytics_calib_yaml(ctx, work))
                bad = trt_check.check_file(peer)
                outputs[v.output] = name
                metrics[v.output] = {"trt_check": "refused: " + str(bad[0]) if bad else "passed",
                                     "violations": len(bad), "post": post_of(v, fam)}
                continue
            exclude = fam.float_decode_nodes(onnx.load(str(fp32)), q.exclude)
            if v.made_from not in caches:
                caches[v.made_from] = oq.compute_ranges(fp32, calib, q.method, work / f"{v.made_from}.{q.method}.json",
                                                        work, decode=exclude, percentile=q.percentile)
            if q.backend == "modelopt":
                from pipeline.quant.modelopt_backend import quantize as mo_quantize

                info = {"backend": "modelopt", "modelopt_method": mo_quantize(fp32, out / name, inputs["calib"],
                                                                              q.method, exclude)}
            elif v.method == "accuracy-aware":
                info = accuracy_aware(fp32, out / name, caches[v.made_from], q.method, exclude, tuple(q.op_types),
                                      calib, gt, ctx, work)
            else:
                oq.quantize(fp32, out / name, caches[v.made_from], q.method, exclude, tuple(q.op_types))
                info = {}
            violations = trt_check.check_file(out / name)
            if violations:
                raise UserError(f"the Q/DQ model breaks TensorRT's rules: {violations[0]}", out / name)
            m = onnx.load(str(out / name))
            onnx.checker.check_model(m)
            info.update({"excluded_head_nodes": exclude, "quantized_nodes": len(oq.quantized_nodes(m)),
                         "trt_check": "passed", "source": v.made_from, "method": q.method})
            outputs[v.output] = name
            metrics[v.output] = info
            effective[v.output] = {"precision": "int8-qdq", "float_nodes": info.get("float_nodes", []),
                                   "decode_float": True}
        shutil.rmtree(work)
        aware = metrics.get(V.PRUNED_INT8.output, {})
        summary = f"{len(outputs)} INT8 files ({', '.join(outputs)})"
        if "tuning_drop" in aware:
            summary += (f"; {V.PRUNED_INT8.name}: {len(aware['float_nodes'])} nodes kept float, tuning drop "
                        f"{100 * aware['tuning_drop']:.2f} ± {100 * aware['tuning_drop_se']:.2f} pt")
        return StageResult(outputs=outputs, metrics=metrics,
                           requested={"precision": "int8", "method": q.method, "backend": q.backend,
                                      "max_drop": q.accuracy_aware.max_drop}, effective=effective, summary=summary)

    return run_stage(ctx, "quantize", VERSION, config, inputs, fn)
