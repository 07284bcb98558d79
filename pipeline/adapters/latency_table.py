"""A device's layer-time table, and the latency it predicts for a pruned candidate.

The device bench records, with TensorRT's profiler, the milliseconds each layer of the unpruned model's engine takes
(pipeline/device/layer_times.py; `make deploy` brings the table back in runs/<run>/devices/<name>/device_report.json,
`layer_times`). Each layer that holds a convolution is keyed by that conv's module name (model.2.cv1.conv); what holds
none (resize, concat, the head's decode) is `other_ms`. A candidate's predicted latency is `other_ms` plus each conv's
time scaled by the share of its MACs the candidate keeps: a GPU conv's time follows its MACs more closely than a CPU
conv's (on ONNX Runtime small convs are mostly overhead; the dev box is timed, not predicted), and the table is
measured, not assumed: what it cannot see (a kernel that gets slower for a channel count TensorRT tiles badly) the
device bench of the pruned model shows afterwards.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pipeline.core.errors import UserError

SCHEMA = "yolo-edge/layer-times/1"


def check(table, where: str | Path) -> dict:
    """The table as recorded (its schema, its per-layer milliseconds), else one line naming the file."""
    if not isinstance(table, dict) or table.get("schema") != SCHEMA:
        raise UserError(f"not a layer-time table (expected schema {SCHEMA})", where)
    layers = table.get("layers")
    if not isinstance(layers, dict) or not layers or not all(
            isinstance(k, str) and isinstance(v, (int, float)) and v >= 0 for k, v in layers.items()):
        raise UserError("the layer-time table's 'layers' is not a non-empty {conv module: ms} mapping", where)
    if not isinstance(table.get("other_ms", 0.0), (int, float)) or table.get("other_ms", 0.0) < 0:
        raise UserError("the layer-time table's 'other_ms' is not a non-negative number", where)
    return table


def stock_name(model: nn.Module, name: str) -> str:
    """The conv's name in the stock ultralytics model (what a device's engine of the exported model is named by): a
    split block's cv0 and cv1 (blocks.py) are both halves of the stock block's cv1."""
    from pipeline.adapters.blocks import _SplitFirstConv

    for half in (".cv0.conv", ".cv1.conv"):
        if name.endswith(half):
            owner = name[: -len(half)]
            if isinstance(model.get_submodule(owner), _SplitFirstConv):
                return owner + ".cv1.conv"
    return name


def conv_macs(model: nn.Module, imgsz: int) -> dict[str, float]:
    """MACs of every conv of `model` (a deployed form) at one imgsz x imgsz image, by its stock module name."""
    out: dict[str, float] = {}
    hooks = []
    names = {m: n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}

    def hook(mod, inp, o):
        k = stock_name(model, names[mod])
        per_out = mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]
        out[k] = out.get(k, 0.0) + float(o.shape[1] * o.shape[2] * o.shape[3] * per_out)

    for m in names:
        hooks.append(m.register_forward_hook(hook))
    was = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, imgsz, imgsz, device=next(model.parameters()).device))
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    return out


def predict_ms(table: dict, base: dict[str, float], candidate: dict[str, float]) -> float:
    """The latency the table predicts for a candidate whose convs have `candidate` MACs where the base (the model the
    table was recorded on) has `base` (conv_macs of each)."""
    total = float(table.get("other_ms", 0.0))
    for name, ms in table["layers"].items():
        b = base.get(name)
        total += ms * (candidate.get(name, 0.0) / b if b else 1.0)
    return total


def coverage(table: dict, base: dict[str, float]) -> float:
    """The share of the table's conv time whose layers the model has (a table of another model shares little)."""
    layers = table["layers"]
    tot = sum(layers.values())
    return sum(v for k, v in layers.items() if k in base) / tot if tot else 0.0
