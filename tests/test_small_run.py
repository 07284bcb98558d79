"""The default recipe's shape on small data, run once through the CLI (a module fixture) and read by one test per
claim: every variant in the agreed report schema, the end-to-end graphs, the interleaved timing, the mAP intervals,
the INT8 records, the bundle, caching, `compare` and the held-out check."""

import json
import subprocess
import sys

import pytest
from conftest import ROOT, cli
from test_pipeline import _assert_schema, _check_report

NAMES = ["base-fp32", "pruned-fp32", "base-int8", "pruned-int8-ptq", "pruned-int8", "pruned-ultralytics-int8",
         "base-fp16", "pruned-fp16", "pruned-int8-fp16"]


@pytest.fixture(scope="module")
def small(tmp_path_factory, base_ckpt_path):
    """One run of every stage on 32 + 16 synthetic images: (run dir, its --set list, report.json)."""
    run = tmp_path_factory.mktemp("small") / "run"
    sets = ["--set", "data.synthetic.train=32", "--set", "data.synthetic.val=16", "--set", "finetune.epochs=1",
            "--set", "finetune.batch=8", "--set", "bench.max_rounds=1", "--set", "bench.warmup=1",
            "--set", f"model.weights={base_ckpt_path}", "--set", "calib.count=16", "--set", "calib.min_count=16",
            "--set", "calib.tuning_images=8", "--set", "quantize.accuracy_aware.max_float=2",
            "--set", "quantize.accuracy_aware.min_float=2", "--set", "prune.mode=uniform",  # latency: its own test
            "--set", "prune.sparsity.enabled=false"]  # its own test; the shipped sparse weights fit the default data
    r = cli("run", "--run-dir", run, *sets)
    assert r.returncode == 0, r.stderr[-3000:]
    (run.parent / "console.txt").write_text(r.stderr + "\x00" + r.stdout)  # what the terminal showed
    return run, sets, json.loads((run / "report.json").read_text())


