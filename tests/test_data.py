import json
import shutil

import numpy as np
import pytest
import yaml

from pipeline.core.errors import UserError
from pipeline.core.store import sha256_tree
from pipeline.data.formats import load_dataset, write_coco, write_yolo
from pipeline.data.synthetic import CLASSES, SynthSpec, generate


@pytest.mark.slow
def test_synthetic_is_seeded_and_varied(tmp_path, synth_small):
    again = generate(tmp_path / "again", SynthSpec(seed=7, train=24, val=12))
    assert sha256_tree(again) == sha256_tree(synth_small)
    other = generate(tmp_path / "other", SynthSpec(seed=8, train=24, val=12))
    assert sha256_tree(other) != sha256_tree(synth_small)
    ds = load_dataset(synth_small)
    assert len(ds.names) >= 8 and ds.names == CLASSES
    boxes = [b for im in ds.split("train") for b in im.boxes]
    areas = np.array([w * h for _, _, _, w, h in boxes])
    assert areas.min() < 32 ** 2 and areas.max() > 96 ** 2  # COCO small and large objects both present
    assert len({b[0] for b in boxes}) == len(CLASSES)


def _max_rel_err(a, b):
    a, b = np.asarray(a, float), np.asarray(b, float)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-9)))


def test_coco_yolo_coco_roundtrip_keeps_boxes_and_names(tmp_path, synth_small):
    ds = load_dataset(synth_small)
    y = write_yolo(ds, tmp_path / "yolo")
    back = write_coco(load_dataset(y), tmp_path / "coco")
    for split in ("train", "val"):
        a = json.loads((synth_small / "annotations" / f"instances_{split}.json").read_text())
        b = json.loads((back / "annotations" / f"instances_{split}.json").read_text())
        assert [c["name"] for c in a["categories"]] == [c["name"] for c in b["categories"]]
        assert [c["id"] for c in a["categories"]] == [c["id"] for c in b["categories"]]
        fa = {i["id"]: i["file_name"] for i in a["images"]}
        fb = {i["id"]: i["file_name"] for i in b["images"]}
        key = lambda d, f: sorted((f[x["image_id"]], x["category_id"], *x["bbox"]) for x in d["annotations"])
        ka, kb = key(a, fa), key(b, fb)
        assert len(ka) == len(kb) > 0
        assert [k[:2] for k in ka] == [k[:2] for k in kb]
        assert _max_rel_err([k[2:] for k in kb], [k[2:] for k in ka]) <= 1e-6


def test_coco_category_ids_survive_yolo(tmp_path, synth_small):
    d = json.loads((synth_small / "annotations/instances_val.json").read_text())
    for c in d["categories"]:
        c["id"] += 10
    for a in d["annotations"]:
        a["category_id"] += 10
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations/instances_val.json").write_text(json.dumps(d))
    shutil.copytree(synth_small / "images/val", tmp_path / "images/val")
    ds = load_dataset(tmp_path)
    y = load_dataset(write_yolo(ds, tmp_path / "y"))
    assert y.category_ids == [c["id"] for c in d["categories"]]


def _yolo_ds(tmp_path, synth_small, label_line=None, image_bytes=None, val_images=True):
    root = tmp_path / "yds"
    (root / "images/val").mkdir(parents=True)
    (root / "labels/val").mkdir(parents=True)
    src = sorted((synth_small / "images/val").glob("*.jpg"))[:2]
    if val_images:
        for p in src:
            shutil.copy(p, root / "images/val" / p.name)
            (root / "labels/val" / (p.stem + ".txt")).write_text("0 0.5 0.5 0.2 0.2\n")
    if label_line is not None:
        (root / "labels/val" / (src[0].stem + ".txt")).write_text(label_line + "\n")
    if image_bytes is not None:
        (root / "images/val" / src[0].name).write_bytes(image_bytes)
    (root / "data.yaml").write_text(yaml.safe_dump({"path": ".", "train": "images/val", "val": "images/val",
                                                    "names": {i: n for i, n in enumerate(CLASSES)}}))
    return root / "data.yaml"


@pytest.mark.parametrize("damage,strict,msg,where", [
    ({"label_line": "8 0.5 0.5 0.1 0.1"}, False, r"class id 8 >= nc=8", "val_00000.txt:1"),
    ({"label_line": "1 0.95 0.5 0.3 0.1"}, True, "outside the 320x320 image", None),
    ({"label_line": "1 0.5 0.5 0.0 0.1"}, True, "degenerate", None),
    ({"label_line": "1 nan 0.5 0.1 0.1"}, False, "non-finite number", "val_00000.txt:1"),
    ({"label_line": "1 0.5 0.5 inf 0.1"}, False, "non-finite number", "val_00000.txt:1"),
    ({"label_line": "1 0.5 0.5 0.1 -nan"}, False, "non-finite number", "val_00000.txt:1"),
    ({"image_bytes": b"not a jpeg"}, False, "does not decode: .*val_00000.jpg", None),
], ids=["class-id-8", "box-outside", "degenerate-box", "nan", "inf", "minus-nan", "undecodable-image"])
def test_yolo_validation_errors_name_the_file(tmp_path, synth_small, damage, strict, msg, where):
    y = _yolo_ds(tmp_path, synth_small, **damage)
    with pytest.raises(UserError, match=msg) as e:
        load_dataset(y, strict=strict)  # without strict, a box outside the image is clipped (test_voc.py)
    if where is not None:
        assert where in str(e.value)


