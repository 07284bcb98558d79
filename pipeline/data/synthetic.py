"""The built-in synthetic detection dataset: seeded, generated in seconds, written as COCO JSON + JPEG images.

Eight shape classes drawn over textured backgrounds, small and large, rotated, overlapping (an object hidden
more than 65% is dropped, a partly hidden one is boxed by what is visible), then blurred, noised and JPEG
compressed. Hard enough that a small YOLO11 does not saturate, learnable on two CPU cores in minutes.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from pipeline.core.store import atomic_dir

CLASSES = ["circle", "square", "triangle", "star", "cross", "ring", "hexagon", "diamond"]
GENERATOR_VERSION = 2


@dataclass(frozen=True)
class SynthSpec:
    seed: int = 0
    train: int = 480
    val: int = 120
    imgsz: int = 320
    min_objects: int = 2
    max_objects: int = 9

    def as_dict(self) -> dict:
        return {**self.__dict__, "version": GENERATOR_VERSION}


def _background(rng: np.random.Generator, s: int) -> np.ndarray:
    # low-frequency colour field + gradient + clutter lines and blobs that are not objects
    low = rng.uniform(0, 255, size=(4, 4, 3)).astype(np.float32)
    img = cv2.resize(low, (s, s), interpolation=cv2.INTER_CUBIC)
    gx = np.linspace(-1, 1, s, dtype=np.float32)[None, :, None] * rng.uniform(-40, 40, size=3).astype(np.float32)
    img = img + gx
    tex = cv2.resize(rng.normal(0, 1, size=(s // 8, s // 8, 1)).astype(np.float32), (s, s))[..., None]
    img = img + tex * rng.uniform(5, 25)
    img = np.clip(img, 0, 255).astype(np.uint8)
    for _ in range(int(rng.integers(3, 12))):
        p1 = tuple(int(v) for v in rng.integers(0, s, 2))
        p2 = tuple(int(v) for v in rng.integers(0, s, 2))
        col = tuple(int(v) for v in rng.integers(0, 255, 3))
        cv2.line(img, p1, p2, col, int(rng.integers(1, 4)), cv2.LINE_AA)
    for _ in range(int(rng.integers(0, 4))):  # distractor blobs: irregular polygons
        c = rng.integers(0, s, 2)
        n = int(rng.integers(5, 9))
        ang = np.sort(rng.uniform(0, 2 * np.pi, n))
        rad = rng.uniform(5, 30, n)
        pts = np.stack([c[0] + rad * np.cos(ang), c[1] + rad * np.sin(ang)], 1).astype(np.int32)
        cv2.fillPoly(img, [pts], tuple(int(v) for v in rng.integers(0, 255, 3)), cv2.LINE_AA)
    return img


def _polygon(n: int, r: float, rot: float, cx: float, cy: float, inner: float | None = None) -> np.ndarray:
    pts = []
    k = 2 * n if inner else n
    for i in range(k):
        a = rot + 2 * math.pi * i / k
        rr = (inner if (inner and i % 2) else r)
        pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
    return np.array(pts, dtype=np.float32)


def _draw_shape(mask: np.ndarray, cls: int, cx: float, cy: float, r: float, rot: float, aspect: float) -> None:
    """Draw class `cls` into the uint8 mask (255 = object)."""
    sh = 4  # sub-pixel precision for fillPoly
    f = 1 << sh

    def poly(p: np.ndarray) -> None:
        cv2.fillPoly(mask, [np.round(p * f).astype(np.int32)], 255, cv2.LINE_AA, shift=sh)

    name = CLASSES[cls]
    if name == "circle":
        cv2.ellipse(mask, (int(cx * f), int(cy * f)), (int(r * f), int(r * aspect * f)), math.degrees(rot), 0, 360,
                    255, -1, cv2.LINE_AA, shift=sh)
    elif name == "ring":
        cv2.ellipse(mask, (int(cx * f), int(cy * f)), (int(r * f), int(r * f)), 0, 0, 360, 255, -1, cv2.LINE_AA, sh)
        cv2.ellipse(mask, (int(cx * f), int(cy * f)), (int(r * 0.55 * f), int(r * 0.55 * f)), 0, 0, 360, 0, -1,
                    cv2.LINE_AA, sh)
    elif name == "square":
        poly(_polygon(4, r, rot + math.pi / 4, cx, cy))
    elif name == "diamond":
        p = _polygon(4, r, rot, cx, cy)
        p[:, 0] = cx + (p[:, 0] - cx) * 0.6
        poly(p)
    elif name == "triangle":
        poly(_polygon(3, r, rot, cx, cy))
    elif name == "hexagon":
        poly(_polygon(6, r, rot, cx, cy))
    elif name == "star":
        poly(_polygon(5, r, rot, cx, cy, inner=r * 0.42))
    elif name == "cross":
        w = r * 0.33
        bar = np.array([[-r, -w], [r, -w], [r, w], [-r, w]], dtype=np.float32)
        c, s_ = math.cos(rot), math.sin(rot)
        for b in (bar, bar[:, ::-1].copy()):
            q = b @ np.array([[c, s_], [-s_, c]], dtype=np.float32) + np.array([cx, cy], dtype=np.float32)
            poly(q)


def _fill(rng: np.random.Generator, s: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """An object's texture (flat colour, a two-colour gradient or stripes) over rows y0:y1 and columns x0:x1 of an
    s x s image: the values the whole image's texture has there, from the same random draws whatever the box."""
    h, w = y1 - y0, x1 - x0
    c1 = rng.integers(0, 255, 3).astype(np.float32)
    kind = rng.integers(0, 3)
    if kind == 0:
        return np.broadcast_to(c1, (h, w, 3)).copy()
    c2 = rng.integers(0, 255, 3).astype(np.float32)
    if kind == 1:
        t = np.linspace(0, 1, s, dtype=np.float32)[y0:y1, None, None]
        return np.broadcast_to(c1 * (1 - t) + c2 * t, (h, w, 3)).copy()
    period = rng.uniform(4, 14)
    yy = np.arange(s, dtype=np.float32)[y0:y1, None]
    xx = np.arange(s, dtype=np.float32)[None, x0:x1]
    st = ((np.sin((xx + yy * rng.uniform(-1, 1)) / period * math.pi) > 0).astype(np.float32))[..., None]
    return c1 * st + c2 * (1 - st)


