"""A synthetic report.json in bench's schema (pipeline/stages/bench.py, yolo-edge/report/1): the default run's
numbers from README's Results table, plus FP16 and end-to-end variants, and stage records for the lineage. Shared by
tests/test_gate.py and tests/test_report_plots.py; nothing here trains or runs a model."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

# name, precision, mAP50-95, mAP50, params, MACs, size bytes, engine p50, e2e p50
ROWS = [("base-fp32", "fp32", 0.8210, 0.9220, 2591400, 798231200, 10483925, 9.68, 12.05),
        ("pruned-fp32", "fp32", 0.8196, 0.9295, 1437000, 392000000, 5880000, 5.85, 7.66),
        ("base-int8", "int8", 0.8180, 0.9218, 2591400, 798231200, 2900000, 19.69, 23.39),
        ("pruned-int8-ptq", "int8", 0.8145, 0.9275, 1437000, 392000000, 1750000, 12.79, 15.87),
        ("pruned-int8", "int8", 0.8145, 0.9275, 1437000, 392000000, 1750000, 13.32, 15.68),
        ("pruned-ultralytics-int8", "int8", 0.8032, 0.9246, 1437000, 392000000, 1800000, 16.61, 19.80),
        ("base-fp16", "fp16", 0.8209, 0.9220, 2591400, 798231200, 5300000, 9.90, 12.30),
        ("pruned-fp16", "fp16", 0.8195, 0.9294, 1437000, 392000000, 3000000, 6.00, 7.80)]
E2E = [("base-fp32-e2e", "base-fp32", 11.2), ("pruned-fp32-e2e", "pruned-fp32", 7.1),
       ("pruned-int8-e2e", "pruned-int8", 14.9)]


def _lat(p50: float) -> dict:
    return {"p50": p50, "p90": p50 * 1.08, "p99": p50 * 1.15, "mean": p50 * 1.02, "min": p50 * 0.95, "n": 100}


def _row(name, prec, m, m50, params, macs, size, eng, e2e_ms, **extra) -> dict:
    return {"name": name, "precision": prec, "note": "",
            "model": {"path": f"x/{name}.onnx", "sha256": "0" * 64, "size_bytes": size},
            "runner": {"runner": "onnxruntime", "version": "1.32.0", "providers": ["CPUExecutionProvider"],
                       "threads": 2},
            "map50_95": m, "map50": m50, "per_class_ap50_95": {"circle": m},
            "latency_ms": {"engine": _lat(eng), "end_to_end": _lat(e2e_ms)}, "fps": 1000 / e2e_ms,
            "timing": {"batch": 1, "warmup": 10, "iters": 100, "wall_s": 1.0}, "params": params, "macs": macs,
            "predictions": f"bench/predictions/{name}.json", "ground_truth": "bench/ground_truth.json",
            "detections": 1000, "e2e_over_engine": e2e_ms / eng, **extra}


def synthetic_report() -> dict:
    rows = [_row(*r) for r in ROWS]
    by = {r["name"]: r for r in rows}
    e2e_rows = []
    for name, src, p50 in E2E:
        s = by[src]
        r = _row(name, s["precision"], s["map50_95"], s["map50"], s["params"], s["macs"],
                 s["model"]["size_bytes"] + 20000, p50, p50,
                 e2e={"frame_hw": [480, 640], "resize": "cv2", "file": f"{name}.onnx", "over": "..."})
        r["e2e_over_engine"] = p50 / s["latency_ms"]["engine"]["p50"]
        e2e_rows.append(r)
    for group, base in ((rows, rows[0]), (e2e_rows, e2e_rows[0])):
        for r in group:
            r["vs_base"] = {"against": base["name"], "macs_ratio": r["macs"] / base["macs"],
                            "params_ratio": r["params"] / base["params"],
                            "size_ratio": r["model"]["size_bytes"] / base["model"]["size_bytes"],
                            "map50_95_delta": r["map50_95"] - base["map50_95"],
                            "engine_p50_speedup": base["latency_ms"]["engine"]["p50"]
                            / r["latency_ms"]["engine"]["p50"],
                            "e2e_p50_speedup": base["latency_ms"]["end_to_end"]["p50"]
                            / r["latency_ms"]["end_to_end"]["p50"]}
    return {"schema": "yolo-edge/report/1", "run": "default",
            "recipe": {"name": "default", "finetune": {"epochs": 10}, "bench": {"runner": "onnxruntime"}},
            "dataset": {"split": "val", "images": 120, "digest": "ab" * 32, "names": ["circle", "square", "tri"]},
            "cross_check": {"evaluator": "ultralytics", "max_delta_pt": 2.0, "variants": {
                "base-fp32": {"bench": 0.821, "ultralytics": 0.824, "bench_map50": 0.922, "ultralytics_map50": 0.93,
                              "delta_pt": -0.3}}},
            "device": {"machine": "x86_64", "processor": "", "cpus": 2, "cpu": "Intel(R) Xeon(R) Processor"},
            "env": {"python": "3.11.7", "onnxruntime": "1.32.0", "ultralytics": "8.4.190"},
            "prepost": {"imgsz": 320, "conf": 0.001, "iou": 0.7, "max_det": 300},
            "variants": rows, "e2e_variants": e2e_rows}


def write_run(run_dir: Path, rep: dict | None = None, finished: float | None = None) -> Path:
    """A run directory with report.json and the stage records the lineage reads."""
    run_dir = Path(run_dir)
    rep = copy.deepcopy(rep if rep is not None else synthetic_report())
    now = finished or time.time()
    for i, st in enumerate(["data", "load", "prune", "finetune", "export", "bench"]):
        (run_dir / st).mkdir(parents=True, exist_ok=True)
        (run_dir / st / "record.json").write_text(json.dumps({
            "stage": st, "stage_version": 1, "key": f"{i:02d}" * 32, "config": {}, "inputs": {},
            "outputs": {"x": {"kind": "file", "path": "x", "digest": "cd" * 32}}, "env": {}, "requested": {},
            "effective": {}, "metrics": {}, "started": now - 60 + 10 * i, "finished": now - 55 + 10 * i}))
    (run_dir / "report.json").write_text(json.dumps(rep, indent=1))
    (run_dir / "bench" / "report.json").write_text(json.dumps(rep, indent=1))  # what `yolo-edge report` publishes
    rec = json.loads((run_dir / "bench" / "record.json").read_text())
    rec["outputs"]["report"] = {"kind": "file", "path": str(run_dir / "bench" / "report.json"), "digest": "ef" * 32,
                                "rel": "report.json"}
    (run_dir / "bench" / "record.json").write_text(json.dumps(rec))
    return run_dir
