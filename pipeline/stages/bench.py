"""`bench` stage: every variant the run has produced, through the same Runner, evaluator and timer, side by
side: COCO mAP (pycocotools) on the val split, engine-only and end-to-end latency, params, MACs, file size.
Writes report.json / report.md (also copied to the run directory) and each variant's raw detections in the
COCO results format next to the ground truth they were scored against."""

from __future__ import annotations

import json
import os
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.errors import UserError
from pipeline.core.stage import Context, StageResult, console, lib_versions, run_stage
from pipeline.core.store import StageRecord, atomic_path, sha256_file, write_json
from pipeline.eval.detect import PrePost

VERSION = 2  # 2: reads the data stage's eval set; ultralytics' validator cross-check

# The fp32 variants a second implementation scores too (ultralytics' validator on the checkpoint they were
# exported from): the stage whose 'model' output that checkpoint is.
CROSS_CHECKED = {"base-fp32": "load", "pruned-fp32": "finetune"}
CROSS_CHECK_MAX_PT = 2.0  # bench and ultralytics disagree by more than this: the run fails


def cross_check(ctx: Context, rows: list[dict], inputs: dict, out: Path) -> dict:
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
    for r in rows:
        if r["name"] not in CROSS_CHECKED:
            continue
        console.print(f"[dim]bench: {r['name']}: ultralytics' validator on the same {cfg.split} split ...[/dim]")
        u = ua.val(inputs[f"{r['name']}.pt"], data_yaml, ctx.recipe.model.imgsz, conf=cfg.conf, iou=cfg.iou,
                   max_det=cfg.max_det)
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


@dataclass(frozen=True)
class Variant:
    name: str
    model_stage: str  # the stage whose output `output` is benchmarked
    stats_stage: str  # the stage whose 'info' (params, MACs) describes the network
    precision: str = "fp32"
    note: str = ""
    output: str = "onnx"


def variants(ctx: Context) -> list[Variant]:
    """The variants this run has: those whose stages have records."""
    cands = [Variant("base-fp32", "export", "load")]
    if ctx.recipe.prune.enabled:
        f, pr = ctx.recipe.finetune, ctx.recipe.prune
        kd = f.distill
        sp = pr.sparsity
        fade = next((p for p in sp.phases if p.fade), None) if sp.enabled else None
        note = ""
        if sp.enabled:
            note = (f"sparsity-trained {sum(p.epochs for p in sp.phases)} epochs (group regularization"
                    + (f"; the planned cut's channels faded to zero over {fade.fade} of {fade.epochs} epochs"
                       if fade else "")
                    + (f", then held at zero for {hold} more" if (hold := sum(p.epochs for p in sp.phases if p.hold))
                       else "") + "), then ")
        if fade:
            note += f"pruned (DepGraph, {pr.mode} mode, the cut the fade trained toward)"
        else:
            note += f"pruned (DepGraph, {pr.mode} mode{', features reconstructed' if pr.reconstruct.enabled else ''})"
        note += f" + fine-tuned {f.epochs} epochs (stock trainer, nbs {f.nbs})"
        if kd.enabled:
            note += f", distilled from base-fp32 (head KD {kd.head_weight}, feature {kd.feature_weight})"
        cands.append(Variant("pruned-fp32", "export-pruned", "finetune", note=note))
    q = ctx.record("quantize") if ctx.recipe.quantize.enabled else None
    if q is not None:
        ort_note = "INT8 Q/DQ; ONNX Runtime CPU latency of INT8 is not representative of TensorRT"
        ptq = f"plain PTQ ({q.requested.get('backend', 'onnxruntime')}, {q.requested.get('method')}), "
        for name, out, stats, note in [
                ("base-int8", "base_int8", "load", ptq + ort_note),
                ("pruned-int8-ptq", "pruned_int8_ptq", "finetune", ptq + ort_note),
                ("pruned-int8", "pruned_int8", "finetune", "accuracy-aware PTQ, " + ort_note),
                ("pruned-ultralytics-int8", "pruned_ultralytics_int8", "finetune",
                 "peer: ultralytics export(format='onnx', quantize=8), same calibration images")]:
            if out in q.outputs:
                cands.append(Variant(name, "quantize", stats, precision="int8", note=note, output=out))
    return [v for v in cands if ctx.record(v.model_stage) is not None and v.output in ctx.record(v.model_stage).outputs]


def prepost(ctx: Context) -> PrePost:
    b = ctx.recipe.bench
    return PrePost(imgsz=ctx.recipe.model.imgsz, conf=b.conf, iou=b.iou, max_det=b.max_det)


def device_info() -> dict:
    info = {"machine": platform.machine(), "processor": platform.processor(), "cpus": os.cpu_count()}
    try:
        for ln in Path("/proc/cpuinfo").read_text().splitlines():
            if ln.startswith("model name"):
                info["cpu"] = ln.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return info


