"""A TensorRT engine's per-layer milliseconds, by the conv module each layer holds: the table a latency target of
the prune stage reads (pipeline/adapters/latency_table.py). No torch, no ultralytics.

TensorRT names a fused layer after the ONNX nodes it holds ("/model.2/cv1/conv/Conv + PWN(/model.2/cv1/act/Sigmoid,
/model.2/cv1/act/Mul)"); the conv node's scope is the module's name (model.2.cv1.conv). A layer without a conv goes
to `other_ms`. Timing uses TensorRT's IProfiler on the execution context (synchronous calls), the mean over `runs`.
"""

from __future__ import annotations

import re

SCHEMA = "yolo-edge/layer-times/1"
_CONV_NODE = re.compile(r"^/?(.+)/Conv(?:_\d+)?$")


def module_path(onnx_scope: str) -> str:
    """A torch-exported ONNX node's scope as the module's name: each scope inside a Sequential or ModuleList repeats
    its parent's ("/model.23/cv3.2/cv3.2.0/conv" is model.23.cv3.2.0.conv)."""
    out: list[str] = []
    for part in onnx_scope.strip("/").split("/"):
        if out and part.startswith(out[-1] + "."):
            out[-1] = part
        else:
            out.append(part)
    return ".".join(out)


def module_of(layer: str) -> str | None:
    """The conv module a TensorRT layer holds (its first Conv node's), else None (a reformatting layer TensorRT adds
    between two layers holds none: its time is not the conv's)."""
    if layer.startswith("Reformatting"):
        return None
    for token in re.split(r"[\s+(),]+", layer):
        m = _CONV_NODE.match(token)
        if m:
            return module_path(m.group(1))
    return None


def table(layer_ms: dict[str, float], *, variant: str, imgsz: int, device: dict, runs: int) -> dict:
    """The layer-time table from {TensorRT layer name: mean ms}."""
    layers: dict[str, float] = {}
    other = 0.0
    for name, ms in layer_ms.items():
        mod = module_of(name)
        if mod is None:
            other += ms
        else:
            layers[mod] = layers.get(mod, 0.0) + ms
    return {"schema": SCHEMA, "variant": variant, "imgsz": imgsz, "runs": runs, "device": device,
            "layers": layers, "other_ms": other, "total_ms": other + sum(layers.values())}


def profile(runner, feed: dict, runs: int = 20) -> dict[str, float]:
    """Mean milliseconds per layer of a Polygraphy TrtRunner's engine (activated), over `runs` synchronous calls."""
    import tensorrt as trt

    class _Profiler(trt.IProfiler):
        def __init__(self):
            super().__init__()
            self.ms: dict[str, float] = {}

        def report_layer_time(self, layer_name, ms):
            self.ms[layer_name] = self.ms.get(layer_name, 0.0) + ms

    prof = _Profiler()
    ctx = runner.context
    ctx.profiler = prof
    try:
        for _ in range(runs):
            runner.infer(feed)
    finally:
        ctx.profiler = None
    return {k: v / runs for k, v in prof.ms.items()}
