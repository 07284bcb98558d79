"""The stage registry: the pipeline's stages in the order a run takes them, each with what the run needs to know of
it (its records, whether the recipe enables it, its pre-flight check, its time estimate, how it is entered). It is
the one list that `run --stages`, `status`, `init`'s plan, the bundle's lineage and the Makefile's per-stage targets
read (the Makefile reads the STAGES line as text)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from pipeline import estimate

STAGES = ("data", "load", "prune", "finetune", "export", "calibrate", "quantize", "engine", "bench", "bundle")


def _always(recipe) -> bool:
    return True


def _pruning(recipe) -> bool:
    return recipe.prune.enabled


def _quantizing(recipe) -> bool:
    return recipe.quantize.enabled


def _none(recipe, timing, sizes) -> list:
    return []


@dataclass(frozen=True)
class StageSpec:
    name: str
    records: tuple[str, ...]  # the records its run writes (export: the base's ONNX and the pruned model's)
    enabled: Callable = _always  # recipe -> whether a run takes this stage
    estimate: Callable = _none  # (recipe, estimate.Timing, estimate.Sizes) -> [estimate.Stage]: rough durations
    preflight: bool = False  # its module's `preflight(ctx)` checks the user's inputs before any stage writes
    entry: str = "run"  # its module's function that runs it for a Context
    build: bool = False  # the entry takes `require_build` (the engine stage: a TensorRT build asked for or not)

    def module(self):
        return importlib.import_module(f"pipeline.stages.{self.name}")

    def run(self, ctx, build_required: bool = False):
        fn = getattr(self.module(), self.entry)
        return fn(ctx, require_build=build_required) if self.build else fn(ctx)

    def check(self, ctx) -> None:
        if self.preflight:
            self.module().preflight(ctx)


REGISTRY = (
    StageSpec("data", ("data",), estimate=estimate.data, preflight=True),
    StageSpec("load", ("load",), estimate=estimate.load, preflight=True),
    StageSpec("prune", ("prune",), _pruning, estimate.prune),
    StageSpec("finetune", ("finetune",), _pruning, estimate.finetune),
    StageSpec("export", ("export", "export-pruned"), estimate=estimate.export, entry="run_all"),
    StageSpec("calibrate", ("calibrate",), _quantizing, estimate.calibrate, preflight=True),
    StageSpec("quantize", ("quantize",), _quantizing, estimate.quantize),
    StageSpec("engine", ("engine",), build=True),
    StageSpec("bench", ("bench",), estimate=estimate.bench),
    StageSpec("bundle", ("bundle",)),
)
SPECS = {s.name: s for s in REGISTRY}
assert tuple(SPECS) == STAGES, "the registry lists the stages in STAGES' order"
# The records a run writes, in the same order.
RECORDS = tuple(r for s in REGISTRY for r in s.records)


def spec(stage: str) -> StageSpec:
    """A stage's spec; KeyError for a name that is not a stage."""
    return SPECS[stage]


def entry(stage: str) -> Callable:
    """The function that runs `stage` for a Context (its module imported on first use)."""
    return getattr(spec(stage).module(), spec(stage).entry)


def plan(recipe, timing, sizes) -> list:
    """What `yolo-edge run` does for this recipe, stage by stage, with rough durations (estimate.Stage entries; the
    prune stage's sparsity training one of its own): the stages the recipe enables, each stage's own estimate."""
    return [st for s in REGISTRY if s.enabled(recipe) for st in s.estimate(recipe, timing, sizes)]
