"""How a cut is made, shared by the prune stage and sparsity training's fade phase: the pruning spec from the recipe's
prune section, the tools built from held-out images (train images not in the eval split) that score and refit it,
and the cut itself in the recipe's mode (uniform ratios, or per-group ratios from the sensitivity or latency scan).

Nothing here reads the run context: the stage layer (pipeline/stages/prune.py: `cutter`) picks the held-out images
and hands over a `Cutter` with everything a cut uses."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from pipeline.core.console import detail, warn
from pipeline.core.errors import UnreachableTarget, UserError


def spec_of(c):
    """The pruning spec of a recipe's prune section (a `target` of MACs is its macs_target; a params, speed-up or
    latency target starts its search from the MACs fraction in the spec: see `cut_to_target`)."""
    from pipeline.adapters.pruning import PruneSpec

    if c.ratio is not None:
        return PruneSpec(ratio=c.ratio, importance=c.importance, global_pruning=c.global_pruning,
                         isomorphic=c.isomorphic, round_to=c.round_to, max_layer_ratio=c.max_layer_ratio)
    macs = c.macs_target
    if c.target is not None:
        t = c.target
        macs = {"macs": t.value, "params": t.value, "speedup": min(0.95, 1 / t.value)}.get(t.kind, macs or 0.5)
    return PruneSpec(macs_target=macs, tolerance=c.tolerance, at_most=c.macs_at_most, importance=c.importance,
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
    latency_table: dict | None = None  # a device's layer times (adapters/latency_table.py), for a device target

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
                warn(f"  prune.reconstruct: the train split has only {len(imgs)} held-out images, all used by "
                     f"the held-out mAP check: the reconstruction fits on them too, so its before/after mAP is "
                     f"measured on the images it was fit on")
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
        warn(f"  prune.reconstruct: only {len(images)} held-out train images (asked for {wanted})")
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
    """Cut `model` to `spec` in the recipe's mode, or to the recipe's params, speed-up or latency target
    (`cut_to_target`): (pruned, history, info, plan). Torch-Pruning's index-mapping memo stays installed for the whole
    cut (the scan, the uniform reference and the chosen cut)."""
    from pipeline.adapters import pruning as yp

    t = cutter.cfg.target
    with yp.fast_index_mapping():
        if t is not None and t.kind != "macs" and spec.ratio is None:
            return cut_to_target(cutter, model, spec, out)
        return _make_cut(cutter, model, spec, out)


@dataclasses.dataclass
class _Scan:
    """The non-uniform modes' scan of `model`: its groups, their sensitivity, the uniform reference cut at the spec's
    target, (latency mode) the groups' ORT latency and the convs' elasticity, and the per-group weights."""

    prepared: object
    sens: dict
    uniform: object
    uinfo: dict
    lat: dict | None
    elasticity: dict | None
    weights: dict


def _scan(cutter: Cutter, model, spec) -> _Scan:
    from pipeline.adapters import prune_plan as pp
    from pipeline.adapters import pruning as yp

    c, fam, imgsz, evaluator, grads_fn = cutter.cfg, cutter.fam, cutter.imgsz, cutter.evaluator, cutter.grads_fn
    log = detail
    threads, runs = cutter.threads, c.sensitivity.latency_runs
    prepared = yp.prepare(model, fam)
    grps = pp.groups(prepared, imgsz, fam)
    sens = pp.sensitivity(prepared, imgsz, spec, grps, evaluator, c.sensitivity.ratio, fam, log=log,
                          grads_fn=grads_fn)
    detail("  the uniform candidate at the same target (the reference; in latency mode also profiled):")
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
    return _Scan(prepared, sens, uniform, uinfo, lat, elasticity, pp.weights(c.mode, sens, lat))


def _make_cut(cutter: Cutter, model, spec, out: Path):
    from pipeline.adapters import prune_plan as pp
    from pipeline.adapters import pruning as yp

    c, fam, imgsz, evaluator, grads_fn = cutter.cfg, cutter.fam, cutter.imgsz, cutter.evaluator, cutter.grads_fn
    log = detail
    if c.mode == "uniform":
        pruned, history, info = yp.prune(model, imgsz, spec, fam, grads_fn=grads_fn, log=log)
        return pruned, history, info, {}
    sc = _scan(cutter, model, spec)
    chosen, history, info = yp.prune(model, imgsz, dataclasses.replace(spec, group_weights=sc.weights), fam,
                                     grads_fn=grads_fn, log=log)
    ms = pp.measure_latency({"base": sc.prepared, "uniform": sc.uniform, c.mode: chosen}, imgsz, fam, cutter.threads)
    maps = {"base": sc.sens["base_map50_95"], "uniform": evaluator(sc.uniform), c.mode: evaluator(chosen)}
    compare = {k: {"latency_ms": ms[k], "map50_95_before_finetune": maps[k],
                   "macs_fraction": {"base": 1.0, "uniform": sc.uinfo["macs_fraction"],
                                     c.mode: info["macs_fraction"]}[k]} for k in ms}
    detail("  ORT CPU latency, held-out mAP50-95 before fine-tuning: " +
                  ", ".join(f"{k} {v['latency_ms']:.2f} ms / {v['map50_95_before_finetune']:.4f}"
                            for k, v in compare.items()))
    ratios = info["channel_ratio"]["ratios"] if isinstance(info["channel_ratio"], dict) else None
    pp.save_table_and_plot(sc.sens, sc.lat, ratios, out)
    plan = {"compare": compare, "latency_ms": ms[c.mode]}
    if sc.elasticity is not None:
        plan["conv_elasticity"] = {k: round(v, 3) for k, v in sc.elasticity.items()}
    return chosen, history, info, plan


# ------------------------------------------------------------------------------------------------ other targets
TARGET_EVALS = 8  # cuts measured at most while searching a params, speed-up or latency target
SPEED_SCHEDULE = dict(warmup=3, per_round=3, min_rounds=6, max_rounds=60, rel_width=0.06, cap_s=25.0, check_every=3)


class _Measure:
    """How a candidate cut is measured against the target: its params fraction; its speed-up over the base on ONNX
    Runtime (the two timed together, interleaved: eval/interleaved.py) or its latency there; or its latency predicted
    by a device's layer-time table."""

    def __init__(self, cutter: Cutter, model):
        from pipeline.adapters import latency_table as lt
        from pipeline.adapters import pruning as yp

        self.cutter, self.t = cutter, cutter.cfg.target
        fam, imgsz = cutter.fam, cutter.imgsz
        self.prepared = yp.prepare(model, fam)
        self.base_params = yp.macs_params(self.prepared, imgsz, fam)[1]
        self.table = cutter.latency_table if self.t.kind in ("speedup", "latency_ms") else None
        self.runner = "onnxruntime" if self.table is None else self.t.runner
        if self.table is not None:
            self.base_macs = lt.conv_macs(fam.deploy_form(self.prepared), imgsz)
            self.base_ms = lt.predict_ms(self.table, self.base_macs, self.base_macs)
        elif self.t.kind in ("speedup", "latency_ms"):
            self._base_session = self._session(self.prepared)

    def _session(self, model):
        import tempfile

        from pipeline.adapters import prune_plan as pp

        self._tmp = getattr(self, "_tmp", None) or tempfile.TemporaryDirectory(prefix="yolo-edge-target-")
        path = Path(self._tmp.name) / f"{id(model)}.onnx"
        return pp._ort_session(model, self.cutter.imgsz, path, self.cutter.threads, self.cutter.fam)

    def __call__(self, cand) -> dict:
        """{"value": the measured quantity, "ci": its 95% interval or None, "meets": bool}."""
        from pipeline.adapters import latency_table as lt
        from pipeline.adapters import pruning as yp

        t, fam, imgsz = self.t, self.cutter.fam, self.cutter.imgsz
        if t.kind == "params":
            v = yp.macs_params(cand, imgsz, fam)[1] / self.base_params
            return {"value": v, "ci": None, "meets": v <= t.value}
        if self.table is not None:
            ms = lt.predict_ms(self.table, self.base_macs, lt.conv_macs(fam.deploy_form(cand), imgsz))
            v = self.base_ms / ms if t.kind == "speedup" else ms
            return {"value": v, "ci": None, "ms": ms, "meets": v >= t.value if t.kind == "speedup" else v <= t.value}
        import numpy as np

        from pipeline.eval.interleaved import Schedule, time_interleaved

        x = np.random.default_rng(0).random((1, 3, imgsz, imgsz), dtype=np.float32)
        sess = {"base": self._base_session, "cut": self._session(cand)}
        calls = {k: (lambda i, s=s: s.run(None, {"images": x})) for k, s in sess.items()}
        tm = time_interleaved(calls, [("base", "cut")], Schedule(**SPEED_SCHEDULE), label="target: timing",
                              progress=False)
        if t.kind == "speedup":
            r = tm.ratio("base", "cut")
            return {"value": r["estimate"], "ci": r["ci"], "ms": tm.items["cut"]["p50"],
                    "base_ms": tm.items["base"]["p50"], "meets": r["estimate"] >= t.value}
        v = tm.items["cut"]["p50"]
        return {"value": v, "ci": tm.items["cut"]["p50_ci"], "meets": v <= t.value}


