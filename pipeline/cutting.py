"""How a cut is made from a recipe, shared by the prune stage and sparsity training's fade phase: the pruning spec,
the held-out images (train images not in the eval split) that score and refit it, and the cut itself in the
recipe's mode (uniform ratios, or per-group ratios from the sensitivity or latency scan)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from pipeline.core.errors import UserError
from pipeline.core.stage import Context, console
from pipeline.core.store import sha256_file


def spec_of(ctx: Context):
    from pipeline.adapters.yolo11_prune import PruneSpec

    c = ctx.recipe.prune
    if c.ratio is not None:
        return PruneSpec(ratio=c.ratio, importance=c.importance, global_pruning=c.global_pruning,
                         isomorphic=c.isomorphic, round_to=c.round_to, max_layer_ratio=c.max_layer_ratio)
    return PruneSpec(macs_target=c.macs_target, tolerance=c.tolerance, at_most=c.macs_at_most, importance=c.importance,
                     global_pruning=c.global_pruning, isomorphic=c.isomorphic, round_to=c.round_to,
                     max_layer_ratio=c.max_layer_ratio)

def held_out_images(ctx: Context, n: int, seed: int):
    """A seeded sample of train images that are not in the eval split (checked by content hash)."""
    from pipeline.stages.data import dataset, eval_set

    ds = dataset(ctx)
    if "train" not in ds.splits or not ds.split("train"):
        raise UserError("prune.mode/steps need train images to measure accuracy on; the dataset has none",
                        ctx.recipe.data.source)
    eval_hashes = set(eval_set(ctx, verify=False).hashes())  # the images bench scores, by content
    train = ds.split("train")
    order = np.random.default_rng(seed).permutation(len(train))
    picked = [train[i] for i in order if sha256_file(train[i].path) not in eval_hashes][:n]
    return picked, ds

def cut_tools(ctx: Context, data_dir: Path | None, needs_eval: bool):
    """(grads_fn for Taylor importance, the held-out mAP evaluator, the reconstruction's images): what a cut needs."""
    from pipeline.adapters import ultralytics_yolo as ua

    c = ctx.recipe.prune
    grads_fn = evaluator = calib = None
    if c.importance == "taylor":
        grads_fn = ua.taylor_grads_fn(data_dir / "data.yaml", ctx.recipe.model.imgsz, c.taylor_batches)
    if needs_eval:
        from pipeline.adapters.prune_plan import Evaluator
        from pipeline.eval.detect import PrePost

        n_eval = c.sensitivity.images
        imgs, ds = held_out_images(ctx, n_eval + (c.reconstruct.images if c.reconstruct.enabled else 0),
                                   c.sensitivity.seed)
        evaluator = Evaluator(imgs[:n_eval], ds, PrePost.from_recipe(ctx.recipe))
        if c.reconstruct.enabled:
            rest, overlap = imgs[n_eval:], False
            if not rest:  # a train split too small for both: fit on the evaluator's images, and say so
                rest, overlap = imgs[:c.reconstruct.images], True
                console.print(f"  [yellow]prune.reconstruct: the train split has only {len(imgs)} held-out "
                              f"images, all used by the held-out mAP check: the reconstruction fits on them "
                              f"too, so its before/after mAP is measured on the images it was fit on[/]")
            calib = (calib_tensor(ctx, rest), overlap)
    return grads_fn, evaluator, calib

def plan_cut(ctx: Context, model, data_dir: Path, out: Path) -> dict:
    """Plan the cut of `model` as this stage would (spec, mode, search), without reconstruction: the fade phase
    of sparsity training trains toward it. Returns {"history", "info", "plan"} (JSON)."""
    c = ctx.recipe.prune
    grads_fn, evaluator, _ = cut_tools(ctx, data_dir, c.mode != "uniform")
    out.mkdir(parents=True, exist_ok=True)
    _, history, info, plan = make_cut(ctx, model, spec_of(ctx), grads_fn, evaluator, out)
    info = {k: v for k, v in info.items() if k != "seconds"}
    cut = {"history": history, "info": info, "plan": plan}
    if (out / "sensitivity.json").is_file():  # the scan's table and plot are drawn again where the cut is made
        cut["sensitivity"] = json.loads((out / "sensitivity.json").read_text())
    return json.loads(json.dumps(cut))

def calib_tensor(ctx: Context, images):
    """The reconstruction's images: letterboxed as bench preprocesses them, NCHW float32."""
    import cv2
    import torch

    from pipeline.eval.detect import PrePost, letterbox

    if not images:
        raise UserError("prune.reconstruct needs held-out train images beyond the sensitivity images; the train "
                        "split has none left (set prune.reconstruct.enabled=false or add train images)",
                        ctx.recipe.data.source)
    if len(images) < ctx.recipe.prune.reconstruct.images:
        console.print(f"  [yellow]prune.reconstruct: only {len(images)} held-out train images (asked for "
                      f"{ctx.recipe.prune.reconstruct.images})[/]")
    spec = PrePost.from_recipe(ctx.recipe)
    return torch.from_numpy(np.concatenate([letterbox(cv2.imread(str(im.path)), spec)[0] for im in images]))

def make_cut(ctx: Context, model, spec, grads_fn, evaluator, out: Path):
    """Cut `model` to `spec` in the recipe's mode: (pruned, history, info, plan). Torch-Pruning's index-mapping memo
    stays installed for the whole cut (the scan, the uniform reference and the chosen cut)."""
    from pipeline.adapters import yolo11_prune as yp

    with yp.fast_index_mapping():
        return _make_cut(ctx, model, spec, grads_fn, evaluator, out)


def _make_cut(ctx: Context, model, spec, grads_fn, evaluator, out: Path):
    from pipeline.adapters import prune_plan as pp
    from pipeline.adapters import yolo11_prune as yp

    c = ctx.recipe.prune
    log = lambda s: console.print(s)  # noqa: E731
    if c.mode == "uniform":
        pruned, history, info = yp.prune(model, ctx.recipe.model.imgsz, spec, grads_fn=grads_fn, log=log)
        return pruned, history, info, {}
    imgsz = ctx.recipe.model.imgsz
    threads, runs = ctx.recipe.bench.threads, c.sensitivity.latency_runs
    prepared = yp.prepare(model)
    grps = pp.groups(prepared, imgsz)
    sens = pp.sensitivity(prepared, imgsz, spec, grps, evaluator, c.sensitivity.ratio, log=log, grads_fn=grads_fn)
    console.print("  the uniform candidate at the same target (the reference; in latency mode also profiled):")
    # Only a reference: where round_to's steps jump over the band for uniform ratios (a model an iterative step cut
    # already), the nearest uniform cut stands in for it (plan.json's compare records its MACs) instead of refusing
    # a cut the weighted search may still land.
    uniform, _, uinfo = yp.prune(model, imgsz, dataclasses.replace(spec, accept=spec.accept or (0.0, 1.0)),
                                 grads_fn=grads_fn, log=log)
    lat = elasticity = None
    if c.mode == "latency":
        base_times = pp.onnx_node_times(prepared, imgsz, threads, runs)
        elasticity = pp.conv_elasticity(prepared, uniform, base_times,
                                        pp.onnx_node_times(uniform, imgsz, threads, runs))
        lat = pp.group_latency(grps, base_times, elasticity)
    w = pp.weights(c.mode, sens, lat)
    chosen, history, info = yp.prune(model, imgsz, dataclasses.replace(spec, group_weights=w), grads_fn=grads_fn,
                                     log=log)
    ms = pp.measure_latency({"base": prepared, "uniform": uniform, c.mode: chosen}, imgsz, ctx.recipe.bench.threads)
    maps = {"base": sens["base_map50_95"], "uniform": evaluator(uniform), c.mode: evaluator(chosen)}
    compare = {k: {"latency_ms": ms[k], "map50_95_before_finetune": maps[k],
                   "macs_fraction": {"base": 1.0, "uniform": uinfo["macs_fraction"],
                                     c.mode: info["macs_fraction"]}[k]} for k in ms}
    console.print("  ORT CPU latency, held-out mAP50-95 before fine-tuning: " +
                  ", ".join(f"{k} {v['latency_ms']:.2f} ms / {v['map50_95_before_finetune']:.4f}"
                            for k, v in compare.items()))
    ratios = info["channel_ratio"]["ratios"] if isinstance(info["channel_ratio"], dict) else None
    pp.save_table_and_plot(sens, lat, ratios, out)
    plan = {"compare": compare, "latency_ms": ms[c.mode]}
    if elasticity is not None:
        plan["conv_elasticity"] = {k: round(v, 3) for k, v in elasticity.items()}
    return chosen, history, info, plan
