"""TensorRT EngineBuilder and Runner (TensorRT 10 and 11 tensor API; runs on the Jetson or any NVIDIA GPU).

TensorRT is imported lazily: on the dev box it is absent and `is_available()` says so, the tests that need it
skip with that reason. Device memory goes through cuda-python's runtime bindings (`cuda.bindings.runtime`,
or the older `cuda.cudart`), which JetPack's Python stack installs with `pip install cuda-python`.

An engine is cached under a key of (onnx digest, build spec, TensorRT version, device name): plans are not
portable across GPUs or TensorRT versions. The plan is a plain TensorRT plan (`trtexec --loadEngine` reads
it) with a sidecar JSON that records requested vs effective precision.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pipeline.backends.base import Runner
from pipeline.core.errors import UserError
from pipeline.core.store import atomic_path, sha256_file, sha256_json


def _trt():
    import tensorrt as trt

    return trt


def _cudart():
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        from cuda import cudart
    return cudart


def _check(ret):
    err, *rest = ret if isinstance(ret, tuple) else (ret,)
    if int(err) != 0:
        raise RuntimeError(f"CUDA runtime error {err}")
    return rest[0] if len(rest) == 1 else rest


def tensorrt_available() -> tuple[bool, str]:
    try:
        trt = _trt()
    except ImportError as e:
        return False, f"tensorrt is not importable ({e}); it ships with JetPack on the device"
    try:
        _cudart()
    except ImportError as e:
        return False, f"tensorrt {trt.__version__} found but cuda-python is not importable ({e})"
    return True, ""


@dataclass(frozen=True)
class BuildSpec:
    precision: str = "int8"  # "fp32" | "fp16" | "int8" (int8 = the ONNX's explicit Q/DQ, rest fp16)
    workspace_mib: int = 2048
    dla_core: int = -1  # -1: GPU only
    builder_optimization_level: int = 3

    def as_dict(self) -> dict:
        return asdict(self)


class EngineBuilder:
    @staticmethod
    def is_available() -> tuple[bool, str]:
        return tensorrt_available()

    def cache_key(self, onnx_path: Path, spec: BuildSpec) -> str:
        trt = _trt()
        cudart = _cudart()
        props = _check(cudart.cudaGetDeviceProperties(0))
        dev = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
        return sha256_json({"onnx": sha256_file(onnx_path), "spec": spec.as_dict(), "trt": trt.__version__,
                            "device": dev, "sm": [props.major, props.minor]})

    def build(self, onnx_path: str | Path, spec: BuildSpec, cache_dir: str | Path) -> Path:
        trt = _trt()
        onnx_path = Path(onnx_path)
        key = self.cache_key(onnx_path, spec)
        plan = Path(cache_dir) / f"{onnx_path.stem}-{key[:16]}.plan"
        if plan.is_file() and plan.with_suffix(".json").is_file():
            return plan
        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        flags = 0
        if hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):  # TensorRT < 10 needs it; 10+ ignores
            flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse(onnx_path.read_bytes()):
            errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise UserError(f"TensorRT's ONNX parser refuses the model: {errs[:300]}", onnx_path)
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, spec.workspace_mib << 20)
        config.builder_optimization_level = spec.builder_optimization_level
        effective = {"precision": "fp32", "dla": False}
        if spec.precision in ("fp16", "int8"):
            if hasattr(trt.BuilderFlag, "FP16"):
                config.set_flag(trt.BuilderFlag.FP16)
                effective["precision"] = "fp16"
        if spec.precision == "int8":
            # Explicit quantization: scales come from the Q/DQ nodes. TensorRT 10 still wants the INT8 flag to
            # honour them in a weakly typed network; TensorRT 11 removed the flag and reads Q/DQ as they are.
            if hasattr(trt.BuilderFlag, "INT8"):
                config.set_flag(trt.BuilderFlag.INT8)
            effective["precision"] = "int8-qdq+fp16"
        if spec.dla_core >= 0:
            if builder.num_DLA_cores <= spec.dla_core:
                raise UserError(f"DLA core {spec.dla_core} requested but this device has {builder.num_DLA_cores}")
            config.default_device_type = trt.DeviceType.DLA
            config.DLA_core = spec.dla_core
            config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
            effective["dla"] = True
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise UserError("TensorRT failed to build an engine (see the TensorRT log above)", onnx_path)
        with atomic_path(plan) as tmp:
            tmp.write_bytes(bytes(serialized))
        meta = {"onnx": str(onnx_path), "key": key, "requested": spec.as_dict(), "effective": effective,
                "tensorrt": trt.__version__}
        with atomic_path(plan.with_suffix(".json")) as tmp:
            tmp.write_text(json.dumps(meta, indent=1))
        return plan


class TensorRTRunner(Runner):
    name = "tensorrt"

    @classmethod
    def is_available(cls) -> tuple[bool, str]:
        return tensorrt_available()

    def __init__(self, plan_path: str | Path, **_):
        trt = _trt()
        self.cudart = _cudart()
        self.path = Path(plan_path)
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise UserError("not a TensorRT plan for this device and TensorRT version", self.path)
        self.context = self.engine.create_execution_context()
        self.stream = _check(self.cudart.cudaStreamCreate())
        self.inputs, self.outputs, self.buffers = [], [], {}
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            shape = tuple(self.engine.get_tensor_shape(name))
            dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(name)))
            host = np.empty(shape, dtype)
            dev = _check(self.cudart.cudaMalloc(host.nbytes))
            self.buffers[name] = (host, dev)
            self.context.set_tensor_address(name, dev)
            is_in = self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            (self.inputs if is_in else self.outputs).append(name)

    @property
    def input_name(self) -> str:
        return self.inputs[0]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.buffers[self.inputs[0]][0].shape

    def infer(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        rt = self.cudart
        h2d, d2h = rt.cudaMemcpyKind.cudaMemcpyHostToDevice, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for name in self.inputs:
            host, dev = self.buffers[name]
            np.copyto(host, feed[name])
            _check(rt.cudaMemcpyAsync(dev, host.ctypes.data, host.nbytes, h2d, self.stream))
        self.context.execute_async_v3(self.stream)
        outs = []
        for name in self.outputs:
            host, dev = self.buffers[name]
            _check(rt.cudaMemcpyAsync(host.ctypes.data, dev, host.nbytes, d2h, self.stream))
            outs.append(host)
        _check(rt.cudaStreamSynchronize(self.stream))
        return [o.copy() for o in outs]

    def describe(self) -> dict:
        return {"runner": self.name, "version": _trt().__version__, "plan": str(self.path)}

    def __del__(self):
        for _, dev in getattr(self, "buffers", {}).values():
            self.cudart.cudaFree(dev)
