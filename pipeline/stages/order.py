"""The pipeline's stages in the order a run takes them: the one list that `run --stages`, `status`, `init`'s plan,
the bundle's lineage and the Makefile's per-stage targets read (the Makefile reads the STAGES line as text)."""

from __future__ import annotations

import importlib
from collections.abc import Callable

STAGES = ("data", "load", "prune", "finetune", "export", "calibrate", "quantize", "engine", "bench", "bundle")
# The records a run writes, in the same order: `export` writes two, the base's ONNX and the pruned model's.
RECORDS = tuple(r for s in STAGES for r in ((s, "export-pruned") if s == "export" else (s,)))
_ENTRY = {"export": "run_all"}  # every other stage module's entry point is `run(ctx)`


def entry(stage: str) -> Callable:
    """The function that runs `stage` for a Context (its module imported on first use)."""
    if stage not in STAGES:
        raise KeyError(stage)
    return getattr(importlib.import_module(f"pipeline.stages.{stage}"), _ENTRY.get(stage, "run"))
