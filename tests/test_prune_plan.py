"""The parts around the pruner: sensitivity / latency-aware modes, the iterative schedule, a pruned
checkpoint scored by ultralytics' val() and by our bench alike, and a fine-tune killed mid-run that resumes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, cli

from pipeline.adapters import prune_plan as pp
from pipeline.adapters import pruning as yp
from pipeline.adapters import ultralytics_yolo as ua
from pipeline.adapters.family import family_named

F11 = family_named("yolo11")


def _sets(base_ckpt, **extra):
    s = ["--set", "data.synthetic.train=24", "--set", "data.synthetic.val=8", "--set", f"model.weights={base_ckpt}",
         "--set", "finetune.batch=8", "--set", "finetune.workers=0", "--set", "prune.mode=uniform",
         "--set", "prune.sparsity.enabled=false"]  # its own test (test_prune.py); the shipped weights fit other data
    for k, v in extra.items():  # later --set wins
        s += ["--set", f"{k.replace('__', '.')}={v}"]
    return s


def _stage(run, name, sets):
    """Run the stages before `name` (data, load) and then `name` through the CLI."""
    for st in ("data", "load"):
        if not (run / st / "record.json").is_file():
            r = cli("stage", st, "--run-dir", run, *sets)
            assert r.returncode == 0, r.stderr[-2000:]
    return cli("stage", name, "--run-dir", run, *sets)


def test_weights_prune_insensitive_groups_more_and_latency_favours_time_per_point():
    sens = {"ratio": 0.5, "groups": [{"group": "a", "drop": 0.0}, {"group": "b", "drop": 0.01},
                                     {"group": "c", "drop": 0.1}, {"group": "d", "drop": -0.01}]}
    w = pp.weights("sensitivity", sens)
    assert w["d"] == w["a"] > w["b"] > w["c"] > 0
    r = yp.weighted_ratios(w, 0.6, 0.7)
    assert r["a"] == pytest.approx(0.6) and r["a"] > r["b"] > r["c"]
    lat = pp.weights("latency", sens, {"a": 0.1, "b": 2.0, "c": 2.0, "d": 0.1})
    assert lat["b"] > lat["a"] and lat["b"] > lat["c"]  # b buys much time for a small drop


@pytest.mark.slow
def test_the_sensitivity_scan_equals_pruning_each_group_alone(base_ckpt, val_synth):
    """The scan zeroes each group's BatchNorm channels on one copy instead of pruning a copy per group: the same
    channels, the same mAP (exactly, on the shipped base) as Torch-Pruning pruning that group alone, for a stem conv,
    a C3k2 residual stream, SPPF, the C2PSA attention's stream, a Detect head conv and a group round_to leaves
    whole."""
    from pipeline.data.formats import load_dataset
    from pipeline.eval.detect import PrePost

    ds = load_dataset(val_synth)
    evaluate = pp.Evaluator(ds.split("val")[:6], ds, PrePost(imgsz=320, conf=0.001, iou=0.7, max_det=300), F11)
    prep = yp.prepare(ua.load_detection_model(base_ckpt), F11)
    spec = yp.PruneSpec(macs_target=0.5, round_to=16)
    every = pp.groups(prep, 320, F11)
    pick = ["model.0.conv", "model.2.m.0.cv1.conv", "model.9.cv1.conv", "model.23.cv2.0.0.conv",
            "model.10.m.0.ffn.1.conv"]  # the last: C2PSA's stream, through the attention's proj BN
    grps = [g for g in every if g.root in pick] + [next(g for g in every if g.channels == 16)]
    assert len(grps) == 6
    rows = pp.sensitivity(prep, 320, spec, grps, evaluate, 0.5, F11, log=lambda s: None)["groups"]
    base = evaluate(prep)
    for g, row in zip(grps, rows):
        pruned, _ = yp.prune_at_ratio(prep, 320, spec, 0.0, F11, ratio_dict={g.root: 0.5})
        kept = dict(pruned.named_modules())[g.root].out_channels
        assert row["pruned_channels"] == g.channels - kept, g.root
        assert row["map50_95"] == evaluate(pruned) and row["drop"] == base - row["map50_95"], g.root
    assert any(r["pruned_channels"] == 0 for r in rows) and any(r["drop"] > 0.01 for r in rows)


@pytest.mark.slow
def test_taylor_importance_ranks_the_sensitivity_scan(base_ckpt, val_synth, tmp_path):
    """The scan's pruner gets the gradients Taylor importance ranks by: a group's scanned mAP is that of the same
    group pruned alone with Taylor importance (the sensitivity and latency modes accept importance: taylor)."""
    from pipeline.data.formats import load_dataset, write_yolo
    from pipeline.eval.detect import PrePost

    ds = load_dataset(val_synth)
    evaluate = pp.Evaluator(ds.split("val")[:4], ds, PrePost(imgsz=320, conf=0.001, iou=0.7, max_det=300), F11)
    grads = ua.taylor_grads_fn(write_yolo(ds, tmp_path / "y"), 320, 1, batch=4)
    prep = yp.prepare(ua.load_detection_model(base_ckpt), F11)
    spec = yp.PruneSpec(macs_target=0.5, round_to=16, importance="taylor")
    grp = [g for g in pp.groups(prep, 320, F11) if g.root == "model.9.cv1.conv"]
    with pytest.raises(Exception, match="taylor importance needs training batches"):
        pp.sensitivity(prep, 320, spec, grp, evaluate, 0.5, F11, log=lambda s: None)
    row = pp.sensitivity(prep, 320, spec, grp, evaluate, 0.5, F11, log=lambda s: None, grads_fn=grads)["groups"][0]
    pruned, _ = yp.prune_at_ratio(prep, 320, spec, 0.0, F11, grads, ratio_dict={grp[0].root: 0.5})
    assert row["pruned_channels"] > 0 and row["map50_95"] == evaluate(pruned)


@pytest.mark.slow(seconds=200)
def test_latency_mode_scans_every_group_and_times_against_uniform(tmp_path, base_ckpt):
    """prune.mode=latency end to end through the CLI: a sensitivity row (and a measured latency) for every
    dependency group, table + plot saved, the MACs target met, the uniform candidate timed beside it, and the
    history replays to the same architecture."""
    run = tmp_path / "run"
    r = _stage(run, "prune",
               _sets(base_ckpt, prune__mode="latency", prune__sensitivity__images=6,
                     prune__sensitivity__latency_runs=5, prune__round_to=8))
    assert r.returncode == 0, r.stderr[-3000:]
    out = run / "prune"
    sens = json.loads((out / "sensitivity.json").read_text())
    base = ua.load_detection_model(base_ckpt)
    n_groups = len(pp.groups(yp.prepare(base, F11), 320, F11))
    assert len(sens["groups"]) == n_groups > 40
    assert all(g["latency_ms"] is not None and g["latency_ms"] >= 0 for g in sens["groups"])
    assert sum(g["latency_ms"] > 0 for g in sens["groups"]) > n_groups // 2
    assert (out / "sensitivity.png").stat().st_size > 10_000
    assert len((out / "sensitivity.csv").read_text().splitlines()) == n_groups + 1
    plan = json.loads((out / "plan.json").read_text())
    assert abs(plan["macs_fraction"] - 0.5) <= 0.02 * 0.5
    ratios = plan["channel_ratio"]["ratios"]
    assert len(set(round(v, 3) for v in ratios.values())) > 3, "latency mode should give non-uniform ratios"
    cmp_ = plan["steps"][0]["compare"]
    assert set(cmp_) == {"base", "uniform", "latency"} and all(v["latency_ms"] > 0 for v in cmp_.values())
    rec = plan["steps"][0]["reconstruct"]  # the chosen candidate refit on the 18 train images the check left
    assert rec["images"] == 18 and not rec["fit_on_eval_images"] and len(rec["layers"]) >= 80
    # the refit lowers the feature error. Its mAP is not asserted here: the latency plan follows timings measured on
    # the machine under whatever else runs, so the cut differs between machines, and on 6 held-out images its mAP
    # moves by whole points (0.0 -> 0.0 beside another worker, 0.0 -> 0.09 alone); the mAP rise is test_reconstruct's,
    # on a fixed cut
    assert rec["mse_after"] < 0.8 * rec["mse_before"], rec
    assert rec["map50_95_after"] is not None and rec["map50_95_before"] is not None, rec
    pruned = ua.load_detection_model(out / "pruned.pt")
    yp.verify_history(pruned, yp.load_history(out / "history.json"), 320, F11, out / "pruned.pt")
    assert all(c["out"] % 8 == 0 for c in plan["channels"] if c["groups"] == 1 and c["out"] > 16)


@pytest.mark.slow(seconds=200)
def test_iterative_schedule_records_every_step_and_replays(tmp_path, base_ckpt):
    import shutil

    run = tmp_path / "run"
    sets = _sets(base_ckpt, prune__steps=2, prune__step_epochs=1, prune__sensitivity__images=6)
    r = _stage(run, "prune", sets + ["--set", "prune.round_to=8"])
    assert r.returncode == 0, r.stderr[-3000:]
    plan = json.loads((run / "prune" / "plan.json").read_text())
    assert [s["step"] for s in plan["steps"]] == [1, 2]
    assert plan["steps"][0]["finetuned"] and not plan["steps"][1]["finetuned"]
    assert plan["steps"][0]["macs_fraction"] > plan["steps"][1]["macs_fraction"]
    assert abs(plan["steps"][0]["macs_fraction"] - 0.5 ** 0.5) <= 0.02
    assert abs(plan["macs_fraction"] - 0.5) <= 0.02 * 0.5
    hist = yp.load_history(run / "prune" / "history.json")
    assert len(yp.as_steps(hist)) == 2
    pruned = ua.load_detection_model(run / "prune" / "pruned.pt")
    yp.verify_history(pruned, hist, 320, F11, run / "prune" / "pruned.pt")
    # the refusals below reuse this run's data and load stages (the stage cache is by content) and skip the
    # reconstruction (tested on its own): each is refused before anything is written
    no_recon = ["--set", "prune.reconstruct.enabled=false"]
    for name in ("run16", "run2"):
        for st in ("data", "load"):
            shutil.copytree(run / st, tmp_path / name / st)
    # round_to 16 (the default recipe's) is too coarse for a second step on a pruned YOLO11n to land in the band: the
    # last step takes the nearest cut below the target, and the record and the result line say how far it landed
    r = _stage(tmp_path / "run16", "prune", sets + no_recon + ["--set", "prune.round_to=16"])
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    t = json.loads((tmp_path / "run16" / "prune" / "plan.json").read_text())["target"]
    assert t["landed"] <= 0.5 and not t["within_tolerance"] and t["distance"] == pytest.approx(t["landed"] - 0.5)
    assert "from the 0.5x target: round_to 16's steps jump over" in r.stderr
    # a budget no step can keep: a one-line refusal, nothing written
    r = _stage(tmp_path / "run2", "prune", sets + no_recon + ["--set", "prune.max_step_drop=1e-9",
                                                             "--set", "prune.round_to=8"])
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "the first pruning step already lost more than prune.max_step_drop" in r.stderr
    assert not (tmp_path / "run2" / "prune").exists()


@pytest.mark.slow(seconds=40)
def test_pruned_checkpoint_ultralytics_val_agrees_with_bench(tmp_path, base_ckpt, val_synth):
    from pipeline.data.formats import load_dataset, write_yolo

    base = ua.load_detection_model(base_ckpt)
    # Uniform pruning without fine-tuning leaves nothing to compare (mAP ~0); the stride-32 groups the sensitivity
    # scan finds free on this data keep the model working while its architecture really changes.
    p5 = ["model.22.cv1.conv", "model.22.m.0.cv3.conv", "model.23.cv3.2.0.0.conv", "model.23.cv3.2.1.0.conv"]
    p, h = yp.prune_at_ratio(yp.prepare(base, F11), 320, yp.PruneSpec(ratio=0.5), 0.0, F11,
                             ratio_dict=dict.fromkeys(p5, 0.5))
    p.names = base.names
    d = tmp_path / "p"
    d.mkdir()
    ua.save_checkpoint(p, d / "pruned.pt", pruning={"history_file": "history.json"})
    yp.save_history(h, d / "history.json")
    from ultralytics import YOLO

    assert yp.arch_signature(YOLO(str(d / "pruned.pt")).model.float()) == yp.arch_signature(p)
    run = tmp_path / "run"
    r = cli("bench", "--data", val_synth, "--weights", d / "pruned.pt", "--run-dir", run, "--set", "bench.max_rounds=1")
    assert r.returncode == 0, r.stderr[-3000:]
    ours = json.loads((run / "report.json").read_text())["variants"][0]
    ref = ua.val(d / "pruned.pt", write_yolo(load_dataset(val_synth), tmp_path / "y"), imgsz=320)
    assert sum(t.numel() for t in p.parameters()) < 0.95 * sum(t.numel() for t in base.parameters())
    assert ours["map50_95"] > 0.01, "a model that detects nothing would make parity trivial"
    assert abs(ours["map50_95"] - ref["map50_95"]) <= 0.01, (ours["map50_95"], ref)


@pytest.mark.slow(seconds=100)
def test_finetune_killed_mid_run_resumes_and_finishes(tmp_path, base_ckpt):
    """Distilled (the harder resume: ultralytics rebuilds its own DistillationModel, ours re-wraps it). The cut is
    a plain channel ratio without the refit: the MACs search and the reconstruction have tests of their own."""
    run = tmp_path / "run"
    sets = _sets(base_ckpt, finetune__epochs=3, finetune__distill__enabled="true", prune__ratio=0.25,
                 prune__reconstruct__enabled="false")
    r = _stage(run, "prune", sets)
    assert r.returncode == 0, r.stderr[-2000:]
    exe = Path(sys.executable).parent / "yolo-edge"
    log = open(tmp_path / "ft1.log", "w")
    proc = subprocess.Popen([str(exe), "stage", "finetune", "--run-dir", str(run), *sets], cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 400
    killed_after = None
    while time.time() < deadline and proc.poll() is None:
        csvs = list((run / ".work").glob("finetune-*/results.csv"))
        # ultralytics writes results.csv, then last.pt, at the end of an epoch
        if csvs and len(csvs[0].read_text().strip().splitlines()) >= 2 and \
                (csvs[0].parent / "weights" / "last.pt").is_file():
            time.sleep(1.0)
            killed_after = len(csvs[0].read_text().strip().splitlines()) - 1
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.5)
    proc.wait()
    assert killed_after is not None and killed_after < 3, open(tmp_path / "ft1.log").read()[-2000:]
    assert not (run / "finetune" / "record.json").exists()
    r = cli("stage", "finetune", "--run-dir", run, *sets)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming the interrupted fine-tune" in r.stderr + r.stdout
    rec = json.loads((run / "finetune" / "record.json").read_text())
    info = json.loads((run / "finetune" / "model.json").read_text())
    assert [h["epoch"] for h in info["history"]] == [1, 2, 3]
    assert all(h["train_loss"]["kd_loss"] > 0 for h in info["history"])  # the head KD trained before and after
    assert rec["metrics"]["epochs"] == 3
    pruned = ua.load_detection_model(run / "prune" / "pruned.pt")
    assert yp.arch_signature(ua.load_detection_model(run / "finetune" / "model.pt")) == yp.arch_signature(pruned)


def test_conv_elasticity_from_two_profiles_scales_each_groups_measured_time():
    from torch import nn

    def net(a_out, b_in):
        m = nn.Module()
        m.a, m.b, m.c = nn.Module(), nn.Module(), nn.Module()
        m.a.conv, m.b.conv, m.c.conv = nn.Conv2d(16, a_out, 3), nn.Conv2d(b_in, 32, 3), nn.Conv2d(32, 32, 1)
        return m

    base, pruned = net(16, 16), net(8, 8)  # a: out 16 -> 8, b: in 16 -> 8 (each keeps half its MACs), c untouched
    t0 = {"/a/conv/Conv": 2.0, "/a/act/Mul": 0.5, "/b/conv/Conv": 1.0, "/c/conv/Conv": 1.0}
    t1 = {"/a/conv/Conv": 1.0, "/a/act/Mul": 0.25, "/b/conv/Conv": 0.9, "/c/conv/Conv": 1.1}
    e = pp.conv_elasticity(base, pruned, t0, t1)
    assert e["a.conv"] == pytest.approx(1.0)  # time fell with MACs
    assert e["b.conv"] == pytest.approx(0.2)  # mostly fixed overhead
    assert e["c.conv"] == 1.0  # not pruned: no evidence, linear assumed
    g = pp.Group("a.conv", 16, out_convs=["a.conv"], in_convs=["b.conv"])
    assert pp.group_latency([g], t0)["a.conv"] == pytest.approx(3.5)
    assert pp.group_latency([g], t0, e)["a.conv"] == pytest.approx(2.5 + 0.2)
