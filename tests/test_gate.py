"""The gate against a baseline (each injected fault caught with a one-line reason and exit 2; an unchanged run
passes; tolerances from measured spread; latency judged by the run's own intervals and not across CPU models),
baseline update, and the SQLite history (parallel writers lose no row). No training: a synthetic report.json in
bench's schema (tests/report_fixture.py)."""

from __future__ import annotations

import copy
import json
import multiprocessing as mp
import re
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, cli
from report_fixture import synthetic_report, write_run

from pipeline.report import history as hist
from pipeline.report.gate import baseline_from_report, compare, render_baseline


def _jetson_report() -> dict:
    """The synthetic report with a 'devices' section: one Jetson's own device report (its rows and state)."""
    rep = synthetic_report()
    jet = copy.deepcopy(rep["variants"][:2])
    for r in jet:
        r["latency_ms"]["engine"]["p50"] /= 4
        r["latency_ms"]["end_to_end"]["p50"] /= 3
    eng = [r["latency_ms"]["engine"]["p50"] for r in jet]
    jet[1]["vs_base"]["engine_p50_speedup"] = eng[0] / eng[1]
    rep["devices"] = [{"device": {"model": "NVIDIA Jetson Orin Nano Developer Kit", "jetson": True,
                                  "machine": "aarch64", "clocks_locked": True, "nvpmodel": {"mode": "MAXN"}},
                       "variants": jet}]
    return rep


@pytest.fixture
def gated(tmp_path):
    """A run directory and its baseline made from that same run (`yolo-edge baseline update`)."""
    run = write_run(tmp_path / "run", _jetson_report())
    bl = tmp_path / "baseline.yaml"
    r = cli("baseline", "update", "--run-dir", run, "--baseline", bl, "--reason", "fixture: the synthetic run")
    assert r.returncode == 0, r.stderr
    return run, bl


def _mutate(run: Path, fn) -> None:
    rep = json.loads((run / "report.json").read_text())
    fn(rep)
    (run / "report.json").write_text(json.dumps(rep))


def _row(rep, name):
    return next(r for r in rep["variants"] + rep["e2e_variants"] if r["name"] == name)


def _slower_pruned(rep):
    r = _row(rep, "pruned-fp32")
    r["latency_ms"]["engine"]["p50"] *= 1.5  # and bench's ratios with it
    r["vs_base"]["engine_p50_speedup"] /= 1.5
    r["e2e_over_engine"] = r["latency_ms"]["end_to_end"]["p50"] / r["latency_ms"]["engine"]["p50"]


def _less_accurate(rep):
    _row(rep, "pruned-fp32")["map50_95"] -= 0.02


def _better(rep):
    _row(rep, "pruned-fp32")["map50_95"] += 0.02


def _no_variant(rep):
    rep["variants"] = [r for r in rep["variants"] if r["name"] != "pruned-int8"]


def _no_device(rep):
    del rep["devices"]


@pytest.mark.parametrize("inject, expect", [
    (_slower_pruned, ["x86_64-2cpu pruned-fp32 engine_p50_speedup", "regression", "±15%"]),
    (_less_accurate, ["x86_64-2cpu pruned-fp32 map50_95", "-2.00 pt", "regression",
                      "±0.26 pt = 2x measured spread 0.13 pt"]),
    (_better, ["x86_64-2cpu pruned-fp32 map50_95", "+2.00 pt", "unexplained gain: update the baseline on purpose"]),
    (_no_variant, ["x86_64-2cpu pruned-int8: variant missing from the run"]),
    (_no_device, ["nvidia-jetson-orin-nano-developer-kit: device missing from the run"]),
], ids=["slower-pruned", "less-accurate", "unexplained-gain", "missing-variant", "missing-device"])
def test_gate_catches_each_fault(gated, inject, expect):
    run, bl = gated
    _mutate(run, inject)
    r = cli("gate", run, "--baseline", bl)
    assert r.returncode == 2, r.stdout + r.stderr
    fails = [ln for ln in r.stderr.splitlines() if ln.startswith("FAIL ")]
    assert fails, r.stderr
    hit = [ln for ln in fails if all(e in ln for e in expect)]
    assert hit, f"no failure line with {expect}: {fails}"


@pytest.mark.slow
def test_unchanged_run_passes_and_absolute_latency_is_not_gated(gated):
    run, bl = gated
    r = cli("gate", run, "--baseline", bl)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "gate: all" in r.stdout and "FAIL" not in r.stdout + r.stderr

    def slower_box(rep):  # the whole box 40% slower tonight: every ratio the same, nothing fails
        for d in [rep, *rep["devices"]]:
            for row in d["variants"] + d.get("e2e_variants", []):
                for k in ("engine", "end_to_end"):
                    row["latency_ms"][k]["p50"] *= 1.4
    _mutate(run, slower_box)
    assert cli("gate", run, "--baseline", bl).returncode == 0


def _speedup_spec(ref=1.6, spread=0.05):
    return {"devices": {"x86_64-2cpu": {"cpu": "CPU A", "isa": ["avx2"], "variants": {"pruned-fp32": {
        "engine_p50_speedup": {"ref": ref, "spread": spread, "rule": "speedup"}}}}}}


