"""The device bench: every variant of a verified bundle through the same evaluator and timer as the dev box
(pipeline.eval.bench with the manifest's PrePost), on TensorRT (engines built and cached with the engine stage's
builder) or, with runner 'onnxruntime', on any machine. No torch, no ultralytics, no pydantic: numpy, OpenCV,
pycocotools, rich (progress), onnx and Polygraphy/TensorRT where they are used.

Output: device_report.json in report.json's schema ("yolo-edge/report/1": dataset, prepost, variants with map50_95,
latency_ms.engine/end_to_end p50/p90/p99, fps, ...) plus a `device` block (model, L4T, TensorRT, CUDA, nvpmodel,
clocks, power and temperature during the timed runs) and `comparable` (false when the clocks are not locked).
"""

from __future__ import annotations

import ctypes
import json
import os
import time
from pathlib import Path

from pipeline.core.errors import UserError
from pipeline.core.store import write_json
from pipeline.device import manifest as mf
from pipeline.device.sysinfo import TegraStats, device_state

DEFAULT_ENGINE_CACHE = Path(os.environ.get("YOLO_EDGE_ENGINE_CACHE", "~/.cache/yolo-edge/engines")).expanduser()
RUNNERS = ("tensorrt", "onnxruntime")


def build_spec(variant: dict, workspace_mib: int = 2048, dla_core: int = -1, opt_level: int = 3):
    """The engine stage's BuildSpec for a variant (precision names the strongly typed ONNX; no builder flag)."""
    from pipeline.backends.tensorrt import BuildSpec

    b = variant.get("build") or {}
    return BuildSpec(precision=b.get("precision", variant.get("precision", "fp32")), workspace_mib=workspace_mib,
                     dla_core=dla_core, builder_optimization_level=opt_level)


def build_engines(root: Path, m: dict, cache: Path, **spec_kw) -> dict[str, Path]:
    """Build (or take from the cache: ONNX sha256, spec, TensorRT, device, SM, L4T) every variant's plan."""
    from pipeline.backends.tensorrt import EngineBuilder, tensorrt_available

    ok, why = tensorrt_available()
    if not ok:
        raise UserError(f"building engines needs TensorRT (JetPack): {why}; `--runner onnxruntime` benchmarks the "
                        f"ONNX files instead")
    b, plans = EngineBuilder(), {}
    for v in m["variants"]:
        if (v.get("tensorrt") or {}).get("buildable") is False:
            print(f"  {v['name']}: not built ({v['tensorrt']['why']})", flush=True)
            continue
        t0 = time.time()
        plans[v["name"]] = b.build(root / v["file"], build_spec(v, **spec_kw), cache, Path(cache) / "timing.cache")
        print(f"  {v['name']}: {plans[v['name']]} ({time.time() - t0:.1f}s)", flush=True)
    return plans


# ---- engine-only latency with CUDA events around the execute call (TensorRT) -----------------------------------

def _cudart():
    for name in ("libcudart.so", "libcudart.so.12", "libcudart.so.11.0", "/usr/local/cuda/lib64/libcudart.so"):
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    raise UserError("libcudart is not loadable: CUDA events need the CUDA runtime (JetPack)")


def cuda_event_latency(runner, tensor, warmup: int, iters: int) -> list[float]:
    """Milliseconds of `context.execute_async_v3(stream)` alone, between two CUDA events on the runner's stream
    (Polygraphy's TrtRunner: one infer() first binds the device buffers; the copies are outside the events)."""
    cu = _cudart()
    trt_runner = runner.runner  # polygraphy TrtRunner
    trt_runner.infer({runner.input_name: tensor})  # binds input/output addresses on the context
    ctx, stream = trt_runner.context, trt_runner.stream.ptr
    start, stop = ctypes.c_void_p(), ctypes.c_void_p()
    cu.cudaEventCreate(ctypes.byref(start))
    cu.cudaEventCreate(ctypes.byref(stop))
    out = []
    try:
        for i in range(warmup + iters):
            cu.cudaEventRecord(start, ctypes.c_void_p(stream))
            if not ctx.execute_async_v3(stream):
                raise UserError("TensorRT execute_async_v3 failed", runner.path)
            cu.cudaEventRecord(stop, ctypes.c_void_p(stream))
            cu.cudaEventSynchronize(stop)
            ms = ctypes.c_float()
            cu.cudaEventElapsedTime(ctypes.byref(ms), start, stop)
            if i >= warmup:
                out.append(float(ms.value))
    finally:
        cu.cudaEventDestroy(start)
        cu.cudaEventDestroy(stop)
    return out


