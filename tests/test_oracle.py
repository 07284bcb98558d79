"""The whole evaluation path against an oracle: a runner that answers each image with its own ground truth, encoded
as the detector's raw output, must score mAP 1.0 on awkward real data (coco8 as COCO JSON with COCO's real,
non-contiguous category ids and shuffled image ids; portrait, landscape, tiny and large images; PNG and grayscale;
nested folders; the YOLO-layout copy of the same), through the data stage's eval set, letterbox, decode, NMS, id
and category mapping and pycocotools. Its twin, answering with the next image's boxes, must score near 0."""

from __future__ import annotations

import hashlib
import json
import shutil

import cv2
import numpy as np
import pytest

from pipeline.backends.base import Runner
from pipeline.core.config import Recipe
from pipeline.core.stage import Context
from pipeline.data.formats import load_dataset, write_yolo
from pipeline.eval.detect import PrePost, letterbox
from pipeline.eval.measure import accuracy

SPEC = PrePost(imgsz=320)


class OracleRunner(Runner):
    """Answers a letterboxed image with the ground truth of the image it came from (found by the tensor's bytes),
    as raw YOLO output (1, 4 + nc, N): xywh in input pixels, score 1 for the box's class. `shift` answers with the
    boxes of the image `shift` places later in the eval set instead."""

    name = "oracle"

    def __init__(self, eval_set, spec: PrePost, shift: int = 0):
        self.nc = len(eval_set.names)
        by_img = {g["id"]: [] for g in eval_set.ground_truth["images"]}
        for a in eval_set.ground_truth["annotations"]:
            by_img[a["image_id"]].append((eval_set.category_ids.index(a["category_id"]), *a["bbox"]))
        self.table = {}
        ims = eval_set.images
        for k, im in enumerate(ims):
            src = ims[(k + shift) % len(ims)]
            x, undo = letterbox(cv2.imread(src.path, cv2.IMREAD_COLOR), spec)
            x_self, _ = letterbox(cv2.imread(im.path, cv2.IMREAD_COLOR), spec)
            self.table[self._key(x_self)] = self._encode(by_img[src.id], undo)
        assert len(self.table) == len(ims), "two eval images letterbox to the same tensor: the oracle is ambiguous"
        self.calls = 0

    @staticmethod
    def _key(x: np.ndarray) -> str:
        return hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest()

    def _encode(self, boxes, undo) -> np.ndarray:
        gx, gy, px, py = undo
        out = np.zeros((1, 4 + self.nc, max(len(boxes), 1)), np.float32)
        for j, (c, x, y, w, h) in enumerate(boxes):
            out[0, :4, j] = [(x + w / 2) * gx + px, (y + h / 2) * gy + py, w * gx, h * gy]
            out[0, 4 + c, j] = 1.0
        return out

    @classmethod
    def is_available(cls):
        return True, ""

    @property
    def input_name(self) -> str:
        return "images"

    @property
    def input_shape(self):
        return (1, 3, SPEC.imgsz, SPEC.imgsz)

    def infer(self, feed):
        self.calls += 1
        return [self.table[self._key(feed["images"])]]


def _coco80_to_91() -> list[int]:
    from ultralytics.data.converter import coco80_to_coco91_class

    return list(coco80_to_coco91_class())


