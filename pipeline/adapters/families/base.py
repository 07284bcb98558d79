"""The base of the model families (pipeline/adapters/family.py says what a family answers): what YOLOv8, YOLO11 and
YOLO26 share. A family module sets the class attributes and overrides what differs."""

from __future__ import annotations

import copy
from pathlib import Path

from torch import nn

from pipeline.core.errors import UserError


class ModelFamily:
    """One family's answers. Subclasses set the class attributes and override `matches`; the methods below are
    what the three supported families share."""

    name: str = ""  # the recipe's model.family value
    title: str = ""  # how the family is named to a user
    blocks: str = ""  # its characteristic blocks, for messages
    post: str = "nms"  # post-processing after the detector: "nms" | "topk"
    exported_post: str = "nms"  # what ultralytics' own ONNX export of the family ends in ("final": detections)
    train_args: dict = {}  # what every stock trainer and validator run of the family is given besides its settings
    known: tuple = ()  # module types its pruner knows (after `prepare`)

    def __repr__(self) -> str:
        return f"ModelFamily({self.name})"

    # ------------------------------------------------------------------ recognition
    def matches(self, model: nn.Module, kinds: set[str]) -> bool:
        """Whether `model` (whose module kinds, rewritten blocks by their source type, are `kinds`) is one of this
        family's."""
        raise NotImplementedError

    def requirement(self) -> str:
        """What a model must have to be treated as this family (for the refusal of a wrong model.family)."""
        return self.blocks

    # ------------------------------------------------------------------ pruning
    def prepare(self, model: nn.Module) -> nn.Module:
        """A rewritten FP32 copy, in eval mode, with gradients on: what the dependency graph is built on."""
        from pipeline.adapters.blocks import rewrite

        m = copy.deepcopy(model).float()
        rewrite(m)
        m.eval()  # after the rewrite: the split convs it builds are new modules, in training mode
        self.check_known(m)
        for p in m.parameters():
            p.requires_grad_(True)
        return m

    def check_known(self, model: nn.Module, where: str | Path | None = None) -> None:
        for name, m in model.named_modules():
            if not isinstance(m, self.known):
                raise UserError(f"module '{name}' ({type(m).__module__}.{type(m).__name__}) is not one the "
                                f"{self.title} pruner knows; it prunes {self.title} detection models "
                                f"({self.blocks})", where)

    def protected_layers(self, model: nn.Module) -> list[nn.Module]:
        """Detect's last conv of every box and class branch (one-to-many and one-to-one) and its DFL: their output
        channels are the boxes, bins and classes themselves."""
        det = model.model[-1]
        keep = [det.dfl] if isinstance(getattr(det, "dfl", None), nn.Module) else []
        for name in ("cv2", "cv3", "one2one_cv2", "one2one_cv3"):
            branch = getattr(det, name, None)
            if branch is not None:
                keep += [seq[-1] for seq in branch]
        return keep

    def customized_pruners(self) -> dict:
        from pipeline.adapters.blocks import DecoupledAttention
        from pipeline.adapters.pruning import AttentionPruner

        return {DecoupledAttention: AttentionPruner()}

    def trace(self, model: nn.Module, x):
        """The forward Torch-Pruning traces: the decoded predictions, which every conv of a one-head model feeds."""
        out = model(x)
        return out[0] if isinstance(out, tuple) else out

    def signature(self, model: nn.Module) -> list:
        """(name, weight shape) of every conv and BN: two models with the same signature have the same
        architecture."""
        return [[n, list(m.weight.shape)] for n, m in model.named_modules()
                if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))]

    # ------------------------------------------------------------------ deployment
    def deploy_form(self, model: nn.Module) -> nn.Module:
        """The network as it is exported, timed and counted; for YOLOv8 and YOLO11 the model itself."""
        return model

    def macs_params(self, model: nn.Module, imgsz: int) -> tuple[int, int]:
        """(MACs, parameters) of the deployed network at one imgsz x imgsz image (Torch-Pruning's counter)."""
        from pipeline.adapters.pruning import count_macs_params

        return count_macs_params(self.deploy_form(model), imgsz)

    def float_decode_nodes(self, onnx_model, patterns: list[str]) -> list[str]:
        """The ONNX nodes an INT8 Q/DQ file keeps float (quant/ort_qdq.head_decode_nodes's patterns)."""
        from pipeline.quant.ort_qdq import head_decode_nodes

        return head_decode_nodes(onnx_model, patterns)