# ---- the bench -----------------------------------------------------------------------------------------------------

def _runner(kind: str, root: Path, v: dict, plans: dict, threads: int):
    from pipeline.backends.base import get_runner

    if kind == "tensorrt":
        return get_runner("tensorrt", plans[v["name"]])
    return get_runner("onnxruntime", root / v["file"], threads=threads)


def bench(bundle: str | Path, runner: str = "tensorrt", out: str | Path | None = None,
          engine_cache: str | Path | None = None, warmup: int | None = None, iters: int | None = None,
          threads: int | None = None, only: list[str] | None = None) -> dict:
    """Verify the bundle, then score and time each variant; write device_report.json; return it."""
    import numpy as np

    from pipeline.data.evalset import EvalSet
    from pipeline.eval.bench import accuracy, latency
    from pipeline.eval.detect import PrePost, letterbox
    from pipeline.eval.timing import percentiles

    if runner not in RUNNERS:
        raise UserError(f"unknown runner '{runner}' (one of {', '.join(RUNNERS)})")
    root = mf.resolve(bundle)
    m = mf.verify(root)
    es = EvalSet.load(root / m["eval"]["dir"])  # images re-hashed against eval_set.json
    eval_digest = es.digest  # before scoring: pycocotools adds keys to the ground truth's annotations
    if eval_digest != m["eval"]["digest"]:
        raise UserError("the eval set's digest differs from the manifest's", root / m["eval"]["dir"])
    spec = PrePost(**m["prepost"])
    cfg = m["bench"]
    warmup = cfg["warmup"] if warmup is None else warmup
    iters = cfg["iters"] if iters is None else iters
    threads = cfg["threads"] if threads is None else threads
    variants = [v for v in m["variants"] if not only or v["name"] in only]
    skipped = [{"name": v["name"], "why": v["tensorrt"]["why"]} for v in variants
               if runner == "tensorrt" and (v.get("tensorrt") or {}).get("buildable") is False]
    if only and len(variants) != len(set(only)):
        missing = sorted(set(only) - {v["name"] for v in variants})
        raise UserError(f"variant(s) {', '.join(missing)} not in the bundle (it has "
                        f"{', '.join(v['name'] for v in m['variants'])})", root / mf.MANIFEST)
    state = device_state()
    plans = build_engines(root, m, Path(engine_cache or DEFAULT_ENGINE_CACHE)) if runner == "tensorrt" else {}
    gt, cat_ids, names = es.ground_truth, es.category_ids, es.names
    paths = [i.path for i in es.images]
    rows = []
    for v in variants:
        if any(x["name"] == v["name"] for x in skipped):
            continue
        r = _runner(runner, root, v, plans, threads)
        acc, dets = accuracy(r, es.images, gt, cat_ids, spec, label=v["name"])
        with TegraStats() as ts:
            lat = latency(r, paths, spec, warmup, iters)
            if runner == "tensorrt":  # engine-only from CUDA events around the execute call
                import cv2

                x = letterbox(cv2.imread(paths[0], cv2.IMREAD_COLOR), spec)[0]
                lat["engine"] = percentiles(cuda_event_latency(r, np.ascontiguousarray(x), warmup, iters))
                lat["engine_timer"] = "CUDA events around execute_async_v3"
        dev = v.get("dev_box") or {}
        rows.append({
            "name": v["name"], "precision": v["precision"], "note": v.get("note", ""),
            "model": {"path": v["file"], "sha256": v["sha256"], "size_bytes": v["size"],
                      **({"plan": str(plans[v["name"]])} if v["name"] in plans else {})},
            "runner": r.describe(),
            "map50_95": acc["map50_95"], "map50": acc["map50"],
            "per_class_ap50_95": {names[cat_ids.index(k)]: a for k, a in acc["per_class_ap50_95"].items()},
            "latency_ms": {"engine": lat["engine"], "end_to_end": lat["end_to_end"]},
            "engine_timer": lat.get("engine_timer", "perf_counter around runner.infer (host-side)"),
            "fps": lat["fps"], "timing": {k: lat[k] for k in ("batch", "warmup", "iters", "wall_s")},
            "params": v.get("params"), "macs": v.get("macs"), "detections": len(dets),
            "e2e_over_engine": lat["end_to_end"]["p50"] / lat["engine"]["p50"],
            "power": ts.summary(),
            "dev_box": {"map50_95": dev.get("map50_95"), "map50": dev.get("map50"), "runner": dev.get("runner")},
            "map50_95_minus_dev_box": (acc["map50_95"] - dev["map50_95"]) if dev.get("map50_95") is not None
            else None,
        })
        del r
    base = next((x for x in rows if x["name"] == "base-fp32"), rows[0] if rows else None)
    for x in rows:
        if base is None or not base.get("macs") or not x.get("macs"):
            break
        x["vs_base"] = {"against": base["name"], "macs_ratio": x["macs"] / base["macs"],
                        "params_ratio": x["params"] / base["params"],
                        "size_ratio": x["model"]["size_bytes"] / base["model"]["size_bytes"],
                        "map50_95_delta": x["map50_95"] - base["map50_95"],
                        "engine_p50_speedup": base["latency_ms"]["engine"]["p50"] / x["latency_ms"]["engine"]["p50"],
                        "e2e_p50_speedup": base["latency_ms"]["end_to_end"]["p50"]
                        / x["latency_ms"]["end_to_end"]["p50"]}
    import platform

    report = {"schema": "yolo-edge/report/1", "run": m["run"], "recipe": m["recipe"],
              "dataset": {**m["dataset"], "digest": eval_digest},
              "device": {**state, "runner": runner}, "env": {"python": platform.python_version(),
                                                             "yolo_edge": _version()},
              "prepost": spec.as_dict(), "bench": {"warmup": warmup, "iters": iters, "threads": threads},
              "bundle": {"digest": mf.digest(root), "format": m["format"], "project": m["project"]},
              "comparable": state["comparable"],
              **({"not_comparable": state["not_comparable_because"]} if not state["comparable"] else {}),
              "variants": rows, "e2e_variants": [], **({"skipped_variants": skipped} if skipped else {})}
    dest = Path(out) if out else Path("device_report.json")
    write_json(dest, report)
    return report


