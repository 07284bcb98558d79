"""COCO mAP through pycocotools, the reference implementation: the numbers in a report are its numbers."""

from __future__ import annotations

import contextlib
import copy
import io
import json
from pathlib import Path

import numpy as np


def coco_eval(gt: dict | str | Path, dets: list[dict] | str | Path) -> dict:
    """Returns {map50_95, map50, per_class_ap50_95: {category id: AP}} for bbox detections."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        # a copy: pycocotools writes into the ground truth it is given (an 'ignore' flag on each annotation)
        coco.dataset = json.loads(Path(gt).read_text()) if isinstance(gt, (str, Path)) else copy.deepcopy(gt)
        coco.createIndex()
        dets = json.loads(Path(dets).read_text()) if isinstance(dets, (str, Path)) else dets
        if not dets:
            return {"map50_95": 0.0, "map50": 0.0, "per_class_ap50_95": {}}
        e = COCOeval(coco, coco.loadRes(dets), "bbox")
        e.evaluate()
        e.accumulate()
        e.summarize()
    prec = e.eval["precision"]  # [T, R, K, A, M]
    per_class = {}
    for k, cid in enumerate(e.params.catIds):
        p = prec[:, :, k, 0, -1]
        p = p[p > -1]
        per_class[int(cid)] = float(p.mean()) if p.size else -1.0
    return {"map50_95": float(e.stats[0]), "map50": float(e.stats[1]), "per_class_ap50_95": per_class}


def _evaluated(gt: dict, dets: list[dict]):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = copy.deepcopy(gt)
        coco.createIndex()
        e = COCOeval(coco, coco.loadRes(dets), "bbox")
        e.evaluate()
    return e


def _map_over(e, keep: set | None) -> float:
    """mAP50-95 (all areas, 100 detections: pycocotools' stats[0]) of an evaluated COCOeval over the images in `keep`
    (all when None): accumulate() skips the per-image results set to None."""
    full = e.evalImgs
    ids = e._paramsEval.imgIds
    if keep is not None:
        e.evalImgs = [r if ids[n % len(ids)] in keep else None for n, r in enumerate(full)]
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            e.accumulate()
    finally:
        e.evalImgs = full
    p = e.eval["precision"][:, :, :, 0, -1]
    p = p[p > -1]
    return float(p.mean()) if p.size else 0.0


def paired_drop(gt: dict, ref: list[dict], cur: list[dict], halves: int = 20, seed: int = 0) -> dict:
    """mAP50-95 of `ref` minus that of `cur` (two models' detections on the same images) and the standard error of
    that difference from random half-samples of the images (a half-sample's variance is about twice the whole
    set's): how far a tuning-set estimate of an INT8 drop can be trusted."""
    if not ref or not cur:
        a = coco_eval(gt, ref)["map50_95"] if ref else 0.0
        b = coco_eval(gt, cur)["map50_95"] if cur else 0.0
        return {"ref": a, "cur": b, "drop": a - b, "se": float("nan"), "halves": 0}
    ea, eb = _evaluated(gt, ref), _evaluated(gt, cur)
    a, b = _map_over(ea, None), _map_over(eb, None)
    ids = list(ea._paramsEval.imgIds)
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(halves):
        keep = set(rng.choice(ids, len(ids) // 2, replace=False).tolist())
        diffs.append(_map_over(ea, keep) - _map_over(eb, keep))
    se = float(np.std(diffs, ddof=1) / np.sqrt(2)) if len(diffs) > 1 else float("nan")
    return {"ref": a, "cur": b, "drop": a - b, "se": se, "halves": halves}


def to_coco_results(dets: np.ndarray, image_id: int, cat_ids: list[int]) -> list[dict]:
    """(k, 6) x1 y1 x2 y2 score class -> COCO results entries."""
    out = []
    for x1, y1, x2, y2, s, c in dets.tolist():
        out.append({"image_id": int(image_id), "category_id": int(cat_ids[int(c)]),
                    "bbox": [round(x1, 3), round(y1, 3), round(x2 - x1, 3), round(y2 - y1, 3)],
                    "score": round(s, 5)})
    return out
