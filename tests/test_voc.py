"""Pascal VOC input: the devkit's 1-based inclusive pixel boxes, `difficult` objects as ignore regions, the class-name
rule, dirty boxes (dropped or clipped with one warning line per file, counted; refused with strict), and the whole
evaluation path against an oracle on BCCD's real photos (skipped without ../shared)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.core.errors import UserError
from pipeline.data.formats import load_dataset, write_yolo

BCCD = Path(__file__).resolve().parents[2] / "shared" / "data" / "bccd"


def _obj(name, box, difficult=0):
    x0, y0, x1, y1 = box
    return (f"<object><name>{name}</name><difficult>{difficult}</difficult><bndbox><xmin>{x0}</xmin>"
            f"<ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>")


def _voc(root: Path, images: dict, splits: dict, size=(40, 20)) -> Path:
    """A VOC directory: images {id: [objects xml]}, splits {split: [ids]}; every image size[0] x size[1]."""
    for d in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / d).mkdir(parents=True, exist_ok=True)
    w, h = size
    for i, objs in images.items():
        cv2.imwrite(str(root / "JPEGImages" / f"{i}.jpg"), np.full((h, w, 3), 128, np.uint8))
        (root / "Annotations" / f"{i}.xml").write_text(
            f"<annotation><filename>{i}.jpg</filename><size><width>{w}</width><height>{h}</height>"
            f"<depth>3</depth></size>{''.join(objs)}</annotation>")
    for s, ids in splits.items():
        (root / "ImageSets/Main" / f"{s}.txt").write_text("".join(f"{i}\n" for i in ids))
    return root


def test_one_based_inclusive_boxes_become_coco_pixels(tmp_path):
    # The devkit's box (1, 1, 40, 20) covers every pixel of a 40x20 image: COCO [0, 0, 40, 20].
    # (5, 3, 8, 4) covers columns 5..8 and rows 3..4 (1-based): 4 x 2 pixels from (4, 2) in 0-based coordinates.
    root = _voc(tmp_path / "voc", {"a": [_obj("cat", (1, 1, 40, 20)), _obj("dog", (5, 3, 8, 4))]}, {"val": ["a"]})
    ds = load_dataset(root)
    assert ds.names == ["cat", "dog"]
    coco = ds.coco_dict("val")
    assert [a["bbox"] for a in coco["annotations"]] == [[0.0, 0.0, 40.0, 20.0], [4.0, 2.0, 4.0, 2.0]]
    assert [a["category_id"] for a in coco["annotations"]] == [1, 2]
    assert coco["images"] == [{"id": 1, "file_name": "a.jpg", "width": 40, "height": 20}]
    assert ds.dirty == {"clipped": 0, "dropped": 0, "files": 0} and not ds.warnings


def test_names_sorted_by_default_recipe_order_wins_unknown_refused(tmp_path):
    root = _voc(tmp_path / "voc", {"a": [_obj("zebra", (1, 1, 5, 5))], "b": [_obj("ant", (1, 1, 5, 5))]},
                {"train": ["a"], "val": ["b"]})
    assert load_dataset(root).names == ["ant", "zebra"]
    ds = load_dataset(root, names=["zebra", "ant"])
    assert ds.names == ["zebra", "ant"] and ds.split("val")[0].boxes[0][0] == 1
    with pytest.raises(UserError, match=r"class 'zebra' is not in data.names \['ant'\]") as e:
        load_dataset(root, names=["ant"])
    assert "a.xml" in str(e.value)


def test_splits_from_imagesets_trainval_left_out_and_test_only(tmp_path):
    root = _voc(tmp_path / "voc", {"a": [_obj("c", (1, 1, 5, 5))], "b": [_obj("c", (2, 2, 6, 6))]},
                {"train": ["a"], "val": ["b"], "trainval": ["a", "b"]})
    (root / "ImageSets/Main/c_train.txt").write_text("a 1\n")  # a per-class list: not a split
    assert set(load_dataset(root).splits) == {"train", "val"}
    only_test = _voc(tmp_path / "t", {"a": [_obj("c", (1, 1, 5, 5))]}, {"test": ["a"]})
    assert set(load_dataset(only_test).splits) == {"test"}


def test_difficult_is_an_ignore_region_not_a_training_label(tmp_path):
    from pipeline.eval.coco import coco_eval

    root = _voc(tmp_path / "voc", {"a": [_obj("c", (1, 1, 10, 10)), _obj("c", (21, 5, 35, 18), difficult=1)]},
                {"train": ["a"], "val": ["a"]})
    ds = load_dataset(root)
    im = ds.split("val")[0]
    assert im.boxes == [(0, 0.0, 0.0, 10.0, 10.0)] and im.crowd == [(0, 20.0, 4.0, 15.0, 14.0)]
    gt = ds.coco_dict("val")
    assert [a["iscrowd"] for a in gt["annotations"]] == [0, 1]
    labels = (write_yolo(ds, tmp_path / "y").parent / "labels" / "train" / "a.txt").read_text().splitlines()
    assert len(labels) == 1  # the difficult object is not a label the trainer learns
    hit = {"image_id": 1, "category_id": 1, "bbox": [0.0, 0.0, 10.0, 10.0], "score": 0.9}
    on_difficult = {"image_id": 1, "category_id": 1, "bbox": [20.0, 4.0, 15.0, 14.0], "score": 0.95}
    assert coco_eval(gt, [hit, on_difficult])["map50_95"] == pytest.approx(1.0)  # neither rewarded nor punished
    plain = json.loads(json.dumps(gt))
    for a in plain["annotations"]:
        a["iscrowd"] = 0
    assert coco_eval(plain, [hit])["map50_95"] < 0.6  # the same object as a plain box: a miss costs


def _dirty(tmp_path):
    return _voc(tmp_path / "voc", {
        "a": [_obj("c", (5, 5, 5, 9)), _obj("c", (1, 1, 10, 10))],          # no width: dropped
        "b": [_obj("c", (30, 5, 46, 15)), _obj("c", (2, 2, 8, 8)), _obj("c", (3, 12, 9, 12))],  # past x=40: clipped;
        "c": [_obj("c", (1, 1, 5, 5))]},                                     # no height: dropped
        {"train": ["a", "b"], "val": ["c"]})


def test_dirty_boxes_dropped_clipped_warned_once_per_file_and_counted(tmp_path):
    ds = load_dataset(_dirty(tmp_path))
    assert ds.dirty == {"clipped": 1, "dropped": 2, "files": 2}
    assert len(ds.warnings) == 2 and all(w.count("\n") == 0 for w in ds.warnings)
    wa, wb = sorted(ds.warnings)
    assert "a.xml" in wa and "c [5, 5, 5, 9] has no area: dropped" in wa
    assert "b.xml" in wb and "clipped to [x=29, y=4, w=11, h=11]" in wb and "[3, 12, 9, 12] has no area" in wb
    a, b = ds.split("train")
    assert a.boxes == [(0, 0.0, 0.0, 10.0, 10.0)]
    assert b.boxes == [(0, 29.0, 4.0, 11.0, 11.0), (0, 1.0, 1.0, 7.0, 7.0)]


def test_strict_refuses_dirty_boxes_and_far_outside_is_always_refused(tmp_path):
    root = _dirty(tmp_path)
    with pytest.raises(UserError, match=r"a.xml: object 1: degenerate bbox c \[5, 5, 5, 9\] \(no area; "
                                        r"data.strict refuses it\)"):
        load_dataset(root, strict=True)
    far = _voc(tmp_path / "far", {"a": [_obj("c", (100, 1, 140, 10))]}, {"val": ["a"]})
    with pytest.raises(UserError, match="lies far outside the 40x20 image"):
        load_dataset(far)


def test_dirty_boxes_in_yolo_and_coco_follow_the_same_rule(tmp_path):
    from pipeline.data.formats import write_coco

    ds = load_dataset(_dirty(tmp_path))
    coco = write_coco(ds, tmp_path / "coco")  # clean now; dirty it again by hand
    f = coco / "annotations" / "instances_train.json"
    d = json.loads(f.read_text())
    d["annotations"][0]["bbox"] = [35.0, 2.0, 10.0, 5.0]  # 5 px past a 40-px-wide image
    d["annotations"][1]["bbox"] = [3.0, 3.0, 0.0, 4.0]
    f.write_text(json.dumps(d))
    c = load_dataset(coco)
    assert c.dirty == {"clipped": 1, "dropped": 1, "files": 2}
    assert c.split("train")[0].boxes == [(0, 35.0, 2.0, 5.0, 5.0)]
    with pytest.raises(UserError, match="outside the 40x20 image \\(data.strict refuses it\\)"):
        load_dataset(coco, strict=True)
    y = write_yolo(ds, tmp_path / "yolo")
    lab = y.parent / "labels" / "val" / "c.txt"
    lab.write_text("0 0.5 0.5 0 0.2\n0 0.95 0.5 0.2 0.2\n")  # no width; reaches 0.05 past the right edge
    yd = load_dataset(y)
    assert yd.dirty == {"clipped": 1, "dropped": 1, "files": 1} and str(lab) in yd.warnings[0]
    with pytest.raises(UserError, match=r"c.txt:1: degenerate bbox"):
        load_dataset(y, strict=True)


def test_check_data_warns_and_counts_through_the_cli(tmp_path):
    from typer.testing import CliRunner

    from pipeline.cli import app

    r = CliRunner().invoke(app, ["check-data", str(_dirty(tmp_path))])
    assert r.exit_code == 0, r.output
    out = r.output
    assert out.count("warning:") == 2 and '"dropped": 2' in out and '"clipped": 1' in out
    r = CliRunner().invoke(app, ["check-data", str(tmp_path / "voc"), "--strict"])
    assert r.exit_code != 0 and isinstance(r.exception, UserError) and "degenerate bbox" in str(r.exception)


# --------------------------------------------------------------------------------------------- BCCD (real photos)
@pytest.fixture(scope="module")
def bccd():
    if not (BCCD / "Annotations").is_dir():
        pytest.skip(f"{BCCD} is absent (../shared is not beside this clone)")
    return BCCD


def test_bccd_reads_with_its_dirt_dropped(bccd):
    ds = load_dataset(bccd, names=["RBC", "WBC", "Platelets"])
    assert {k: len(v) for k, v in ds.splits.items()} == {"train": 205, "val": 87}
    assert sum(len(i.boxes) for i in ds.split("val")) == 1137
    assert ds.dirty == {"clipped": 0, "dropped": 2, "files": 2}
    assert sorted(w.split(":")[0].rsplit("/", 1)[-1] for w in ds.warnings) == ["BloodImage_00338.xml",
                                                                              "BloodImage_00343.xml"]
    with pytest.raises(UserError, match="BloodImage_003(38|43).xml: object .*degenerate bbox RBC"):
        load_dataset(bccd, strict=True)


def test_oracle_scores_one_on_bccd_and_shifted_near_zero(bccd, tmp_path):
    from test_oracle import _eval_set_of, _score  # the oracle runner: each image answered with its own ground truth

    es = _eval_set_of(bccd, tmp_path / "run")
    assert es.images[0].file_name == "BloodImage_00000.jpg" and len(es.images) == 87  # VOC's own file names
    acc, dets = _score(es)
    # BCCD's val labels hold two RBCs drawn twice, 2 px apart (IoU 0.92, BloodImage_00104 and _00331): NMS at
    # IoU 0.7 keeps one of each pair, as it would for any detector. Every other box is found exactly: the other
    # classes score 1.0 and RBC loses exactly those two.
    cats = dict(zip(es.names, es.category_ids))
    assert acc["per_class_ap50_95"][cats["WBC"]] == 1.0 and acc["per_class_ap50_95"][cats["Platelets"]] == 1.0, acc
    assert len(dets) == len(es.ground_truth["annotations"]) - 2
    assert acc["map50_95"] >= 0.99, acc
    acc, _ = _score(es, shift=1)
    assert acc["map50_95"] < 0.1, acc


@pytest.mark.slow(seconds=150)
def test_bench_scores_a_voc_test_split_and_agrees_with_ultralytics(bccd, tmp_path):
    """`yolo-edge bench --data` on a VOC directory that holds only ImageSets/Main/test.txt scores that split
    (--set bench.split=test) with the shipped BCCD base, within 1 pt of ultralytics' validator on the same images."""
    from conftest import ROOT, cli

    weights = ROOT / "models" / "base" / "yolo11n-bccd.pt"
    if not weights.is_file():
        pytest.skip(f"{weights} is absent")
    voc = tmp_path / "voc"
    (voc / "ImageSets" / "Main").mkdir(parents=True)
    for d in ("Annotations", "JPEGImages"):
        (voc / d).symlink_to(bccd / d)
    ids = (bccd / "ImageSets" / "Main" / "val.txt").read_text().split()
    ids = ids[:39] + ["BloodImage_00338"] * ("BloodImage_00338" not in ids[:39])  # its zero-area box, counted
    (voc / "ImageSets" / "Main" / "test.txt").write_text("\n".join(ids) + "\n")
    run = tmp_path / "run"
    elsewhere = tmp_path / "elsewhere"  # not the checkout: the default recipe comes from the package
    elsewhere.mkdir()
    r = cli("bench", "--data", voc, "--weights", weights, "--run-dir", run, "--set", "bench.split=test",
            "--set", "bench.cap_s=5", cwd=elsewhere)
    assert r.returncode == 0, r.stderr[-3000:]
    # VOC's sorted names are the checkpoint's classes in another order: scored in the checkpoint's, said in one line
    assert "are the checkpoint's in another order: scored in the checkpoint's order ['RBC', 'WBC', 'Platelets']" \
        in r.stderr
    rep = json.loads((run / "report.json").read_text())
    assert rep["dataset"]["split"] == "test" and rep["dataset"]["images"] == 40
    assert rep["dataset"]["dirty_boxes"] == {"clipped": 0, "dropped": 1, "files": 1}
    assert "1 dirty box(es) dropped" in (run / "report.md").read_text()
    assert "BloodImage_00338.xml: box RBC [504, 337, 504, 337] has no area: dropped" in r.stderr
    cc = rep["cross_check"]["variants"]["base-fp32"]
    assert abs(cc["delta_pt"]) <= 1.0, cc
    assert rep["variants"][0]["map50_95"] > 0.5  # the converged base, scored on its own classes' order


