"""Bad input through the console script's main(): one line naming the file and the problem, exit 2, no traceback,
nothing written (in-process through cli(); the installed script as a process of its own where its exit status is
the point)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

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


@pytest.mark.parametrize("args,code,needle", [
    (("check-trt", "absent.onnx"), 2, "absent.onnx: ONNX file not found"),
    (("nope",), 2, "No such command 'nope'"),
    (("--help",), 0, None),
], ids=["user-error", "usage-error", "help"])
def test_the_installed_console_script_exits_with_the_status_a_shell_sees(tmp_path, args, code, needle):
    """The process boundary itself: the `yolo-edge` script pip installed, its exit status and its stderr."""
    r = subprocess.run([str(Path(sys.executable).parent / "yolo-edge"), *args], cwd=tmp_path, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == code, (r.returncode, r.stderr[-1000:])
    assert "Traceback" not in r.stderr
    if needle is not None:
        assert needle in r.stderr, r.stderr[-1000:]
    if code == 2 and needle.startswith("absent"):
        assert r.stderr.strip().startswith("error: ") and len(r.stderr.strip().splitlines()) == 1


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


@pytest.mark.slow
def test_missing_data_path(tmp_path):
    r, run = _bench(tmp_path, tmp_path / "nope.yaml")
    _assert_clean_error(r, "nope.yaml", "not found")
    assert not run.exists()


@pytest.mark.slow
def test_undecodable_image(tmp_path, synth_small):
    r, run = _bench(tmp_path, _yolo(tmp_path, synth_small, image_bytes=b"\xff\xd8garbage"))
    _assert_clean_error(r, "data.yaml", "does not decode", ".jpg")
    assert not run.exists()


@pytest.mark.slow
def test_label_class_out_of_range(tmp_path, synth_small):
    r, run = _bench(tmp_path, _yolo(tmp_path, synth_small, label="12 0.5 0.5 0.1 0.1"))
    _assert_clean_error(r, ".txt:1", "class id 12 >= nc=8")
    assert not run.exists()


@pytest.mark.slow
def test_bbox_outside_image(tmp_path, synth_small):
    r, run = _bench(tmp_path, _yolo(tmp_path, synth_small, label="3 1.80 0.5 0.2 0.1"))  # a little past: clipped
    _assert_clean_error(r, ".txt:1", "lies far outside the 320x320 image")
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
    rec.write_text((ROOT / "models/default.yaml").read_text().replace("  cap_s: 90", "  cap_s: 90\n  cap_z: 3"))
    r = cli("run", "--recipe", rec, "--run-dir", tmp_path / "run")
    _assert_clean_error(r, str(rec), "unknown recipe key 'bench.cap_z'")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("content,msg", [(b"", "the recipe is empty"), (b"\xff\xfe\x00\x01", "not a text file"),
                                         (b"train: images/train\nval: images/val\nnames: {0: a}\n",
                                          "this is a dataset yaml, not a recipe")])
def test_recipe_that_is_not_a_recipe(tmp_path, content, msg):
    rec = tmp_path / "r.yaml"
    rec.write_bytes(content)
    r = cli("status", "--recipe", rec, "--run-dir", tmp_path / "run")
    _assert_clean_error(r, str(rec), msg)


@pytest.mark.slow
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


@pytest.mark.slow
def test_stage_before_its_inputs_says_so(tmp_path):
    r = cli("stage", "bundle", "--run-dir", tmp_path / "run")
    _assert_clean_error(r, "stage 'bench' has not produced", "make bench")
    r = cli("stage", "engine", "--run-dir", tmp_path / "run")
    _assert_clean_error(r, "stage 'export' has not produced", "make export")
    r = cli("stage", "quantize", "--run-dir", tmp_path / "run")
    _assert_clean_error(r, "stage 'calibrate' has not produced", "make calibrate")


@pytest.mark.slow
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


# ---- files that parse but are not what their role needs --------------------------------------------------------------

def _family_yaml(name="yolo11.yaml"):
    """One of ultralytics' shipped model configs, found without importing ultralytics."""
    import importlib.util
    from pathlib import Path

    return next((Path(importlib.util.find_spec("ultralytics").origin).parent / "cfg" / "models").rglob(name))


@pytest.mark.slow
@pytest.mark.parametrize("name,body,msg", [
    ("data.yaml", {"train": "images/train", "val": "images/val", "names": {0: "a"}}, "a dataset yaml"),
    ("recipe.yaml", None, "a yolo-edge recipe"),
    ("empty.yaml", "", "empty file"),
    ("list.yaml", [1, 2], "holds a YAML list"),
    ("unknown-module.yaml", "FooConv", "ultralytics cannot build a model from this config (KeyError: 'FooConv')"),
    ("yolo11n-seg.yaml", "shipped", "head ends in Segment, not Detect"),
])
def test_weights_yaml_that_is_not_a_detection_model_config(tmp_path, synth_small, name, body, msg):
    w = tmp_path / name
    if body is None:
        w.write_text((ROOT / "models/default.yaml").read_text())
    elif body == "FooConv":
        cfg = yaml.safe_load(_family_yaml().read_text())
        cfg["backbone"][1][2] = "FooConv"
        w.write_text(yaml.safe_dump(cfg))
    elif body == "shipped":
        w = name  # by name, as ultralytics ships it (yolo11-seg.yaml at scale n)
    else:
        w.write_text(body if isinstance(body, str) else yaml.safe_dump(body))
    r, run = _bench(tmp_path, synth_small, w)
    _assert_clean_error(r, str(w), msg)
    assert not run.exists()


