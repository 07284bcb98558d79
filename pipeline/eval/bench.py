"""Accuracy and latency of any Runner on a list of images. numpy + OpenCV + pycocotools only: the Jetson
bench imports this as it is."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

import cv2
import numpy as np
from rich.progress import Progress

from pipeline.backends.base import Runner
from pipeline.data.evalset import EvalImage  # noqa: F401  (the evaluator's image: path + the dataset's id)
from pipeline.eval.coco import coco_eval, to_coco_results
from pipeline.eval.detect import PrePost, e2e_detections, letterbox, postprocess
from pipeline.eval.timing import percentiles, time_calls


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


def predict_e2e(runner_for, images: Sequence[EvalImage], cat_ids: list[int], label: str = "predict") -> list[dict]:
    """Detections of an end-to-end graph (uint8 BGR frame in, final detections out). `runner_for(h, w)` gives the
    runner of the graph built for frames of that size (an e2e graph's input size is fixed)."""
    dets = []
    with Progress(transient=True) as prog:
        task = prog.add_task(f"{label}: {len(images)} images", total=len(images))
        for im in images:
            img = _read(im.path)
            runner = runner_for(*img.shape[:2])
            dets += to_coco_results(e2e_detections(runner.infer({runner.input_name: img})), im.id, cat_ids)
            prog.advance(task)
    return dets


def latency_e2e(runner: Runner, image_paths: Iterable[str], frame_hw: tuple[int, int], warmup: int,
                iters: int) -> dict:
    """An end-to-end graph's time per camera frame (the images resized to its frame size): engine-only and
    end-to-end are the same call, the frame in memory to the final detections."""
    h, w = frame_hw
    frames = [cv2.resize(_read(p), (w, h), interpolation=cv2.INTER_LINEAR)
              for p in list(image_paths)[: max(1, min(iters, 16))]]
    name = runner.input_name
    t0 = time.perf_counter()
    t = percentiles(time_calls(lambda i: runner.infer({name: frames[i % len(frames)]}), warmup, iters))
    return {"engine": t, "end_to_end": t, "fps": 1000.0 / t["mean"], "batch": 1, "warmup": warmup, "iters": iters,
            "wall_s": time.perf_counter() - t0, "frame_hw": [h, w]}
