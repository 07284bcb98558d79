"""ONNX Runtime Runner (CPU everywhere; CUDA where onnxruntime-gpu is installed and asked for)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.backends.base import Runner
from pipeline.core.errors import UserError


class OnnxRuntimeRunner(Runner):
    name = "onnxruntime"

    @classmethod
    def is_available(cls) -> tuple[bool, str]:
        try:
            import onnxruntime  # noqa: F401
        except ImportError as e:
            return False, f"onnxruntime is not importable ({e})"
        return True, ""

    def __init__(self, model_path: str | Path, threads: int = 2, providers: list[str] | None = None):
        import onnxruntime as ort

        self.path = Path(model_path)
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        try:
            self.sess = ort.InferenceSession(str(self.path), so, providers=providers or ["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
            raise UserError(f"ONNX Runtime cannot load the model: {str(e).splitlines()[0][:200]}", self.path) from None
        self.threads = threads
        inp = self.sess.get_inputs()[0]
        self._input_name = inp.name
        self._input_shape = tuple(d if isinstance(d, int) else -1 for d in inp.shape)
        self.output_names = [o.name for o in self.sess.get_outputs()]

    @property
    def input_name(self) -> str:
        return self._input_name

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self._input_shape

    def infer(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.sess.run(self.output_names, feed)

    def describe(self) -> dict:
        import onnxruntime as ort

        return {"runner": self.name, "version": ort.__version__, "providers": self.sess.get_providers(),
                "threads": self.threads}
