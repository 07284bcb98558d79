"""`bench` stage: every variant the run has produced, through the same Runner, evaluator and timer, side by
side: COCO mAP (pycocotools) on the val split, engine-only and end-to-end latency, params, MACs, file size.
Writes report.json / report.md (also copied to the run directory) and each variant's raw detections in the
COCO results format next to the ground truth they were scored against."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
from pathlib import Path

from pipeline.core import variants as V
from pipeline.core.console import detail
from pipeline.core.errors import UserError
from pipeline.core.stage import Context, StageResult, console, lib_versions, run_stage
from pipeline.core.store import StageRecord, atomic_path, sha256_file, write_json
from pipeline.eval.bootstrap import annotate_rows
from pipeline.eval.detect import PrePost
from pipeline.eval.report_rows import SCHEMA, add_vs_base, variant_row
from pipeline.report.markdown import render_devices, render_markdown
from pipeline.stages.load import family, prepost
from pipeline.stages.variants import note, post_of, present

VERSION = 5  # 5: speed-ups as the median of per-round ratios (4: interleaved timing, mAP intervals, vector units)

# Bench and ultralytics disagree by more than this: the run fails. The two evaluators differ by construction
# (pycocotools matches detections to ground truth in score order and samples precision at 101 recall points;
# ultralytics matches by IoU and integrates an interpolated curve): measured -0.22 to -0.30 pt on the synthetic val
# split (base and four pruned fine-tunes), +2.59 pt on BCCD's crowded photos with a YOLO11n after 15 epochs (3
# classes, one at AP 0). 5.0 is 1.9x the largest; the faults this check exists for (detections paired with the wrong
# images, categories mapped wrong, boxes in the wrong frame) move mAP by tens of points. Finer faults are the oracle
# tests' (tests/test_oracle.py).
CROSS_CHECK_MAX_PT = 5.0


def _data_counts(ctx: Context) -> dict:
    """What the data stage did to the dataset's boxes (dirty ones dropped or clipped) and the ignore regions it
    kept, from its record."""
    from pipeline.stages.data import meta

    m = meta(ctx)
    return {k: m[k] for k in ("dirty_boxes", "ignore_regions") if k in m}


def _bench_e2e(ctx: Context, v: V.Variant, onnx_path: Path, images, gt: dict, cat_ids, spec, out: Path):
    """An end-to-end variant: the graph built from `onnx_path` for each val image size (mAP) and for the camera's
    frame size (latency; the file kept in the bench output as e2e/<variant>.onnx). Returns the accuracy, the
    detections, the frame-size graph's runner (timed later with the others) and the graph's description."""
    from pipeline.backends.base import slowed
    from pipeline.backends.factory import get_runner
    from pipeline.eval.coco import coco_eval
    from pipeline.eval.measure import predict_e2e
    from pipeline.quant.e2e import build_e2e

    cfg, e2e = ctx.recipe.bench, ctx.recipe.export.e2e
    work = out / "e2e"
    work.mkdir(exist_ok=True)
    runners: dict = {}

    def runner_for(h: int, w: int):
        if (h, w) not in runners:
            f = work / f".{v.name}-{h}x{w}.onnx"
            build_e2e(onnx_path, f, (h, w), spec, resize=e2e.resize)
            runners[(h, w)] = get_runner(cfg.runner, f, threads=cfg.threads)
        return runners[(h, w)]

    dets = predict_e2e(runner_for, images, cat_ids, label=v.name)
    sizes = sorted(runners)
    for h, w in sizes:
        (work / f".{v.name}-{h}x{w}.onnx").unlink()
    runners.clear()
    dest = work / f"{v.name}.onnx"
    info = build_e2e(onnx_path, dest, tuple(e2e.frame_hw), spec, resize=e2e.resize)
    runner = slowed(get_runner(cfg.runner, dest, threads=cfg.threads), cfg.inject_slowdown.get(v.name))
    info = {**info, "resize": e2e.resize, "file": dest.name, "scored_at_sizes": [list(x) for x in sizes]}
    return coco_eval(gt, dets), dets, runner, info


def cross_check(ctx: Context, rows: list[dict], inputs: dict, out: Path, fam) -> dict:
    """Score the fp32 checkpoints with ultralytics' own validator (its letterbox, NMS and mAP code) on the same
    split of the data stage's YOLO copy; the two numbers go side by side into the report. They differ a little by
    construction (ultralytics interpolates precision its own way: ~0.3 pt on the default data); more than
    CROSS_CHECK_MAX_PT means one of the two scores the wrong thing, and the run stops."""
    from pipeline.adapters import ultralytics_yolo as ua

    cfg = ctx.recipe.bench
    res = {"evaluator": f"ultralytics {lib_versions().get('ultralytics')} DetectionValidator (rect=False, batch 1, "
                        f"conf {cfg.conf}, iou {cfg.iou}, max_det {cfg.max_det})", "max_delta_pt": CROSS_CHECK_MAX_PT,
           "variants": {}}
    import yaml

    # the split alone, as both of ultralytics' required keys (a user's single COCO JSON has no train split)
    src = yaml.safe_load((inputs["data"] / "data.yaml").read_text())
    data_yaml = out / "cross_check_data.yaml"
    data_yaml.write_text(yaml.safe_dump({"path": str(Path(inputs["data"]).resolve()), "train": f"images/{cfg.split}",
                                         "val": f"images/{cfg.split}", "names": src["names"]}, sort_keys=False))
    checked = {v.name for v in V.CROSS_CHECKED}
    for r in rows:
        if r["name"] not in checked:
            continue
        detail(f"bench: {r['name']}: ultralytics' validator on the same {cfg.split} split ...")
        u = ua.val(inputs[f"{r['name']}.pt"], data_yaml, ctx.recipe.model.imgsz, conf=cfg.conf, iou=cfg.iou,
                   max_det=cfg.max_det, **fam.train_args)
        d = 100 * (r["map50_95"] - u["map50_95"])
        res["variants"][r["name"]] = {"bench": r["map50_95"], "ultralytics": u["map50_95"],
                                      "bench_map50": r["map50"], "ultralytics_map50": u["map50"],
                                      "delta_pt": round(d, 3)}
        r["ultralytics_map50_95"] = u["map50_95"]
    bad = {k: v for k, v in res["variants"].items() if abs(v["delta_pt"]) > CROSS_CHECK_MAX_PT}
    data_yaml.unlink()
    (out / "cross_check.json").write_text(json.dumps(res, indent=1))
    if bad:
        k, v = next(iter(bad.items()))
        raise UserError(f"bench and ultralytics' validator disagree on {k}: mAP50-95 {v['bench']:.4f} vs "
                        f"{v['ultralytics']:.4f} ({v['delta_pt']:+.2f} pt, more than {CROSS_CHECK_MAX_PT}): one of "
                        f"them scores the wrong images or boxes; nothing was published", inputs["eval"])
    return res


def variants(ctx: Context) -> list[V.Variant]:
    """The variants this run has (pipeline/core/variants.py's table, filtered by the run's records)."""
    return present(ctx)


def env_vars() -> dict:
    """The settings of the environment that change a run's numbers: OMP_NUM_THREADS as the user set it (ultralytics
    sets it to 1 at import when unset)."""
    from pipeline.adapters.offline import USER_OMP_THREADS

    return {"OMP_NUM_THREADS": USER_OMP_THREADS or "unset"}


# the vector units ONNX Runtime's CPU kernels choose between: a speed-up measured with one set is not comparable
# with one measured with another (round_to 16 suits AVX-512's 16-channel blocks; INT8 runs on VNNI/AMX where present)
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16", "asimd", "sve")


def device_info() -> dict:
    info = {"machine": platform.machine(), "processor": platform.processor(), "cpus": os.cpu_count()}
    try:
        for ln in Path("/proc/cpuinfo").read_text().splitlines():
            if ln.startswith("model name") and "cpu" not in info:
                info["cpu"] = ln.split(":", 1)[1].strip()
            if ln.split(":")[0].strip() in ("flags", "Features") and "isa" not in info:
                have = set(ln.split(":", 1)[1].split())
                info["isa"] = [f for f in ISA_FLAGS if f in have]
    except OSError:
        pass
    return info


def speed_bases(vs: list[V.Variant]) -> dict[str, str]:
    """The variant each variant's speed-ups are measured against: the base FP32 model (else the first variant); for
    an end-to-end variant, the base FP32 model's end-to-end graph where the run has it."""
    names = [v.name for v in vs]
    base = V.BASE_FP32.name if V.BASE_FP32.name in names else names[0]
    base_e2e = next((v.name for v in vs if v.role == "e2e" and v.made_from == V.BASE_FP32.name), None)
    return {v.name: base_e2e if v.role == "e2e" and base_e2e else base for v in vs}


