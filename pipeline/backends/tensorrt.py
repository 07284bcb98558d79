"""TensorRT EngineBuilder and Runner through Polygraphy's loaders (TensorRT 10 on JetPack 6, and TensorRT 11).

Strongly typed only. TensorRT 11 removed the weak-typing API (the FP16 and INT8 builder flags, INT8 calibrators,
platform_has_fast_fp16); TensorRT 10 has NetworkDefinitionCreationFlag.STRONGLY_TYPED. Every tensor's precision is
decided on the dev box and written into the ONNX (pipeline.quant.fp16, the quantize stage's Q/DQ), so the builder
here never sets a precision flag: `BuildSpec.precision` only names which ONNX variant the plan was built from. A test
greps the package for the flags.

Polygraphy API relied on (polygraphy.backend.trt, 0.49+; docs.nvidia.com .../polygraphy/backend/trt/loader.html):
- NetworkFromOnnxPath(path, strongly_typed=True): parses with the ONNX parser into a strongly typed network;
- CreateConfig(builder_optimization_level=, load_timing_cache=): never fp16=/int8= (they would set BuilderFlags);
  not use_dla= either (on TensorRT < 11 it also sets PREFER_PRECISION_CONSTRAINTS): DLA is set in PostprocessConfig;
- PostprocessConfig(config, func): workspace pool, DLA core + GPU_FALLBACK, and which layers cannot run on DLA
  (IBuilderConfig.can_run_on_DLA) recorded as fallbacks;
- EngineFromNetwork(network, config, save_timing_cache=): builds, merges the timing cache back into the file;
- SaveEngine(engine, path): a plain TensorRT plan (`trtexec --loadEngine` reads it);
- TrtRunner(EngineFromBytes(BytesFromPath(plan))): device buffers and streams (no hand-written CUDA buffer code).

Polygraphy imports tensorrt lazily: the loader chain can be built and inspected on a machine without TensorRT (the
tests do); calling it imports TensorRT. An engine is cached under (ONNX sha256, build spec, TensorRT version, device
name, SM, L4T release) and carries a sidecar JSON; a plan whose sidecar names another TensorRT or device is refused.
"""

from __future__ import annotations

import ctypes
import json
import shlex
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pipeline.backends.base import Runner
from pipeline.core.errors import UserError
from pipeline.core.store import atomic_path, sha256_file, sha256_json

PRECISIONS = ("fp32", "fp16", "int8")
NV_TEGRA_RELEASE = Path("/etc/nv_tegra_release")


def _trt():
    import tensorrt as trt

    return trt


def tensorrt_available() -> tuple[bool, str]:
    try:
        _trt()
    except ImportError as e:
        return False, f"tensorrt is not importable ({e}); it ships with JetPack on the device"
    try:
        import polygraphy  # noqa: F401
    except ImportError as e:
        return False, f"polygraphy is not importable ({e}): pip install polygraphy"
    return True, ""


@dataclass(frozen=True)
class BuildSpec:
    """What the build is asked for. `precision` names the strongly typed ONNX variant (its tensors carry the types);
    it sets no builder flag."""

    precision: str = "int8"  # "fp32" | "fp16" | "int8" (int8: explicit Q/DQ with FP16 around, in the ONNX)
    workspace_mib: int = 2048
    dla_core: int = -1  # -1: GPU only; >= 0: that DLA core, layers it cannot run fall back to the GPU
    builder_optimization_level: int = 3

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise UserError(f"unknown precision '{self.precision}' (one of {', '.join(PRECISIONS)})")
        if not 0 <= self.builder_optimization_level <= 5:
            raise UserError(f"builder_optimization_level {self.builder_optimization_level} outside 0..5")

    def as_dict(self) -> dict:
        return asdict(self)


# ---- where it runs: TensorRT version, GPU name, SM, L4T release ----------------------------------------------------

def l4t_release(path: Path = NV_TEGRA_RELEASE) -> str | None:
    """'R36.3.0' from '# R36 (release), REVISION: 3.0, GCID: ...' (JetPack's /etc/nv_tegra_release), else None."""
    try:
        line = path.read_text().splitlines()[0]
    except (OSError, IndexError):
        return None
    import re

    m = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", line)
    return f"R{m.group(1)}.{m.group(2)}" if m else line.strip("# ").strip()[:40] or None


