"""Bootstrap intervals for COCO mAP: the weighted re-accumulation against pycocotools, and the interval summary."""

from __future__ import annotations

import contextlib
import copy
import io
import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.eval.bootstrap import Matched, intervals

COCO8_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "coco8"
CAT_IDS = [1, 7, 42, 90]  # 42 has detections but no ground truth


def _pycocotools(gt: dict, dets: list[dict]) -> tuple[float, float]:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = copy.deepcopy(gt)
        coco.createIndex()
        e = COCOeval(coco, coco.loadRes(copy.deepcopy(dets)), "bbox")
        e.evaluate()
        e.accumulate()
        e.summarize()
    return float(e.stats[0]), float(e.stats[1])


def _jitter(rng: np.random.Generator, box: list[float], scale: float) -> list[float]:
    x, y, w, h = box
    dx, dy, dw, dh = rng.normal(0, scale, 4)
    return [x + dx * w, y + dy * h, max(1.0, w * (1 + dw)), max(1.0, h * (1 + dh))]


def _synthetic(seed: int, n_images: int = 30, jitter: float = 0.08, false_pos: int = 8) -> tuple[dict, list[dict]]:
    """Ground truth over categories 1, 7, 90 (crowd boxes included; some images without any), and detections:
    jittered ground truth plus random boxes in all four categories, continuous scores, none on some images, and
    more than 100 of category 1 on the first image."""
    rng = np.random.default_rng(seed)
    gt = {"images": [], "annotations": [], "categories": [{"id": c, "name": f"c{c}"} for c in CAT_IDS]}
    dets: list[dict] = []
    for i in range(n_images):
        img_id = 1000 + 3 * i
        gt["images"].append({"id": img_id, "width": 640, "height": 480, "file_name": f"{img_id}.jpg"})
        n_gt = 0 if i % 7 == 3 else int(rng.integers(1, 7))
        no_dets = i % 5 == 2
        for _ in range(n_gt):
            cat = int(rng.choice([1, 7, 90], p=[0.5, 0.35, 0.15]))
            w, h = rng.uniform(10, 200, 2)
            box = [float(rng.uniform(0, 640 - w)), float(rng.uniform(0, 480 - h)), float(w), float(h)]
            crowd = int(rng.random() < 0.1)
            gt["annotations"].append({"id": 5 * len(gt["annotations"]) + 2, "image_id": img_id, "category_id": cat,
                                      "bbox": box, "area": float(w * h), "iscrowd": crowd})
            if not no_dets and rng.random() < 0.85:
                for _ in range(int(rng.integers(1, 3))):  # sometimes a duplicate: a false positive near a match
                    dets.append({"image_id": img_id, "category_id": cat, "bbox": _jitter(rng, box, jitter),
                                 "score": float(rng.uniform(0.2, 1.0))})
        if no_dets:
            continue
        for _ in range(int(rng.integers(0, false_pos + 1))):
            w, h = rng.uniform(5, 150, 2)
            dets.append({"image_id": img_id, "category_id": int(rng.choice(CAT_IDS)),
                         "bbox": [float(rng.uniform(0, 600)), float(rng.uniform(0, 450)), float(w), float(h)],
                         "score": float(rng.uniform(0.0, 0.9))})
    first = gt["images"][0]["id"]
    anchor = {"id": 3, "image_id": first, "category_id": 1, "bbox": [100.0, 100.0, 80.0, 60.0], "area": 4800.0,
              "iscrowd": 0}
    gt["annotations"].append(anchor)
    for _ in range(130):  # beyond maxDets=100 on one image and category
        dets.append({"image_id": first, "category_id": 1, "bbox": _jitter(rng, anchor["bbox"], 0.3),
                     "score": float(rng.uniform(0.0, 1.0))})
    return gt, dets


def _duplicated(gt: dict, dets: list[dict], weights: np.ndarray, ids: list[int]) -> tuple[dict, list[dict]]:
    """A dataset in which image ids[i] appears weights[i] times (new image and annotation ids)."""
    out = {"images": [], "annotations": [], "categories": copy.deepcopy(gt["categories"])}
    out_dets = []
    by_img = {i["id"]: i for i in gt["images"]}
    for img_id, w in zip(ids, weights):
        for _ in range(int(w)):
            new = len(out["images"]) + 1
            out["images"].append({**by_img[img_id], "id": new})
            for a in gt["annotations"]:
                if a["image_id"] == img_id:
                    out["annotations"].append({**copy.deepcopy(a), "id": len(out["annotations"]) + 1,
                                               "image_id": new})
            out_dets += [{**copy.deepcopy(d), "image_id": new} for d in dets if d["image_id"] == img_id]
    return out, out_dets