def run(ctx: Context) -> StageRecord:
    vs = variants(ctx)
    cfg = ctx.recipe.bench
    spec = prepost(ctx)
    inputs = {"eval": ctx.output("data", "eval"), "data": ctx.output("data", "yolo")}
    for v in vs:
        inputs[f"{v.name}.onnx"] = ctx.output(v.model_stage, v.output)
        inputs[f"{v.name}.info"] = ctx.output(v.stats_stage, "info")
    for name, stage in CROSS_CHECKED.items():
        if any(v.name == name for v in vs):
            inputs[f"{name}.pt"] = ctx.output(stage, "model")
    config = {**cfg.model_dump(), "prepost": spec.as_dict(), "variants": [v.__dict__ for v in vs]}

    def fn(ctx: Context, out: Path, inputs) -> StageResult:
        from pipeline.backends.base import get_runner
        from pipeline.data.evalset import EvalSet
        from pipeline.eval.bench import accuracy, latency

        es = EvalSet.load(inputs["eval"])  # images re-hashed, ground truth checked against them
        if es.split != cfg.split:
            raise UserError(f"the eval set holds the '{es.split}' split, bench.split is '{cfg.split}': re-run the "
                            f"data stage", inputs["eval"])
        gt = es.ground_truth
        shutil.copyfile(inputs["eval"] / "ground_truth.json", out / "ground_truth.json")
        images, cat_ids, names = es.images, es.category_ids, es.names
        (out / "predictions").mkdir()
        rows = []
        for v in vs:
            onnx_path = inputs[f"{v.name}.onnx"]
            info = json.loads(inputs[f"{v.name}.info"].read_text())
            runner = get_runner(cfg.runner, onnx_path, threads=cfg.threads)
            acc, dets = accuracy(runner, images, gt, cat_ids, spec, label=v.name)
            (out / "predictions" / f"{v.name}.json").write_text(json.dumps(dets))
            lat = latency(runner, [i.path for i in images], spec, cfg.warmup, cfg.iters)
            rel = lambda p: os.path.relpath(p, ctx.run_dir)
            rows.append({
                "name": v.name, "precision": v.precision, "note": v.note,
                "model": {"path": rel(ctx.stage_dir(v.model_stage) / onnx_path.name), "sha256": sha256_file(onnx_path),
                          "size_bytes": onnx_path.stat().st_size},
                "runner": runner.describe(),
                "map50_95": acc["map50_95"], "map50": acc["map50"],
                "per_class_ap50_95": {names[cat_ids.index(k)]: a for k, a in acc["per_class_ap50_95"].items()},
                "latency_ms": {"engine": lat["engine"], "end_to_end": lat["end_to_end"]},
                "fps": lat["fps"], "timing": {k: lat[k] for k in ("batch", "warmup", "iters", "wall_s")},
                "params": info["params"], "macs": info["macs"],
                "predictions": rel(ctx.stage_dir("bench") / "predictions" / f"{v.name}.json"),
                "ground_truth": rel(ctx.stage_dir("bench") / "ground_truth.json"),
                "detections": len(dets),
                **({"training": info["training"]} if info.get("training") else {}),
            })
        cross = cross_check(ctx, rows, inputs, out)
        base = next((r for r in rows if r["name"] == "base-fp32"), rows[0] if rows else None)
        for r in rows:
            if base is None:
                break
            r["vs_base"] = {"macs_ratio": r["macs"] / base["macs"], "params_ratio": r["params"] / base["params"],
                            "size_ratio": r["model"]["size_bytes"] / base["model"]["size_bytes"],
                            "map50_95_delta": r["map50_95"] - base["map50_95"],
                            "engine_p50_speedup": base["latency_ms"]["engine"]["p50"]
                            / r["latency_ms"]["engine"]["p50"],
                            "e2e_p50_speedup": base["latency_ms"]["end_to_end"]["p50"]
                            / r["latency_ms"]["end_to_end"]["p50"]}
        report = {"schema": "yolo-edge/report/1", "run": ctx.run_dir.name, "recipe": ctx.recipe.model_dump(),
                  "dataset": {"split": cfg.split, "images": len(images), "digest": es.digest, "names": names},
                  "cross_check": cross,
                  "device": device_info(), "env": lib_versions(), "prepost": spec.as_dict(), "variants": rows}
        (out / "report.json").write_text(json.dumps(report, indent=1))
        (out / "report.md").write_text(render_markdown(report))
        return StageResult(outputs={"report": "report.json", "report_md": "report.md",
                                    "cross_check": "cross_check.json", "predictions": "predictions",
                                    "ground_truth": "ground_truth.json"},
                           metrics={r["name"]: {"map50_95": r["map50_95"], "e2e_p50_ms":
                                                r["latency_ms"]["end_to_end"]["p50"]} for r in rows})

    rec = run_stage(ctx, "bench", VERSION, config, inputs, fn)
    publish(ctx)
    return rec