def _coco_copy(tmp_path, synth_small, mutate):
    d = json.loads((synth_small / "annotations/instances_val.json").read_text())
    mutate(d)
    (tmp_path / "annotations").mkdir(parents=True)
    (tmp_path / "annotations/instances_val.json").write_text(json.dumps(d))
    shutil.copytree(synth_small / "images/val", tmp_path / "images/val")
    return tmp_path


def _unknown_image(d):
    d["annotations"][0]["image_id"] = 999


def _unknown_cat(d):
    d["annotations"][0]["category_id"] = 77


def _dup(d):
    d["images"][1]["id"] = d["images"][0]["id"]


def _outside(d):
    d["annotations"][0]["bbox"] = [300.0, 10.0, 40.0, 10.0]


def _degenerate(d):
    d["annotations"][0]["bbox"] = [10.0, 10.0, 0.0, 10.0]


def _nan_box(d):
    d["annotations"][0]["bbox"] = [10.0, float("nan"), 5.0, 10.0]  # json writes NaN, Python's reader takes it


def _str_box(d):
    d["annotations"][0]["bbox"] = ["10", 10, 5, 10]


def _short_box(d):
    d["annotations"][0]["bbox"] = [10, 10, 5]


def _wrong_size(d):
    d["images"][0]["width"] = 640


def _no_file_name(d):
    del d["images"][0]["file_name"]


def _same_file(d):
    d["images"][1]["file_name"] = d["images"][0]["file_name"]


def _cats_not_list(d):
    d["categories"] = {"1": "circle"}


@pytest.mark.parametrize("fn,msg", [
    (_unknown_image, "unknown image id 999"),
    (_unknown_cat, "unknown category id 77"),
    (_dup, "duplicate image id"),
    (_outside, "outside the 320x320 image"),
    (_degenerate, "degenerate bbox"),
    (_nan_box, "non-finite number"),
    (_str_box, "bbox must be 4 numbers"),
    (_short_box, "bbox must be 4 numbers"),
    (_wrong_size, "says 640x320 but the file decodes to 320x320"),
    (_no_file_name, "needs an integer 'id' and a string 'file_name'"),
    (_same_file, "have the same file_name"),
    (_cats_not_list, "'categories' must be a list"),
], ids=["unknown-image", "unknown-category", "duplicate-image-id", "box-outside", "degenerate-box", "nan-box",
        "string-in-box", "short-box", "wrong-size", "no-file-name", "same-file-name", "categories-not-a-list"])
def test_coco_validation_errors(tmp_path, synth_small, fn, msg):
    root = _coco_copy(tmp_path, synth_small, fn)
    with pytest.raises(UserError, match=msg) as e:
        load_dataset(root, strict=True)  # dirty boxes (outside, degenerate) are refused only with strict
    assert "instances_val.json" in str(e.value)


def test_empty_split(tmp_path, synth_small):
    root = _coco_copy(tmp_path, synth_small, lambda d: (d.update(images=[], annotations=[])))
    with pytest.raises(UserError, match="'val' split is empty"):
        load_dataset(root).split("val")


def test_nested_folders_and_duplicate_base_names_survive_both_layouts(tmp_path, synth_small):
    """A COCO file_name with folders (two images share a base name) keeps its folders in the YOLO copy and back."""
    def nest(d):
        d["images"][0]["file_name"] = "a/" + d["images"][0]["file_name"]
        d["images"][1]["file_name"] = "b/" + d["images"][0]["file_name"].split("/")[-1]

    root = _coco_copy(tmp_path / "c", synth_small, lambda d: None)
    d = json.loads((root / "annotations/instances_val.json").read_text())
    src0, src1 = d["images"][0]["file_name"], d["images"][1]["file_name"]
    nest(d)
    for sub in ("a", "b"):
        (root / "images/val" / sub).mkdir()
    shutil.move(root / "images/val" / src0, root / "images/val/a" / src0)
    shutil.move(root / "images/val" / src1, root / "images/val/b" / src0)
    (root / "annotations/instances_val.json").write_text(json.dumps(d))
    ds = load_dataset(root)
    names = [im.file_name for im in ds.split("val")]
    assert names[:2] == [f"a/{src0}", f"b/{src0}"]
    y = load_dataset(write_yolo(ds, tmp_path / "y"))
    assert sorted(im.file_name for im in y.split("val")) == sorted(names)
    back = json.loads((write_coco(y, tmp_path / "back") / "annotations/instances_val.json").read_text())
    assert sorted(i["file_name"] for i in back["images"]) == sorted(names)
    boxes = lambda dd: sorted(len(im.boxes) for im in dd.split("val"))
    assert boxes(y) == boxes(ds)


@pytest.mark.parametrize("key,value,msg", [("names", {"a": "x"}, "'names' keys must be class indices"),
                                           ("val", 5, "a split must name a folder"),
                                           ("path", 5, "'path' must be a folder"),
                                           ("coco_category_ids", [1], "'coco_category_ids' must list 8")])
def test_yolo_yaml_that_parses_but_is_wrong(tmp_path, synth_small, key, value, msg):
    y = _yolo_ds(tmp_path, synth_small)
    d = yaml.safe_load(y.read_text())
    d[key] = value
    y.write_text(yaml.safe_dump(d))
    with pytest.raises(UserError, match=msg) as e:
        load_dataset(y)
    assert str(y) in str(e.value)


@pytest.mark.parametrize("line,msg", [("inf 0.5 0.5 0.1 0.1", "non-finite"), ("1.5 0.5 0.5 0.1 0.1", "not an integer")])
def test_yolo_class_id_must_be_a_finite_integer(tmp_path, synth_small, line, msg):
    with pytest.raises(UserError, match=msg):
        load_dataset(_yolo_ds(tmp_path, synth_small, label_line=line))
