"""YOLO11: C3k2 blocks (C2f with C3k or Bottleneck inside), SPPF, C2PSA attention (its split conv and its attention's
reshape rewritten, the attention pruned as one node), and the one-to-many Detect head with DFL and depthwise class
convs; NMS after the detector."""

from __future__ import annotations

from ultralytics.nn.modules.block import C3, DFL, SPPF, Bottleneck, C3k, PSABlock
from ultralytics.nn.modules.conv import Concat, Conv, DWConv
from ultralytics.nn.modules.head import Detect
from ultralytics.nn.tasks import DetectionModel

from pipeline.adapters.blocks import C2fSplit, C2PSASplit, DecoupledAttention
from pipeline.adapters.families.base import ModelFamily
from pipeline.adapters.families.yolov8 import PLAIN, has_one2one_head


class YOLO11(ModelFamily):
    name = "yolo11"
    title = "YOLO11"
    blocks = "C3k2 and C2PSA blocks, SPPF and a Detect head with DFL"
    post = "nms"
    known = (DetectionModel, Conv, DWConv, Bottleneck, C3k, C3, C2fSplit, C2PSASplit, PSABlock, DecoupledAttention,
             SPPF, Detect, DFL, Concat, *PLAIN)

    def matches(self, model, kinds):
        return not has_one2one_head(model) and bool(kinds & {"C3k2", "C2PSA"})
