"""How a cut is made, shared by the prune stage and sparsity training's fade phase: the pruning spec from the recipe's
prune section, the tools built from held-out images (train images not in the eval split) that score and refit it,
and the cut itself in the recipe's mode (uniform ratios, or per-group ratios from the sensitivity or latency scan).

Nothing here reads the run context: the stage layer (pipeline/stages/prune.py: `cutter`) picks the held-out images
and hands over a `Cutter` with everything a cut uses."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from pipeline.core.errors import UserError
from pipeline.core.stage import console


def spec_of(c):
    """The pruning spec of a recipe's prune section."""
    from pipeline.adapters.pruning import PruneSpec

    if c.ratio is not None:
        return PruneSpec(ratio=c.ratio, importance=c.importance, global_pruning=c.global_pruning,
                         isomorphic=c.isomorphic, round_to=c.round_to, max_layer_ratio=c.max_layer_ratio)
    return PruneSpec(macs_target=c.macs_target, tolerance=c.tolerance, at_most=c.macs_at_most, importance=c.importance,
                     global_pruning=c.global_pruning, isomorphic=c.isomorphic, round_to=c.round_to,
                     max_layer_ratio=c.max_layer_ratio)


@dataclasses.dataclass
class Cutter:
    """What a cut uses: the model's family, the input size, the recipe's prune section, the runner's threads (the
    latency scan), and the tools built from held-out images: Taylor importance's gradients, the held-out mAP
    evaluator, the reconstruction's images (a tensor, and whether they are the evaluator's own)."""

    fam: object
    imgsz: int
    cfg: object  # core.config.PruneCfg
    threads: int
    grads_fn: object = None
    evaluator: object = None
    calib: tuple | None = None

    @property
    def spec(self):
        return spec_of(self.cfg)


def cut_tools(fam, imgsz: int, c, prepost, data_yaml: Path | None, held_out=None, where=None):
    """(grads_fn for Taylor importance, the held-out mAP evaluator, the reconstruction's images). `held_out` is
    (images, dataset) when the cut needs held-out images (else None); prepost the letterbox and post-processing."""
    from pipeline.adapters import ultralytics_yolo as ua

    grads_fn = evaluator = calib = None
    if c.importance == "taylor":
        grads_fn = ua.taylor_grads_fn(data_yaml, imgsz, c.taylor_batches)
    if held_out is not None:
        from pipeline.adapters.prune_plan import Evaluator

        imgs, ds = held_out
        n_eval = c.sensitivity.images
        evaluator = Evaluator(imgs[:n_eval], ds, prepost, fam)
        if c.reconstruct.enabled:
            rest, overlap = imgs[n_eval:], False
            if not rest:  # a train split too small for both: fit on the evaluator's images, and say so
                rest, overlap = imgs[:c.reconstruct.images], True
                console.print(f"  [yellow]prune.reconstruct: the train split has only {len(imgs)} held-out "
                              f"images, all used by the held-out mAP check: the reconstruction fits on them "
                              f"too, so its before/after mAP is measured on the images it was fit on[/]")
            calib = (calib_tensor(rest, prepost, c.reconstruct.images, where), overlap)
    return grads_fn, evaluator, calib


def calib_tensor(images, prepost, wanted: int, where=None):
    """The reconstruction's images: letterboxed as bench preprocesses them, NCHW float32."""
    import cv2
    import torch

    from pipeline.eval.detect import letterbox

    if not images:
        raise UserError("prune.reconstruct needs held-out train images beyond the sensitivity images; the train "
                        "split has none left (set prune.reconstruct.enabled=false or add train images)", where)
    if len(images) < wanted:
        console.print(f"  [yellow]prune.reconstruct: only {len(images)} held-out train images (asked for "
                      f"{wanted})[/]")
    return torch.from_numpy(np.concatenate([letterbox(cv2.imread(str(im.path)), prepost)[0] for im in images]))


def plan_cut(cutter: Cutter, model, out: Path) -> dict:
    """Plan the cut of `model` as the prune stage would (spec, mode, search), without reconstruction: the fade phase
    of sparsity training trains toward it. Returns {"history", "info", "plan"} (JSON)."""
    out.mkdir(parents=True, exist_ok=True)
    _, history, info, plan = make_cut(cutter, model, cutter.spec, out)
    info = {k: v for k, v in info.items() if k != "seconds"}
    cut = {"history": history, "info": info, "plan": plan}
    if (out / "sensitivity.json").is_file():  # the scan's table and plot are drawn again where the cut is made
        cut["sensitivity"] = json.loads((out / "sensitivity.json").read_text())
    return json.loads(json.dumps(cut))


def make_cut(cutter: Cutter, model, spec, out: Path):
    """Cut `model` to `spec` in the recipe's mode: (pruned, history, info, plan). Torch-Pruning's index-mapping memo
    stays installed for the whole cut (the scan, the uniform reference and the chosen cut)."""
    from pipeline.adapters import pruning as yp

    with yp.fast_index_mapping():
        return _make_cut(cutter, model, spec, out)


def _make_cut(cutter: Cutter, model, spec, out: Path):
    from pipeline.adapters import prune_plan as pp
    from pipeline.adapters import pruning as yp

    c, fam, imgsz, evaluator, grads_fn = cutter.cfg, cutter.fam, cutter.imgsz, cutter.evaluator, cutter.grads_fn
    log = lambda s: console.print(s)  # noqa: E731
    if c.mode == "uniform":
        pruned, history, info = yp.prune(model, imgsz, spec, fam, grads_fn=grads_fn, log=log)
        return pruned, history, info, {}
    threads, runs = cutter.threads, c.sensitivity.latency_runs
    prepared = yp.prepare(model, fam)
    grps = pp.groups(prepared, imgsz, fam)
    sens = pp.sensitivity(prepared, imgsz, spec, grps, evaluator, c.sensitivity.ratio, fam, log=log,
                          grads_fn=grads_fn)
    console.print("  the uniform candidate at the same target (the reference; in latency mode also profiled):")
    # Only a reference: where round_to's steps jump over the band for uniform ratios (a model an iterative step cut
    # already), the nearest uniform cut stands in for it (plan.json's compare records its MACs) instead of refusing
    # a cut the weighted search may still land.
    uniform, _, uinfo = yp.prune(model, imgsz, dataclasses.replace(spec, accept=spec.accept or (0.0, 1.0)), fam,
                                 grads_fn=grads_fn, log=log)
    lat = elasticity = None
    if c.mode == "latency":
        base_times = pp.onnx_node_times(prepared, imgsz, fam, threads, runs)
        elasticity = pp.conv_elasticity(prepared, uniform, base_times,
                                        pp.onnx_node_times(uniform, imgsz, fam, threads, runs))
        lat = pp.group_latency(grps, base_times, elasticity)
    w = pp.weights(c.mode, sens, lat)
    chosen, history, info = yp.prune(model, imgsz, dataclasses.replace(spec, group_weights=w), fam,
                                     grads_fn=grads_fn, log=log)
    ms = pp.measure_latency({"base": prepared, "uniform": uniform, c.mode: chosen}, imgsz, fam, threads)
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
