"""The device bench: every variant of a verified bundle through the same evaluator and timer as the dev box
(pipeline.eval.measure with the manifest's PrePost), on TensorRT (engines built and cached with the engine stage's
builder) or, with runner 'onnxruntime', on any machine. Every variant is scored first, then all of them are timed
in one interleaved session (pipeline/eval/interleaved.py; on TensorRT the engine-only item is the execute call between
CUDA events), so speed-ups and e2e ÷ engine carry 95% intervals taken on one machine state. No torch, no
ultralytics, no pydantic: numpy, OpenCV, pycocotools, rich (progress), onnx and Polygraphy/TensorRT where they are
used.

Output: device_report.json in report.json's schema ("yolo-edge/report/1": dataset, prepost, variants with map50_95,
latency_ms.engine/end_to_end p50/p90/p99, fps, ...) plus a `device` block (model, L4T, TensorRT, CUDA, nvpmodel,
clocks), `timing` (how the session went), `power` (power and temperature over the session, every variant
together) and `comparable` (false when the clocks are not locked).
"""

from __future__ import annotations

import ctypes
import json
import os
import time
from dataclasses import asdict
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


class CudaEventTimer:
    """A timed item for the interleaved timer: each call runs `context.execute_async_v3(stream)` once between two
    CUDA events on the runner's stream and returns its milliseconds (Polygraphy's TrtRunner: one infer() first binds
    the device buffers; the copies are outside the events)."""

    def __init__(self, runner, tensor):
        self.cu = _cudart()
        self.path = runner.path
        trt_runner = runner.runner  # polygraphy TrtRunner
        trt_runner.infer({runner.input_name: tensor})  # binds input/output addresses on the context
        self.ctx, self.stream = trt_runner.context, trt_runner.stream.ptr
        self.start, self.stop = ctypes.c_void_p(), ctypes.c_void_p()
        self.cu.cudaEventCreate(ctypes.byref(self.start))
        self.cu.cudaEventCreate(ctypes.byref(self.stop))

    def __call__(self, i: int) -> float:
        cu, stream = self.cu, ctypes.c_void_p(self.stream)
        cu.cudaEventRecord(self.start, stream)
        if not self.ctx.execute_async_v3(self.stream):
            raise UserError("TensorRT execute_async_v3 failed", self.path)
        cu.cudaEventRecord(self.stop, stream)
        cu.cudaEventSynchronize(self.stop)
        ms = ctypes.c_float()
        cu.cudaEventElapsedTime(ctypes.byref(ms), self.start, self.stop)
        return float(ms.value)

    def close(self) -> None:
        self.cu.cudaEventDestroy(self.start)
        self.cu.cudaEventDestroy(self.stop)


# ---- the bench -----------------------------------------------------------------------------------------------------

def _runner(kind: str, root: Path, v: dict, plans: dict, threads: int):
    from pipeline.backends.factory import get_runner

    if kind == "tensorrt":
        return get_runner("tensorrt", plans[v["name"]])
    return get_runner("onnxruntime", root / v["file"], threads=threads)


def time_all(kind: str, scored: list, paths: list[str], spec, base: str | None, sched):
    """Every variant's engine-only and end-to-end calls in one interleaved session (pipeline/eval/interleaved.py), with
    tegrastats running; returns the Timing, each variant's TimedVariant and the power/temperature summary."""
    import numpy as np

    from pipeline.eval.interleaved import time_interleaved
    from pipeline.eval.measure import TimedVariant, TimingInputs, timed_calls, tracked_ratios

    inputs = TimingInputs.load(paths, spec)
    items, tvs, events = {}, {}, []
    try:
        for v, r, _, _ in scored:
            tv = tvs[v["name"]] = TimedVariant.split(v["name"], base)
            c = timed_calls(r, inputs, spec)
            if kind == "tensorrt":  # engine-only from CUDA events around the execute call
                c["engine"] = CudaEventTimer(r, np.ascontiguousarray(inputs.tensors[0]))
                events.append(c["engine"])
            items[tv.engine], items[tv.end_to_end] = c["engine"], c["end_to_end"]
        with TegraStats() as ts:
            t = time_interleaved(items, tracked_ratios(tvs), sched, label="bench: timing")
    finally:
        for ev in events:
            ev.close()
    print(f"  timing: {t.summary['stop']} after {t.summary['rounds']} rounds ({t.summary['wall_s']:.0f} s)",
          flush=True)
    return t, tvs, {**ts.summary(), "scope": "the whole interleaved timing session (every variant)"}