def _with_speedup(x, ci, cpu="CPU A", isa=("avx2",)):
    rep = synthetic_report()
    rep["device"]["cpu"], rep["device"]["isa"] = cpu, list(isa)
    vb = _row(rep, "pruned-fp32")["vs_base"]
    vb["engine_p50_speedup"], vb["engine_p50_speedup_ci"] = x, ci
    return rep


@pytest.mark.parametrize("x, ci, status", [
    (1.30, [1.24, 1.40], "ok"),          # the value is outside ±15% but its interval reaches the band: noise
    (1.23, [1.20, 1.26], "regression"),  # 1.3x slower, the whole interval below the band
    (2.20, [2.05, 2.35], "gain"),        # the whole interval above: unexplained gain
    (1.60, None, "ok"),                  # no interval: the value decides
], ids=["overlapping", "slower-1.3x", "faster", "no-interval"])
def test_latency_ratios_are_judged_by_the_runs_interval(x, ci, status):
    (c,) = compare(_with_speedup(x, ci), _speedup_spec())
    assert c.status == status, c.line
    if status != "ok":
        assert c.line.startswith("x86_64-2cpu pruned-fp32 engine_p50_speedup") and "95%" not in c.line
        assert f"[{ci[0]:.3f}×, {ci[1]:.3f}×]" in c.line and "tolerance ±15% (floor; measured spread 5%)" in c.line


def test_latency_is_not_gated_across_cpu_models_or_with_no_latency():
    (c,) = compare(_with_speedup(1.0, [0.95, 1.05], cpu="CPU B"), _speedup_spec())
    assert c.status == "not-comparable" and not c.failed and "another CPU (CPU B" in c.line
    (c,) = compare(_with_speedup(1.0, [0.95, 1.05], isa=("avx2", "avx512f")), _speedup_spec())
    assert c.status == "not-comparable" and "other vector units (avx2 avx512f" in c.line
    (c,) = compare(_with_speedup(1.0, [0.95, 1.05]), _speedup_spec(), latency=False)
    assert c.status == "skipped" and not c.failed
    (c,) = compare(_with_speedup(1.0, [0.95, 1.05]), _speedup_spec())
    assert c.status == "regression"


def test_tolerance_follows_the_measured_spread():
    from pipeline.report.gate import spread_of

    reps = [synthetic_report() for _ in range(3)]
    for rep, d in zip(reps, (0.0, 0.004, -0.002)):
        _row(rep, "pruned-fp32")["map50_95"] += d
    sp = spread_of(reps)
    assert sp[("x86_64-2cpu", "pruned-fp32", "map50_95")] == pytest.approx(0.003)
    assert sp[("x86_64-2cpu", "base-fp32", "map50_95")] == 0.0
    b = baseline_from_report(reps[0], None, "x", Path("r"), spread_reports={"r1": reps[1], "r2": reps[2]})
    text = render_baseline(b)
    spec = yaml.safe_load(text)["devices"]["x86_64-2cpu"]["variants"]["pruned-fp32"]["map50_95"]
    assert spec == {"ref": pytest.approx(0.8196), "spread": pytest.approx(0.003), "rule": "map-fp32"}
    assert "tolerance ±0.6 pt = 2x measured spread 0.3 pt" in text and "spread_runs:" in text
    base = yaml.safe_load(text)["devices"]["x86_64-2cpu"]["variants"]["base-fp32"]["map50_95"]
    assert base["spread"] == 0.0  # no spread measured: the floor (0.2 pt) applies
    rep = synthetic_report()
    _row(rep, "pruned-fp32")["map50_95"] += 0.007  # beyond 0.6 pt
    _row(rep, "base-fp32")["map50_95"] += 0.0015  # within the 0.2 pt floor
    bad = [c for c in compare(rep, yaml.safe_load(text)) if c.failed]
    assert [(c.variant, c.metric) for c in bad] == [("pruned-fp32", "map50_95")]


def test_gate_writes_gate_txt_and_no_latency_flag(gated):
    run, bl = gated
    _mutate(run, _slower_pruned)
    r = cli("gate", run, "--baseline", bl, "--no-latency")
    assert r.returncode == 0, r.stdout + r.stderr
    text = (run / "gate.txt").read_text()
    assert "FAIL" not in text and "checks within tolerance" in text and "not gated)" in text
    assert any("engine_p50_speedup" in ln and ln.rstrip().endswith("skipped") for ln in text.splitlines())
    r = cli("gate", run, "--baseline", bl)
    assert r.returncode == 2 and "FAIL x86_64-2cpu pruned-fp32 engine_p50_speedup" in (run / "gate.txt").read_text()