@pytest.mark.slow
@pytest.mark.parametrize("f,msg", [
    ("seg.pt", "holds a SegmentationModel whose head is Segment"),
    ("nan.pt", "non-finite weights (NaN or inf in model.0.conv.weight)"),
    ("state_dict.pt", "not a YOLO detection checkpoint (holds OrderedDict"),
], ids=["segment-head", "nan-weight", "state-dict"])
def test_weights_checkpoint_that_is_not_a_detection_model(tmp_path, synth_small, f, msg):
    import contextlib
    import io

    import torch
    from ultralytics.nn.tasks import DetectionModel, SegmentationModel

    if f == "seg.pt":
        with contextlib.redirect_stdout(io.StringIO()):
            seg = SegmentationModel("yolo11n-seg.yaml", nc=8, verbose=False)
        torch.save({"model": seg, "ema": None, "train_args": {}}, tmp_path / f)
    elif f == "nan.pt":
        with contextlib.redirect_stdout(io.StringIO()):
            det = DetectionModel("yolo11n.yaml", nc=8, verbose=False)
        with torch.no_grad():
            det.model[0].conv.weight[0, 0, 0, 0] = float("nan")
        torch.save({"model": det, "ema": None, "train_args": {}}, tmp_path / f)
    else:
        torch.save(torch.nn.Linear(3, 4).state_dict(), tmp_path / f)
    r, run = _bench(tmp_path, synth_small, tmp_path / f)
    _assert_clean_error(r, f, msg)
    assert not run.exists()


@pytest.mark.slow
def test_base_start_that_is_not_a_model(tmp_path, synth_small):
    bad = tmp_path / "data.yaml"
    bad.write_text(yaml.safe_dump({"train": "images/train", "val": "images/val", "names": ["a"]}))
    r = cli("base", "--set", f"data.source={synth_small}", "--run-dir", tmp_path / "run", "--epochs", "1",
            "--start", bad, "--out", tmp_path / "out.pt")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith(f"error: {bad}: a dataset yaml"), r.stderr[-500:]
    assert not list((tmp_path / "run").glob("base-*")) and not (tmp_path / "out.pt").exists()


@pytest.mark.slow
@pytest.mark.parametrize("content,msg", [(b"not an image at all", "does not decode as an image"),
                                         (None, "names no images")])
def test_calib_list_naming_a_file_that_is_not_an_image(tmp_path, synth_small, content, msg):
    lst = tmp_path / "calib.txt"
    if content is None:
        lst.write_text("# only a comment\n")
    else:
        (tmp_path / "fake.jpg").write_bytes(content)
        good = sorted((synth_small / "images/train").glob("*.jpg"))[0]
        lst.write_text(f"{good}\nfake.jpg\n")
    run = tmp_path / "run"
    r = cli("run", "--stages", "data,calibrate", "--run-dir", run, "--set", f"data.source={synth_small}",
            "--set", f"calib.source={lst}", "--set", "calib.force=true")
    _assert_clean_error(r, str(lst), msg)
    assert not run.exists()


@pytest.mark.slow
@pytest.mark.parametrize("content", [b"", b"names: [a]\n"])
def test_check_trt_on_a_file_that_is_not_onnx(tmp_path, content):
    f = tmp_path / "model.onnx"
    f.write_bytes(content)
    _assert_clean_error(cli("check-trt", f), str(f), "not an ONNX model")


@pytest.mark.slow(seconds=20)
def test_a_checkpoint_whose_classes_are_not_the_datasets_is_refused(tmp_path, base_ckpt_path):
    from pipeline.adapters import ultralytics_yolo as ua

    m = ua.load_detection_model(base_ckpt_path)
    m.names = {i: f"thing{i}" for i in range(len(m.names))}  # as many classes, other names
    ua.save_checkpoint(m, tmp_path / "other.pt")
    r = cli("run", "--stages", "data,load", "--run-dir", tmp_path / "run", "--set",
            f"model.weights={tmp_path}/other.pt", "--set", "data.synthetic.train=8", "--set", "data.synthetic.val=4")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]  # after the data stage's lines: the load stage's one line
    assert last.startswith("error: ") and "other.pt" in last and "the model's classes ['thing0'" in last
    assert "are not the dataset's ['circle'" in last and not (tmp_path / "run" / "load" / "record.json").exists()


