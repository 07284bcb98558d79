"""Accuracy of any Runner on a list of images, and the calls the interleaved timer (pipeline/eval/interleaved.py) times.
numpy + OpenCV + pycocotools only: the Jetson bench imports this as it is."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from pipeline.backends.base import Runner
from pipeline.core.console import task
from pipeline.data.evalset import EvalImage  # noqa: F401  (the evaluator's image: path + the dataset's id)
from pipeline.eval.coco import coco_eval, to_coco_results
from pipeline.eval.detect import PrePost, e2e_detections, letterbox, postprocess
from pipeline.eval.interleaved import Timing

TIMING_IMAGES = 16  # distinct images (frames) the timed calls cycle through


def _read(path: str) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError(f"{path}: image does not decode")
    return img


def detections(out: np.ndarray, undo: tuple, shape: tuple[int, int], image_id: int, cat_ids: list[int],
               spec: PrePost) -> list[dict]:
    """One image's raw detector output (1, 4 + nc, N) as COCO results: bench's post-processing, for every runner."""
    return to_coco_results(postprocess(out, undo, shape, spec), image_id, cat_ids)


def predict(runner: Runner, images: Sequence[EvalImage], cat_ids: list[int], spec: PrePost,
            label: str = "predict") -> list[dict]:
    dets = []
    with task(f"{label}: images", len(images)) as t:
        for im in images:
            img = _read(im.path)
            x, undo = letterbox(img, spec)
            dets += detections(runner.infer({runner.input_name: x})[0], undo, img.shape[:2], im.id, cat_ids, spec)
            t.advance()
    return dets


def accuracy(runner: Runner, images: Sequence[EvalImage], gt: dict, cat_ids: list[int], spec: PrePost,
             label: str = "predict") -> tuple[dict, list[dict]]:
    dets = predict(runner, images, cat_ids, spec, label)
    return coco_eval(gt, dets), dets


@dataclass(frozen=True)
class TimingInputs:
    """What the timed calls run on, decoded once and shared by every variant of a session: the first
    TIMING_IMAGES eval images in memory (JPEG decoding is excluded, as a camera pipeline hands over raw frames) and
    their letterboxed tensors. Call i of an item uses image i modulo their number."""
    images: list[np.ndarray]
    tensors: list[np.ndarray]

    @classmethod
    def load(cls, image_paths: Iterable[str], spec: PrePost) -> TimingInputs:
        images = [_read(p) for p in list(image_paths)[:TIMING_IMAGES]]
        if not images:
            raise ValueError("no images to time the models on")
        return cls(images, [letterbox(im, spec)[0] for im in images])

    def frames(self, frame_hw: tuple[int, int]) -> list[np.ndarray]:
        """The images resized to a camera's frame size (what an end-to-end graph takes)."""
        h, w = frame_hw
        return [cv2.resize(im, (w, h), interpolation=cv2.INTER_LINEAR) for im in self.images]


def timed_calls(runner: Runner, inputs: TimingInputs, spec: PrePost) -> dict[str, Callable[[int], None]]:
    """The interleaved timer's items for one model: engine-only (runner.infer on a ready tensor) and end-to-end
    (letterbox + infer + NMS on a decoded image in memory)."""
    imgs, tensors, name = inputs.images, inputs.tensors, runner.input_name

    def engine(i: int) -> None:
        runner.infer({name: tensors[i % len(tensors)]})

    def end_to_end(i: int) -> None:
        img = imgs[i % len(imgs)]
        x, undo = letterbox(img, spec)
        postprocess(runner.infer({name: x})[0], undo, img.shape[:2], spec)

    return {"engine": engine, "end_to_end": end_to_end}


def predict_e2e(runner_for, images: Sequence[EvalImage], cat_ids: list[int], label: str = "predict") -> list[dict]:
    """Detections of an end-to-end graph (uint8 BGR frame in, final detections out). `runner_for(h, w)` gives the
    runner of the graph built for frames of that size (an e2e graph's input size is fixed)."""
    dets = []
    with task(f"{label}: images", len(images)) as t:
        for im in images:
            img = _read(im.path)
            runner = runner_for(*img.shape[:2])
            dets += to_coco_results(e2e_detections(runner.infer({runner.input_name: img})), im.id, cat_ids)
            t.advance()
    return dets


def timed_call_e2e(runner: Runner, frames: list[np.ndarray]) -> Callable[[int], None]:
    """The timer's item for an end-to-end graph: one call on a camera-size frame in memory (TimingInputs.frames) to
    the final detections; its engine-only and end-to-end time are this same call."""
    name = runner.input_name

    def call(i: int) -> None:
        runner.infer({name: frames[i % len(frames)]})

    return call


@dataclass(frozen=True)
class TimedVariant:
    """A variant's items in an interleaved timing session, and what its ratios divide by."""
    name: str
    engine: str  # the item of its engine-only time
    end_to_end: str  # the item of its end-to-end time (an end-to-end graph: the engine item itself)
    over: str  # the engine-only item its e2e ÷ engine divides by (its own; an end-to-end graph's: its source's)
    against: str | None = None  # the variant its speed-ups are measured against

    @classmethod
    def split(cls, name: str, against: str | None = None) -> TimedVariant:
        """A model timed on a ready tensor and, separately, end to end around the runner."""
        return cls(name, f"{name} engine", f"{name} e2e", f"{name} engine", against)

    @classmethod
    def graph(cls, name: str, source_engine: str, against: str | None = None) -> TimedVariant:
        """An end-to-end graph: one item, its e2e ÷ engine over its source variant's engine-only item."""
        return cls(name, name, name, source_engine, against)


def tracked_ratios(tvs: Mapping[str, TimedVariant]) -> list[tuple[str, str]]:
    """(numerator, denominator) items whose ratios the report states: each variant's engine-only and end-to-end
    speed-up (base over variant) and its end-to-end over engine-only time."""
    pairs = []
    for v in tvs.values():
        if v.against is not None and v.against != v.name:
            b = tvs[v.against]
            pairs += [(b.engine, v.engine), (b.end_to_end, v.end_to_end)]
        pairs.append((v.end_to_end, v.over))
    return [p for p in dict.fromkeys(pairs) if p[0] != p[1]]


def timing_fields(t: Timing, v: TimedVariant) -> dict:
    """A report row's latency_ms (engine, end_to_end: percentiles and the p50's 95% interval), fps, timing and
    e2e_over_engine (+ its interval) from a session that timed it."""
    e, r, s = t.items[v.end_to_end], t.ratio(v.end_to_end, v.over), t.summary
    return {"latency_ms": {"engine": t.items[v.engine], "end_to_end": e}, "fps": 1000.0 / e["mean"],
            "timing": {"batch": 1, "method": s["method"], "warmup": s["warmup"], "rounds": s["rounds"],
                       "per_round": s["per_round"], "iters": e["n"], "wall_s": s["wall_s"]},
            "e2e_over_engine": r["estimate"], "e2e_over_engine_ci": r["ci"]}


def speedup_fields(t: Timing, v: TimedVariant, base: TimedVariant) -> dict:
    """vs_base's speed-ups: base p50 over the variant's p50 (engine-only and end-to-end) with 95% intervals."""
    eng, e2e = t.ratio(base.engine, v.engine), t.ratio(base.end_to_end, v.end_to_end)
    return {"engine_p50_speedup": eng["estimate"], "engine_p50_speedup_ci": eng["ci"],
            "e2e_p50_speedup": e2e["estimate"], "e2e_p50_speedup_ci": e2e["ci"]}
