"""Where the time goes: ONNX Runtime's profiler on each FP32 variant of a run, time by op type, side by side.

usage: python benchmarks/profile_ort.py [RUN_DIR] [ITERS]
Prints, per op type, the share of inference time and milliseconds per image for the base and pruned models,
so the gap between the MACs ratio and the latency ratio can be attributed (ops pruning does not shrink)."""

from __future__ import annotations

import json
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnxruntime as ort


def profile(onnx_path: Path, iters: int, threads: int = 2) -> dict[str, float]:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.enable_profiling = True
    so.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "prof")
    s = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    inp = s.get_inputs()[0]
    x = np.random.default_rng(0).random([d if isinstance(d, int) else 1 for d in inp.shape], dtype=np.float32)
    for _ in range(3):
        s.run(None, {inp.name: x})
    for _ in range(iters):
        s.run(None, {inp.name: x})
    events = json.loads(Path(s.end_profiling()).read_text())
    by_op: dict[str, float] = defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            by_op[e["args"]["op_name"]] += e["dur"] / 1000.0
    n = iters + 3
    return {k: v / n for k, v in by_op.items()}


def main(run_dir: str = "runs/default", iters: str = "20") -> None:
    rep = json.loads((Path(run_dir) / "report.json").read_text())
    rows = {}
    for v in rep["variants"]:
        if v["name"] in ("base-fp32", "pruned-fp32"):
            rows[v["name"]] = profile(Path(run_dir) / v["model"]["path"], int(iters))
    ops = sorted({o for r in rows.values() for o in r}, key=lambda o: -rows.get("base-fp32", {}).get(o, 0))
    tot = {k: sum(r.values()) for k, r in rows.items()}
    print(f"{'op':14s}" + "".join(f"{k:>26s}" for k in rows) + f"{'ratio':>8s}")
    for o in ops:
        cells = "".join(f"{r.get(o, 0):9.2f} ms {100 * r.get(o, 0) / tot[k]:5.1f}%      " for k, r in rows.items())
        b, p = rows.get("base-fp32", {}).get(o, 0), rows.get("pruned-fp32", {}).get(o, 0)
        print(f"{o:14s}{cells}{(b / p if p else float('nan')):8.2f}")
    print(f"{'total':14s}" + "".join(f"{t:9.2f} ms             " for t in tot.values()))


if __name__ == "__main__":
    main(*sys.argv[1:])