def check_injection(cfg, vs: list[V.Variant]) -> None:
    """bench.inject_slowdown names variants this run has; each injected slowdown is announced."""
    names = [v.name for v in vs]
    unknown = sorted(set(cfg.inject_slowdown) - set(names))
    if unknown:
        raise UserError(f"bench.inject_slowdown names {', '.join(unknown)}, which this run does not have (it has "
                        f"{', '.join(names)})")
    for name, factor in cfg.inject_slowdown.items():
        console.print(f"[yellow]bench: WARNING: {name}'s runner is made {factor:g}× slower on purpose "
                      f"(bench.inject_slowdown): its latency and speed-ups are not the model's own[/yellow]")


@dataclasses.dataclass
class Scored:
    """A variant after scoring: its model, accuracy, detections, the runner that made them (kept for the timing)."""
    v: V.Variant
    onnx_path: Path
    info: dict
    acc: dict
    dets: list
    runner: object
    e2e_info: dict | None = None  # an end-to-end graph's description; its runner takes camera-size frames


def time_variants(cfg, scored: list[Scored], paths: list[str], spec: PrePost, frame_hw: tuple[int, int],
                  bases: dict[str, str]):
    """Every variant's engine-only and end-to-end calls timed in one interleaved session (pipeline/eval/interleaved.py);
    returns the Timing and each variant's TimedVariant."""
    from pipeline.eval.interleaved import Schedule, time_interleaved
    from pipeline.eval.measure import TimedVariant, TimingInputs, timed_call_e2e, timed_calls, tracked_ratios

    inputs = TimingInputs.load(paths, spec)
    frames = inputs.frames(frame_hw) if any(sc.v.role == "e2e" for sc in scored) else []
    calls, tvs = {}, {}
    for sc in scored:
        name = sc.v.name
        if sc.v.role == "e2e":
            tvs[name] = TimedVariant.graph(name, tvs[sc.v.made_from].engine, bases[name])
            calls[name] = timed_call_e2e(sc.runner, frames)
        else:
            tvs[name] = tv = TimedVariant.split(name, bases[name])
            c = timed_calls(sc.runner, inputs, spec)
            calls[tv.engine], calls[tv.end_to_end] = c["engine"], c["end_to_end"]
    sched = Schedule.of(cfg.model_dump())
    detail(f"bench: timing {len(scored)} variants together ({len(calls)} timed calls, {sched.per_round} "
                  f"each per round, in a new random order every round) until every speed-up's 95% interval is "
                  f"within ±{50 * sched.rel_width:g}% or {sched.cap_s:g} s ...[/dim]")
    t = time_interleaved(calls, tracked_ratios(tvs), sched, label="bench: timing")
    detail(f"bench: timing: {t.summary['stop']} after {t.summary['rounds']} rounds "
                  f"({t.summary['wall_s']:.0f} s)")
    return t, tvs