def test_baseline_update_keeps_the_reason_and_hand_set_tolerances(gated):
    run, bl = gated
    b = yaml.safe_load(bl.read_text())
    assert b["updates"][-1]["reason"] == "fixture: the synthetic run"
    spec = b["devices"]["x86_64-2cpu"]["variants"]["pruned-fp32"]["engine_p50_speedup"]
    assert spec["rule"] == "speedup" and "rtol" not in spec  # the tolerance follows from the rule and the spread
    assert "# tolerance ±15% (floor; measured spread 3.8%)" in bl.read_text()  # each says where it comes from
    text = bl.read_text().replace("{ref: 0.8196, rule: map-fp32}", "{ref: 0.8196, tol: 0.05, rule: hand}")
    bl.write_text(text)
    _mutate(run, _less_accurate)
    assert cli("gate", run, "--baseline", bl).returncode == 0  # within the hand-set 5 pt
    r = cli("baseline", "update", "--run-dir", run, "--baseline", bl, "--reason", "on purpose: less accurate")
    assert r.returncode == 0, r.stderr
    b = yaml.safe_load(bl.read_text())
    assert [u["reason"] for u in b["updates"]] == ["fixture: the synthetic run", "on purpose: less accurate"]
    assert b["devices"]["x86_64-2cpu"]["variants"]["pruned-fp32"]["map50_95"] == {"ref": pytest.approx(0.7996),
                                                                                   "tol": 0.05, "rule": "hand"}


@pytest.mark.parametrize("name", ["default", "default-ft60"])
def test_shipped_baselines_parse(name):
    from pipeline.report.gate import load_baseline

    b = load_baseline(ROOT / "benchmarks" / "baselines" / f"{name}.yaml")
    vs = b["devices"]["x86_64-2cpu"]["variants"]
    assert {"base-fp32", "pruned-fp32", "pruned-int8"} <= set(vs)
    assert "engine_p50_speedup" in vs["pruned-fp32"] and "e2e_over_engine" in vs["pruned-fp32"]
    assert not any(m.endswith("_ms") for v in vs.values() for m in v)  # never absolute milliseconds


def test_the_default_baseline_holds_and_gates_the_readme_numbers():
    from pipeline.report.gate import load_baseline

    # the default baseline and the README's results table are the same run: every mAP the README shows for a gated
    # variant is the baseline's reference (to the table's 4 decimals)
    vs = load_baseline(ROOT / "benchmarks" / "baselines" / "default.yaml")["devices"]["x86_64-2cpu"]["variants"]
    readme = (ROOT / "README.md").read_text()
    rows = dict(re.findall(r"^\| ([a-z0-9-]+) \| onnxruntime \| (0\.\d{4})[ |]", readme, re.M))
    assert {"base-fp32", "pruned-fp32", "pruned-int8"} <= set(rows)
    for name, m in rows.items():
        if name in vs:
            assert abs(vs[name]["map50_95"]["ref"] - float(m)) <= 5e-5, (name, m, vs[name]["map50_95"])
    # and the synthetic report gates against it line by line without error (its numbers are older: failures allowed)
    checks = compare(synthetic_report(), load_baseline(ROOT / "benchmarks" / "baselines" / "default.yaml"))
    assert checks and all(c.line for c in checks)


def test_matrix_required_variant_without_reference_fails():
    rep = synthetic_report()
    b = baseline_from_report(rep, None, "x", Path("r"), variants=["base-fp32"])
    checks = compare(rep, yaml.safe_load(render_baseline(b)), {"x86_64-2cpu": ["base-fp32", "pruned-fp32"]})
    bad = [c.line for c in checks if c.failed]
    assert len(bad) == 1 and "pruned-fp32: no reference in the baseline" in bad[0]


# --- history ---------------------------------------------------------------------------------------------------

def _writer(db: str, wid: int, n: int) -> None:
    con = hist.connect(db)
    for i in range(n):  # one transaction per row: the most lock contention
        hist.insert(con, [{"run_uid": f"w{wid}", "run": "r", "time": "2026-12-01T00:00:00", "device": "d",
                           "variant": f"v{i}", "metric": "m", "value": float(i)}])
    con.close()


def test_parallel_writers_lose_no_row(tmp_path):
    db = str(tmp_path / "h.db")
    hist.connect(db).close()
    procs, n = 6, 300
    ps = [mp.get_context("fork").Process(target=_writer, args=(db, w, n)) for w in range(procs)]
    for p in ps:
        p.start()
    for p in ps:
        p.join(120)
        assert p.exitcode == 0
    assert hist.count(db) == procs * n
    con = hist.connect(db)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    con.close()


def test_recording_is_idempotent(tmp_path):
    db = tmp_path / "h.db"
    run = write_run(tmp_path / "run")
    new, total = hist.record(run, db, commit="abc")
    assert new == total and hist.record(run, db, commit="abc")[0] == 0
    con = hist.connect(db)
    row = con.execute("SELECT commit_sha, recipe, recipe_digest, versions, device, device_state FROM results WHERE "
                      "variant = 'pruned-fp32' AND metric = 'engine_p50_speedup' AND commit_sha = 'abc'").fetchone()
    assert row[0] == "abc" and row[1] == "default" and len(row[2]) == 64 and "onnxruntime" in row[3]
    assert row[4] == "x86_64-2cpu" and "Xeon" in row[5]
    con.close()
