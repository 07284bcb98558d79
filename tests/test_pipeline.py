"""End to end through the real CLI: the default recipe shape on small data, caching, report schema, mAP parity
with ultralytics' own validator, and users' own datasets."""

import json
import random
import subprocess
import sys

import pytest
from conftest import ROOT, SHARED, cli

from pipeline.core.store import sha256_file


def _check_report(run_dir, *need):
    tool = SHARED / "tools" / "check-report"
    if not tool.is_file():
        return None
    r = subprocess.run([sys.executable, str(tool), str(run_dir), *need], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


REQUIRED = ["name", "model", "runner", "map50_95", "map50", "latency_ms", "fps", "params", "macs", "predictions",
            "ground_truth"]


def _assert_schema(rep):
    assert isinstance(rep["variants"], list) and rep["variants"]
    for v in rep["variants"]:
        assert all(k in v for k in REQUIRED), v.keys()
        assert set(v["model"]) >= {"path", "sha256"}
        for part in ("engine", "end_to_end"):
            lat = v["latency_ms"][part]
            assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"]


def _reordered_coco(src, dest):
    """The val images of a synthetic COCO dataset as a user's COCO JSON looks: image ids shuffled and not in file
    order, category ids non-contiguous, images listed in another order, half of them padded to non-square."""
    import cv2
    import numpy as np

    d = json.loads((src / "annotations" / "instances_val.json").read_text())
    rng = np.random.default_rng(3)
    new_id = {im["id"]: int(v) for im, v in zip(d["images"], rng.permutation(len(d["images"])) * 13 + 5)}
    new_cat = {c["id"]: 2 * c["id"] + 3 for c in d["categories"]}
    (dest / "images" / "val").mkdir(parents=True)
    for k, im in enumerate(d["images"]):
        img = cv2.imread(str(src / "images" / "val" / im["file_name"]))
        if k % 2:  # pad below or to the right with noise: the objects stay where they were
            pad = rng.integers(0, 255, (80, img.shape[1], 3), dtype=np.uint8) if k % 4 == 1 else \
                rng.integers(0, 255, (img.shape[0], 80, 3), dtype=np.uint8)
            img = np.concatenate([img, pad], 0 if k % 4 == 1 else 1)
        cv2.imwrite(str(dest / "images" / "val" / im["file_name"]), img)
        im["height"], im["width"] = img.shape[:2]
    for a in d["annotations"]:
        a["image_id"], a["category_id"] = new_id[a["image_id"]], new_cat[a["category_id"]]
    for im in d["images"]:
        im["id"] = new_id[im["id"]]
    d["images"] = d["images"][::-1]
    d["categories"] = [{**c, "id": new_cat[c["id"]]} for c in d["categories"]]
    (dest / "annotations").mkdir()
    (dest / "annotations" / "instances_val.json").write_text(json.dumps(d))
    return dest, d


@pytest.mark.slow(seconds=45)
def test_bench_on_coco_json_ids_out_of_file_order_equals_ultralytics_val(tmp_path, base_ckpt, val_synth):
    """A COCO JSON whose image ids are not in file-name order, with non-contiguous category
    ids and non-square images. bench (ONNX Runtime, our letterbox + NMS, pycocotools, the data stage's eval set) and
    ultralytics' own validator on the same checkpoint and images agree within 1 point: bench's own cross-check in
    the report, and a direct call. Predictions carry the COCO file's own image and category ids."""
    from pipeline.adapters import ultralytics_yolo as ua
    from pipeline.data.formats import load_dataset, write_yolo

    src, d = _reordered_coco(val_synth, tmp_path / "coco")
    run = tmp_path / "run"
    r = cli("bench", "--data", src, "--weights", base_ckpt, "--run-dir", run, "--set", "bench.max_rounds=1")
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((run / "report.json").read_text())
    ours = rep["variants"][0]
    assert ours["map50_95"] > 0.5, "a model that detects little would make parity easy"
    cc = rep["cross_check"]["variants"]["base-fp32"]
    assert cc["bench"] == ours["map50_95"] and abs(cc["delta_pt"]) <= 1.0, cc
    y = write_yolo(load_dataset(src), tmp_path / "y")
    (tmp_path / "y" / "data.yaml").write_text((tmp_path / "y" / "data.yaml").read_text() + "train: images/val\n")
    ref = ua.val(base_ckpt, y, imgsz=320)
    assert abs(ours["map50_95"] - ref["map50_95"]) <= 0.01, (ours["map50_95"], ref)
    assert abs(ours["map50"] - ref["map50"]) <= 0.02, (ours["map50"], ref)
    e2e = rep["e2e_variants"][0]  # letterbox + model + NMS in one graph: the same detections' mAP
    assert e2e["name"] == "base-fp32-e2e" and abs(e2e["map50_95"] - ours["map50_95"]) <= 0.001
    assert len(e2e["e2e"]["scored_at_sizes"]) == 3  # one graph each: square, padded below, padded right
    dets = json.loads((run / ours["predictions"]).read_text())
    assert {x["image_id"] for x in dets} <= {im["id"] for im in d["images"]}
    assert {x["category_id"] for x in dets} <= {c["id"] for c in d["categories"]}
    assert "cross-check, ultralytics" in (run / "report.md").read_text()
    _check_report(run, "base-fp32")


@pytest.mark.slow
def test_bench_on_users_yolo_dataset_coco8(tmp_path, needs_shared):
    run = tmp_path / "run"
    r = cli("bench", "--data", needs_shared, "--weights", "yolo11n.yaml", "--run-dir", run,
            "--set", "bench.max_rounds=1", "--set", "bench.warmup=1")
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((run / "report.json").read_text())
    _assert_schema(rep)
    assert rep["dataset"]["images"] == 4 and len(rep["dataset"]["names"]) == 80
    gt = json.loads((run / rep["variants"][0]["ground_truth"]).read_text())
    assert len(gt["annotations"]) > 0 and len(gt["categories"]) == 80


@pytest.mark.slow
def test_bench_on_users_coco_json_dataset(tmp_path, synth_small):
    run = tmp_path / "run"
    r = cli("bench", "--data", synth_small / "annotations" / "instances_val.json", "--weights", "yolo11n.yaml",
            "--run-dir", run, "--set", "bench.max_rounds=1", "--set", "bench.warmup=1")
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((run / "report.json").read_text())
    _assert_schema(rep)
    assert rep["dataset"]["images"] == 12


def test_make_help_lists_every_target():
    r = subprocess.run(["make", "-s", "help"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0
    for t in ("pipeline", "test", "load", "prune", "finetune", "export", "calibrate", "quantize", "engine", "bundle",
              "bench", "report", "status", "base", "sparse", "nightly"):
        assert f"make {t} " in r.stdout, t


@pytest.mark.slow(seconds=45)
def test_make_base_trains_phases_and_checks_convergence_with_the_finetune_settings(tmp_path):
    """`yolo-edge base`: phases in sequence (each its own epochs and nominal batch), the record beside the
    checkpoint, and a convergence check trained with the fine-tune section's settings; then a phase appended to the
    recipe, which continues the shipped weights."""
    out = tmp_path / "b.pt"
    sets = ["--set", "data.synthetic.train=16", "--set", "data.synthetic.val=8", "--set", "model.imgsz=96",
            "--set", "base.batch=8", "--set", "base.workers=0",
            "--set", "base.phases=[{epochs: 1}, {epochs: 1, nbs: 8, close_mosaic: 1, warmup_epochs: 0}]",
            "--set", "base.check_epochs=1",
            "--set", "finetune.batch=8", "--set", "finetune.nbs=8"]
    r = cli("base", "--run-dir", tmp_path / "run", "--out", out, *sets)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "engine/trainer:" not in r.stdout + r.stderr  # ultralytics' chatter: in the command's log only
    assert "engine/trainer:" in (tmp_path / "run" / "base" / "log.txt").read_text()
    assert not list((tmp_path / "run").glob("base-*"))  # the training folder goes once the base is shipped
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["phases"] == [{"epochs": 1, "nbs": 64},
                              {"epochs": 1, "nbs": 8, "close_mosaic": 1, "warmup_epochs": 0.0}]
    assert meta["epochs"] == 2
    assert [h["phase"] for h in meta["history"]] == [1, 2]
    assert meta["trained_on"]["phases"] == [1, 2] and meta["trained_on"]["device"].startswith("cpu, ")
    c = meta["convergence_check"]
    assert c["trained_on"].startswith("cpu, ")
    assert c["settings"]["nbs"] == 8 and c["epochs"] == 1 and len(c["history"]) == 1
    assert c["window"] == 1 and c["check_tail_map50_95"] == c["history"][-1]["map50_95"]
    assert meta["converged"] == (c["check_tail_map50_95"] - c["shipped_tail_map50_95"] < c["converged_gain"])
    from pipeline.stages.load import training_summary

    assert training_summary(out.with_suffix(".json"))["check_epochs"] == 1
    # A phase appended to the recipe continues the shipped weights: phases 1-2 are not trained again (their history
    # is kept as it was), and the check may take the last phase's settings (auto optimizer) instead.
    sets[sets.index("base.phases=[{epochs: 1}, {epochs: 1, nbs: 8, close_mosaic: 1, warmup_epochs: 0}]")] = \
        "base.phases=[{epochs: 1}, {epochs: 1, nbs: 8, close_mosaic: 1, warmup_epochs: 0}, {epochs: 1, nbs: 16}]"
    r = cli("base", "--run-dir", tmp_path / "run", "--out", out, *sets, "--set", "base.check_settings=last_phase")
    assert r.returncode == 0, r.stderr[-3000:]
    log = r.stdout + r.stderr
    assert "holds phases 1-2 of 3" in log and "phase 1/3" not in log and "phase 3/3" in log
    meta2 = json.loads(out.with_suffix(".json").read_text())
    assert meta2["epochs"] == 3 and meta2["history"][:2] == meta["history"]
    assert [h["phase"] for h in meta2["history"]] == [1, 2, 3]
    assert meta2["extended_from"]["sha256"] == meta["sha256"] != meta2["sha256"]
    assert meta2["extended_from"]["convergence_check"] == c
    c2 = meta2["convergence_check"]
    assert c2["settings_from"] == "last_phase" and c2["settings"]["nbs"] == 16 and c2["settings"]["optimizer"] == "auto"
    assert c2["shipped_tail_map50_95"] == meta2["history"][-1]["map50_95"]
    # A last_phase check is kept beside the record; appending its schedule makes it phase 4 without training it.
    kept = tmp_path / "b.check.pt"
    assert c2["as_phase"] == {"epochs": 1, "nbs": 16} and c2["weights"]["file"] == kept.name
    assert c2["weights"]["sha256"] == sha256_file(kept)
    sets[sets.index("base.check_epochs=1")] = "base.check_epochs=0"
    phases4 = ("base.phases=[{epochs: 1}, {epochs: 1, nbs: 8, close_mosaic: 1, warmup_epochs: 0}, "
               "{epochs: 1, nbs: 16}, {epochs: 1, nbs: 16}]")
    sets[sets.index("base.phases=[{epochs: 1}, {epochs: 1, nbs: 8, close_mosaic: 1, warmup_epochs: 0}, "
                    "{epochs: 1, nbs: 16}]")] = phases4
    r = cli("base", "--run-dir", tmp_path / "run", "--out", out, *sets)
    assert r.returncode == 0, r.stderr[-3000:]
    log = r.stdout + r.stderr
    assert "phase 4/4 is the schedule of the record's convergence check" in log and "phase 4/4: training" not in log
    meta3 = json.loads(out.with_suffix(".json").read_text())
    assert meta3["sha256"] == c2["weights"]["sha256"] == sha256_file(out) and meta3["epochs"] == 4
    assert meta3["history"] == meta2["history"] + [{**h, "phase": 4} for h in c2["history"]]
    assert meta3["phase_from_check"]["phase"] == 4 and meta3["convergence_check"] is None
    assert not kept.exists()  # no check ran on the weights now shipped: nothing of the old one is kept


def test_convergence_compares_tail_means_not_a_best_epoch():
    """A plateau whose epochs scatter ±0.4 pt is converged although its best epoch beats the shipped final one by more
    than the threshold; a run that still climbs is not; the shipped side is the last phase's own tail."""
    from pipeline.stages.base_training import convergence

    rng = random.Random(0)
    shipped = [{"phase": 1, "map50_95": 0.5}] * 5 + [{"phase": 2, "map50_95": 0.78 + rng.gauss(0, 0.004)}
                                                     for _ in range(60)]
    shipped[-1] = {"phase": 2, "map50_95": 0.775}  # a low final epoch
    plateau = [{"phase": 0, "map50_95": 0.78 + rng.gauss(0, 0.004)} for _ in range(60)]
    c = convergence(shipped, plateau, 0.005, 10)
    assert c["best_gain"] > 0.005 and abs(c["gain"]) < 0.004 and c["converged"] is True
    climbing = [{"phase": 0, "map50_95": 0.78 + 0.0004 * i} for i in range(60)]
    c = convergence(shipped, climbing, 0.005, 10)
    assert c["gain"] > 0.015 and c["converged"] is False
    short = convergence(shipped[:7], plateau[:3], 0.005, 10)  # phase 2 has 2 epochs, the check 3: window 2
    assert short["window"] == 2


def test_a_longer_run_that_raises_the_base_is_reported_as_not_converged(tmp_path):
    """A base that passed make base's check but was raised by a longer single-schedule run (the record's
    longer_checks) is reported as not converged, with both runs named."""
    from pipeline.report.markdown import render_markdown
    from pipeline.stages.load import training_summary

    rec = {"epochs": 495, "converged": False,
           "convergence_check": {"epochs": 60, "gain": 0.0025, "window": 10, "converged": True},
           "longer_checks": [{"epochs": 90, "gain": 0.0211, "window": 10, "where": "GPU"}]}
    (tmp_path / "b.json").write_text(json.dumps(rec))
    t = training_summary(tmp_path / "b.json")
    assert t["converged"] is False and t["check_converged"] is True and t["longer_checks"][0]["epochs"] == 90
    lat = {"p50": 1.0, "p90": 1.0, "p99": 1.0}
    rep = {"run": "x", "dataset": {"images": 1, "split": "val", "names": ["a"], "digest": "0" * 12},
           "prepost": {"imgsz": 32}, "device": {"cpu": "c", "cpus": 1},
           "variants": [{"name": "base-fp32", "runner": {"runner": "onnxruntime"}, "map50_95": 0.5, "map50": 0.6,
                         "params": 1, "macs": 1, "model": {"size_bytes": 1}, "fps": 1.0, "precision": "fp32",
                         "latency_ms": {"end_to_end": lat, "engine": lat}, "training": t}]}
    line = [x for x in render_markdown(rep).splitlines() if x.startswith("- base-fp32: trained")][0]
    assert "converged by that check" in line and "90 more epochs (one schedule, GPU) changed it by +0.0211" in line
    assert line.endswith("NOT converged")
    rec.pop("longer_checks")
    rec["converged"] = True
    (tmp_path / "b.json").write_text(json.dumps(rec))
    rep["variants"][0]["training"] = training_summary(tmp_path / "b.json")
    line = [x for x in render_markdown(rep).splitlines() if x.startswith("- base-fp32: trained")][0]
    assert line.endswith(": converged") and "one schedule" not in line and "(the fine-tune settings)" in line
    rec["convergence_check"]["settings_from"] = "last_phase"
    (tmp_path / "b.json").write_text(json.dumps(rec))
    rep["variants"][0]["training"] = training_summary(tmp_path / "b.json")
    line = [x for x in render_markdown(rep).splitlines() if x.startswith("- base-fp32: trained")][0]
    assert "60 more (one more schedule like its last phase) changed its val mAP50-95 by +0.0025" in line


@pytest.mark.slow(seconds=40)
def test_shipped_sparse_weights_match_the_default_run(tmp_path, base_ckpt):
    """`make pipeline` cuts the shipped sparsity-trained weights only if their record names the default run's model,
    data and settings; this fails when the base, the data or prune.sparsity change without `make sparse`."""
    from pipeline.core.config import load_recipe
    from pipeline.core.stage import Context
    from pipeline.stages import sparsity

    run = tmp_path / "run"
    r = cli("run", "--run-dir", run, "--stages", "data,load")
    assert r.returncode == 0, r.stderr[-3000:]
    ctx = Context(run_dir=run, recipe=load_recipe(ROOT / "models/default.yaml", []),
                  recipe_path=ROOT / "models/default.yaml")
    shipped = ROOT / ctx.recipe.prune.sparsity.shipped
    want = sparsity.key_of(ctx, run / "load" / "model.pt", run / "data" / "yolo")
    ok, why = sparsity.shipped_matches(shipped, want["key"])
    assert ok, why


@pytest.mark.parametrize("recipe_file", ["default.yaml", "bccd.yaml", "bccd-s.yaml", "bccd-26n.yaml"])
def test_the_shipped_base_is_the_recipes_converged_base(tmp_path, recipe_file):
    """Each shipped base's record holds every phase of its recipe's base for its model, data and setup and
    still describes the file, so `make base` goes on from it (its check only) instead of training from the yaml;
    it says converged from a check of one more schedule like the last phase, and a kept check is the file it names."""
    from pipeline.core.config import load_recipe
    from pipeline.core.stage import Context
    from pipeline.stages.base_training import _shipped_prefix, check_as_phase, check_file, recipe_phases

    recipe = load_recipe(ROOT / "models" / recipe_file, [])
    ctx = Context(run_dir=tmp_path, recipe=recipe, recipe_path=ROOT / "models" / recipe_file)
    dest = ROOT / recipe.model.weights
    if recipe_file == "bccd-s.yaml" and not dest.is_file():
        pytest.skip(f"{dest} is not shipped (19 MB): `make base RECIPE=models/bccd-s.yaml` trains it")
    rec = _shipped_prefix(ctx, dest, recipe_phases(recipe.base))
    assert rec is not None, f"{dest.with_suffix('.json')} does not describe {dest} as the default recipe trains it"
    assert len(rec["phases"]) == len(recipe.base.phases) and rec["epochs"] == sum(p.epochs for p in recipe.base.phases)
    c = rec["convergence_check"]
    assert rec["converged"] is True and c["converged"] is True and c["gain"] < recipe.base.converged_gain
    assert c["epochs"] == recipe.base.phases[-1].epochs == recipe.base.check_epochs
    if c.get("weights") and check_file(dest).is_file():  # a kept check is the file it names (BCCD's: not shipped)
        assert check_as_phase(rec, c["as_phase"], dest)


def test_readme_make_table_and_makefile_agree():
    """Every documented target (`make help`'s) is in the README's make-target table, and every target the table names
    exists in the Makefile."""
    import re

    r = subprocess.run(["make", "-s", "help"], cwd=ROOT, capture_output=True, text=True)
    made = set(re.findall(r"^\s+make (\S+)", r.stdout, re.M))
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Make targets"):]
    table = table[: table.index("\n## ", 4)]
    first_cells = re.findall(r"^\| ([^|]*)\|", table, re.M)  # a row may name several targets (the stages')
    documented = {t for cell in first_cells for t in re.findall(r"`make ([a-z][a-z-]*)", cell)}
    assert made and documented
    assert not made - documented, f"targets missing from the README's table: {sorted(made - documented)}"
    assert not documented - made, f"README names targets the Makefile lacks: {sorted(documented - made)}"


@pytest.mark.parametrize("target,var", [("check-trt", "FILE"), ("deploy", "HOSTS"), ("compare", "ENTRIES"),
                                        ("baseline", "REASON")])
def test_a_make_target_missing_its_variable_says_which_in_one_line(target, var):
    """`make check-trt` without FILE (and the like) names the variable and its form, exit 2, before any CLI call
    (`-o venv`: the environment is taken as it is)."""
    import os
    import re

    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}  # under `make test`
    r = subprocess.run(["make", "-s", "-o", "venv", target, f"{var}="], cwd=ROOT, capture_output=True, text=True,
                       timeout=60, env=env)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if not re.match(r"make(\[\d+\])?: \*\*\*", ln)]
    assert len(lines) == 1 and lines[0].startswith(f"make {target} needs {var}="), r.stderr