def _load_eval_set(inputs: dict, split: str, out: Path):
    """The data stage's eval set, its images re-hashed and its ground truth checked against them; the ground truth
    copied beside the predictions."""
    from pipeline.data.evalset import EvalSet

    es = EvalSet.load(inputs["eval"])
    if es.split != split:
        raise UserError(f"the eval set holds the '{es.split}' split, bench.split is '{split}': re-run the data stage",
                        inputs["eval"])
    shutil.copyfile(inputs["eval"] / "ground_truth.json", out / "ground_truth.json")
    return es


def _score_selection(scored: list[Scored], inputs: dict, spec: PrePost, fam, seed: int) -> dict | None:
    """Every detector variant's mAP on the selection split (data.selection: carved out of train, never trained on),
    for comparing recipe choices away from the split the report's numbers come from."""
    from pipeline.data.evalset import EvalSet
    from pipeline.eval.measure import accuracy

    if "selection" not in inputs:
        return None
    sel = EvalSet.load(inputs["selection"])
    out = {"images": len(sel.images), "seed": seed, "digest": sel.digest, "map50_95": {}, "map50": {}}
    for sc in scored:
        if sc.v.role == "e2e":
            continue
        acc, _ = accuracy(sc.runner, sel.images, sel.ground_truth, sel.category_ids,
                          dataclasses.replace(spec, post=post_of(sc.v, fam)), label=f"{sc.v.name} (selection)")
        out["map50_95"][sc.v.name], out["map50"][sc.v.name] = acc["map50_95"], acc["map50"]
    return out