def _version() -> str | None:
    try:
        from importlib import metadata

        return metadata.version("yolo-edge")
    except Exception:  # noqa: BLE001 - an uninstalled tree
        return None


def summary_lines(rep: dict) -> list[str]:
    d = rep["device"]
    head = (f"{d.get('model')} | L4T {((d.get('l4t') or {}).get('release')) or '-'} | TensorRT "
            f"{d.get('tensorrt') or '-'} | CUDA {d.get('cuda') or '-'} | nvpmodel "
            f"{(d.get('nvpmodel') or {}).get('mode', '-')} | clocks "
            f"{'locked' if d.get('clocks_locked') else 'NOT locked' if d.get('clocks_locked') is False else 'unknown'}"
            + ("" if rep["comparable"] else f" | not comparable: {rep.get('not_comparable')}"))
    lines = [head, f"{'variant':<22} {'runner':<12} {'mAP50-95':>9} {'dev box':>9} {'engine p50/p90/p99 ms':>24} "
                   f"{'e2e p50 ms':>10} {'fps':>7} {'power W':>8}"]
    for r in rep["variants"]:
        e, g = r["latency_ms"]["end_to_end"], r["latency_ms"]["engine"]
        dev = r["dev_box"]["map50_95"]
        pw = r["power"].get("power_mean_mw")
        eng = f"{g['p50']:.2f}/{g['p90']:.2f}/{g['p99']:.2f}"
        lines.append(f"{r['name']:<22} {r['runner']['runner']:<12} {r['map50_95']:>9.4f} "
                     f"{'-' if dev is None else format(dev, '.4f'):>9} {eng:>24} {e['p50']:>10.2f} {r['fps']:>7.1f} "
                     f"{'-' if pw is None else format(pw / 1000, '.2f'):>8}")
    return lines


def load_report(path: Path) -> dict:
    return json.loads(Path(path).read_text())