def gpu_info() -> dict:
    """Name and compute capability of GPU 0 through the CUDA driver API (libcuda: present wherever TensorRT runs;
    no cuda-python needed)."""
    for lib in ("libcuda.so.1", "libcuda.so"):
        try:
            cu = ctypes.CDLL(lib)
            break
        except OSError:
            cu = None
    if cu is None:
        return {"device": "unknown", "sm": None}
    dev, major, minor = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    name = ctypes.create_string_buffer(256)
    if cu.cuInit(0) != 0 or cu.cuDeviceGet(ctypes.byref(dev), 0) != 0:
        return {"device": "unknown", "sm": None}
    cu.cuDeviceGetName(name, 256, dev)
    cu.cuDeviceGetAttribute(ctypes.byref(major), 75, dev)  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR
    cu.cuDeviceGetAttribute(ctypes.byref(minor), 76, dev)  # ..._MINOR
    return {"device": name.value.decode(errors="replace"), "sm": f"{major.value}.{minor.value}"}


def here() -> dict:
    """The build/run environment a plan is tied to."""
    return {"tensorrt": _trt().__version__, **gpu_info(), "l4t": l4t_release()}


ENV_KEYS = ("tensorrt", "device", "sm", "l4t")


def cache_key(onnx_sha256: str, spec: BuildSpec, env: dict) -> str:
    return sha256_json({"onnx": onnx_sha256, "spec": spec.as_dict(), **{k: env.get(k) for k in ENV_KEYS}})


def check_compatible(sidecar: dict, env: dict, plan: str | Path) -> None:
    """Refuse, in one line naming both, a plan built for another TensorRT, GPU or L4T release: never run it."""
    built = {k: sidecar.get(k) for k in ENV_KEYS}
    now = {k: env.get(k) for k in ENV_KEYS}
    if built != now:
        fmt = lambda d: f"TensorRT {d['tensorrt']} on {d['device']} (SM {d['sm']}, L4T {d['l4t'] or 'none'})"
        raise UserError(f"plan built for {fmt(built)}, this is {fmt(now)}: rebuild it here "
                        f"(`yolo-edge stage engine`)", plan)


# ---- refusals that need no TensorRT -------------------------------------------------------------------------------

def onnx_io(onnx_path: Path) -> dict:
    import onnx
    from onnx import TensorProto

    m = onnx.load(str(onnx_path), load_external_data=False)

    def desc(vi):
        tt = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim]
        return {"name": vi.name, "shape": dims, "dtype": TensorProto.DataType.Name(tt.elem_type).lower()}

    inits = {t.name for t in m.graph.initializer}
    return {"inputs": [desc(i) for i in m.graph.input if i.name not in inits],
            "outputs": [desc(o) for o in m.graph.output]}


def validate(onnx_path: Path, spec: BuildSpec, num_dla_cores: int | None = None, device: str = "this device") -> None:
    io = onnx_io(onnx_path)
    dynamic = [i["name"] for i in io["inputs"] if any(not isinstance(d, int) or d <= 0 for d in i["shape"])]
    if spec.dla_core >= 0 and dynamic:
        raise UserError(f"DLA needs static input shapes but '{dynamic[0]}' is dynamic: export with a fixed size or "
                        f"build for the GPU (dla_core=-1)", onnx_path)
    if spec.dla_core >= 0 and num_dla_cores is not None and spec.dla_core >= num_dla_cores:
        has = "has no DLA cores (Orin Nano has none)" if num_dla_cores == 0 else f"has {num_dla_cores} DLA core(s)"
        raise UserError(f"DLA core {spec.dla_core} requested but {device} {has}: build for the GPU (dla_core=-1)")


# ---- the Polygraphy loader chain --------------------------------------------------------------------------------

def _postprocess(spec: BuildSpec, report: dict):
    def func(builder, network, config):
        trt = _trt()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, spec.workspace_mib << 20)
        if spec.dla_core >= 0:
            config.default_device_type = trt.DeviceType.DLA
            config.DLA_core = spec.dla_core
            config.set_flag(trt.BuilderFlag.GPU_FALLBACK)  # placement, not precision
            report["dla_fallback_layers"] = [network.get_layer(i).name for i in range(network.num_layers)
                                             if not config.can_run_on_DLA(network.get_layer(i))]
    return func


def loaders(onnx_path: str | Path, spec: BuildSpec, timing_cache: str | Path | None = None,
            report: dict | None = None):
    """(network, config, engine) Polygraphy loaders: built without TensorRT, TensorRT imported when called."""
    from polygraphy.backend.trt import CreateConfig, EngineFromNetwork, NetworkFromOnnxPath, PostprocessConfig

    network = NetworkFromOnnxPath(str(onnx_path), strongly_typed=True)
    tc = str(timing_cache) if timing_cache else None
    base = CreateConfig(builder_optimization_level=spec.builder_optimization_level,
                        load_timing_cache=tc if tc and Path(tc).is_file() else None)
    config = PostprocessConfig(base, _postprocess(spec, report if report is not None else {}))
    engine = EngineFromNetwork(network, config=config, save_timing_cache=tc)
    return network, config, engine


