"""The nightly: benchmarks/matrix.yaml (recipes × variants × runners/devices, as data) run entry by entry, each run
recorded in the history, drawn, and gated against its baseline; a summary table says what moved."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from pipeline.core.errors import UserError


def load_matrix(path: Path) -> dict:
    if not Path(path).is_file():
        raise UserError(f"no nightly matrix at {path}", path)
    m = yaml.safe_load(Path(path).read_text()) or {}
    entries = m.get("entries")
    if not isinstance(entries, list) or not entries:
        raise UserError("the matrix needs a non-empty 'entries' list", path)
    devs = {d["id"]: d for d in m.get("devices") or []}
    for e in entries:
        for k in ("name", "recipe", "run_dir"):
            if not e.get(k):
                raise UserError(f"matrix entry {e.get('name', '?')}: '{k}' is required", path)
        for d in e.get("devices") or []:
            if d not in devs:
                raise UserError(f"matrix entry {e['name']}: device '{d}' is not in 'devices'", path)
    return m


def required(entry: dict) -> dict[str, list[str]]:
    """{device: [variant]} the entry must produce (variants: a list, or 'baseline' for the baseline's)."""
    vs = entry.get("variants")
    if not isinstance(vs, list):
        return {}
    return {d: list(vs) for d in entry.get("devices") or []}


def run_matrix(matrix: Path, history: Path, run_pipeline: Callable[[dict], None], only: list[str] | None = None,
               echo: Callable[[str], None] = print) -> int:
    """Run every enabled entry (or those named in `only`); returns the number of entries that failed (a pipeline
    error or a gate failure)."""
    from pipeline.report import history as hist
    from pipeline.report.gate import gate, gate_text
    from pipeline.report.render import render_run

    m = load_matrix(matrix)
    failed = 0
    for e in m["entries"]:
        if (only and e["name"] not in only) or (not only and e.get("enabled", True) is False):
            continue
        t0 = time.time()
        echo(f"== nightly {e['name']}: {e['recipe']} {' '.join(e.get('sets') or [])} -> {e['run_dir']}")
        try:
            run_pipeline(e)
        except Exception as ex:  # noqa: BLE001 - one entry's failure must not hide the others'
            failed += 1
            echo(f"FAIL {e['name']}: the pipeline failed: {type(ex).__name__}: {ex}")
            continue
        run_dir = Path(e["run_dir"])
        new, total = hist.record(run_dir, history)
        echo(f"history: {new} of {total} rows new in {history}")
        checks, notes = gate(run_dir, Path(e["baseline"]) if e.get("baseline") else None, required(e))
        bad = [c for c in checks if c.failed]
        text = gate_text(checks, notes)
        (run_dir / "gate.txt").write_text(text + "\n")
        (run_dir / "gate.json").write_text(json.dumps({"entry": e["name"], "failures": [c.line for c in bad],
                                                       "checks": [c.__dict__ for c in checks]}, indent=1))
        render_run(run_dir, history, gate_text=text)
        echo(text)
        echo(f"== {e['name']}: {'FAILED' if bad else 'passed'} in {time.time() - t0:.0f} s; "
             f"{run_dir / 'report.html'}")
        failed += bool(bad)
    return failed