def make_image(rng: np.random.Generator, spec: SynthSpec) -> tuple[np.ndarray, list[tuple[int, list[float]]]]:
    s = spec.imgsz
    img = _background(rng, s).astype(np.float32)
    owner = np.full((s, s), -1, np.int32)  # which object owns each pixel (last drawn on top)
    objs = []
    n = int(rng.integers(spec.min_objects, spec.max_objects + 1))
    for k in range(n):
        cls = int(rng.integers(0, len(CLASSES)))
        # log-uniform size: many small objects, some large
        r = float(math.exp(rng.uniform(math.log(6), math.log(s * 0.28))))
        cx, cy = rng.uniform(r * 0.5, s - r * 0.5, 2)
        mask = np.zeros((s, s), np.uint8)
        _draw_shape(mask, cls, float(cx), float(cy), r, float(rng.uniform(0, 2 * math.pi)), float(rng.uniform(0.6, 1)))
        # blended over the shape's bounding box only: outside it alpha is 0 and the image keeps its values exactly
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        box = (rows[0], rows[-1] + 1, cols[0], cols[-1] + 1) if rows.size else (0, 0, 0, 0)
        y0, y1, x0, x1 = (int(v) for v in box)
        alpha = mask[y0:y1, x0:x1].astype(np.float32)[..., None] / 255.0
        img[y0:y1, x0:x1] = img[y0:y1, x0:x1] * (1 - alpha) + _fill(rng, s, y0, y1, x0, x1) * alpha
        solid = mask[y0:y1, x0:x1] > 127
        owner[y0:y1, x0:x1][solid] = k
        objs.append((cls, int(solid.sum()), box))
    anns = []
    for k, (cls, full, (by0, by1, bx0, bx1)) in enumerate(objs):
        vis = owner[by0:by1, bx0:bx1] == k  # an object's pixels lie inside its own shape's box
        area = int(vis.sum())
        if full == 0 or area < 12 or area / full < 0.35:
            continue
        ys, xs = np.nonzero(vis)
        x0, y0, x1, y1 = xs.min() + bx0, ys.min() + by0, xs.max() + 1 + bx0, ys.max() + 1 + by0
        if x1 - x0 < 3 or y1 - y0 < 3:
            continue
        anns.append((cls, [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]))
    sigma = rng.uniform(0, 1.4)
    if sigma > 0.3:
        img = cv2.GaussianBlur(img, (0, 0), sigma)
    img = img + rng.normal(0, rng.uniform(2, 14), img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8), anns


def generate(root: Path, spec: SynthSpec = SynthSpec()) -> Path:
    """Write the dataset under `root` (atomically) and return it. Layout: images/{train,val}/*.jpg,
    annotations/instances_{train,val}.json, dataset.json (the spec)."""
    root = Path(root)
    with atomic_dir(root) as tmp:
        for split, count, seed_off in (("train", spec.train, 0), ("val", spec.val, 10_000_000)):
            rng = np.random.default_rng(spec.seed + seed_off)
            (tmp / "images" / split).mkdir(parents=True)
            images, annotations = [], []
            for i in range(count):
                img, anns = make_image(rng, spec)
                name = f"{split}_{i:05d}.jpg"
                quality = int(rng.integers(60, 96))
                cv2.imwrite(str(tmp / "images" / split / name), img[..., ::-1].copy(),
                            [cv2.IMWRITE_JPEG_QUALITY, quality])
                images.append({"id": i + 1, "file_name": name, "width": spec.imgsz, "height": spec.imgsz})
                for cls, box in anns:
                    annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": cls + 1,
                                        "bbox": [round(v, 2) for v in box], "area": round(box[2] * box[3], 2),
                                        "iscrowd": 0})
            coco = {"info": {"description": "yolo-edge synthetic shapes", **spec.as_dict()},
                    "images": images, "annotations": annotations,
                    "categories": [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(CLASSES)]}
            (tmp / "annotations").mkdir(exist_ok=True)
            (tmp / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))
        (tmp / "dataset.json").write_text(json.dumps({"format": "coco", "train": "annotations/instances_train.json",
                                                      "val": "annotations/instances_val.json",
                                                      "images": {"train": "images/train", "val": "images/val"},
                                                      "spec": spec.as_dict()}, indent=1))
    return root