@pytest.mark.parametrize("seed, decimals", [(0, None), (1, None), (2, None), (3, None), (4, 2), (5, 1)])
def test_score_equals_pycocotools(seed, decimals):
    gt, dets = _synthetic(seed, jitter=0.04 + 0.02 * seed)
    if decimals is not None:  # score ties across and within images: pycocotools' stable order decides
        dets = [{**d, "score": round(d["score"], decimals)} for d in dets]
    before = json.dumps(gt, sort_keys=True)
    m = Matched.from_coco(gt, dets)
    assert json.dumps(gt, sort_keys=True) == before  # the caller's ground truth is left as it was
    assert m.image_ids == sorted(i["id"] for i in gt["images"])
    ref = _pycocotools(gt, dets)
    got = m.score()
    assert 0.05 < ref[0] < ref[1] < 1
    assert abs(got[0] - ref[0]) < 1e-12 and abs(got[1] - ref[1]) < 1e-12, (got, ref)
    assert m.score(np.ones(len(m.image_ids))) == got


def test_score_without_detections_is_zero():
    gt, _ = _synthetic(0)
    assert Matched.from_coco(gt, []).score() == (0.0, 0.0)


@pytest.mark.parametrize("bad", [np.full(5, 0.5), np.array([1, 1, -1, 1, 1]), np.ones(4)],
                         ids=["fractional", "negative", "wrong-length"])
def test_score_refuses_weights_that_are_not_counts(bad):
    gt, dets = _synthetic(0, n_images=5)
    m = Matched.from_coco(gt, dets)
    with pytest.raises(ValueError):
        m.score(bad)


def test_score_of_a_category_only_crowd_or_absent():
    gt, dets = _synthetic(5)
    for a in gt["annotations"]:
        if a["category_id"] == 90:
            a["iscrowd"] = 1  # only ignored ground truth: the category is absent
    ref = _pycocotools(gt, dets)
    got = Matched.from_coco(gt, dets).score()
    assert abs(got[0] - ref[0]) < 1e-12 and abs(got[1] - ref[1]) < 1e-12, (got, ref)


def _weight_cases() -> tuple[dict, list[dict], Matched, list[np.ndarray]]:
    """Ground truth and detections on 24 images, and four weight vectors over them: random counts 0 to 3, a
    multinomial resample, every third image three times (the others left out), and counts that leave out every
    image with category 90."""
    gt, dets = _synthetic(11, n_images=24)
    m = Matched.from_coco(gt, dets)
    n = len(m.image_ids)
    rng = np.random.default_rng(4)
    only90 = {a["image_id"] for a in gt["annotations"] if a["category_id"] == 90 and not a["iscrowd"]}
    no90 = np.array([0 if i in only90 else 1 for i in m.image_ids])  # category 90 drops out (-1 in pycocotools)
    cases = [rng.integers(0, 4, n), rng.multinomial(n, np.full(n, 1 / n)), np.where(np.arange(n) % 3 == 0, 3, 0),
             no90 * rng.integers(1, 3, n)]
    assert {0, 1, 2, 3} <= set(cases[0].tolist()) and no90.min() == 0
    return gt, dets, m, cases


@pytest.mark.parametrize("case", range(4), ids=["counts-0-to-3", "multinomial", "every-third-x3", "no-category-90"])
def test_weights_equal_duplicated_images(case):
    gt, dets, m, cases = _weight_cases()
    w = cases[case]
    ref = _pycocotools(*_duplicated(gt, dets, w, m.image_ids))
    got = m.score(w)
    assert abs(got[0] - ref[0]) < 1e-9 and abs(got[1] - ref[1]) < 1e-9, (w, got, ref)


def test_score_many_equals_score_of_each_weight_vector():
    _, _, m, cases = _weight_cases()
    many = m.score_many(np.stack(cases))
    assert np.array_equal(many, np.array([m.score(w) for w in cases]))