def _score(ctx: Context, vs: list[V.Variant], inputs: dict, es, spec: PrePost, out: Path, fam) -> list[Scored]:
    """Every variant's accuracy on the eval set (predictions/<variant>.json written); their runners kept for timing."""
    from pipeline.backends.base import slowed
    from pipeline.backends.factory import get_runner
    from pipeline.eval.measure import accuracy

    cfg = ctx.recipe.bench
    gt, cat_ids = es.ground_truth, es.category_ids
    (out / "predictions").mkdir()
    scored = []
    for v in vs:
        onnx_path = inputs[f"{v.name}.onnx"]
        info = json.loads(inputs[f"{v.name}.info"].read_text())
        if v.role == "e2e":
            acc, dets, runner, e2e_info = _bench_e2e(ctx, v, onnx_path, es.images, gt, cat_ids, spec, out)
            scored.append(Scored(v, onnx_path, info, acc, dets, runner, e2e_info))
        else:
            runner = slowed(get_runner(cfg.runner, onnx_path, threads=cfg.threads), cfg.inject_slowdown.get(v.name))
            acc, dets = accuracy(runner, es.images, gt, cat_ids, dataclasses.replace(spec, post=post_of(v, fam)),
                                 label=v.name)
            scored.append(Scored(v, onnx_path, info, acc, dets, runner))
        (out / "predictions" / f"{v.name}.json").write_text(json.dumps(dets))
    return scored


def _row(ctx: Context, sc: Scored, es, timed: dict, out: Path, fam) -> dict:
    """One variant's report row (without its comparison against its base)."""
    cfg, v, e2e_info = ctx.recipe.bench, sc.v, sc.e2e_info
    rel = lambda p: os.path.relpath(p, ctx.run_dir)  # noqa: E731
    model_file, model_at = sc.onnx_path, ctx.stage_dir(v.stage) / sc.onnx_path.name
    if v.role == "e2e":  # the end-to-end file itself, kept in the bench output
        model_file, model_at = out / "e2e" / e2e_info["file"], ctx.stage_dir("bench") / "e2e" / e2e_info["file"]
    return variant_row(
        name=v.name, precision=v.precision, role=v.role, note=note(ctx, v, fam),
        model={"path": rel(model_at), "sha256": sha256_file(model_file), "size_bytes": model_file.stat().st_size},
        runner=sc.runner.describe(), acc=sc.acc, names=es.names, cat_ids=es.category_ids, timed=timed,
        params=sc.info["params"], macs=sc.info["macs"], detections=len(sc.dets),
        made_from=v.made_from, fp32_source=V.fp32_source(v),
        predictions=rel(ctx.stage_dir("bench") / "predictions" / f"{v.name}.json"),
        ground_truth=rel(ctx.stage_dir("bench") / "ground_truth.json"),
        **({"training": sc.info["training"]} if sc.info.get("training") else {}),
        **({"e2e": {**e2e_info, "of": v.made_from,
                    "over": f"{v.made_from}'s engine-only p50 (the model on a ready tensor)"}} if e2e_info else {}),
        **({"injected_slowdown": cfg.inject_slowdown[v.name]} if v.name in cfg.inject_slowdown else {}))


