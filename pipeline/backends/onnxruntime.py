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
        # The worker threads stop spinning when a run ends: the bench times many sessions in turn (interleaved), and
        # a finished session's spinning workers would take a core from the next one. Measured on the 2-core dev box,
        # the default run's 9 models in shuffled rounds of 3 calls: pruned-fp32 p50 9.5 ms (IQR 6.9-16.2) against
        # 4.9 ms timed alone; with the spinning stopped 5.6 ms (IQR 5.4-5.9) against 5.2 ms alone.
        so.add_session_config_entry("session.force_spinning_stop", "1")
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
                "threads": self.threads, "spinning": "stops after each run"}
