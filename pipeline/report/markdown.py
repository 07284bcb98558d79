"""report.md: a run's report.json as Markdown (the variant table, how the numbers were taken, the devices `deploy`
measured), written by the bench stage and re-rendered by `deploy` after it merges device results."""

from __future__ import annotations


def times(x: float, ci: list[float] | None = None) -> str:
    """A ratio as the report shows it: 1.62× [1.55, 1.70] (with its 95% interval when there is one)."""
    return f"{x:.2f}×" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


def speedup_cell(r: dict, kind: str) -> str:
    """A row's engine or e2e speed-up over its base, with its interval (the base itself: 1×, no interval)."""
    vb = r.get("vs_base", {})
    own = vb.get("against") == r["name"]
    return times(vb.get(f"{kind}_p50_speedup", 1), None if own else vb.get(f"{kind}_p50_speedup_ci"))


def timing_line(t: dict | None) -> str:
    """How the latencies were taken and why the timing stopped (the report's `timing` block)."""
    if not t:
        return ""
    return (f"Timing: every variant in one session, interleaved ({t['items']} timed calls): {t['warmup']} warm-up "
            f"calls each, then {t['rounds']} rounds of {t['per_round']} calls per item, {t['order']}, so a passing "
            f"load reaches every variant alike; [lo, hi] = 95% bootstrap interval over rounds. Stopped: {t['stop']} "
            f"after {t['wall_s']:.0f} s (target ±{50 * t['rel_width']:g}%, cap {t['cap_s']:g} s, at most "
            f"{t['max_rounds']} rounds).")


def delta_cell(d: dict, key: str = "map50_95_delta") -> str:
    """'-0.07 pt [-1.38, +1.21]': a mAP difference in points with its paired 95% interval where there is one."""
    x, ci = d.get(key, 0.0), d.get(f"{key}_ci")
    return f"{100 * x:+.2f} pt" + (f" [{100 * ci[0]:+.2f}, {100 * ci[1]:+.2f}]" if ci else "")


def _dirt_note(ds: dict) -> str:
    d, ign = ds.get("dirty_boxes") or {}, sum((ds.get("ignore_regions") or {}).values())
    parts = ([f"{d['dropped']} dirty box(es) dropped and {d['clipped']} clipped in {d['files']} annotation file(s)"]
             if d.get("files") else []) + ([f"{ign} ignore region(s) (difficult/crowd)"] if ign else [])
    return (" Data: " + "; ".join(parts) + ".") if parts else ""


def summary_table(rep: dict) -> str:
    """The variant table a terminal shows after a run: mAP50-95 with its interval, the change against the base,
    MACs, engine latency and speed-up (report.md has everything else)."""
    lines = [f"{'variant':<26} {'mAP50-95 [95% CI]':<26} {'Δ vs base, pt':<14} {'MACs':>6} {'engine p50':>11} "
             f"{'speed-up':>9}"]
    for r in rep["variants"] + rep.get("e2e_variants", []):
        vb = r.get("vs_base", {})
        ci = r.get("map50_95_ci")
        m = f"{r['map50_95']:.4f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
        d = "–" if vb.get("against") == r["name"] else f"{100 * vb.get('map50_95_delta', 0.0):+.2f}"
        lines.append(f"{r['name']:<26} {m:<26} {d:<14} {vb.get('macs_ratio', 1):>5.2f}× "
                     f"{r['latency_ms']['engine']['p50']:>8.2f} ms {speedup_cell(r, 'engine').split(' ')[0]:>9}")
    return "\n".join(lines)