def _coco8_gt() -> dict:
    import yaml
    from PIL import Image

    names = yaml.safe_load((COCO8_DIR / "coco8.yaml").read_text())["names"]
    gt = {"images": [], "annotations": [],
          "categories": [{"id": int(k) + 1, "name": v} for k, v in names.items()]}
    for n, img in enumerate(sorted((COCO8_DIR / "images" / "val").glob("*.jpg"))):
        with Image.open(img) as im:
            width, height = im.size
        img_id = int(img.stem) if img.stem.isdigit() else n + 1
        gt["images"].append({"id": img_id, "width": width, "height": height, "file_name": img.name})
        label = COCO8_DIR / "labels" / "val" / f"{img.stem}.txt"
        for line in (label.read_text().splitlines() if label.is_file() else []):
            if not line.strip():
                continue
            c, cx, cy, bw, bh = line.split()[:5]
            w, h = float(bw) * width, float(bh) * height
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": img_id,
                                      "category_id": int(c) + 1, "bbox": [float(cx) * width - w / 2,
                                                                          float(cy) * height - h / 2, w, h],
                                      "area": w * h, "iscrowd": 0})
    return gt


@pytest.mark.shared
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_score_equals_pycocotools_on_coco8(seed):
    if not (COCO8_DIR / "labels" / "val").is_dir():
        pytest.skip(f"{COCO8_DIR} is absent (../shared is not beside this clone)")
    gt = _coco8_gt()
    assert gt["annotations"]
    rng = np.random.default_rng(seed)
    cats = sorted({a["category_id"] for a in gt["annotations"]})
    dets = []
    for a in gt["annotations"]:
        for _ in range(int(rng.integers(0, 3))):
            dets.append({"image_id": a["image_id"], "category_id": a["category_id"],
                         "bbox": _jitter(rng, a["bbox"], 0.05 + 0.05 * seed), "score": float(rng.uniform(0.1, 1))})
    for img in gt["images"]:
        for _ in range(int(rng.integers(0, 12))):
            w, h = rng.uniform(8, img["width"] / 2), rng.uniform(8, img["height"] / 2)
            dets.append({"image_id": img["id"], "category_id": int(rng.choice(cats + [80])),
                         "bbox": [float(rng.uniform(0, img["width"] - w)), float(rng.uniform(0, img["height"] - h)),
                                  float(w), float(h)], "score": float(rng.uniform(0, 0.8))})
    ref = _pycocotools(gt, dets)
    got = Matched.from_coco(gt, dets).score()
    assert abs(got[0] - ref[0]) < 1e-12 and abs(got[1] - ref[1]) < 1e-12, (got, ref)


@pytest.fixture(scope="module")
def variants() -> dict[str, Matched]:
    gt, good = _synthetic(21, n_images=60, jitter=0.02, false_pos=2)
    _, bad = _synthetic(21, n_images=60, jitter=0.12, false_pos=10)  # same ground truth, looser boxes, more noise
    return {"good": Matched.from_coco(gt, good), "bad": Matched.from_coco(gt, bad),
            "good2": Matched.from_coco(gt, good)}


def test_intervals_shape_and_determinism(variants):
    pairs = [("good", "bad"), ("good", "good2")]
    r = intervals(variants, pairs, resamples=200, seed=3)
    assert r == intervals(variants, pairs, resamples=200, seed=3)
    assert r != intervals(variants, pairs, resamples=200, seed=4)
    assert (r["resamples"], r["seed"], r["level"], r["unit"], r["images"]) == (200, 3, 0.95, "image", 60)
    for name, v in r["variants"].items():
        assert (v["map50_95"], v["map50"]) == variants[name].score()
        for key in ("map50_95", "map50"):
            lo, hi = v[f"{key}_ci"]
            assert lo <= v[key] <= hi and hi - lo > 0
    same = r["deltas"]["good - good2"]
    assert (same["a"], same["b"]) == ("good", "good2")
    assert same["map50_95"] == same["map50"] == 0.0
    assert same["map50_95_ci"] == same["map50_ci"] == [0.0, 0.0] and same["map50_95_se"] == same["map50_se"] == 0.0
    d = r["deltas"]["good - bad"]
    assert d["map50_95_ci"][0] > 0 and d["map50_ci"][0] > 0  # clearly better: the interval excludes 0
    assert d["map50_95_ci"][0] <= d["map50_95"] <= d["map50_95_ci"][1] and d["map50_95_se"] > 0


def test_intervals_refuse_other_images(variants):
    gt, dets = _synthetic(21, n_images=59)
    with pytest.raises(ValueError, match="other images"):
        intervals({**variants, "short": Matched.from_coco(gt, dets)}, [("good", "short")], resamples=10)
    with pytest.raises(ValueError, match="unknown"):
        intervals(variants, [("good", "nope")], resamples=10)
