"""PyTorch eager Runner over an in-memory model: what the pruning sensitivity scan evaluates candidates with
(no export per candidate). Same input/output contract as the ONNX Runtime runner."""

from __future__ import annotations

import numpy as np

from pipeline.backends.base import Runner


class TorchRunner(Runner):
    name = "torch"

    @classmethod
    def is_available(cls) -> tuple[bool, str]:
        return True, ""

    def __init__(self, model, imgsz: int):
        self.model = model.eval()
        self._shape = (1, 3, imgsz, imgsz)

    @property
    def input_name(self) -> str:
        return "images"

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self._shape

    def infer(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        import torch

        with torch.no_grad():  # not inference_mode: Detect caches anchors that a later traced forward reuses
            out = self.model(torch.from_numpy(feed[self.input_name]))
        return [(out[0] if isinstance(out, (tuple, list)) else out).numpy()]