def trtexec_command(onnx_path: str | Path, spec: BuildSpec, plan: str | Path, timing_cache: str | Path | None) -> str:
    """The trtexec line that builds the same plan (strongly typed; no --fp16/--int8, which TensorRT 11 removed)."""
    args = ["trtexec", f"--onnx={onnx_path}", "--stronglyTyped", f"--saveEngine={plan}",
            f"--memPoolSize=workspace:{spec.workspace_mib}M",
            f"--builderOptimizationLevel={spec.builder_optimization_level}"]
    if timing_cache:
        args.append(f"--timingCacheFile={timing_cache}")
    if spec.dla_core >= 0:
        args += [f"--useDLACore={spec.dla_core}", "--allowGPUFallback"]
    return shlex.join(args)


class EngineBuilder:
    @staticmethod
    def is_available() -> tuple[bool, str]:
        return tensorrt_available()

    def plan_path(self, onnx_path: Path, spec: BuildSpec, cache_dir: Path, env: dict) -> Path:
        return Path(cache_dir) / f"{onnx_path.stem}-{cache_key(sha256_file(onnx_path), spec, env)[:16]}.plan"

    def build(self, onnx_path: str | Path, spec: BuildSpec, cache_dir: str | Path,
              timing_cache: str | Path | None = None) -> Path:
        from polygraphy.backend.trt import SaveEngine

        trt = _trt()
        onnx_path, cache_dir = Path(onnx_path), Path(cache_dir)
        env = here()
        digest = sha256_file(onnx_path)
        plan = cache_dir / f"{onnx_path.stem}-{cache_key(digest, spec, env)[:16]}.plan"
        side = plan.with_suffix(".json")
        if plan.is_file() and side.is_file():
            check_compatible(json.loads(side.read_text()), env, plan)
            return plan
        validate(onnx_path, spec, trt.Builder(trt.Logger(trt.Logger.WARNING)).num_DLA_cores, env["device"])
        cache_dir.mkdir(parents=True, exist_ok=True)
        report: dict = {}
        timing_cache = timing_cache or cache_dir / "timing.cache"
        _, _, engine = loaders(onnx_path, spec, timing_cache, report)
        started = time.time()
        with atomic_path(plan) as tmp:
            SaveEngine(engine, str(tmp))()
        meta = {**onnx_io(onnx_path), "onnx": str(onnx_path), "onnx_sha256": digest, "spec": spec.as_dict(),
                **{k: env[k] for k in ENV_KEYS}, "key": cache_key(digest, spec, env),
                "build_seconds": round(time.time() - started, 1), "built": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "strongly_typed": True, "dla_fallback_layers": report.get("dla_fallback_layers", []),
                "trtexec": trtexec_command(onnx_path, spec, plan, timing_cache)}
        with atomic_path(side) as tmp:
            tmp.write_text(json.dumps(meta, indent=1))
        return plan


class TensorRTRunner(Runner):
    name = "tensorrt"

    @classmethod
    def is_available(cls) -> tuple[bool, str]:
        return tensorrt_available()

    def __init__(self, plan_path: str | Path, **_):
        from polygraphy.backend.common import BytesFromPath
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner

        self.path = Path(plan_path)
        side = self.path.with_suffix(".json")
        if not side.is_file():
            raise UserError("no sidecar JSON beside the plan: cannot tell what it was built for; rebuild it", self.path)
        self.meta = json.loads(side.read_text())
        check_compatible(self.meta, here(), self.path)
        self.runner = TrtRunner(EngineFromBytes(BytesFromPath(str(self.path))))
        self.runner.activate()
        meta = self.runner.get_input_metadata()
        self.inputs = list(meta.keys())
        self._shape = tuple(meta[self.inputs[0]].shape)

    @property
    def input_name(self) -> str:
        return self.inputs[0]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self._shape

    def infer(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        out = self.runner.infer(feed)
        return [np.asarray(v).copy() for v in out.values()]

    def describe(self) -> dict:
        return {"runner": self.name, "version": _trt().__version__, "plan": str(self.path),
                "precision": self.meta.get("spec", {}).get("precision")}

    def __del__(self):
        r = getattr(self, "runner", None)
        if r is not None and r.is_active:
            r.deactivate()