def cut_to_target(cutter: Cutter, model, spec, out: Path):
    """The cut to a params, speed-up or latency target (prune.target): the MACs fraction the recipe's cut takes is
    searched (the mode's scan made once, at the first guess: for a speed-up S, 1/S of the MACs) until the measured
    value meets the target, on the safe side: the least-pruned candidate measured that meets it (at most the params
    or the latency, at least the speed-up). A speed-up or latency on ONNX Runtime is timed beside the base
    (interleaved) and carries its 95% interval; on a device, the layer-time table predicts it. Returns as
    `_make_cut`; info["target"] holds every candidate measured."""
    import math

    from pipeline.adapters import prune_plan as pp
    from pipeline.adapters import pruning as yp

    c, fam, imgsz, t = cutter.cfg, cutter.fam, cutter.imgsz, cutter.cfg.target
    log = detail
    quiet = lambda s: None  # noqa: E731
    measure = _Measure(cutter, model)
    detail(f"  target: {t.describe()}" + (f" (the layer-time table of {t.runner})" if measure.table else
                                                  " (measured here)" if t.kind != "params" else ""))
    sc = _scan(cutter, model, spec) if c.mode != "uniform" else None  # once, at the first guess
    weights = sc.weights if sc is not None else None
    trials, best, seen, t0 = [], None, {}, time.time()

    def attempt(m: float):
        nonlocal best
        s = dataclasses.replace(spec, macs_target=m, group_weights=weights, accept=None)
        cand, hist, info = yp.prune(model, imgsz, s, fam, grads_fn=cutter.grads_fn, log=quiet)
        key = (info["macs"], info["params"])  # the same cut as an earlier attempt: measured once
        again = key in seen
        r = seen[key] if again else measure(cand)
        seen[key] = r
        trials.append({"macs_target": round(m, 5), "macs_fraction": round(info["macs_fraction"], 5),
                       **{k: (round(v, 5) if isinstance(v, float) else v) for k, v in r.items()},
                       **({"same_cut_as_before": True} if again else {})})
        log(f"  cut at {info['macs_fraction']:.4f}x MACs -> {t.kind} {r['value']:.4g}"
            + (f" [{r['ci'][0]:.4g}, {r['ci'][1]:.4g}]" if r.get("ci") else "")
            + (" (meets the target)" if r["meets"] else "") + (" (an earlier attempt's cut)" if again else ""))
        if r["meets"] and (best is None or info["macs_fraction"] > best[2]["macs_fraction"]):
            best = (cand, hist, info, r)
        return r["meets"], info["macs_fraction"]

    ok_m, bad_m = None, None  # the MACs fractions bracketing the target: meets / does not
    m = spec.macs_target
    lo_limit, hi_limit = 0.02, 0.98
    for _ in range(TARGET_EVALS):
        try:
            meets, landed = attempt(m)
        except UserError as e:  # a fraction this spec cannot reach: the limit of the bracket
            trials.append({"macs_target": round(m, 5), "unreachable": e.problem})
            lo_limit = m
            meets, landed = False, None
        if meets:
            ok_m = m if ok_m is None else max(ok_m, m)
        else:
            bad_m = m if bad_m is None else (min(bad_m, m) if landed is not None else bad_m)
        if ok_m is not None and bad_m is not None:
            if bad_m <= ok_m or bad_m / ok_m < 1.03:
                break
            m = math.sqrt(ok_m * bad_m)  # geometric bisection between them
        elif ok_m is not None:
            m = min(hi_limit, ok_m / 0.75)  # every cut so far meets: prune less
            if m >= hi_limit and ok_m >= hi_limit:
                break
        else:
            if m <= lo_limit * 1.01:
                break
            m = max(lo_limit, m * 0.75)  # none meets yet: prune more
    if best is None:
        near = max((x for x in trials if "value" in x), key=lambda x: x["value"] if t.kind == "speedup" else
                   -x["value"], default=None)
        raise UnreachableTarget(f"prune.target {t.describe()} is not reached by any cut tried (down to "
                                f"{min(x.get('macs_fraction', 1) for x in trials):.3f}x the MACs; the nearest: "
                                f"{near['value']:.4g} at {near['macs_fraction']:.3f}x)" if near else
                                f"prune.target {t.describe()} is not reached by any cut tried")
    cand, hist, info, r = best
    target = {"kind": t.kind, "value": t.value, "runner": measure.runner, "requested_runner": t.runner,
              "measured": r["value"], "ci": r.get("ci"), "met": True, "candidates": trials}
    info = {**info, "seconds": time.time() - t0, "trials": trials, "target": target}
    detail(f"  target met: {t.kind} {r['value']:.4g}" + (f" [{r['ci'][0]:.4g}, {r['ci'][1]:.4g}]" if
                                                                 r.get("ci") else "")
                  + f" at {info['macs_fraction']:.4f}x MACs ({len(trials)} cuts measured)")
    plan = {"target": info["target"]}
    if sc is not None:
        pp.save_table_and_plot(sc.sens, sc.lat, info["channel_ratio"]["ratios"], out)
        if sc.elasticity is not None:
            plan["conv_elasticity"] = {k: round(v, 3) for k, v in sc.elasticity.items()}
    return cand, hist, info, plan
