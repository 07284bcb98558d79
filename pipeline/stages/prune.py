"""`prune` stage: structured DepGraph pruning of the loaded model to a MACs target (or channel ratio).

Writes pruned.pt (an FP32 ultralytics checkpoint that plain `YOLO(path)` loads), history.json (Torch-Pruning's
pruning history, one entry per step: replayed on the base model it rebuilds the pruned architecture) and
plan.json (the spec, the search trials, requested vs effective MACs, and every conv's channel counts).

Modes (prune.mode): `uniform` ratios; `sensitivity` (each group pruned alone, mAP drop measured on held-out
train images; less sensitive groups pruned more); `latency` (group time measured with ONNX Runtime's profiler,
pruning the groups that buy the most time per point of accuracy). The non-uniform modes also save
sensitivity.csv/.json/.png and time the chosen candidate against the uniform one at the same MACs target.
Iterative (prune.steps > 1): k steps toward the target (geometric waypoints), each followed by a short fine-tune
(stock trainer) and a held-out mAP check that stops the schedule early when a step loses more than
prune.max_step_drop. A waypoint round_to's granularity cannot reach settles for the reachable cut nearest it that
leaves the last step room, or is skipped (plan.json says which); the last step lands within the tolerance or refuses.
Reconstruction (prune.reconstruct, after every cut): the pruned convs are refit by least squares to the unpruned
model's features on held-out train images (pipeline/adapters/reconstruct.py); plan.json records each layer's
error before/after and the held-out mAP50-95 before/after.
Sparsity training (prune.sparsity, pipeline/stages/sparsity.py): what is cut is the model after group-sparsity
training of the loaded one (shipped weights reused when their record matches, else trained here). When its last
phase was a fade phase, the cut is the one that phase planned and trained toward (its record holds Torch-Pruning's
history): applied as it is, checked exact on images, its scan's table and plot drawn again here.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

from pipeline.core.console import detail
from pipeline.core.errors import UnreachableTarget, UserError
from pipeline.core.stage import Context, StageResult, console, run_stage
from pipeline.core.store import StageRecord
from pipeline.cutting import Cutter, make_cut, spec_of
from pipeline.stages.cuts import cutter, table_path

VERSION = 6
WAYPOINT_GAP = 0.1  # an iterative waypoint keeps MACs >= (1 + this) x the final target, relative to the model it cuts


def run(ctx: Context) -> StageRecord:
    c = ctx.recipe.prune
    spec = spec_of(c)
    if c.steps > 1 and c.ratio is not None:
        raise UserError("prune.steps > 1 needs prune.macs_target (the steps approach it), not prune.ratio",
                        ctx.recipe_path)
    if c.mode != "uniform" and c.ratio is not None:
        raise UserError(f"prune.mode={c.mode} distributes a MACs target over groups: set prune.macs_target, "
                        f"not prune.ratio", ctx.recipe_path)
    needs_eval = c.mode != "uniform" or c.steps > 1 or c.reconstruct.enabled
    if c.steps > 1 and c.target is not None and c.target.kind != "macs":
        raise UserError(f"prune.steps > 1 approaches a MACs target; prune.target is {c.target.describe()}",
                        ctx.recipe_path)
    if c.sparsity.enabled and c.steps > 1:
        raise UserError("prune.sparsity trains before a single cut; it does not combine with prune.steps > 1",
                        ctx.recipe_path)
    config = {**c.model_dump(), "imgsz": ctx.recipe.model.imgsz}
    if c.steps > 1:
        config["step_finetune"] = ctx.recipe.finetune.model_dump()
    inputs = {"model": ctx.output("load", "model")}
    if needs_eval or c.importance == "taylor" or c.sparsity.enabled:
        inputs["data"] = ctx.output("data", "yolo")
    table = table_path(ctx)
    if table is not None and table.is_file():  # a device's layer times: a new deploy re-plans the cut
        inputs["device_report"] = table

    def fn(ctx: Context, out: Path, inputs) -> StageResult:
        from pipeline.adapters import pruning as yp
        from pipeline.adapters import ultralytics_yolo as ua

        model = ua.load_detection_model(inputs["model"])
        sparse = None
        if c.sparsity.enabled:
            from pipeline.stages import sparsity

            path, srec = sparsity.sparse_weights(ctx, inputs["model"], inputs["data"])
            model = ua.load_detection_model(path)
            sparse = {k: srec[k] for k in ("source", "path", "key", "model_digest", "data_digest", "settings",
                                           "epochs", "final_val_map50_95")}
        cut = cutter(ctx, inputs.get("data"), needs_eval)

        if sparse is not None and "cut" in srec:  # the fade phase trained toward this plan: apply it
            pruned, history, info, plan = _planned_cut(ctx, model, srec["cut"], cut, out)
            steps = [{"step": 1, **_summary(info), **plan}]
        elif c.steps == 1:
            pruned, history, info, plan = _prune_once(ctx, model, spec, cut, out)
            steps = [{"step": 1, **_summary(info), **plan}]
        else:
            pruned, history, info, steps = _iterative(ctx, model, spec, cut, out, inputs)
        pruned.names = model.names
        ua.save_checkpoint(pruned, out / "pruned.pt", pruning={"history_file": "history.json", "spec": _jsonable(spec),
                                                               "macs_fraction": info["macs_fraction"]})
        yp.save_history(history, out / "history.json")
        meta = {"spec": _jsonable(spec), "mode": c.mode, "steps": steps, "sparsity": sparse, "family": cut.fam.name,
                **info}
        (out / "plan.json").write_text(json.dumps({**meta, "channels": yp.channel_report(pruned)}, indent=1))
        (out / "model.json").write_text(json.dumps({"params": info["params"], "macs": info["macs"]}, indent=1))
        tgt = info.get("target") or {}
        where = ""
        if "within_tolerance" in tgt and not tgt["within_tolerance"]:
            where = (f"; {tgt['distance']:+.4f} from the {tgt['macs_fraction']:g}x target: round_to "
                     f"{spec.round_to}'s steps jump over its {tgt['tolerance']} band")
        elif "measured" in tgt:
            where = (f"; {tgt['kind']} {tgt['measured']:.4g}" + (f" [{tgt['ci'][0]:.4g}, {tgt['ci'][1]:.4g}]"
                                                                   if tgt.get("ci") else "")
                     + f" on {tgt['runner']} (target {tgt['value']:g})")
        summary = (f"{info['macs_fraction']:.3f}x MACs, {info['params_fraction']:.3f}x params ({c.mode}"
                   + (f", {len(steps)} steps" if len(steps) > 1 else "")
                   + (", the sparsity fade's planned cut" if sparse is not None and "cut" in srec else "")
                   + f"){where}")
        requested = {"macs_target": spec.macs_target, "ratio": spec.ratio, "round_to": spec.round_to,
                     "mode": c.mode, "steps": c.steps,
                     **({"target": c.target.model_dump(exclude_none=True)} if c.target is not None else {})}
        effective = {"macs_fraction": info["macs_fraction"], "channel_ratio": info["channel_ratio"],
                     "round_to": spec.round_to, "mode": c.mode, "steps": len(steps),
                     **({"target": tgt} if tgt else {})}
        outputs = {"model": "pruned.pt", "history": "history.json", "plan": "plan.json", "info": "model.json"}
        for extra in ("sensitivity.csv", "sensitivity.json", "sensitivity.png"):
            if (out / extra).is_file():
                outputs[extra.replace(".", "_")] = extra
        metrics = {k: v for k, v in info.items() if k not in ("trials", "channel_ratio")}
        metrics["steps"] = [_summary(s) for s in steps]
        metrics["sparsity"] = sparse
        return StageResult(outputs=outputs, metrics=metrics, requested=requested, effective=effective,
                           summary=summary)

    return run_stage(ctx, "prune", VERSION, config, inputs, fn)


def _planned_cut(ctx: Context, model, cut: dict, cutter: Cutter, out: Path):
    """Apply the cut a fade phase trained toward; its removed channels carry zero, so the outputs must not change
    (checked on real images). The reconstruction is skipped when they do not: there is nothing to refit."""
    import time

    import torch

    from pipeline.adapters import pruning as yp

    t0 = time.time()
    if "sensitivity" in cut:
        from pipeline.adapters.prune_plan import save_table_and_plot

        sens = cut["sensitivity"]
        save_table_and_plot(sens, {r["group"]: r["latency_ms"] for r in sens["groups"] if r["latency_ms"] is not None},
                            {r["group"]: r["ratio"] for r in sens["groups"] if r["ratio"] is not None}, out)
    imgsz, fam, evaluator, calib = cutter.imgsz, cutter.fam, cutter.evaluator, cutter.calib
    prepared = yp.prepare(model, fam)
    pruned = yp.cut(model, cut["history"], imgsz, fam)
    x = calib[0][:8] if calib is not None else torch.rand(2, 3, imgsz, imgsz)
    with torch.no_grad():
        a, b = fam.deploy_form(prepared)(x), fam.deploy_form(pruned)(x)
    a, b = (a[0] if isinstance(a, tuple) else a), (b[0] if isinstance(b, tuple) else b)
    diff, scale = float((a - b).abs().max()), float(a.abs().max())
    exact = diff <= 1e-5 * max(scale, 1.0)  # float32 summation order only (outputs: boxes in pixels, scores)
    base_macs, base_params = yp.macs_params(prepared, imgsz, fam)
    macs, params = yp.macs_params(pruned, imgsz, fam)
    info = {**cut["info"], "base_macs": base_macs, "base_params": base_params, "macs": macs, "params": params,
            "macs_fraction": macs / base_macs, "params_fraction": params / base_params}
    plan = {**cut["plan"], "planned_by_fade_phase": True, "cut_max_abs_diff": diff, "output_max_abs": scale,
            "cut_exact": exact}
    detail(f"  the fade phase's planned cut: {info['macs_fraction']:.3f}x MACs, outputs (up to {scale:.3g}) "
                  f"change by at most {diff:.2e}" + (" (the removed channels carry zero)" if exact else
                                                     " [yellow](not exact: the weights did not finish fading)[/]"))
    if evaluator is not None:
        plan["map50_95_after_cut"] = evaluator(pruned)
    if calib is not None:
        if not exact:
            plan["reconstruct"] = _reconstruct(ctx, model, pruned, cut["history"], cutter)
        else:
            plan["reconstruct"] = {"skipped": f"the cut is exact (max abs diff {diff:.2e}): nothing to refit"}
    info["seconds"] = time.time() - t0
    return pruned, cut["history"], info, plan


def _jsonable(spec) -> dict:
    d = dataclasses.asdict(spec)
    if d.get("group_weights"):
        d["group_weights"] = {k: round(v, 6) for k, v in d["group_weights"].items()}
    return d


def _summary(d: dict) -> dict:
    keep = ("step", "macs_fraction", "params_fraction", "map50_95", "drop", "latency_ms", "stopped", "seconds",
            "target", "skipped")
    out = {k: d[k] for k in keep if k in d}
    if "reconstruct" in d:
        r = d["reconstruct"]
        out["reconstruct"] = {k: r[k] for k in ("map50_95_before", "map50_95_after", "mse_before", "mse_after",
                                                "seconds") if k in r}
    return out


def _reconstruct(ctx: Context, reference, pruned, history, cutter: Cutter) -> dict:
    """Refit the pruned model's convs to the reference's features (in place) on the cutter's reconstruction images;
    returns the record."""
    from pipeline.adapters import pruning as yp
    from pipeline.adapters.reconstruct import reconstruct
    from pipeline.core.console import task

    r = ctx.recipe.prune.reconstruct
    (calib, overlap), evaluator, fam = cutter.calib, cutter.evaluator, cutter.fam
    before = evaluator(pruned)
    with task(f"reconstruction on {len(calib)} images: convs", None) as prog:
        stats = reconstruct(yp.prepare(reference, fam), pruned, history, calib, ctx.recipe.model.imgsz, fam,
                            positions=r.positions, alpha=r.alpha, seed=r.seed,
                            progress=lambda k, n: prog.update(k))
    after = evaluator(pruned)
    detail(f"  reconstruction: {len(stats['layers'])} convs refit in {stats['seconds']:.0f}s, mean feature "
                  f"MSE {stats['mse_before']:.4f} -> {stats['mse_after']:.4f}; held-out mAP50-95 "
                  f"{before:.4f} -> {after:.4f}")
    return {**stats, "map50_95_before": before, "map50_95_after": after, "fit_on_eval_images": overlap}


def _prune_once(ctx: Context, model, spec, cutter: Cutter, out: Path):
    """One pruning pass to spec.macs_target (relative to `model`), then the reconstruction when the cutter has
    reconstruction images. Returns (pruned, history, info, plan)."""
    pruned, history, info, plan = make_cut(cutter, model, spec, out)
    if cutter.calib is not None:
        plan["reconstruct"] = _reconstruct(ctx, model, pruned, history, cutter)
        info["seconds"] += plan["reconstruct"]["seconds"]
    return pruned, history, info, plan


def _iterative(ctx: Context, model, spec, cutter: Cutter, out: Path, inputs):
    from pipeline.adapters import pruning as yp
    from pipeline.adapters import ultralytics_yolo as ua

    c, f, fam, evaluator = ctx.recipe.prune, ctx.recipe.finetune, cutter.fam, cutter.evaluator
    imgsz = ctx.recipe.model.imgsz
    base_macs, base_params = yp.macs_params(yp.prepare(model, fam), imgsz, fam)
    base_map = evaluator(model)
    cur, frac, history, steps, total_s, kept = model, 1.0, [], [], 0.0, 0
    work = ctx.run_dir / ".work" / "prune-steps"
    shutil.rmtree(work, ignore_errors=True)
    info = None
    for i in range(1, c.steps + 1):
        goal = c.macs_target ** (i / c.steps)
        console.print(f"  step {i}/{c.steps}: to {goal:.3f}x the base MACs")
        step_spec = dataclasses.replace(spec, macs_target=min(goal / frac, 0.999))
        if i < c.steps:
            # A waypoint: round_to's granularity may not allow ±tolerance there, so it settles for the reachable cut
            # nearest the goal that still leaves the last step at least WAYPOINT_GAP of the way to the final target
            # (and removes at least 2% of the MACs); with none, the waypoint is skipped. The last step is exact.
            final = c.macs_target / frac
            step_spec = dataclasses.replace(step_spec, tolerance=max(spec.tolerance, 0.1),
                                            accept=(min(final * (1 + WAYPOINT_GAP), 0.98), 0.98))
        try:
            pruned, h, inf, plan = _prune_once(ctx, cur, step_spec, cutter, out)
        except UnreachableTarget as e:
            if i < c.steps:
                steps.append({"step": i, "target": goal, "skipped": e.problem})
                console.print(f"  [yellow]step {i}: skipped ({e.problem}); the next step cuts further instead[/]")
                continue
            if not history:
                raise
            raise UserError(f"prune step {i}/{c.steps}: {e.problem}; after step {len(history)} every conv is already "
                            f"a multiple of round_to={spec.round_to}, too coarse for this step on this model: use "
                            f"fewer prune.steps or a smaller prune.round_to", ctx.recipe_path) from None
        pruned.names = model.names
        total_s += inf["seconds"]
        rec = {"step": i, "target": goal, **plan}
        if i < c.steps:
            ck = work / f"step{i}" / "pruned.pt"
            ck.parent.mkdir(parents=True, exist_ok=True)
            ua.save_checkpoint(pruned, ck)
            opts = ua.TrainOptions(c.step_epochs, imgsz, {**f.trainer_args(), "close_mosaic": 0,
                                                          "warmup_epochs": min(f.warmup_epochs, 1.0),
                                                          **fam.train_args}, label=f"step {i} fine-tune")
            last = ua.finetune(ck, inputs["data"] / "data.yaml", work / f"step{i}" / "train", opts)
            tuned = ua.load_detection_model(last)
            if fam.signature(tuned) != fam.signature(pruned):
                raise UserError("the step's fine-tuned checkpoint lost the pruned architecture", last)
            tuned.names = model.names
            pruned = tuned
        m = evaluator(pruned)
        macs, params = yp.macs_params(pruned, imgsz, fam)
        rec.update({"macs_fraction": macs / base_macs, "params_fraction": params / base_params, "map50_95": m,
                    "drop": base_map - m, "finetuned": i < c.steps})
        console.print(f"  step {i}: {macs / base_macs:.3f}x MACs, held-out mAP50-95 {m:.4f} "
                      f"(base {base_map:.4f}){' after ' + str(c.step_epochs) + ' epochs' if i < c.steps else ''}")
        if i < c.steps and c.max_step_drop is not None and base_map - m > c.max_step_drop:
            rec["stopped"] = f"drop {base_map - m:.4f} > max_step_drop {c.max_step_drop}: kept step {kept}"
            steps.append(rec)
            console.print(f"  [yellow]stopped early: {rec['stopped']}[/]")
            break
        steps.append(rec)
        cur, frac, kept = pruned, macs / base_macs, i
        history.append(h)
        info = {"base_macs": base_macs, "base_params": base_params, "macs": macs, "params": params,
                "macs_fraction": frac, "params_fraction": params / base_params,
                "channel_ratio": inf["channel_ratio"], "trials": inf["trials"]}
    if not history:
        raise UserError(f"the first pruning step already lost more than prune.max_step_drop={c.max_step_drop} "
                        f"mAP50-95: nothing to keep", ctx.recipe_path)
    shutil.rmtree(work, ignore_errors=True)
    info["seconds"] = total_s
    low, high, band = yp._band(dataclasses.replace(spec, macs_target=c.macs_target))
    info["target"] = {"macs_fraction": c.macs_target, "landed": frac, "distance": frac - c.macs_target,
                      "tolerance": band, "within_tolerance": bool(low <= frac <= high)}
    return cur, history, info, steps
