"""The trade-off picture and report.html. The data behind tradeoff.png (every variant's point on every
device, the Pareto front), the files `yolo-edge report` writes, and the HTML embedding its images. No training."""

from __future__ import annotations

import base64
import json
import re

import pytest
from conftest import cli
from report_fixture import E2E, ROWS, synthetic_report, write_run

from pipeline.report import history as hist
from pipeline.report.plots import pareto, tradeoff_data
from pipeline.report.render import render_run


def test_pareto_front():
    pts = [{"variant": n, "latency_ms": x, "map50_95": y} for n, x, y in
           [("a", 1, 0.5), ("b", 2, 0.7), ("c", 3, 0.6), ("d", 4, 0.8), ("e", 4, 0.79), ("f", 0.5, 0.4)]]
    assert [p["variant"] for p in pareto(pts)] == ["f", "a", "b", "d"]


def test_tradeoff_data_has_every_variant_and_the_front():
    d = tradeoff_data(synthetic_report())
    assert list(d) == ["x86_64-2cpu"]
    pts = d["x86_64-2cpu"]["points"]
    plain, e2e = [r[0] for r in ROWS], [r[0] for r in E2E]
    assert sorted(p["variant"] for p in pts if p["kind"] == "engine") == sorted(plain)
    assert sorted(p["variant"] for p in pts if p["kind"] == "end_to_end") == sorted(plain + e2e)
    pf = next(p for p in pts if p["variant"] == "pruned-fp32" and p["kind"] == "engine")
    assert (pf["latency_ms"], pf["map50_95"], pf["size_bytes"]) == (5.85, 0.8196, 5880000)
    assert d["x86_64-2cpu"]["front"] == {"engine": ["pruned-fp32", "base-fp32"],
                                         "end_to_end": ["pruned-fp32-e2e", "base-fp32-e2e"]}
    assert d["x86_64-2cpu"]["state"] == "clocks: not recorded"


@pytest.mark.slow
def test_devices_section_adds_a_device(tmp_path):
    rep = synthetic_report()
    rep["devices"] = {"orin-nano": {"clocks_locked": False, "variants": [rep["variants"][0]]}}
    d = tradeoff_data(rep)
    assert list(d) == ["x86_64-2cpu", "orin-nano"] and len(d["orin-nano"]["points"]) == 2
    run = write_run(tmp_path / "run", rep)
    out = render_run(run, history=tmp_path / "none.db")
    html = out["html"].read_text()
    assert "orin-nano" in html and "clocks NOT locked" in html


@pytest.mark.slow
def test_report_writes_table_plots_and_self_contained_html(tmp_path):
    run = write_run(tmp_path / "run")
    db = tmp_path / "h.db"
    for i in range(3):  # a history for history.png: three nights of this recipe
        hist.insert(hist.connect(db), [r | {"run_uid": f"n{i}", "time": f"2026-11-2{i}T02:00:00"}
                                       for r in hist.report_rows(run, commit="x")])
    r = cli("report", "--run-dir", run, "--history", db)
    assert r.returncode == 0, r.stderr
    assert "| pruned-fp32 |" in r.stdout and (run / "report.md").is_file()
    for f in ("tradeoff.png", "history.png", "report.html"):
        assert (run / f).is_file(), f
        assert f"wrote {run / f}" in r.stdout
    html = (run / "report.html").read_text()
    imgs = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(imgs) == 2
    assert base64.b64decode(imgs[0]) == (run / "tradeoff.png").read_bytes()
    assert base64.b64decode(imgs[1]) == (run / "history.png").read_bytes()
    assert not re.search(r'src="(?!data:)', html)  # nothing fetched from elsewhere
    rep = json.loads((run / "report.json").read_text())
    for row in rep["variants"] + rep["e2e_variants"]:
        assert f"<td>{row['name']}</td>" in html
    for stage in ("data", "load", "prune", "finetune", "export", "bench"):  # lineage: every stage record
        assert f"<td>{stage}</td>" in html
    assert "no &#x27;devices&#x27; section" in html or "no 'devices' section" in html