def _int8_drop(ctx: Context, by: dict[str, dict], n_images: int) -> None:
    """What the accuracy-aware INT8 search certified on its tuning images, beside what the val split shows (on the
    pruned-int8 row, in place)."""
    q = ctx.record("quantize")
    aware, fp32 = V.PRUNED_INT8.name, V.PRUNED_INT8.made_from
    aa = q.metrics.get(V.PRUNED_INT8.output, {}) if q is not None else {}
    if not ("tuning_drop" in aa and aware in by and fp32 in by):
        return
    val = by[fp32]["map50_95"] - by[aware]["map50_95"]
    cal = ctx.record("calibrate")
    source = cal.metrics.get("tuning_from", "train") if cal is not None else "train"
    by[aware]["int8_drop"] = {
        "tuning": aa["tuning_drop"], "tuning_se": aa["tuning_drop_se"], "tuning_images": aa["tuning_images"],
        "val": val, "val_images": n_images, "budget": aa["max_drop"], "noise_z": aa["noise_z"],
        "within_budget_on_tuning": aa["within_budget"], "within_budget_on_val": val <= aa["max_drop"]}
    by[aware]["note"] += (
        f"; drop vs pruned-fp32: {100 * aa['tuning_drop']:.2f} ± {100 * aa['tuning_drop_se']:.2f} pt on "
        f"{aa['tuning_images']} {source} images (the search's estimate), {100 * val:.2f} pt on the "
        f"{n_images} val images (budget {100 * aa['max_drop']:.2f})")


def _summary(rows: list[dict]) -> str:
    """The bench's key numbers: each FP32 model's mAP50-95, the pruned one's change and speed-up over the base."""
    by = {r["name"]: r for r in rows}
    out = []
    for v in (V.BASE_FP32, V.PRUNED_FP32):
        r = by.get(v.name)
        if r is None:
            continue
        s = f"{v.name} mAP50-95 {r['map50_95']:.4f}"
        vb = r.get("vs_base") or {}
        if vb.get("against") not in (None, v.name):
            s += (f" ({100 * vb['map50_95_delta']:+.2f} pt, {vb['engine_p50_speedup']:.2f}x faster at "
                  f"{vb['macs_ratio']:.2f}x MACs)")
        out.append(s)
    return "; ".join(out) + f" ({len(rows)} variants)"


