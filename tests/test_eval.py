"""The evaluator against the references: ultralytics' own letterbox and NMS, and pycocotools."""

import json

import numpy as np
import pytest
import torch

from pipeline.eval.coco import coco_eval
from pipeline.eval.detect import PrePost, letterbox, postprocess


def _img(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("hw", [(320, 320), (480, 640), (427, 640), (640, 333), (17, 500)])
def test_letterbox_matches_ultralytics(hw):
    from ultralytics.data.augment import LetterBox

    img = _img(*hw)
    x, undo = letterbox(img, PrePost(imgsz=320))
    ref = LetterBox((320, 320), auto=False, stride=32)(image=img)
    ref = ref[..., ::-1].transpose(2, 0, 1)[None].astype(np.float32) / 255.0
    assert x.shape == ref.shape == (1, 3, 320, 320)
    assert np.array_equal(x, ref)


@pytest.mark.slow
def test_postprocess_matches_ultralytics_nms_and_scaling():
    from ultralytics.utils import nms, ops

    rng = np.random.default_rng(0)
    nc, n = 5, 2100
    xy = rng.uniform(0, 320, (n, 2))
    wh = rng.uniform(4, 120, (n, 2))
    scores = rng.uniform(0, 1, (n, nc)) ** 6
    out = np.concatenate([xy, wh, scores], 1).T[None].astype(np.float32)
    spec = PrePost(imgsz=320, conf=0.01, iou=0.6, max_det=100)
    orig = (480, 640)
    _, undo = letterbox(_img(*orig), spec)
    ours = postprocess(out, undo, orig, spec)
    ref = nms.non_max_suppression(torch.from_numpy(out), spec.conf, spec.iou, multi_label=True,
                                  max_det=spec.max_det)[0]
    ref[:, :4] = ops.scale_boxes((320, 320), ref[:, :4], orig)
    ref = ref.numpy()
    assert ours.shape == ref.shape and len(ours) > 20
    o, r = ours[np.lexsort(ours.T[::-1])], ref[np.lexsort(ref.T[::-1])]
    assert np.allclose(o, r, atol=1e-3)


def test_evaluator_equals_pycocotools_on_fixed_predictions(tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    rng = np.random.default_rng(1)
    images = [{"id": i, "file_name": f"{i}.jpg", "width": 320, "height": 320} for i in range(1, 11)]
    anns, dets = [], []
    for im in images:
        for _ in range(4):
            x, y = rng.uniform(0, 250, 2)
            w, h = rng.uniform(8, 60, 2)
            c = int(rng.integers(1, 4))
            anns.append({"id": len(anns) + 1, "image_id": im["id"], "category_id": c, "bbox": [x, y, w, h],
                         "area": w * h, "iscrowd": 0})
            j = rng.normal(0, 3, 4)
            dets.append({"image_id": im["id"], "category_id": c if rng.uniform() < 0.8 else 1,
                         "bbox": [x + j[0], y + j[1], w + j[2], h + j[3]], "score": float(rng.uniform())})
    gt = {"images": images, "annotations": anns, "categories": [{"id": i, "name": str(i)} for i in (1, 2, 3)]}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "dt.json").write_text(json.dumps(dets))
    ours = coco_eval(tmp_path / "gt.json", tmp_path / "dt.json")
    coco = COCO(str(tmp_path / "gt.json"))
    e = COCOeval(coco, coco.loadRes(str(tmp_path / "dt.json")), "bbox")
    e.evaluate(), e.accumulate(), e.summarize()
    assert ours["map50_95"] == e.stats[0] and ours["map50"] == e.stats[1]
    assert 0.2 < ours["map50_95"] < 0.95  # a set that tests something: neither empty nor perfect


def _noisy_pair(n_images, seed=1):
    rng = np.random.default_rng(seed)
    images = [{"id": 1000 + 7 * i, "file_name": f"{i}.jpg", "width": 320, "height": 320} for i in range(n_images)]
    anns, good, worse = [], [], []
    for im in images:
        for _ in range(4):
            x, y = rng.uniform(0, 250, 2)
            w, h = rng.uniform(8, 60, 2)
            c = int(rng.integers(1, 4))
            anns.append({"id": len(anns) + 1, "image_id": im["id"], "category_id": c, "bbox": [x, y, w, h],
                         "area": w * h, "iscrowd": 0})
            for dl, s in ((good, 2.0), (worse, 3.0)):
                j = rng.normal(0, s, 4)
                dl.append({"image_id": im["id"], "category_id": c, "bbox": [x + j[0], y + j[1], w + j[2], h + j[3]],
                           "score": float(rng.uniform())})
    return {"images": images, "annotations": anns,
            "categories": [{"id": i, "name": str(i)} for i in (1, 2, 3)]}, good, worse


@pytest.mark.slow
def test_paired_drop_is_the_map_difference_with_an_honest_standard_error():
    """The INT8 search's stop rule reads this: the drop equals pycocotools' mAP difference on the whole set, and its
    half-sample standard error shrinks as the tuning set grows (about 1/sqrt(n))."""
    from pipeline.eval.coco import paired_drop

    gt, good, worse = _noisy_pair(200)
    d = paired_drop(gt, good, worse)
    assert d["drop"] == pytest.approx(coco_eval(gt, good)["map50_95"] - coco_eval(gt, worse)["map50_95"], abs=1e-12)
    assert d["drop"] > 0 and 0 < d["se"] < d["drop"]
    small = paired_drop(*_noisy_pair(25, seed=2))
    assert small["se"] > 1.5 * d["se"], (small["se"], d["se"])