def _refused_small_run(tmp_path, stages, *sets):
    """The last stderr line of a run on an 8 + 4 image synthetic set that must stop in one line (exit 2, no traceback)
    and leave no record of the last stage asked for."""
    flags = [x for s in ("data.synthetic.train=8", "data.synthetic.val=4", *sets) for x in ("--set", s)]
    r = cli("run", "--stages", stages, "--run-dir", tmp_path / "run", *flags)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "run" / stages.split(",")[-1] / "record.json").exists()
    return r.stderr.strip().splitlines()[-1]


def test_a_selection_split_larger_than_train_is_refused_naming_the_recipe(tmp_path):
    """data.selection.images is a recipe key: too many for the train split names the recipe (not the directory the
    synthetic set is generated in) and leaves no data stage behind."""
    last = _refused_small_run(tmp_path, "data", "data.selection.images=9")
    assert last.startswith("error: models/default.yaml: data.selection.images=9: the train split has 8 images"), last
    assert "keep some to train on" in last


def test_an_input_size_off_the_models_stride_is_refused_by_the_load_stage(tmp_path):
    """An input size the model's strides do not divide (its feature maps would not line up) is one line naming the
    recipe and a size that works, not a traceback from inside the MACs count."""
    last = _refused_small_run(tmp_path, "data,load", "model.imgsz=100")
    assert last.startswith("error: models/default.yaml: model.imgsz 100 is not a multiple of the model's largest "
                           "stride 32 (e.g. 96)"), last


def test_a_bench_split_the_synthetic_set_lacks_is_refused_naming_the_recipe(tmp_path):
    """The synthetic set has train and val only: bench.split 'test' is one line naming the recipe, not a data stage
    without an eval set that a later stage trips over."""
    last = _refused_small_run(tmp_path, "data", "bench.split=test")
    assert last.startswith("error: models/default.yaml: bench.split 'test': the dataset has no images in it (its "
                           "splits: train 8, val 4)"), last


def test_a_training_record_given_as_the_weights_is_not_a_checkpoint(tmp_path):
    """models/base/<name>.json beside a base is its record: given as model.weights it is refused as what it is."""
    rec = tmp_path / "base.json"
    rec.write_text(json.dumps({"epochs": 3, "sha256": "0" * 64}))
    last = _refused_small_run(tmp_path, "data,load", f"model.weights={rec}")
    assert last.startswith(f"error: {rec}: not a YOLO checkpoint"), last


@pytest.mark.parametrize("name,content", [("notes.md", b"# a README\n"), ("labels.txt", b"0 0.5 0.5 0.2 0.2\n")])
def test_a_file_that_is_no_dataset_layout_is_refused_as_such(tmp_path, name, content):
    """A file that is neither a YOLO data yaml nor a COCO JSON is named as not a dataset, with the layouts taken
    (not reported as broken JSON)."""
    f = tmp_path / name
    f.write_bytes(content)
    for cmd in (("check-data", f), ("convert", "--to", "coco", f, tmp_path / "out")):
        _assert_clean_error(cli(*cmd), str(f), "not a dataset: expected a YOLO data yaml, a COCO directory or "
                                                   "instances JSON, or a Pascal VOC directory")
    assert not (tmp_path / "out").exists()


def test_deploy_from_a_run_directory_without_a_report_creates_nothing(tmp_path):
    """A mistyped --run-dir is one line naming the missing report; no directory (nor its lock file) is left behind."""
    run = tmp_path / "no-such-run"
    _assert_clean_error(cli("deploy", "--run-dir", run, "--host", "user@jetson"), str(run / "report.json"),
                        "no report.json: run the pipeline")
    assert not run.exists()


def test_a_yolo_directory_is_read_through_its_one_data_yaml_whatever_its_name(tmp_path, synth_small):
    """ultralytics' sets name their yaml after the set (coco8.yaml): the directory reads as that yaml does; two data
    yamls are one line asking which; a directory of no layout says what was looked for."""
    from pipeline.data.formats import load_dataset

    y = _yolo(tmp_path, synth_small)
    y.rename(y.with_name("mine.yaml"))
    (y.parent / "notes.yaml").write_text("a: 1\n")  # a yaml without names is not a data yaml
    by_dir, by_yaml = load_dataset(y.parent), load_dataset(y.with_name("mine.yaml"))
    assert by_dir.names == by_yaml.names and {k: len(v) for k, v in by_dir.splits.items()} == {"train": 2, "val": 2}
    (y.parent / "other.yaml").write_text(y.with_name("mine.yaml").read_text())
    _assert_clean_error(cli("check-data", y.parent), str(y.parent), "2 data yamls (mine.yaml, other.yaml)")
    (tmp_path / "empty").mkdir()
    _assert_clean_error(cli("check-data", tmp_path / "empty"), "not a dataset: no data.yaml (YOLO), "
                        "annotations/instances_<split>.json (COCO) or Annotations/ (Pascal VOC)")
