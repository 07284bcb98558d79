"""Bad input through the real console script: one line naming the file and the problem, exit 2, no traceback,
nothing written."""

import json
import shutil

import pytest
import yaml
from conftest import ROOT, cli


def _assert_clean_error(r, *needles):
    err = r.stderr.strip()
    assert r.returncode == 2, (r.returncode, r.stdout[-500:], r.stderr[-2000:])
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ")
    for n in needles:
        assert n in err, (n, err)


def _bench(tmp_path, data, weights="yolo11n.yaml", *extra):
    run = tmp_path / "run"
    r = cli("bench", "--data", data, "--weights", weights, "--run-dir", run, *extra)
    return r, run


def _yolo(tmp_path, synth_small, label=None, image_bytes=None, empty_val=False):
    root = tmp_path / "y"
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        if split == "val" and empty_val:
            continue
        for p in sorted((synth_small / "images" / split).glob("*.jpg"))[:2]:
            shutil.copy(p, root / "images" / split / p.name)
            (root / "labels" / split / (p.stem + ".txt")).write_text("0 0.5 0.5 0.2 0.2\n")
    first = sorted((root / "labels/val").glob("*.txt"))
    if label:
        first[0].write_text(label + "\n")
    if image_bytes is not None:
        sorted((root / "images/val").glob("*.jpg"))[0].write_bytes(image_bytes)
    (root / "data.yaml").write_text(yaml.safe_dump({"train": "images/train", "val": "images/val",
                                                    "names": {i: f"c{i}" for i in range(8)}}))
    return root / "data.yaml"


def test_missing_data_path(tmp_path):
    r, run = _bench(tmp_path, tmp_path / "nope.yaml")
    _assert_clean_error(r, "nope.yaml", "not found")
    assert not run.exists()


def test_undecodable_image(tmp_path, synth_small):
    r, run = _bench(tmp_path, _yolo(tmp_path, synth_small, image_bytes=b"\xff\xd8garbage"))
    _assert_clean_error(r, "data.yaml", "does not decode", ".jpg")
    assert not run.exists()


def test_label_class_out_of_range(tmp_path, synth_small):
    r, run = _bench(tmp_path, _yolo(tmp_path, synth_small, label="12 0.5 0.5 0.1 0.1"))
    _assert_clean_error(r, ".txt:1", "class id 12 >= nc=8")
    assert not run.exists()


def test_bbox_outside_image(tmp_path, synth_small):
    r, run = _bench(tmp_path, _yolo(tmp_path, synth_small, label="3 0.98 0.5 0.2 0.1"))
    _assert_clean_error(r, ".txt:1", "outside the image")
    assert not run.exists()


@pytest.mark.parametrize("field,value,msg", [("image_id", 4242, "unknown image id 4242"),
                                             ("category_id", 99, "unknown category id 99")])
def test_coco_annotation_unknown_reference(tmp_path, synth_small, field, value, msg):
    d = json.loads((synth_small / "annotations/instances_val.json").read_text())
    d["annotations"][3][field] = value
    root = tmp_path / "coco"
    shutil.copytree(synth_small / "images", root / "images")
    (root / "annotations").mkdir()
    (root / "annotations/instances_val.json").write_text(json.dumps(d))
    r, run = _bench(tmp_path, root)
    _assert_clean_error(r, "instances_val.json", msg)
    assert not run.exists()


def test_unknown_recipe_key(tmp_path):
    rec = tmp_path / "r.yaml"
    rec.write_text((ROOT / "models/default.yaml").read_text().replace("  iters: 30", "  iters: 30\n  itres: 3"))
    r = cli("run", "--recipe", rec, "--run-dir", tmp_path / "run")
    _assert_clean_error(r, str(rec), "unknown recipe key 'bench.itres'")
    assert not (tmp_path / "run").exists()


def test_model_file_not_a_checkpoint(tmp_path, synth_small):
    bad = tmp_path / "weights.pt"
    bad.write_bytes(b"this is not a checkpoint" * 100)
    r, run = _bench(tmp_path, synth_small, bad)
    _assert_clean_error(r, "weights.pt", "not a YOLO checkpoint")
    assert not run.exists()
    import torch

    torch.save({"model": {"a": 1}}, tmp_path / "dict.pt")
    r, run = _bench(tmp_path, synth_small, tmp_path / "dict.pt")
    _assert_clean_error(r, "dict.pt", "not a YOLO detection checkpoint")


def test_empty_val_split(tmp_path, synth_small):
    r, run = _bench(tmp_path, _yolo(tmp_path, synth_small, empty_val=True))
    _assert_clean_error(r, "data.yaml", "'val' split is empty")
    assert not run.exists()


def test_unimplemented_stage_says_so(tmp_path):
    r = cli("stage", "engine", "--run-dir", tmp_path / "run")
    _assert_clean_error(r, "stage 'engine' is not implemented yet")
    r = cli("stage", "quantize", "--run-dir", tmp_path / "run")
    _assert_clean_error(r, "stage 'calibrate' has not produced", "make calibrate")


@pytest.mark.parametrize("sets,msg", [
    (["prune.mode=latency", "prune.ratio=0.3"], "prune.mode=latency distributes a MACs target over groups"),
    (["prune.steps=3", "prune.ratio=0.3"], "prune.steps > 1 needs prune.macs_target"),
    (["prune.sensitivity.ratio=1.5"], "recipe key 'prune.sensitivity.ratio'"),
])
def test_prune_mode_settings_that_cannot_work_are_refused(tmp_path, sets, msg):
    args = [a for s in sets for a in ("--set", s)]
    r = cli("stage", "prune", "--run-dir", tmp_path / "run", *args)
    _assert_clean_error(r, "", msg)
    assert not (tmp_path / "run" / "prune").exists()
