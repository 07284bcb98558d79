"""Model families: what differs between YOLOv8, YOLO11 and YOLO26, and nothing else.

A `ModelFamily` answers, for the checkpoints of one family, every question a stage asks of a model's structure:

- `prepare(model)`: a rewritten copy the dependency graph sees through (the block rewrites of `blocks.py`), its
  modules checked against the ones this family's pruner knows;
- `protected_layers(model)`: what must never be cut (Detect's last box/class convs, the DFL);
- `trace(model, x)`: the forward the dependency graph is traced with (it must reach every conv: YOLO26's traces the
  raw outputs of both head branches, since inference returns the one-to-one branch's alone);
- `signature(model)`: the architecture, as (name, shape) of every conv and BN, that a reload must reproduce;
- `deploy_form(model)` and `macs_params(model, imgsz)`: the network that is exported, timed and counted (YOLO26:
  its one-to-one head alone, its output the per-anchor boxes and scores before the top-K selection);
- `float_decode_nodes(onnx_model, patterns)`: the head-decode nodes that stay float in an INT8 Q/DQ file;
- `post`: the post-processing after the detector (`nms` for YOLOv8 and YOLO11; `topk` for YOLO26's NMS-free
  one-to-one head), which is also the tail of the end-to-end graph (pipeline/quant/e2e.py).

The family is read from the checkpoint (`family_of`); the recipe key `model.family` overrides the detection where
the structure allows it. Stages call this interface, never a family module; an unsupported architecture (RT-DETR,
a segmentation or pose model, YOLOv10's head, a YOLOv5 or YOLOv9 backbone) is refused in one line naming it.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from pipeline.adapters.families.base import ModelFamily
from pipeline.core.errors import UserError

__all__ = ["ModelFamily", "family_named", "family_of", "SUPPORTED"]

SUPPORTED = "YOLOv8, YOLO11 and YOLO26 detection models"


def _registry() -> dict[str, ModelFamily]:
    from pipeline.adapters.families import FAMILIES

    return FAMILIES


NAMES = ("yolov8", "yolo11", "yolo26")


def family_named(name: str) -> ModelFamily:
    fams = _registry()
    if name not in fams:
        raise UserError(f"unknown model family '{name}' (one of {', '.join(fams)})")
    return fams[name]


def _kinds(model: nn.Module) -> set[str]:
    return {getattr(m, "source_type", type(m).__name__) for m in model.modules()}


def _head(model: nn.Module):
    layers = getattr(model, "model", None)
    return layers[-1] if isinstance(layers, nn.Sequential) and len(layers) else None


def family_of(model: nn.Module, override: str | None = None, where: str | Path | None = None) -> ModelFamily:
    """The family of an ultralytics DetectionModel, read from its structure (its head and blocks); `override` (the
    recipe's model.family) picks one where the structure allows it. Anything else is refused in one line."""
    head = type(_head(model)).__name__
    if head != "Detect":
        what = {"v10Detect": "YOLOv10's NMS-free head (v10Detect)", "RTDETRDecoder": "an RT-DETR decoder",
                "Segment": "a segmentation head", "Pose": "a pose head", "OBB": "an oriented-box head"}.get(
            head, f"a {head} head")
        raise UserError(f"the model has {what}: yolo-edge takes {SUPPORTED}", where)
    kinds = _kinds(model)
    fams = _registry()
    if override:
        fam = family_named(override)
        if not fam.matches(model, kinds):
            raise UserError(f"model.family is {override}, but the model is not one: a {fam.title} has "
                            f"{fam.requirement()}", where)
        return fam
    hits = [f for f in fams.values() if f.matches(model, kinds)]
    if not hits:
        seen = sorted(k for k in kinds if k[:1].isupper() and k not in ("Conv", "Concat", "Detect", "Sequential",
                                                                         "ModuleList", "DetectionModel"))
        raise UserError(f"the model's blocks ({', '.join(seen[:6])}) are not those of a YOLOv8 (C2f), YOLO11 "
                        f"(C3k2, C2PSA) or YOLO26 (C3k2, one-to-one head): yolo-edge takes {SUPPORTED}", where)
    return hits[0]
