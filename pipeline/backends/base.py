"""One interface over inference libraries: a Runner runs a model, an EngineBuilder makes one.

`infer(feed) -> outputs` takes {input name: array} and returns the outputs as numpy arrays in the model's
order. Backends import their library lazily and answer `is_available()`, so the evaluator and the timer
serve ONNX Runtime on any CPU and TensorRT on a Jetson without knowing which they hold."""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np


class Runner(ABC):
    name: str = "runner"

    @classmethod
    @abstractmethod
    def is_available(cls) -> tuple[bool, str]:
        """(available, reason when not)."""

    @property
    @abstractmethod
    def input_name(self) -> str: ...

    @property
    @abstractmethod
    def input_shape(self) -> tuple[int, ...]: ...

    @abstractmethod
    def infer(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]: ...

    def describe(self) -> dict:
        return {"runner": self.name}


def get_runner(kind: str, model_path, **kw) -> Runner:
    if kind == "onnxruntime":
        from pipeline.backends.onnxruntime import OnnxRuntimeRunner as cls
    elif kind == "tensorrt":
        from pipeline.backends.tensorrt import TensorRTRunner as cls
    else:
        raise ValueError(f"unknown runner {kind}")
    ok, why = cls.is_available()
    if not ok:
        from pipeline.core.errors import UserError

        raise UserError(f"runner '{kind}' is not available here: {why}")
    return cls(model_path, **kw)