def _layer_times(runner: str, scored: list, paths: list[str], spec, state: dict) -> dict | None:
    """The unpruned model's per-layer milliseconds on this device (TensorRT's profiler; device/layer_times.py), the
    table a latency target of the prune stage reads: of the base FP16 variant (what the device runs), else the base
    FP32 one. A failure to profile is recorded in the table's place, never fails the bench."""
    import numpy as np

    from pipeline.device import layer_times as lt
    from pipeline.eval.measure import TimingInputs

    pick = [(v, r) for v, r, *_ in scored if v.get("role") == "base"]
    pick = sorted(pick, key=lambda vr: {"fp16": 0, "fp32": 1}.get(vr[0]["precision"], 2))
    if not pick:
        return None
    v, r = pick[0]
    try:
        x = np.ascontiguousarray(TimingInputs.load(paths[:1], spec).tensors[0])
        ms = lt.profile(r.runner, {r.input_name: x})
        return lt.table(ms, variant=v["name"], imgsz=spec.imgsz, device=state, runs=20)
    except Exception as e:  # noqa: BLE001 - a profile is extra: the bench stands without it
        return {"schema": lt.SCHEMA, "error": f"{type(e).__name__}: {str(e)[:200]}", "variant": v["name"]}


def bench(bundle: str | Path, runner: str = "tensorrt", out: str | Path | None = None,
          engine_cache: str | Path | None = None, warmup: int | None = None, threads: int | None = None,
          only: list[str] | None = None, timing: dict | None = None) -> dict:
    """Verify the bundle, score each variant, then time all of them together (interleaved); write
    device_report.json; return it. `timing` overrides the bundle's timer settings (per_round, min_rounds,
    max_rounds, rel_width, cap_s)."""
    from pipeline.data.evalset import EvalSet
    from pipeline.eval.detect import PrePost
    from pipeline.eval.interleaved import Schedule
    from pipeline.eval.measure import accuracy, timing_fields
    from pipeline.eval.report_rows import SCHEMA, add_vs_base, variant_row

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
    sched = Schedule.of(cfg, warmup=warmup, **(timing or {}))
    threads = cfg["threads"] if threads is None else threads
    variants = [v for v in m["variants"] if not only or v["name"] in only]
    if only and len(variants) != len(set(only)):
        missing = sorted(set(only) - {v["name"] for v in variants})
        raise UserError(f"variant(s) {', '.join(missing)} not in the bundle (it has "
                        f"{', '.join(v['name'] for v in m['variants'])})", root / mf.MANIFEST)
    state = device_state()
    plans = build_engines(root, m, Path(engine_cache or DEFAULT_ENGINE_CACHE)) if runner == "tensorrt" else {}
    gt, cat_ids, names = es.ground_truth, es.category_ids, es.names
    paths = [i.path for i in es.images]
    scored = []  # accuracy of every variant first; then all of them are timed together
    for v in variants:
        r = _runner(runner, root, v, plans, threads)
        scored.append((v, r, *accuracy(r, es.images, gt, cat_ids, spec, label=v["name"])))
    names_run = [v["name"] for v, *_ in scored]
    # the speed-ups' reference: the bundle's base FP32 variant (the variant table's role), else the first one scored
    base = next((v["name"] for v, *_ in scored if v.get("role") == "base" and v["precision"] == "fp32"),
                names_run[0] if names_run else None)
    t, tvs, power = time_all(runner, scored, paths, spec, base, sched) if scored else (None, {}, {})
    engine_timer = ("CUDA events around execute_async_v3" if runner == "tensorrt"
                    else "perf_counter around runner.infer (host-side)")
    rows = []
    for v, r, acc, dets in scored:
        dev = v.get("dev_box") or {}
        rows.append(variant_row(
            name=v["name"], precision=v["precision"], role=v.get("role"), note=v.get("note", ""),
            model={"path": v["file"], "sha256": v["sha256"], "size_bytes": v["size"],
                   **({"plan": str(plans[v["name"]])} if v["name"] in plans else {})},
            runner=r.describe(), acc=acc, names=names, cat_ids=cat_ids, timed=timing_fields(t, tvs[v["name"]]),
            params=v.get("params"), macs=v.get("macs"), detections=len(dets),
            engine_timer=engine_timer, power=power,
            dev_box={"map50_95": dev.get("map50_95"), "map50": dev.get("map50"), "runner": dev.get("runner")},
            map50_95_minus_dev_box=(acc["map50_95"] - dev["map50_95"]) if dev.get("map50_95") is not None else None))
    layers = _layer_times(runner, scored, paths, spec, state) if runner == "tensorrt" else None
    del scored  # the runners
    add_vs_base(rows, dict.fromkeys(names_run, base), t, tvs)
    import platform

    report = {"schema": SCHEMA, "run": m["run"], "recipe": m["recipe"],
              "dataset": {**m["dataset"], "digest": eval_digest},
              "device": {**state, "runner": runner}, "env": {"python": platform.python_version(),
                                                             "yolo_edge": _version()},
              "prepost": spec.as_dict(), "bench": {**asdict(sched), "threads": threads},
              "timing": t.summary if t else None,
              "power": power,
              "bundle": {"digest": mf.digest(root), "format": m["format"], "project": m["project"]},
              "comparable": state["comparable"],
              **({"not_comparable": state["not_comparable_because"]} if not state["comparable"] else {}),
              "variants": rows, "e2e_variants": [],
              **({"layer_times": layers} if layers else {}),
              "tensorrt_checked_for": (m.get("tensorrt") or {}).get("target")}
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