def publish(ctx: Context) -> Path:
    """Copy the bench report to runs/<run>/report.json and render report.md beside it."""
    report = json.loads(ctx.output("bench", "report").read_text())
    write_json(ctx.run_dir / "report.json", report)
    with atomic_path(ctx.run_dir / "report.md") as tmp:
        tmp.write_text(render_markdown(report))
    return ctx.run_dir / "report.json"


def render_markdown(rep: dict) -> str:
    lines = [f"# yolo-edge report: {rep['run']}", "",
             f"Dataset: {rep['dataset']['images']} {rep['dataset']['split']} images, "
             f"{len(rep['dataset']['names'])} classes (digest {rep['dataset']['digest'][:12]}); "
             f"input {rep['prepost']['imgsz']}x{rep['prepost']['imgsz']}; device: {rep['device'].get('cpu', '?')}, "
             f"{rep['device'].get('cpus')} CPUs.", "",
             "| variant | runner | mAP50-95 | mAP50 | Δ mAP50-95 | params | MACs (×base) | size | engine p50 ms "
             "| speed-up (engine) | e2e p50 / p90 / p99 ms | speed-up (e2e) | fps |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rep["variants"]:
        vb = r.get("vs_base", {})
        e, g = r["latency_ms"]["end_to_end"], r["latency_ms"]["engine"]
        lines.append(
            f"| {r['name']} | {r['runner']['runner']} | {r['map50_95']:.4f} | {r['map50']:.4f} | "
            f"{vb.get('map50_95_delta', 0) * 100:+.2f} pt | {r['params'] / 1e6:.3f} M | "
            f"{r['macs'] / 1e9:.3f} G ({vb.get('macs_ratio', 1):.2f}×) | {r['model']['size_bytes'] / 1e6:.2f} MB | "
            f"{g['p50']:.2f} | {vb.get('engine_p50_speedup', 1):.2f}× | "
            f"{e['p50']:.2f} / {e['p90']:.2f} / {e['p99']:.2f} | "
            f"{vb.get('e2e_p50_speedup', 1):.2f}× | "
            f"{r['fps']:.1f} |")
    lines += ["", "Latency: batch 1, ONNX Runtime CPU unless the runner says otherwise; engine = inference on a ready "
              "tensor, e2e = letterbox + inference + NMS on a decoded frame. mAP: pycocotools on the predictions and "
              "ground truth named in report.json."]
    cc = (rep.get("cross_check") or {}).get("variants") or {}
    if cc:
        lines.append("- cross-check, " + rep["cross_check"]["evaluator"] + " on the same split: " + "; ".join(
            f"{k} {v['ultralytics']:.4f} vs bench {v['bench']:.4f} ({v['delta_pt']:+.2f} pt)" for k, v in cc.items())
            + f" (the run fails beyond ±{rep['cross_check']['max_delta_pt']:g} pt)")
    for r in rep["variants"]:
        vb = r.get("vs_base", {})
        if r["precision"] == "fp32" and vb.get("macs_ratio", 1) < 0.99:
            red = 1 / vb["macs_ratio"]
            lines.append(f"- {r['name']}: {red:.2f}x fewer MACs, engine {vb['engine_p50_speedup']:.2f}x faster: "
                         f"{vb['engine_p50_speedup'] / red:.2f} of the MACs reduction became speed on this runner")
    for r in rep["variants"]:
        if r.get("note"):
            lines.append(f"- {r['name']}: {r['note']}")
        t = r.get("training") if r["precision"] == "fp32" else None
        if t and t.get("check_epochs"):
            how = f" (mean of the last {t['check_window']} epochs of each run)" if t.get("check_window") else ""
            longer = "".join(f"; a run of {x['epochs']} more epochs (one schedule, {x['where']}) changed it by "
                             f"{x['gain']:+.4f}" for x in t.get("longer_checks") or [])
            by_check = t.get("check_converged", t["converged"])
            like = ("one more schedule like its last phase" if t.get("check_settings") == "last_phase" else
                    "the fine-tune settings")
            lines.append(f"- {r['name']}: trained {t['epochs']} epochs; {t['check_epochs']} more ({like}) changed "
                         f"its val mAP50-95 by {t['check_gain']:+.4f}{how}"
                         + (f": converged by that check{longer}: {'converged' if t['converged'] else 'NOT converged'}"
                            if longer and by_check else
                            f": {'converged' if t['converged'] else 'NOT converged'}{longer}"))
    return "\n".join(lines) + "\n"