def run(ctx: Context) -> StageRecord:
    vs = variants(ctx)
    cfg = ctx.recipe.bench
    spec = prepost(ctx)
    check_injection(cfg, vs)
    inputs = {"eval": ctx.output("data", "eval"), "data": ctx.output("data", "yolo")}
    if "selection" in ctx.record("data").outputs:  # data.selection: scored beside the report's split
        inputs["selection"] = ctx.output("data", "selection")
    for v in vs:
        inputs[f"{v.name}.onnx"] = ctx.output(v.stage, v.output)
        inputs[f"{v.name}.info"] = ctx.output(v.stats_stage, "info")
    for v in V.CROSS_CHECKED:
        if v in vs:
            inputs[f"{v.name}.pt"] = ctx.output(v.stats_stage, "model")
    config = {**cfg.model_dump(), "prepost": spec.as_dict(), "variants": [v.as_dict() for v in vs],
              "e2e": ctx.recipe.export.e2e.model_dump()}

    def fn(ctx: Context, out: Path, inputs) -> StageResult:
        from pipeline.eval.measure import timing_fields

        fam = family(ctx)
        es = _load_eval_set(inputs, cfg.split, out)
        scored = _score(ctx, vs, inputs, es, spec, out, fam)  # accuracy of every variant first; then timed together
        selection = _score_selection(scored, inputs, spec, fam, ctx.recipe.data.selection.seed)
        bases = speed_bases(vs)
        timing, tvs = time_variants(cfg, scored, [i.path for i in es.images], spec,
                                    tuple(ctx.recipe.export.e2e.frame_hw), bases)
        rows = [_row(ctx, sc, es, timing_fields(timing, tvs[sc.v.name]), out, fam) for sc in scored]
        all_dets = {sc.v.name: sc.dets for sc in scored}
        del scored  # the runners
        cross = cross_check(ctx, rows, inputs, out, fam)
        _int8_drop(ctx, {r["name"]: r for r in rows}, len(es.images))
        add_vs_base(rows, bases, timing, tvs)
        intervals = annotate_rows(rows, es.ground_truth, all_dets, resamples=cfg.bootstrap_resamples,
                                  seed=cfg.bootstrap_seed)
        report = {"schema": SCHEMA, "run": ctx.run_dir.name, "recipe": ctx.recipe.model_dump(),
                  "dataset": {"split": cfg.split, "images": len(es.images), "digest": es.digest, "names": es.names,
                              **_data_counts(ctx)},
                  "cross_check": cross, "timing": timing.summary, "map_intervals": intervals,
                  **({"selection": selection} if selection else {}),
                  "device": device_info(), "env": lib_versions(), "env_vars": env_vars(),
                  "prepost": spec.as_dict(),
                  # The end-to-end variants stand apart: their detections equal their source variant's (the parity
                  # the graph is built for), which check-report's rule against identical predictions would refuse.
                  "variants": [r for r in rows if r["role"] != "e2e"],
                  "e2e_variants": [r for r in rows if r["role"] == "e2e"]}
        (out / "report.json").write_text(json.dumps(report, indent=1))
        (out / "report.md").write_text(render_markdown(report))
        return StageResult(outputs={"report": "report.json", "report_md": "report.md",
                                    "cross_check": "cross_check.json", "predictions": "predictions",
                                    "ground_truth": "ground_truth.json",
                                    **({"e2e": "e2e"} if (out / "e2e").is_dir() else {})},
                           metrics={r["name"]: {"map50_95": r["map50_95"], "e2e_p50_ms":
                                                r["latency_ms"]["end_to_end"]["p50"]} for r in rows},
                           summary=_summary(rows))

    rec = run_stage(ctx, "bench", VERSION, config, inputs, fn)
    publish(ctx)
    return rec


def publish(ctx: Context) -> Path:
    """Copy the bench report to runs/<run>/report.json and render report.md beside it."""
    report = json.loads(ctx.output("bench", "report").read_text())
    old = ctx.run_dir / "report.json"
    if old.is_file():  # keep what devices measured (make deploy) while they measured these same model files
        sha = {v["name"]: v["model"]["sha256"] for v in report["variants"]}
        for name, d in (json.loads(old.read_text()).get("devices") or {}).items():
            if all(sha.get(v["name"]) == (v.get("model") or {}).get("sha256") for v in d.get("variants", [])):
                report.setdefault("devices", {})[name] = d
            else:
                console.print(f"[yellow]bench: device {name}'s results were for other model files: dropped from "
                              f"report.json (`make deploy` measures these)[/yellow]")
    write_json(ctx.run_dir / "report.json", report)
    with atomic_path(ctx.run_dir / "report.md") as tmp:
        tmp.write_text(render_markdown(report) + (render_devices(report) if report.get("devices") else ""))
    from pipeline.report.render import render_run

    render_run(ctx.run_dir)  # tradeoff.png, history.png, report.html beside report.json
    return ctx.run_dir / "report.json"
