"""COCO mAP through pycocotools, the reference implementation: the numbers in a report are its numbers."""

from __future__ import annotations

import contextlib
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
        coco.dataset = json.loads(Path(gt).read_text()) if isinstance(gt, (str, Path)) else gt
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


def to_coco_results(dets: np.ndarray, image_id: int, cat_ids: list[int]) -> list[dict]:
    """(k, 6) x1 y1 x2 y2 score class -> COCO results entries."""
    out = []
    for x1, y1, x2, y2, s, c in dets.tolist():
        out.append({"image_id": int(image_id), "category_id": int(cat_ids[int(c)]),
                    "bbox": [round(x1, 3), round(y1, 3), round(x2 - x1, 3), round(y2 - y1, 3)],
                    "score": round(s, 5)})
    return out