def _awkward_coco(src_yaml, dest, seed=0):
    """coco8 (all 8 images) rewritten as a COCO dataset that real files look like: a val split of 12 images of
    mixed sizes and formats in nested folders (two share a base name), shuffled large image ids, COCO's 80-of-91
    category ids; a train split of the 4 originals."""
    rng = np.random.default_rng(seed)
    ds = load_dataset(src_yaml)
    ims = ds.split("train") + ds.split("val")
    cids = _coco80_to_91()[: ds.nc]
    variants = []  # (file_name, image, boxes)

    def add(name, img, boxes):
        variants.append((name, img, boxes))

    for k, im in enumerate(ims):
        img = cv2.imread(str(im.path))
        boxes = list(im.boxes)
        add(f"orig/{im.path.name}", img, boxes)  # landscape, 640 wide, mixed heights
        if k == 0:  # portrait: transposed
            add("rot/portrait.jpg", np.ascontiguousarray(img.transpose(1, 0, 2)),
                [(c, y, x, h, w) for c, x, y, w, h in boxes])
        if k == 1:  # tiny: 1/8 size
            s = 1 / 8
            small = cv2.resize(img, (round(img.shape[1] * s), round(img.shape[0] * s)), interpolation=cv2.INTER_AREA)
            sx, sy = small.shape[1] / img.shape[1], small.shape[0] / img.shape[0]
            add("size/tiny.jpg", small, [(c, x * sx, y * sy, w * sx, h * sy) for c, x, y, w, h in boxes])
        if k == 2:  # large: 2.5x, PNG
            big = cv2.resize(img, (img.shape[1] * 5 // 2, img.shape[0] * 5 // 2), interpolation=cv2.INTER_LINEAR)
            sx, sy = big.shape[1] / img.shape[1], big.shape[0] / img.shape[0]
            add("size/large.png", big, [(c, x * sx, y * sy, w * sx, h * sy) for c, x, y, w, h in boxes])
        if k == 3:  # grayscale PNG, mirrored (so it does not decode to another image's pixels)
            g = cv2.cvtColor(img[:, ::-1], cv2.COLOR_BGR2GRAY)
            W = img.shape[1]
            add("gray/deep/nested/gray.png", g, [(c, W - x - w, y, w, h) for c, x, y, w, h in boxes])
        if k == 4:  # same base name as orig/<name>, another folder, a crop (non-square, not 640 wide)
            crop = img[: img.shape[0] * 3 // 4, : img.shape[1] * 2 // 3].copy()
            H, W = crop.shape[:2]
            cb = []
            for c, x, y, w, h in boxes:
                x2, y2 = min(x + w, W), min(y + h, H)
                if x2 - x > 2 and y2 - y > 2 and x < W and y < H:
                    cb.append((c, x, y, x2 - x, y2 - y))
            add(f"crop/{im.path.name}", crop, cb)
    n_train = len(ds.split("train"))
    train = [v for v in variants if v[0].startswith("orig/")][:n_train]  # coco8's train images
    val = [v for v in variants if v not in train]  # coco8's val images + every variant
    ids = rng.permutation(np.arange(len(val))) * 7919 + 1000  # large, shuffled, not in file order
    root = dest
    (root / "annotations").mkdir(parents=True)
    for split, items, id_of in (("train", train, lambda i: i + 1), ("val", val, lambda i: int(ids[i]))):
        images, anns = [], []
        for i, (name, img, boxes) in enumerate(items):
            p = root / "images" / split / name
            p.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(p), img)
            h, w = img.shape[:2]
            images.append({"id": id_of(i), "file_name": name, "width": w, "height": h})
            for c, x, y, bw, bh in boxes:
                anns.append({"id": len(anns) + 1, "image_id": id_of(i), "category_id": cids[c],
                             "bbox": [x, y, bw, bh], "area": bw * bh, "iscrowd": 0})
        images = images[::-1]  # the annotation tool's order, not file order
        cats = [{"id": cid, "name": n} for cid, n in zip(cids, ds.names)]
        (root / "annotations" / f"instances_{split}.json").write_text(
            json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return root


def _eval_set_of(source, run_dir):
    from pipeline.stages import data as data_stage

    r = Recipe.model_validate({"data": {"source": str(source)}, "model": {"imgsz": SPEC.imgsz}})
    ctx = Context(run_dir=run_dir, recipe=r, recipe_path=run_dir / "recipe.yaml")
    data_stage.run(ctx)
    return data_stage.eval_set(ctx)


@pytest.fixture(scope="module")
def awkward(tmp_path_factory):
    from conftest import COCO8

    if not COCO8.is_file():
        pytest.skip(f"{COCO8} is absent (../shared is not beside this clone)")
    return _awkward_coco(COCO8, tmp_path_factory.mktemp("awkward") / "coco")


def _score(es, shift=0):
    runner = OracleRunner(es, SPEC, shift=shift)
    acc, dets = accuracy(runner, es.images, es.ground_truth, es.category_ids, SPEC, label="oracle")
    assert runner.calls == len(es.images)
    return acc, dets


def test_oracle_scores_one_on_awkward_coco_json(awkward, tmp_path):
    es = _eval_set_of(awkward, tmp_path / "run")
    gt = json.loads((awkward / "annotations" / "instances_val.json").read_text())
    # the eval set keeps the COCO file's own ids and names, in the file's order
    assert [(i.id, i.file_name) for i in es.images] == [(g["id"], g["file_name"]) for g in gt["images"]]
    assert sorted(es.category_ids) == sorted(c["id"] for c in gt["categories"]) and max(es.category_ids) > 80
    sizes = {(i.width, i.height) for i in es.images}
    assert any(h > w for w, h in sizes) and min(w for w, _ in sizes) < 100 and max(w for w, _ in sizes) > 1500
    assert len({i.file_name.rsplit("/", 1)[-1] for i in es.images}) < len(es.images)  # a base name twice
    acc, dets = _score(es)
    assert acc["map50_95"] >= 0.999 and acc["map50"] >= 0.999, acc
    assert {d["image_id"] for d in dets} == {g["id"] for g in gt["images"] if any(
        a["image_id"] == g["id"] for a in gt["annotations"])}
    assert {d["category_id"] for d in dets} <= {c["id"] for c in gt["categories"]}


def test_oracle_shifted_by_one_image_scores_near_zero(awkward, tmp_path):
    es = _eval_set_of(awkward, tmp_path / "run")
    acc, _ = _score(es, shift=1)
    assert acc["map50_95"] < 0.1, acc  # the test can fail: pairing with the wrong image is seen


def test_oracle_scores_one_on_the_yolo_layout_copy(awkward, tmp_path):
    y = write_yolo(load_dataset(awkward), tmp_path / "yolo")
    es = _eval_set_of(y, tmp_path / "run")
    assert any("/" in i.file_name for i in es.images)  # nested folders survive
    acc, _ = _score(es)
    assert acc["map50_95"] >= 0.999, acc


def test_eval_set_refuses_a_changed_image(awkward, tmp_path):
    from pipeline.core.errors import UserError
    from pipeline.data.evalset import EvalSet

    src = tmp_path / "coco"
    shutil.copytree(awkward, src)
    es = _eval_set_of(src, tmp_path / "run")
    victim = src / "images" / "val" / es.images[0].file_name
    victim.write_bytes(victim.read_bytes() + b"\0")
    with pytest.raises(UserError, match="changed since the eval set was written"):
        EvalSet.load(es.root)
