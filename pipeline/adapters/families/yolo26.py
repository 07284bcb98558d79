"""YOLO26: YOLO11's blocks (C3k2, some with a PSA attention block inside; SPPF with a residual; C2PSA) and an
NMS-free Detect head without DFL (reg_max 1): a one-to-one branch, trained beside a one-to-many one, whose top-K
scores are the detections. Both branches read the neck, so both are pruned alike; only the one-to-one branch is
deployed.

Deployed form: the one-to-many branch dropped (as ultralytics' own fuse does) and the head's output stopped before
its top-K selection: (1, 4 + nc, anchors), boxes x1y1x2y2 in input pixels, then class scores. The selection
(ultralytics' `Detect.get_topk_index`: the max_det anchors with the best class score, then the max_det best
(anchor, class) pairs among them) runs after the detector: in post-processing (`post = "topk"`, numpy) and as the
tail of the end-to-end graph. So the detector file has the same form as YOLOv8's and YOLO11's, its INT8
calibration, parity and output-error checks apply unchanged, and no TopK sits inside the quantized network."""

from __future__ import annotations

import copy

from ultralytics.nn.modules.block import C3, SPPF, Bottleneck, C3k, PSABlock
from ultralytics.nn.modules.conv import Concat, Conv, DWConv
from ultralytics.nn.modules.head import Detect
from ultralytics.nn.tasks import DetectionModel

from pipeline.adapters.blocks import C2fSplit, C2PSASplit, DecoupledAttention
from pipeline.adapters.families.base import ModelFamily
from pipeline.adapters.families.yolov8 import PLAIN, has_one2one_head


class One2OneRawDetect(Detect):
    """YOLO26's Detect, one-to-one branch only, returning the decoded per-anchor boxes (x1y1x2y2) and scores instead
    of the top-K detections: `postprocess` (ultralytics' top-K step) gives its input back in the head's layout."""

    def postprocess(self, preds):
        return preds.permute(0, 2, 1)


class YOLO26(ModelFamily):
    name = "yolo26"
    title = "YOLO26"
    blocks = "C3k2 blocks and an NMS-free one-to-one Detect head"
    post = "topk"
    exported_post = "final"  # ultralytics exports the end-to-end head with its top-K: (1, max_det, 6) detections
    # ultralytics 8.4 validates a YOLO26 with its one-to-many branch and NMS unless told `nms=False`: the epochs'
    # val mAP (convergence checks, fine-tune histories) and the cross-check then score the deployed one-to-one head
    train_args = {"nms": False}
    known = (DetectionModel, Conv, DWConv, Bottleneck, C3k, C3, C2fSplit, C2PSASplit, PSABlock, DecoupledAttention,
             SPPF, Detect, Concat, *PLAIN)

    def matches(self, model, kinds):
        return has_one2one_head(model)

    def requirement(self):
        return "a one-to-one (NMS-free) Detect head"

    def trace(self, model, x):
        """The raw box and class outputs of both head branches (eval mode returns them beside the detections): the
        one-to-many branch reads the neck too, so the graph must reach it, and never the top-K selection, which no
        channel passes through (Torch-Pruning cannot map channels through its gathers)."""
        preds = model(x)[1]
        return [preds[b][k] for b in ("one2many", "one2one") for k in ("boxes", "scores")]

    def deploy_form(self, model):
        m = copy.deepcopy(model)
        det = m.model[-1]
        if type(det) is Detect:
            det.__class__ = One2OneRawDetect
        det.cv2 = det.cv3 = None  # the one-to-many branch: training only
        det.end2end = True
        return m
