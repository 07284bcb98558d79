"""One interface over inference libraries: a Runner runs a model, an EngineBuilder makes one.

`infer(feed) -> outputs` takes {input name: array} and returns the outputs as numpy arrays in the model's
order. Backends import their library lazily and answer `is_available()`, so the evaluator and the timer
serve ONNX Runtime on any CPU and TensorRT on a Jetson without knowing which they hold."""

from __future__ import annotations

import time
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


class SlowedRunner(Runner):
    """Fault injection: another runner whose every `infer` call really takes `factor` × its own duration (the call,
    then a busy wait for the extra time, measured per call with perf_counter), so the timer and the gate see a
    slower model, not an edited number. Other attributes (a TensorRT runner's, say) are the wrapped runner's."""

    def __init__(self, inner: Runner, factor: float):
        if not factor >= 1:
            raise ValueError(f"a slowdown factor is at least 1, got {factor}")
        self.inner, self.factor = inner, float(factor)
        self.name = inner.name

    @classmethod
    def is_available(cls) -> tuple[bool, str]:
        return True, ""

    @property
    def input_name(self) -> str:
        return self.inner.input_name

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.inner.input_shape

    def infer(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        t0 = time.perf_counter()
        out = self.inner.infer(feed)
        t1 = time.perf_counter()
        end = t1 + (t1 - t0) * (self.factor - 1)
        while time.perf_counter() < end:
            pass
        return out

    def describe(self) -> dict:
        return self.inner.describe()

    def __getattr__(self, name: str):
        if name == "inner":  # not set yet: no wrapped runner to ask
            raise AttributeError(name)
        return getattr(self.inner, name)


def slowed(runner: Runner, factor: float | None) -> Runner:
    """`runner` as it is, or made `factor` times slower (bench.inject_slowdown)."""
    return runner if factor is None else SlowedRunner(runner, factor)
