"""The runner for a backend name: the one place that knows every backend module (they import `base`, not this)."""

from __future__ import annotations

from pipeline.backends.base import Runner
from pipeline.core.errors import UserError


def get_runner(kind: str, model_path, **kw) -> Runner:
    if kind == "onnxruntime":
        from pipeline.backends.onnxruntime import OnnxRuntimeRunner as cls
    elif kind == "tensorrt":
        from pipeline.backends.tensorrt import TensorRTRunner as cls
    else:
        raise ValueError(f"unknown runner {kind}")
    ok, why = cls.is_available()
    if not ok:
        raise UserError(f"runner '{kind}' is not available here: {why}")
    return cls(model_path, **kw)
