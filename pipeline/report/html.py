"""runs/<run>/report.html: one self-contained page (the PNGs embedded as base64): the table, the trade-off and
history plots, the devices and their state, the run's lineage (recipe, commit, every stage's record.json)."""

from __future__ import annotations

import base64
import html
import json
from datetime import datetime
from pathlib import Path

from pipeline.report.rows import all_rows, clocks_state, devices

CSS = """body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1400px;color:#222}
table{border-collapse:collapse;font-size:12.5px;margin:8px 0 16px}th,td{border:1px solid #ccc;padding:3px 7px;
text-align:right}th{background:#f2f2f2}td:first-child,th:first-child{text-align:left}img{max-width:100%;
border:1px solid #ddd}code,pre{background:#f6f6f6;font-size:12px}pre{padding:8px;overflow:auto;max-height:420px}
.bad{color:#b00;font-weight:600}.ok{color:#070}.muted{color:#777}"""


def _img(path: Path, alt: str) -> str:
    if not path.is_file():
        return f"<p class=muted>{html.escape(alt)}: not drawn (no data)</p>"
    b64 = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'


def _table(rep: dict) -> str:
    head = ["device", "variant", "precision", "mAP50-95", "mAP50", "Δ mAP50-95 (pt)", "params (M)", "MACs (G)",
            "size (MB)", "engine p50 / p90 / p99 ms", "speed-up (engine)", "e2e p50 / p90 / p99 ms",
            "speed-up (e2e)", "e2e ÷ engine", "fps"]
    out = ["<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"]
    for d in devices(rep):
        for r in all_rows(d):
            vb = r.get("vs_base") or {}
            lat = r.get("latency_ms") or {}
            g, e = lat.get("engine") or {}, lat.get("end_to_end") or {}
            pct = lambda x: " / ".join(f"{x.get(p, float('nan')):.2f}" for p in ("p50", "p90", "p99"))  # noqa: E731
            cells = [d["id"], r["name"], r.get("precision", ""), f"{r['map50_95']:.4f}", f"{r['map50']:.4f}",
                     f"{100 * vb.get('map50_95_delta', 0):+.2f}", f"{(r.get('params') or 0) / 1e6:.3f}",
                     f"{(r.get('macs') or 0) / 1e9:.3f} ({vb.get('macs_ratio', 1):.2f}×)",
                     f"{(r.get('model') or {}).get('size_bytes', 0) / 1e6:.2f}", pct(g),
                     f"{vb.get('engine_p50_speedup', 1):.2f}×", pct(e), f"{vb.get('e2e_p50_speedup', 1):.2f}×",
                     f"{r['e2e_over_engine']:.2f}×" if "e2e_over_engine" in r else "–", f"{r.get('fps', 0):.1f}"]
            out.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    return "\n".join(out) + "</table>"


def _devices(rep: dict) -> str:
    out = ["<table><tr><th>device</th><th>description</th><th>clocks</th><th>state</th><th>variants</th></tr>"]
    for d in devices(rep):
        st = clocks_state(d["state"])
        cls = "bad" if "NOT" in st else "ok" if "locked" in st else "muted"
        out.append(f"<tr><td>{html.escape(d['id'])}</td><td>{html.escape(d['description'])}</td>"
                   f"<td class={cls}>{html.escape(st)}</td><td style='text-align:left'><code>"
                   f"{html.escape(json.dumps(d['state'], default=str))}</code></td><td>{len(all_rows(d))}</td></tr>")
    if not rep.get("devices"):
        out.append("<tr><td colspan=5 class=muted style='text-align:left'>no 'devices' section in this report: "
                   "only the host the bench ran on (no Jetson results attached)</td></tr>")
    return "\n".join(out) + "</table>"


def _lineage(run_dir: Path, rep: dict, commit: str | None) -> str:
    from pipeline.report.history import recipe_digest

    rows = []
    for rec in sorted(run_dir.glob("*/record.json"), key=lambda p: json.loads(p.read_text()).get("finished", 0)):
        r = json.loads(rec.read_text())
        when = datetime.fromtimestamp(r.get("finished", 0)).strftime("%Y-%m-%d %H:%M:%S")
        dur = r.get("finished", 0) - r.get("started", 0)
        outs = ", ".join(sorted(r.get("outputs") or {}))
        ins = ", ".join(f"{k}:{(v.get('digest') or '')[:8]}" for k, v in sorted((r.get("inputs") or {}).items()))
        rows.append(f"<tr><td>{html.escape(rec.parent.name)}</td><td>{r.get('stage_version')}</td>"
                    f"<td><code>{html.escape(r.get('key', '')[:12])}</code></td><td>{when}</td><td>{dur:.1f}</td>"
                    f"<td style='text-align:left'>{html.escape(outs)}</td>"
                    f"<td style='text-align:left'><small>{html.escape(ins)}</small></td></tr>")
    recipe = rep.get("recipe") or {}
    import yaml

    return (f"<p>recipe <b>{html.escape(str(recipe.get('name', '?')))}</b>, digest "
            f"<code>{(recipe_digest(rep) or '?')[:16]}</code>; commit <code>{html.escape(commit or 'unknown')}</code> "
            f"(git HEAD when this page was written); libraries: "
            + html.escape(", ".join(f"{k} {v}" for k, v in (rep.get("env") or {}).items() if k != "platform"))
            + "</p><table><tr><th>stage</th><th>version</th><th>key</th><th>finished</th><th>s</th><th>outputs</th>"
              "<th>inputs (digest)</th></tr>" + "\n".join(rows) + "</table>"
            + (f"<details><summary>recipe (as the report holds it)</summary><pre>"
               f"{html.escape(yaml.safe_dump(recipe, sort_keys=False))}</pre></details>" if recipe else ""))


def write_html(run_dir: Path, rep: dict, dest: Path, commit: str | None = None, gate_text: str | None = None) -> Path:
    run_dir = Path(run_dir)
    ds = rep.get("dataset") or {}
    cc = ((rep.get("cross_check") or {}).get("variants")) or {}
    parts = [f"<!doctype html><html><head><meta charset=utf-8><title>yolo-edge report: {html.escape(rep['run'])}"
             f"</title><style>{CSS}</style></head><body>",
             f"<h1>yolo-edge report: {html.escape(rep['run'])}</h1>",
             f"<p>{ds.get('images', '?')} {html.escape(str(ds.get('split', '?')))} images, "
             f"{len(ds.get('names') or [])} classes (digest <code>{str(ds.get('digest', ''))[:12]}</code>); input "
             f"{(rep.get('prepost') or {}).get('imgsz', '?')} px; mAP from pycocotools; latency batch 1. Compare "
             f"latency within one run, as ratios: on a shared CPU it moves ±40% from run to run.</p>",
             "<h2>Trade-off</h2>", _img(dest.parent / "tradeoff.png", "tradeoff.png"),
             "<h2>Variants</h2>", _table(rep)]
    if cc:
        parts.append("<p>cross-check (ultralytics' validator on the same split): " + html.escape("; ".join(
            f"{k} {v['ultralytics']:.4f} vs bench {v['bench']:.4f} ({v['delta_pt']:+.2f} pt)"
            for k, v in cc.items())) + "</p>")
    if gate_text:
        parts += ["<h2>Gate</h2>", f"<pre>{html.escape(gate_text)}</pre>"]
    parts += ["<h2>History</h2>", _img(dest.parent / "history.png", "history.png"),
              "<h2>Devices</h2>", _devices(rep), "<h2>Lineage</h2>", _lineage(run_dir, rep, commit),
              "</body></html>"]
    dest.write_text("\n".join(parts))
    return dest
