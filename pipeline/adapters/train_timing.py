"""Timing one real training batch with ultralytics' own dataset, augmentation, collate and loss (the trainer's
per-batch work), and one inference forward on the CPU: what `yolo-edge init` and the sparsity-training notice
scale into stage estimates (pipeline/estimate.py). Nothing is trained: the gradients are dropped."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from pipeline.adapters.offline import cpu_threads
from pipeline.core.errors import UserError


def torch_device(device: str) -> torch.device:
    """The first device of an ultralytics device string (cpu, 0, cuda:0, 0,1, mps)."""
    d = str(device).strip().lower()
    if d in ("", "cpu"):
        return torch.device("cpu")
    if d == "mps":
        if not torch.backends.mps.is_available():
            raise UserError("--device mps: no Apple MPS device here")
        return torch.device("mps")
    first = d.replace("cuda:", "").split(",")[0].strip()
    if not first.isdigit():
        raise UserError(f"device '{device}' is not cpu, mps or a CUDA index (0, cuda:0, 0,1)")
    if not torch.cuda.is_available() or int(first) >= torch.cuda.device_count():
        raise UserError(f"device '{device}': no such CUDA device here ({torch.cuda.device_count()} visible)")
    return torch.device(f"cuda:{first}")


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_train_batch(model, data_yaml: str | Path, imgsz: int, batch: int, device: str = "cpu") -> dict:
    """Seconds for one training batch of `model` (a DetectionModel, left unchanged) on the train split of
    `data_yaml`: `load_s` assembles it as the trainer's dataset does (mosaic and the other default augmentations,
    collate), `step_s` runs forward + loss + backward at (batch, imgsz) on `device` (the second of two), and
    `infer_img_s` is one image's eval forward on the CPU (where the prune, quantize and bench stages run). A split
    smaller than `batch` is timed at its size, as the trainer batches it; `batch` in the result says which."""
    dev = torch_device(device)
    threads = torch.get_num_threads()
    try:
        if dev.type == "cpu":
            torch.set_num_threads(cpu_threads())  # as the trainer's callback does (ultralytics_yolo._all_cpu_threads)
        return _time(model, data_yaml, imgsz, batch, dev)
    finally:
        torch.set_num_threads(threads)  # the caller's (a stage in progress) as it was


def _time(model, data_yaml, imgsz: int, batch: int, dev: torch.device) -> dict:
    import contextlib
    import io
    import logging
    from copy import deepcopy

    from ultralytics.cfg import get_cfg
    from ultralytics.data import build_yolo_dataset
    from ultralytics.data.utils import check_det_dataset
    from ultralytics.utils import LOGGER

    cfg = get_cfg(overrides={"imgsz": imgsz, "batch": batch, "workers": 0})
    m = deepcopy(model).float()
    stride = int(max(int(m.stride.max()), 32)) if hasattr(m, "stride") else 32
    level, quiet = LOGGER.level, io.StringIO()
    try:  # the dataset scan's progress lines and notices: not this command's output (its errors still raise)
        LOGGER.setLevel(logging.WARNING)
        with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
            data = check_det_dataset(str(data_yaml))
            ds = build_yolo_dataset(cfg, data["train"], batch, data, mode="train", stride=stride)
    finally:
        LOGGER.setLevel(level)
    if len(ds) == 0:
        raise UserError("the train split has no images to time a batch on", data_yaml)
    batch = min(batch, len(ds))  # the trainer's batches are no larger than the split

    t0 = time.perf_counter()
    b = ds.collate_fn([ds[i % len(ds)] for i in range(batch)])
    load_s = time.perf_counter() - t0

    m.args = cfg
    m.criterion = None
    m = m.to(dev).train()
    for p in m.parameters():
        p.requires_grad_(True)

    def step(k: int) -> None:
        keep = b["batch_idx"] < k
        sub = {"img": b["img"][:k].to(dev).float() / 255, "cls": b["cls"][keep].to(dev),
               "bboxes": b["bboxes"][keep].to(dev), "batch_idx": b["batch_idx"][keep].to(dev)}
        loss, _ = m.loss(sub)
        loss.sum().backward()
        m.zero_grad(set_to_none=True)

    step(batch)  # warm-up at the batch's own shapes: the criterion, allocations, kernel selection (a first pass
    _sync(dev)    # at a new shape costs several times a later one on the CPU)
    t0 = time.perf_counter()
    step(batch)
    _sync(dev)
    step_s = time.perf_counter() - t0

    cpu = deepcopy(model).float().cpu().eval()
    x = b["img"][:1].float() / 255
    with torch.no_grad():
        cpu(x)  # warm-up
        times = []
        for _ in range(3):  # cheap: the least of three, as a timer would report it
            t0 = time.perf_counter()
            cpu(x)
            times.append(time.perf_counter() - t0)
    infer_img_s = min(times)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return {"load_s": load_s, "step_s": step_s, "infer_img_s": infer_img_s, "batch": batch, "imgsz": imgsz,
            "device": str(dev), "cpu_threads": torch.get_num_threads()}
