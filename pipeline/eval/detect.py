"""Pre- and post-processing of a YOLO detector, in numpy only (the Jetson side imports this too).

Preprocessing is ultralytics' LetterBox (centered, pad 114, bilinear resize, BGR->RGB, /255, NCHW float32).
The detector's output is (1, 4 + nc, anchors): per-anchor boxes in input pixels, then class scores. Postprocessing
(`PrePost.post`) is the family's:
- `nms` (YOLOv8, YOLO11; boxes xywh): ultralytics' validation NMS (multi-label, class-aware, conf > conf, IoU iou, at
  most max_det);
- `topk` (YOLO26's NMS-free one-to-one head; boxes x1y1x2y2): ultralytics' end-to-end selection
  (`Detect.get_topk_index`): the max_det anchors with the best class score, then the max_det best (anchor, class)
  scores among them, those over conf kept.
- `final` (an ultralytics end-to-end export, such as its INT8 peer of a YOLO26): the output is (1, K, 6) detections
  (x1, y1, x2, y2, score, class), those over conf kept. Boxes are scaled back to the original image as
`scale_boxes` does. The spec is written into deploy bundles so the device does exactly the same.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class PrePost:
    imgsz: int = 320
    pad_value: int = 114
    conf: float = 0.001
    iou: float = 0.7
    max_det: int = 300
    max_nms: int = 30000
    max_wh: int = 7680
    post: str = "nms"  # "nms" | "topk": the model family's post-processing; "final": detections already

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_recipe(cls, recipe, post: str = "nms") -> PrePost:
        """The recipe's input size and bench thresholds and the family's post-processing: what every stage that runs
        the detector uses."""
        b = recipe.bench
        return cls(imgsz=recipe.model.imgsz, conf=b.conf, iou=b.iou, max_det=b.max_det, post=post)


def letterbox_geometry(frame_hw: tuple[int, int], imgsz: int) -> dict:
    """The letterbox of a frame of frame_hw into imgsz x imgsz, as ultralytics' LetterBox rounds it: the resized size,
    the pads (top, bottom, left, right), the gains and the (x, y) offset that undo it. The end-to-end graph
    (quant/e2e.py) is built from these same numbers."""
    h0, w0 = frame_hw
    s = imgsz
    r = min(s / h0, s / w0)
    new_w, new_h = max(round(w0 * r), 1), max(round(h0 * r), 1)
    dw, dh = (s - new_w) / 2, (s - new_h) / 2
    top, bottom = round(dh - 0.1), round(dh + 0.1)
    left, right = round(dw - 0.1), round(dw + 0.1)
    return {"new_hw": (new_h, new_w), "pads": (top, bottom, left, right), "gain": (new_w / w0, new_h / h0),
            "pad_xy": (left, top)}


def letterbox(img_bgr: np.ndarray, spec: PrePost) -> tuple[np.ndarray, tuple]:
    """Returns the NCHW float32 tensor and (gain_x, gain_y, pad_x, pad_y) to undo it."""
    h0, w0 = img_bgr.shape[:2]
    geo = letterbox_geometry((h0, w0), spec.imgsz)
    (new_h, new_w), (top, bottom, left, right) = geo["new_hw"], geo["pads"]
    img = cv2.resize(img_bgr, (new_w, new_h), interpolation=cv2.INTER_LINEAR) if (new_w, new_h) != (w0, h0) else img_bgr
    img = cv2.copyMakeBorder(img, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(spec.pad_value,) * 3)
    x = np.ascontiguousarray(img[..., ::-1].transpose(2, 0, 1))[None].astype(np.float32) / 255.0
    return x, (*geo["gain"], left, top)


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float, max_keep: int) -> np.ndarray:
    """Greedy NMS over xyxy boxes; returns kept indices, best first."""
    order = np.argsort(-scores, kind="stable")
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1) * (y2 - y1)
    keep = []
    while order.size and len(keep) < max_keep:
        i = order[0]
        keep.append(i)
        rest = order[1:]
        xx1 = np.maximum(x1[i], x1[rest])
        yy1 = np.maximum(y1[i], y1[rest])
        xx2 = np.minimum(x2[i], x2[rest])
        yy2 = np.minimum(y2[i], y2[rest])
        inter = np.clip(xx2 - xx1, 0, None) * np.clip(yy2 - yy1, 0, None)
        ov = inter / (areas[i] + areas[rest] - inter + 1e-9)
        order = rest[ov <= iou]
    return np.array(keep, dtype=np.int64)


def topk_select(p: np.ndarray, max_det: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ultralytics' end-to-end selection (Detect.get_topk_index, class-aware) over p (N, 4 + nc): the k = min(max_det,
    N) anchors with the best class score, then the k best (anchor, class) scores among those anchors. Returns
    (anchor indices, class indices, scores), best first."""
    scores = p[:, 4:]
    n, nc = scores.shape
    k = min(max_det, n)
    anchors = np.argsort(-scores.max(1), kind="stable")[:k]
    flat = scores[anchors].reshape(-1)
    top = np.argsort(-flat, kind="stable")[:k]
    return anchors[top // nc], top % nc, flat[top]


def _unletterbox(xyxy: np.ndarray, undo: tuple, orig_hw: tuple[int, int]) -> np.ndarray:
    gx, gy, px, py = undo
    xyxy = (xyxy - np.array([px, py, px, py], np.float32)) / np.array([gx, gy, gx, gy], np.float32)
    h0, w0 = orig_hw
    xyxy[:, [0, 2]] = xyxy[:, [0, 2]].clip(0, w0)
    xyxy[:, [1, 3]] = xyxy[:, [1, 3]].clip(0, h0)
    return xyxy


def _detections(xyxy, sc, j, undo, orig_hw) -> np.ndarray:
    xyxy = _unletterbox(xyxy.astype(np.float32), undo, orig_hw)
    return np.concatenate([xyxy, sc[:, None], j[:, None].astype(np.float32)], 1).astype(np.float32)


def postprocess(out: np.ndarray, undo: tuple, orig_hw: tuple[int, int], spec: PrePost) -> np.ndarray:
    """out: (1, 4+nc, N) raw detector output (boxes in input pixels: xywh for `nms`, x1y1x2y2 for `topk`; class
    scores), or for `final` (1, K, 6) detections. Returns (k, 6): x1, y1, x2, y2 (original image pixels), score,
    class."""
    if spec.post == "final":
        d = out[0][out[0][:, 4] > spec.conf][: spec.max_det]
        return _detections(d[:, :4], d[:, 4], d[:, 5].astype(np.int64), undo, orig_hw)
    if spec.post == "topk":
        p = out[0].T  # (N, 4+nc)
        a, j, sc = topk_select(p, spec.max_det)
        keep = sc > spec.conf
        a, j, sc = a[keep], j[keep], sc[keep]
        return _detections(p[a, :4], sc, j, undo, orig_hw)
    p = out[0].T  # (N, 4+nc)
    cls_scores = p[:, 4:]
    i, j = np.nonzero(cls_scores > spec.conf)  # multi-label: one candidate per (box, class) over conf
    if i.size == 0:
        return np.zeros((0, 6), np.float32)
    sc = cls_scores[i, j]
    if sc.size > spec.max_nms:
        top = np.argsort(-sc, kind="stable")[: spec.max_nms]
        i, j, sc = i[top], j[top], sc[top]
    xywh = p[i, :4]
    xyxy = np.concatenate([xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, :2] + xywh[:, 2:] / 2], 1)
    keep = nms(xyxy + (j[:, None] * spec.max_wh).astype(xyxy.dtype), sc, spec.iou, spec.max_det)
    return _detections(xyxy[keep], sc[keep], j[keep], undo, orig_hw)


# The end-to-end graph's outputs (pipeline/quant/e2e.py), in TensorRT EfficientNMS's layout.
E2E_OUTPUTS = ("num_dets", "boxes", "scores", "classes")


def e2e_detections(outputs) -> np.ndarray:
    """An e2e graph's outputs (num_dets, boxes, scores, classes: a list in that order or a dict by name) as the
    (k, 6) x1, y1, x2, y2, score, class array `postprocess` returns (best first)."""
    if isinstance(outputs, dict):
        outputs = [outputs[k] for k in E2E_OUTPUTS]
    num, boxes, scores, classes = outputs
    k = int(np.asarray(num).reshape(-1)[0])
    return np.concatenate([boxes[0, :k], scores[0, :k, None], classes[0, :k, None].astype(np.float32)],
                          1).astype(np.float32)