def render_markdown(rep: dict) -> str:
    lines = [f"# yolo-edge report: {rep['run']}", "",
             f"Dataset: {rep['dataset']['images']} {rep['dataset']['split']} images, "
             f"{len(rep['dataset']['names'])} classes (digest {rep['dataset']['digest'][:12]}); "
             f"input {rep['prepost']['imgsz']}x{rep['prepost']['imgsz']}; device: {rep['device'].get('cpu', '?')}, "
             f"{rep['device'].get('cpus')} CPUs.{_dirt_note(rep['dataset'])}", "",
             "| variant | runner | mAP50-95 | mAP50 | Δ mAP50-95 | params | MACs (×base) | size | engine p50 ms "
             "| speed-up (engine) | e2e p50 / p90 / p99 ms | speed-up (e2e) | e2e ÷ engine | fps |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rep["variants"] + rep.get("e2e_variants", []):
        vb = r.get("vs_base", {})
        e, g = r["latency_ms"]["end_to_end"], r["latency_ms"]["engine"]
        ratio = times(r["e2e_over_engine"], r.get("e2e_over_engine_ci")) if "e2e_over_engine" in r else "–"
        lines.append(
            f"| {r['name']} | {r['runner']['runner']} | {r['map50_95']:.4f} | {r['map50']:.4f} | "
            f"{delta_cell(vb)} | {r['params'] / 1e6:.3f} M | "
            f"{r['macs'] / 1e9:.3f} G ({vb.get('macs_ratio', 1):.2f}×) | {r['model']['size_bytes'] / 1e6:.2f} MB | "
            f"{g['p50']:.2f} | {speedup_cell(r, 'engine')} | "
            f"{e['p50']:.2f} / {e['p90']:.2f} / {e['p99']:.2f} | "
            f"{speedup_cell(r, 'e2e')} | "
            f"{ratio} | {r['fps']:.1f} |")
    lines += ["", "Latency: batch 1, ONNX Runtime CPU unless the runner says otherwise; engine = inference on a ready "
              "tensor, e2e = letterbox + inference + NMS on a decoded frame (Python around the runner; for the "
              "`-e2e` variants all of it inside the one graph, on a camera-size frame); e2e ÷ engine = that over the "
              "engine-only time (for `-e2e` variants: over their source variant's engine-only time). mAP: "
              "pycocotools on the predictions and ground truth named in report.json."]
    if rep.get("timing"):
        lines += ["", timing_line(rep["timing"])]
    mi = rep.get("map_intervals")
    if mi:
        lines.append(f"- mAP intervals: 95% {mi['method']}; {mi['resamples']} resamples of the {mi['images']} "
                     f"images (seed {mi['seed']}). Δ mAP50-95 is against the row's base (base-fp32; the e2e rows: "
                     f"base-fp32-e2e); a quantized row's change against the FP32 model it was made from:")
        lines += [f"  - {r['name']} vs {r['vs_fp32']['against']}: {delta_cell(r['vs_fp32'])}"
                  for r in rep["variants"] if r.get("vs_fp32")]
    sel = rep.get("selection")
    if sel:
        lines.append(f"- selection split ({sel['images']} train images carved out before training, seed {sel['seed']}; "
                     f"recipe choices are compared here, not on '{rep['dataset']['split']}'): mAP50-95 "
                     + ", ".join(f"{k} {v:.4f}" for k, v in sel["map50_95"].items()))
    cc = (rep.get("cross_check") or {}).get("variants") or {}
    if cc:
        lines.append("- cross-check, " + rep["cross_check"]["evaluator"] + " on the same split: " + "; ".join(
            f"{k} {v['ultralytics']:.4f} vs bench {v['bench']:.4f} ({v['delta_pt']:+.2f} pt)" for k, v in cc.items())
            + f" (the run fails beyond ±{rep['cross_check']['max_delta_pt']:g} pt)")
    for r in rep["variants"] + rep.get("e2e_variants", []):
        vb = r.get("vs_base", {})
        if r["precision"] == "fp32" and vb.get("macs_ratio", 1) < 0.99 and not r.get("e2e"):
            red = 1 / vb["macs_ratio"]
            lines.append(f"- {r['name']}: {red:.2f}x fewer MACs, engine "
                         f"{times(vb['engine_p50_speedup'], vb.get('engine_p50_speedup_ci'))} faster: "
                         f"{vb['engine_p50_speedup'] / red:.2f} of the MACs reduction became speed on this runner")
    for r in rep["variants"] + rep.get("e2e_variants", []):
        if r.get("injected_slowdown"):
            lines.append(f"- {r['name']}: **injected slowdown ×{r['injected_slowdown']:g}** (bench.inject_slowdown): "
                         f"its runner was made slower on purpose; its latency is not the model's own")
        if r.get("note"):
            lines.append(f"- {r['name']}: {r['note']}")
        t = r.get("training") if r["precision"] == "fp32" and not r.get("e2e") else None
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


def render_devices(rep: dict) -> str:
    lines = ["", "## Devices", ""]
    for name, d in (rep.get("devices") or {}).items():
        dv = d["device"]
        lines.append(f"**{name}**: {dv.get('model')}, L4T {(dv.get('l4t') or {}).get('release', '-')}, TensorRT "
                     f"{dv.get('tensorrt') or '-'}, CUDA {dv.get('cuda') or '-'}, nvpmodel "
                     f"{(dv.get('nvpmodel') or {}).get('mode', '-')}, runner {dv.get('runner')}; "
                     + ("clocks locked" if d["comparable"] else f"**not comparable**: {d.get('not_comparable')}"))
        lines += ["", "| variant | mAP50-95 (device) | mAP50-95 (dev box) | equal | engine p50 / p90 / p99 ms | "
                      "e2e p50 / p90 / p99 ms | fps | power W (mean) | temp max °C |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for v in d["variants"]:
            g, e = v["latency_ms"]["engine"], v["latency_ms"]["end_to_end"]
            pw = v.get("power", {}).get("power_mean_mw")
            tmax = max((v.get("power", {}).get("temp_max_c") or {}).values(), default=None)
            dev = v.get("dev_box_map50_95")
            lines.append(f"| {v['name']} | {v['map50_95']:.4f} | {'-' if dev is None else format(dev, '.4f')} | "
                         f"{'yes' if v.get('map_equals_dev_box') else 'no'} | {g['p50']:.2f} / {g['p90']:.2f} / "
                         f"{g['p99']:.2f} | {e['p50']:.2f} / {e['p90']:.2f} / {e['p99']:.2f} | {v['fps']:.1f} | "
                         f"{'-' if pw is None else format(pw / 1000, '.2f')} | {'-' if tmax is None else tmax} |")
        lines.append("")
    return "\n".join(lines) + "\n"
