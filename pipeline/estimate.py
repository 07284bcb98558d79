"""Rough stage durations for a recipe on this machine, scaled from one timed training batch and one timed CPU
forward (pipeline/adapters/train_timing.py): what `yolo-edge init` prints as its plan, and what the prune stage says
sparsity training will cost before it starts.

The scale factors are this project's own measurements on its 2-core dev box (README: "Pipeline cost"; sparsity
training ~30 s an epoch where the fine-tune takes ~23 s, quantize ~40 s, bench ~10 s; and, beside a timed batch, a
3-epoch fine-tune of 96 images at 320: ~12.5 s an epoch, estimated 13-15 s; a uniform cut of YOLO11n with its
reconstruction on 24 images: 83 s), expressed in units of the timed batch or forward, so they move with the model,
input size and machine. They are estimates to plan by (within a factor of ~2), not promises: other load on the
machine, disk speed and ultralytics' data loading on a GPU host change them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

TRAINER_OVERHEAD = 1.1  # optimizer step, EMA update and logging on top of forward + loss + backward
VAL_PER_IMAGE = 0.5  # a validation image costs this many training-batch images (forward only, larger batches, NMS)
EPOCH_FIXED_S = 1.0  # per epoch: dataloader restart, last.pt written
RUN_FIXED_S = 5.0  # per training run: trainer setup, label caches, the final validation's setup
SPARSITY_FACTOR = 1.3  # group regularization per step, fade bookkeeping, the fold back (README: ~30 vs ~23 s)


def prunable_groups(model, imgsz: int) -> int:
    """How many dependency groups of `model` (an ultralytics DetectionModel) the pruner can cut: 69 on YOLO11n,
    more on the deeper scales (m, l, x repeat their blocks)."""
    from pipeline.adapters import prune_plan as pp
    from pipeline.adapters.family import family_of

    fam = family_of(model)
    return len(pp.groups(fam.prepare(model), imgsz, fam))


@dataclass
class Timing:
    """What the timed batch measured (adapters/train_timing.time_train_batch)."""

    step_s: float  # forward + loss + backward of one batch on the training device
    load_s: float  # assembling one batch (augmentation, collate) in one process
    infer_img_s: float  # one image's eval forward on the CPU
    batch: int
    device: str = "cpu"
    workers: int = 2

    @classmethod
    def of(cls, t: dict, workers: int = 2) -> Timing:
        return cls(step_s=t["step_s"], load_s=t["load_s"], infer_img_s=t["infer_img_s"], batch=t["batch"],
                   device=t.get("device", "cpu"), workers=workers)


def epoch_seconds(t: Timing, n_train: int, n_val: int) -> float:
    """One ultralytics training epoch: every train batch, then validation on n_val images. On the CPU the trainer
    loads batches in the main process (it sets workers to 0 there); on a GPU its workers load beside the steps."""
    batches = math.ceil(n_train / t.batch)
    step = t.step_s * TRAINER_OVERHEAD
    per_batch = step + t.load_s if t.device == "cpu" else max(step, t.load_s / max(t.workers, 1))
    return batches * per_batch + n_val * VAL_PER_IMAGE * t.step_s / t.batch + EPOCH_FIXED_S


def training_seconds(t: Timing, epochs: int, n_train: int, n_val: int, factor: float = 1.0) -> float:
    return RUN_FIXED_S + epochs * epoch_seconds(t, n_train, n_val) * factor + n_val * VAL_PER_IMAGE * t.step_s / t.batch


@dataclass
class Stage:
    name: str
    seconds: float
    what: str


@dataclass
class Sizes:
    """What a plan scales with besides the timed batch: the train and bench-split image counts, all images (the data
    stage reads them all), the model's prunable dependency groups (`prunable_groups`: the sensitivity and latency
    scans prune them one by one)."""

    n_train: int
    n_val: int
    n_images: int | None = None
    groups: int = 0

    @property
    def images(self) -> int:
        return self.n_images if self.n_images is not None else self.n_train + self.n_val


# One function per stage, named in the stage registry (pipeline/stages/order.py): (recipe, timing, sizes) -> the
# stage's rough durations, each a Stage (the prune stage's sparsity training is a Stage of its own).

def data(r, t: Timing, z: Sizes) -> list[Stage]:
    if r.data.source == "synthetic":
        s = r.data.synthetic
        return [Stage("data", 2 + 0.03 * (s.train + s.val),
                      f"generate the synthetic data ({s.train} train / {s.val} val images), write both layouts")]
    return [Stage("data", 2 + 0.005 * z.images, f"validate {r.data.source} ({z.images} images), write YOLO and COCO "
                                                f"layouts")]


def load(r, t: Timing, z: Sizes) -> list[Stage]:
    weights = r.model.weights or r.model.arch
    return [Stage("load", 3, f"load {weights} at {r.model.imgsz}x{r.model.imgsz}, count params and MACs")]


def prune(r, t: Timing, z: Sizes) -> list[Stage]:
    p, n_train, n_val, I = r.prune, z.n_train, z.n_val, t.infer_img_s  # noqa: E741 - one CPU forward
    out = []
    held = max(n_train, 0)
    n_eval = min(p.sensitivity.images, held)
    n_rec = min(p.reconstruct.images, max(held - n_eval, 0)) or n_eval
    if p.sparsity.enabled:
        s = p.sparsity
        epochs = sum(ph.epochs for ph in s.phases)
        sec = training_seconds(t, epochs, n_train, n_val, SPARSITY_FACTOR) + RUN_FIXED_S * (len(s.phases) - 1)
        src = f"the shipped {s.shipped} if its record matches, else " if s.shipped else ""
        out.append(Stage("sparsity", sec, f"{src}sparsity training: {len(s.phases)} phases, {epochs} epochs on "
                                          f"{s.device} (the prune stage's first part; cached per key)"))
    target = (f"{p.macs_target:g}x the MACs" + (" at most" if p.macs_at_most else f" ±{p.tolerance:g}")
              if p.ratio is None else f"channel ratio {p.ratio:g}")
    sec = 20 + 100 * I  # the bisection's trial cuts (~15 on YOLO11n with macs_at_most), each counted
    what = f"cut channels ({p.mode}) to {target}, round_to {p.round_to}"
    if p.mode != "uniform":
        sec += z.groups * n_eval * I * 1.3 + (3 * p.sensitivity.latency_runs * I if p.mode == "latency" else 0)
        what += f", after a per-group scan on {n_eval} held-out train images"
    if p.reconstruct.enabled or p.mode != "uniform" or p.steps > 1:
        sec += 2 * n_eval * I * 1.3
    if p.reconstruct.enabled:
        sec += 15 + 25 * n_rec * I  # each conv refit in turn on the images' features, then solved
        what += f"; refit the convs on {n_rec} held-out train images"
    if p.steps > 1:
        sec += (p.steps - 1) * training_seconds(t, p.step_epochs, n_train, n_val)
        what += f"; {p.steps} steps, {p.step_epochs} fine-tune epochs between them"
    return out + [Stage("prune", sec, what)]


def finetune(r, t: Timing, z: Sizes) -> list[Stage]:
    f = r.finetune
    return [Stage("finetune", training_seconds(t, f.epochs, z.n_train, z.n_val),
                  f"{f.epochs} epochs on {f.device}, {f.optimizer} lr {f.lr0 if f.lr0 is not None else 'auto'}"
                  f", batch {f.batch}, an optimizer step every "
                  + (f"{round(f.nbs / f.batch)} batches" if round(f.nbs / f.batch) > 1 else "batch")
                  + (", distilled from the unpruned model" if f.distill.enabled else ""))]


def _models(r) -> int:
    return 2 if r.prune.enabled else 1


def export(r, t: Timing, z: Sizes) -> list[Stage]:
    n = _models(r)
    return [Stage("export", n * (8 + 10 * t.infer_img_s), f"ONNX (opset {r.export.opset}) of {n} model(s), "
                                                          f"parity-checked against PyTorch")]


def _calib_images(r, z: Sizes) -> int:
    c = r.calib
    return min(c.count, z.n_train) if c.source == "train" else c.count


def calibrate(r, t: Timing, z: Sizes) -> list[Stage]:
    n = _calib_images(r, z)
    return [Stage("calibrate", 1 + 0.01 * n, f"{n} calibration images from the train split")]


def quantize(r, t: Timing, z: Sizes) -> list[Stage]:
    q, p, n, I = r.quantize, r.prune, _models(r), t.infer_img_s  # noqa: E741
    calib = _calib_images(r, z)
    sel = r.data.selection.images  # data.selection: the search tunes on it (images no training saw)
    pool = sel if sel else max(z.n_train - calib, 0)
    tuning = min(r.calib.tuning_images, pool) if q.accuracy_aware.enabled and p.enabled else 0
    return [Stage("quantize", 15 + 2 * n * calib * I + 4 * tuning * I + (10 + calib * I if q.peer else 0),
                  f"INT8 Q/DQ ({q.backend}, {q.method}) of {n} model(s)"
                  + (f", accuracy-aware on {tuning} {'selection' if sel else 'held-out train'} images"
                     if tuning else "")
                  + (", ultralytics' INT8 beside it" if q.peer else ""))]


def bench(r, t: Timing, z: Sizes) -> list[Stage]:
    n, q, b, I = _models(r), r.quantize, r.bench, t.infer_img_s  # noqa: E741
    variants = n
    if q.enabled:
        variants += n + (1 if r.prune.enabled else 0) + (1 if q.peer and r.prune.enabled else 0)
    # timing: engine-only and end-to-end of every variant in shared rounds; a quiet box converges in ~20 rounds
    timing = min(b.cap_s, 2 * variants * (b.warmup + max(b.min_rounds, 20) * b.per_round) * I * 0.5)
    return [Stage("bench", variants * (z.n_val * I * 0.5 + 0.5) + timing
                  + n * (3 + 1.5 * z.n_val * I),  # ultralytics' validator on the FP32 models, beside it
                  f"{variants} variant(s) on the {z.n_val} '{b.split}' images ({b.runner}, {b.threads} threads), "
                  f"cross-checked with ultralytics' validator")]


def human(seconds: float) -> str:
    """A duration the way a plan states it: 40 s, 3 min, 1.4 h, 2.3 days."""
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    if seconds < 90 * 60:
        return f"{round(seconds / 60)} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def sparsity_eta(cfg, imgsz: int, model_path, data_yaml, epochs: int, n_train: int, n_val: int) -> str:
    """`epochs` of sparsity training (cfg: the recipe's prune.sparsity) of the model at `model_path` on the data of
    `data_yaml` (n_train train and n_val bench-split images), in words: '~3.1 h on cpu (estimated from one timed
    batch)'. Timing takes one batch; a failure to time says so instead of stopping the run."""
    from pathlib import Path

    from pipeline.adapters import ultralytics_yolo as ua
    from pipeline.adapters.train_timing import time_train_batch
    from pipeline.core.errors import UserError

    try:
        t = Timing.of(time_train_batch(ua.load_detection_model(model_path), Path(data_yaml), imgsz, cfg.batch,
                                       cfg.device), cfg.workers)
    except (UserError, OSError, KeyError, RuntimeError) as e:
        return f"time not estimated (timing a batch failed: {str(e).splitlines()[0][:120]})"
    sec = training_seconds(t, epochs, n_train, n_val, SPARSITY_FACTOR)
    return f"~{human(sec)} on {t.device} (estimated from one timed batch: {t.step_s:.2f} s)"
