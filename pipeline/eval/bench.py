"""Accuracy and latency of any Runner on a list of images. numpy + OpenCV + pycocotools only: the Jetson
bench imports this as it is."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
from rich.progress import Progress

from pipeline.backends.base import Runner
from pipeline.eval.coco import coco_eval, to_coco_results
from pipeline.eval.detect import PrePost, letterbox, postprocess
from pipeline.eval.timing import percentiles, time_calls


@dataclass
class EvalImage:
    path: str
    id: int


def _read(path: str) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError(f"{path}: image does not decode")
    return img


def predict(runner: Runner, images: Sequence[EvalImage], cat_ids: list[int], spec: PrePost,
            label: str = "predict") -> list[dict]:
    dets = []
    with Progress(transient=True) as prog:
        task = prog.add_task(f"{label}: {len(images)} images", total=len(images))
        for im in images:
            img = _read(im.path)
            x, undo = letterbox(img, spec)
            out = runner.infer({runner.input_name: x})[0]
            dets += to_coco_results(postprocess(out, undo, img.shape[:2], spec), im.id, cat_ids)
            prog.advance(task)
    return dets


def accuracy(runner: Runner, images: Sequence[EvalImage], gt: dict, cat_ids: list[int], spec: PrePost,
             label: str = "predict") -> tuple[dict, list[dict]]:
    dets = predict(runner, images, cat_ids, spec, label)
    return coco_eval(gt, dets), dets


def latency(runner: Runner, image_paths: Iterable[str], spec: PrePost, warmup: int, iters: int) -> dict:
    """Engine-only (runner.infer on a ready tensor) and end-to-end (letterbox + infer + NMS on a decoded image in
    memory; JPEG decoding is excluded, as a camera pipeline hands over raw frames). Interleaved image by image."""
    imgs = [_read(p) for p in list(image_paths)[: max(1, min(iters, 16))]]
    tensors = [letterbox(im, spec)[0] for im in imgs]
    name = runner.input_name

    def engine(i: int):
        runner.infer({name: tensors[i % len(tensors)]})

    def e2e(i: int):
        img = imgs[i % len(imgs)]
        x, undo = letterbox(img, spec)
        postprocess(runner.infer({name: x})[0], undo, img.shape[:2], spec)

    t0 = time.perf_counter()
    eng = time_calls(engine, warmup, iters)
    end = time_calls(e2e, warmup, iters)
    wall = time.perf_counter() - t0
    e = percentiles(end)
    return {"engine": percentiles(eng), "end_to_end": e, "fps": 1000.0 / e["mean"], "batch": 1,
            "warmup": warmup, "iters": iters, "wall_s": wall}
