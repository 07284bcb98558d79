"""A run's cut setup (pipeline/cutting.py's Cutter) from its recipe and data: shared by the prune stage and sparsity
training's fade phase, which plans the cut the prune stage then applies."""

from __future__ import annotations

from pathlib import Path

from pipeline.core.stage import Context
from pipeline.cutting import Cutter, cut_tools


def cutter(ctx: Context, data_dir: Path | None, needs_eval: bool) -> Cutter:
    """Everything a cut of this run's model uses (cutting.Cutter): the family, the prune section, and the tools built
    from the held-out train images (when the mode, the steps or the reconstruction need them)."""
    from pipeline.stages.data import held_out_images
    from pipeline.stages.load import family, prepost

    c, fam, imgsz = ctx.recipe.prune, family(ctx), ctx.recipe.model.imgsz
    held = None
    if needs_eval:
        held = held_out_images(ctx, c.sensitivity.images + (c.reconstruct.images if c.reconstruct.enabled else 0),
                               c.sensitivity.seed)
    grads_fn, evaluator, calib = cut_tools(fam, imgsz, c, prepost(ctx), data_dir / "data.yaml" if data_dir else None,
                                           held, ctx.recipe.data.source)
    return Cutter(fam, imgsz, c, ctx.recipe.bench.threads, grads_fn, evaluator, calib, latency_table(ctx))


def table_path(ctx: Context) -> Path | None:
    """Where the device a latency target names keeps its layer-time table (`make deploy` writes it), or None when
    the target is timed here."""
    t = ctx.recipe.prune.target
    if t is None or t.kind not in ("speedup", "latency_ms") or not t.runner.startswith("device:"):
        return None
    return ctx.run_dir / "devices" / t.runner.removeprefix("device:") / "device_report.json"


def latency_table(ctx: Context) -> dict | None:
    """The layer-time table of the device the recipe's target names; where the device has none (no deploy yet, or a
    device bench without TensorRT), the run says so in one line and the target is timed on this box instead."""
    import json

    from pipeline.adapters import latency_table as lt
    from pipeline.core.stage import console

    path = table_path(ctx)
    if path is None:
        return None
    table = None
    if path.is_file():
        try:
            table = json.loads(path.read_text()).get("layer_times")
        except (OSError, ValueError, AttributeError):
            table = None
    if table is None or "error" in table:
        why = (f"its layer-time profile failed ({table['error']})" if table else
               f"has no layer-time table ({path}: `make deploy` with TensorRT records one)")
        console.print(f"[yellow]prune.target: {ctx.recipe.prune.target.runner} {why}: the target is timed on this "
                      f"box's ONNX Runtime instead[/]")
        return None
    return lt.check(table, path)