@pytest.mark.slow(seconds=30)
def test_init_pins_a_voc_sets_class_order_to_the_checkpoints(bccd, tmp_path):
    from conftest import ROOT, cli

    from pipeline.core.config import load_recipe

    weights = ROOT / "models" / "base" / "yolo11n-bccd.pt"
    if not weights.is_file():
        pytest.skip(f"{weights} is absent")
    out = tmp_path / "bccd.yaml"
    r = cli("init", "--data", bccd, "--weights", weights, "--out", out, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    rec = load_recipe(out)
    assert rec.data.names == ["RBC", "WBC", "Platelets"]  # the checkpoint's order, not the sorted names
    assert rec.model.imgsz == 416 and rec.prune.mode == "latency"
    # sparsity training is the recommended default: written, priced in the plan, and how to skip it said
    assert rec.prune.sparsity.enabled is True and "enabled: true" in out.read_text()
    assert "sparsity training: on (80 epochs before the cut" in r.stdout and "--no-sparsity" in r.stdout
    # a run whose recipe names the sorted order against the same checkpoint: one line, before anything is scored
    r = cli("run", "--stages", "data,load", "--run-dir", tmp_path / "run", "--set", f"data.source={bccd}",
            "--set", f"model.weights={weights}", "--set", "data.names=[Platelets, RBC, WBC]", cwd=ROOT)
    assert r.returncode == 2 and "in another order: set data.names to ['RBC', 'WBC', 'Platelets']" in r.stderr
    assert "Traceback" not in r.stderr
    # bench adopts the checkpoint's order only where no data.names is given: a recipe's (or a --set) stands
    r = cli("bench", "--data", bccd, "--weights", weights, "--run-dir", tmp_path / "bench", "--recipe", out,
            "--set", "data.names=[Platelets, RBC, WBC]", cwd=ROOT)
    assert r.returncode == 2 and "in another order: set data.names to ['RBC', 'WBC', 'Platelets']" in r.stderr
    assert "scored in the checkpoint's order" not in r.stdout + r.stderr
