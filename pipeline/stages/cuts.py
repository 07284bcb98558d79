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
    return Cutter(fam, imgsz, c, ctx.recipe.bench.threads, grads_fn, evaluator, calib)