@pytest.mark.slow(seconds=150)
def test_the_console_shows_the_project_s_lines_and_each_stage_keeps_its_log(small):
    """Every stage: one start line and one result line with its key numbers; at most 60 lines in all (a pipe is not
    a terminal: no bar redraws); what the libraries print (ultralytics' trainer and exporter, ONNX Runtime's
    quantizer) is not on the terminal but in the stage's log.txt, timestamped."""
    from pipeline.stages.order import RECORDS

    run = small[0]
    err, out = (run.parent / "console.txt").read_text().split("\x00")
    lines = (err + out).strip().splitlines()
    assert len(lines) <= 60, len(lines)
    for stage in RECORDS:
        assert f"▶ {stage}: running" in err and any(ln.startswith(f"✓ {stage}: ") for ln in err.splitlines()), stage
        assert (run / stage / "log.txt").is_file(), stage
    assert "✓ prune: 0.4" in err and "x MACs" in err  # a result line carries the stage's numbers
    for chatter in ("Ultralytics 8.4", "Please consider", "Predict:", "engine/trainer:", "\r"):
        assert chatter not in err + out, chatter
    ft = (run / "finetune" / "log.txt").read_text()
    assert "engine/trainer:" in ft and __import__("re").match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \[", ft)
    assert "Please consider" in (run / "quantize" / "log.txt").read_text()
    assert "variant" in out and "report: " in out  # the summary table and where the report is


@pytest.mark.slow(seconds=30)
def test_verbose_streams_the_libraries_lines_too(tmp_path, base_ckpt_path):
    r = cli("-v", "run", "--stages", "data,load,export", "--run-dir", tmp_path / "run", "--set",
            f"model.weights={base_ckpt_path}", "--set", "data.synthetic.train=8", "--set", "data.synthetic.val=8")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "ONNX:" in r.stderr + r.stdout and "✓ export:" in r.stderr  # ultralytics' exporter, on the terminal too
    assert "ONNX:" in (tmp_path / "run" / "export" / "log.txt").read_text()


def _by(rep):
    return {v["name"]: v for v in rep["variants"]}


@pytest.mark.slow(seconds=150)
def test_every_variant_is_reported_in_the_agreed_schema(small, base_ckpt_path):
    run, _, rep = small
    _assert_schema(rep)
    assert [v["name"] for v in rep["variants"]] == NAMES
    by = _by(rep)
    for a, b in (("base-fp16", "base-fp32"), ("pruned-fp16", "pruned-fp32"), ("pruned-int8-fp16", "pruned-int8")):
        assert abs(by[a]["map50_95"] - by[b]["map50_95"]) < 0.01, (a, by[a]["map50_95"], by[b]["map50_95"])
    cc = rep["cross_check"]["variants"]
    assert set(cc) == {"base-fp32", "pruned-fp32"} and all(abs(v["delta_pt"]) <= 2 for v in cc.values())
    base, pruned = rep["variants"][:2]
    assert pruned["macs"] <= 0.51 * base["macs"] and pruned["params"] < base["params"]
    shipped = json.loads(base_ckpt_path.with_suffix(".json").read_text())
    assert base["training"]["epochs"] == shipped["epochs"]  # the base's training record travels into the report
    assert base["training"]["converged"] == shipped["converged"]
    md = (run / "report.md").read_text()
    assert "pruned-fp32: pruned (DepGraph, uniform mode, features reconstructed) + fine-tuned 1 epochs" in md
    assert md.count("| pruned-fp32 |") == 1
    rec = json.loads((run / "prune" / "plan.json").read_text())["steps"][0]["reconstruct"]
    assert rec["fit_on_eval_images"] and rec["images"] == 32  # 32 train images: the held-out check's own, said so
    _check_report(run, *NAMES)


@pytest.mark.slow
def test_the_end_to_end_graphs_score_as_the_python_path(small):
    """One graph from frame to detections: the same mAP as the Python path around the model."""
    run, _, rep = small
    by = _by(rep)
    e2e = {v["name"]: v for v in rep["e2e_variants"]}
    assert list(e2e) == ["base-fp32-e2e", "pruned-fp32-e2e", "pruned-int8-e2e"]
    for name, v in e2e.items():
        assert abs(v["map50_95"] - by[name[:-4]]["map50_95"]) <= 0.001, (name, v["map50_95"])
        assert v["e2e"]["frame_hw"] == [720, 1280] and (run / v["model"]["path"]).is_file()
        assert v["e2e_over_engine"] > 0 and v["vs_base"]["against"] == "base-fp32-e2e"
    assert "| pruned-int8-e2e |" in (run / "report.md").read_text()


@pytest.mark.slow
def test_every_variant_is_timed_in_one_interleaved_session(small):
    """bench.max_rounds=1: one round of 3 calls per timed item; every ratio inside its interval."""
    run, _, rep = small
    assert "engine_p50_speedup" in rep["variants"][1]["vs_base"]
    t = rep["timing"]
    assert t["method"] == "interleaved" and t["stopped_by"] == "max_rounds" and t["rounds"] == 1
    for v in rep["variants"] + rep["e2e_variants"]:
        assert v["latency_ms"]["engine"]["n"] == 3 and v["timing"]["rounds"] == 1
        for est, ci in ((v["vs_base"]["engine_p50_speedup"], v["vs_base"]["engine_p50_speedup_ci"]),
                        (v["vs_base"]["e2e_p50_speedup"], v["vs_base"]["e2e_p50_speedup_ci"]),
                        (v["e2e_over_engine"], v["e2e_over_engine_ci"])):
            assert ci[0] <= est * (1 + 1e-9) and est <= ci[1] * (1 + 1e-9), (v["name"], est, ci)
    assert "Timing: every variant in one session, interleaved" in (run / "report.md").read_text()


@pytest.mark.slow
def test_every_map_and_delta_has_its_paired_interval(small):
    run, _, rep = small
    assert rep["map_intervals"]["images"] == 16 and rep["map_intervals"]["unit"] == "image"
    for v in rep["variants"] + rep["e2e_variants"]:
        vb = v["vs_base"]
        assert v["map50_95_ci"][0] <= v["map50_95"] <= v["map50_95_ci"][1], v["name"]
        assert vb["map50_95_delta_ci"][0] <= vb["map50_95_delta"] + 1e-12 and \
            vb["map50_95_delta"] - 1e-12 <= vb["map50_95_delta_ci"][1], v["name"]
    by = _by(rep)
    assert by["pruned-int8"]["vs_fp32"]["against"] == "pruned-fp32"
    assert by["base-fp16"]["vs_fp32"]["against"] == "base-fp32" and "vs_fp32" not in by["pruned-fp32"]
    pr = by["pruned-fp32"]["vs_base"]
    assert f"{100 * pr['map50_95_delta']:+.2f} pt [{100 * pr['map50_95_delta_ci'][0]:+.2f}, " in \
        (run / "report.md").read_text()


@pytest.mark.slow
def test_the_int8_files_pass_tensorrts_rules_and_the_drop_is_reported_beside_its_estimate(small):
    run, _, rep = small
    by = _by(rep)
    q = json.loads((run / "quantize" / "record.json").read_text())
    assert q["metrics"]["pruned-int8"]["trt_check"] == "passed"
    aa = q["metrics"]["pruned-int8"]
    assert aa["tuning_images"] == 8 and aa["tuning_drop_se"] >= 0 and all("bound" in st for st in aa["steps"])
    drop = by["pruned-int8"]["int8_drop"]  # the search's tuning estimate beside the val split's drop
    assert drop["tuning"] == aa["tuning_drop"] and drop["val_images"] == 16
    assert drop["val"] == by["pruned-fp32"]["map50_95"] - by["pruned-int8"]["map50_95"]
    assert q["metrics"]["pruned-ultralytics-int8"]["trt_check"].startswith("refused: node '")


@pytest.mark.slow
def test_the_bundle_carries_this_projects_variants_each_one_jetpack_6_parses(small):
    """The peer (ultralytics' INT8) is scored on the dev box but stays behind; every carried file passes TensorRT
    10.3's operator table and rules."""
    from pipeline.quant import trt_ops

    run, _, _ = small
    b = run / "bundle" / "yolo-edge-bundle"
    m = json.loads((b / "manifest.json").read_text())
    assert [v["name"] for v in m["variants"]] == [n for n in NAMES if n != "pruned-ultralytics-int8"]
    assert [x["name"] for x in m["not_carried"]] == ["pruned-ultralytics-int8"] and m["tensorrt"]["target"] == "10.3"
    assert all(trt_ops.check_file(b / v["file"], "10.3") == [] for v in m["variants"])


@pytest.mark.slow
def test_a_second_run_recomputes_nothing(small):
    run, sets, _ = small
    r2 = cli("run", "--run-dir", run, *sets)
    assert r2.returncode == 0, r2.stderr[-2000:]
    for stage in ("data", "load", "prune", "finetune", "export", "export-pruned", "calibrate", "quantize", "engine",
                  "bench"):
        assert f"{stage}: cached" in r2.stderr, (stage, r2.stderr[-2000:])
    st = cli("status", "--run-dir", run, *sets)
    assert st.returncode == 0 and "finetune   done" in st.stdout


@pytest.mark.slow
def test_compare_pairs_variants_of_runs_and_times_them_together(small, tmp_path):
    """mAP paired from the stored predictions (the report's own delta and interval), every file timed again."""
    run, _, rep = small
    by = _by(rep)
    pr = by["pruned-fp32"]["vs_base"]
    c = cli("compare", f"{run}:base-fp32", f"{run}:pruned-fp32=pruned", f"{run}:pruned-int8", "--out",
            tmp_path / "cmp", "--cap-s", "2")
    assert c.returncode == 0, c.stderr[-2000:]
    cmp = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    rows = {r["label"]: r for r in cmp["rows"]}
    assert list(rows) == [f"{run.name}:base-fp32", "pruned", f"{run.name}:pruned-int8"]
    assert rows["pruned"]["delta_pt"] == pytest.approx(100 * pr["map50_95_delta"], abs=1e-9)
    assert rows["pruned"]["delta_pt_ci"] == pytest.approx([100 * x for x in pr["map50_95_delta_ci"]], abs=1e-9)
    assert rows["pruned"]["macs_vs_ref"] == by["pruned-fp32"]["macs"] / by["base-fp32"]["macs"]
    assert all(r["speedup_ci"][0] <= r["speedup"] <= r["speedup_ci"][1] for r in cmp["rows"])
    assert "| pruned | 320 |" in (tmp_path / "cmp" / "compare.md").read_text()
    bad = cli("compare", f"{run}:base-fp32", f"{run}:nope")
    assert bad.returncode == 2 and "no variant 'nope'" in bad.stderr and "Traceback" not in bad.stderr


def _heldout(*args, timeout=600):
    return subprocess.run([sys.executable, str(ROOT / "benchmarks/heldout.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_heldout_scores_both_models_on_a_fresh_split(small):
    """make heldout: base and pruned scored by ultralytics' validator on a split drawn with another seed."""
    run, _, _ = small
    h = _heldout("--run", run, "--images", "12", "--seed", "5")
    assert h.returncode == 0, h.stderr[-3000:]
    ho = json.loads((run / "heldout.json").read_text())
    assert ho["split"]["seed"] == 5 and ho["split"]["val"] == 12 and set(ho["scores"]) == {"base-fp32", "pruned-fp32"}
    assert ho["delta_map50_95_pt"] == round(100 * (ho["scores"]["pruned-fp32"]["map50_95"]
                                                   - ho["scores"]["base-fp32"]["map50_95"]), 2)
    assert 0 < ho["scores"]["base-fp32"]["map50_95"] <= 1


@pytest.mark.slow
@pytest.mark.parametrize("args,msg", [(("--seed", "0"), "the run's own data seed"),
                                      ((), "no base-fp32 checkpoint")], ids=["own-seed", "no-run"])
def test_heldout_refuses_in_one_line(small, tmp_path, args, msg):
    run = small[0] if args else tmp_path / "none"
    h = _heldout("--run", run, *args, timeout=120)
    assert h.returncode == 2 and msg in h.stderr and h.stderr.count("\n") == 1 and "Traceback" not in h.stderr
