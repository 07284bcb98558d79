"""YOLOv8: C2f blocks (their chunked first conv split in two by the rewrite), SPPF, and the one-to-many Detect head
with DFL (16 bins) and plain 3x3 class convs; NMS after the detector."""

from __future__ import annotations

from torch import nn
from ultralytics.nn.modules.block import DFL, SPPF, Bottleneck
from ultralytics.nn.modules.conv import Concat, Conv
from ultralytics.nn.modules.head import Detect
from ultralytics.nn.tasks import DetectionModel

from pipeline.adapters.blocks import C2fSplit
from pipeline.adapters.families.base import ModelFamily

PLAIN = (nn.Sequential, nn.ModuleList, nn.Conv2d, nn.BatchNorm2d, nn.SiLU, nn.Identity, nn.MaxPool2d, nn.Upsample)


def has_one2one_head(model: nn.Module) -> bool:
    return getattr(model.model[-1], "one2one_cv2", None) is not None


class YOLOv8(ModelFamily):
    name = "yolov8"
    title = "YOLOv8"
    blocks = "C2f blocks, SPPF and a Detect head with DFL"
    post = "nms"
    known = (DetectionModel, Conv, Bottleneck, C2fSplit, SPPF, Detect, DFL, Concat, *PLAIN)

    def matches(self, model, kinds):
        return not has_one2one_head(model) and "C2f" in kinds and not kinds & {"C3k2", "C2PSA"}
