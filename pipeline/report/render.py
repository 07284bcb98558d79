"""Everything drawn for one run: tradeoff.png, history.png, report.html beside its report.json. Called at the end
of every bench (stages/bench.publish) and by `yolo-edge report`."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.core.stage import console


def history_bands(baseline: dict, device: str, metrics: list[str]) -> dict:
    """{metric: {variant: (lo, hi)}} from a baseline (empty when there is none)."""
    from pipeline.report.gate import _band

    out: dict = {}
    variants = (((baseline.get("devices") or {}).get(device) or {}).get("variants")) or {}
    for v, ms in variants.items():
        for m in metrics:
            if m in (ms or {}):
                lo, hi, _ = _band(m, ms[m])
                out.setdefault(m, {})[v] = (lo, hi)
    return out


def render_run(run_dir: str | Path, history: str | Path | None = None, gate_text: str | None = None) -> dict:
    """Write tradeoff.png, history.png (when the history has this recipe's runs) and report.html; returns their
    paths."""
    import yaml

    from pipeline.report import history as hist
    from pipeline.report.gate import baseline_path_for
    from pipeline.report.html import write_html
    from pipeline.report.plots import HISTORY_METRICS, write_history, write_tradeoff
    from pipeline.report.rows import devices

    run_dir = Path(run_dir)
    rep = json.loads((run_dir / "report.json").read_text())
    out = {"tradeoff": run_dir / "tradeoff.png"}
    write_tradeoff(rep, out["tradeoff"])
    hp = run_dir / "history.png"
    try:  # the history is a nicety here: a missing or locked database must not fail a bench
        db = Path(history) if history else hist.default_db()
        dev = devices(rep)[0]["id"]
        metrics = [m for m, _ in HISTORY_METRICS]
        s = hist.series(db, (rep.get("recipe") or {}).get("name"), dev, metrics) if db.is_file() else {}
        bp = baseline_path_for(run_dir, rep)
        bands = history_bands(yaml.safe_load(bp.read_text()) or {}, dev, metrics) if bp.is_file() else {}
        if write_history(s, bands, hp, f"{(rep.get('recipe') or {}).get('name')} on {dev}: {db}"):
            out["history"] = hp
        elif hp.exists():
            hp.unlink()
    except Exception as e:  # noqa: BLE001
        console.print(f"[yellow]report: history.png not drawn: {type(e).__name__}: {e}[/yellow]")
    from pipeline.report.history import git_commit

    out["html"] = write_html(run_dir, rep, run_dir / "report.html", commit=git_commit(), gate_text=gate_text)
    return out
