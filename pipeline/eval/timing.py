"""Latency: warm-up, then N timed iterations; percentiles and throughput."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np


def percentiles(samples_ms: list[float]) -> dict:
    a = np.asarray(samples_ms, dtype=np.float64)
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "mean": float(a.mean()), "min": float(a.min()), "n": int(a.size)}


def time_calls(fn: Callable[[int], object], warmup: int, iters: int) -> list[float]:
    """Call fn(i) warmup times untimed, then iters times timed; returns milliseconds per call."""
    for i in range(warmup):
        fn(i)
    out = []
    for i in range(iters):
        t0 = time.perf_counter()
        fn(i)
        out.append((time.perf_counter() - t0) * 1e3)
    return out
