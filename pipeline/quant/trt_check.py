"""Checks an ONNX file against TensorRT's documented explicit-quantization rules, on the dev box.

TensorRT cannot run here, and a Jetson is the worst place to learn a file is unbuildable. The rules (TensorRT 10
and 11 developer guide, "Explicit Quantization"; onnx-tensorrt operator support):
- Q/DQ are INT8 (or FP8/INT4 on parts this pipeline does not target): a UINT8 zero point is refused;
- zero points are 0 (symmetric quantization only);
- DequantizeLinear inputs are activations or INT8 weights: an int32 DequantizeLinear (a quantized bias) is
  refused by the parser ("only activation types allowed as input to this layer": onnx/onnx-tensorrt#850);
- per-channel scales lie on the output-channel axis of the weight they dequantize (0 for Conv/Gemm weights,
  1 for ConvTranspose), per-tensor scales for activations;
- Q/DQ come from the standard ONNX domain, opset >= 13 (per-channel Q/DQ), at most the opset TensorRT 10 parses;
- input shapes are static unless an optimization profile is supplied.

Strongly typed networks (TensorRT 10's NetworkDefinitionCreationFlag.STRONGLY_TYPED, the only mode TensorRT 11 has:
every tensor keeps the type the ONNX gives it, no builder precision flag, TensorRT inserts no casts):
- the file must type-check strictly (onnx.shape_inference strict mode): an op reading FP16 and FP32 in the same
  type parameter (an Add of an FP16 and an FP32 tensor) is refused, TensorRT does no implicit promotion;
- Q/DQ scales are FP32: TensorRT's operator reference lists the Dequantize scale as float32 (8.6 "Dequantize":
  T2 float32, output float16 or float32); FP16 scales need ONNX opset 19 (QuantizeLinear-19 admits float16) and a
  TensorRT newer than JetPack 6's 10.3 to be sure of, so this project's files keep FP32 scales with Casts around Q/DQ;
- no DOUBLE tensors (onnx-tensorrt: "limited support for DOUBLE, TensorRT will attempt to cast down", a silent
  type change a strongly typed file must not rely on);
- FP16 weights are finite (an FP32 weight beyond ±65504 becomes inf in FP16).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from pipeline.core.errors import UserError

MIN_OPSET, MAX_OPSET = 13, 22
QDQ = ("QuantizeLinear", "DequantizeLinear")


@dataclass
class Violation:
    node: str
    rule: str
    op: str = ""

    def __str__(self) -> str:
        return f"node '{self.node}'" + (f" ({self.op})" if self.op else "") + f": {self.rule}"


def check_types(model: onnx.ModelProto) -> list[Violation]:
    """The strong-typing rules (module docstring); an FP32 file passes them trivially."""
    from onnx import TensorProto

    v: list[Violation] = []
    try:
        onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except Exception as e:  # InferenceError: the first type clash, naming the node
        v.append(Violation("<model>", f"does not type-check strictly ({' '.join(str(e).split())[:200]}): a strongly "
                                      f"typed network inserts no casts"))
    inits = {t.name: t for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type in QDQ and len(n.input) > 1 and n.input[1] in inits:
            if inits[n.input[1]].data_type != TensorProto.FLOAT:
                v.append(Violation(n.name, f"{n.op_type} scale of type "
                                           f"{TensorProto.DataType.Name(inits[n.input[1]].data_type)}: keep Q/DQ "
                                           f"scales FP32 (TensorRT's Dequantize scale is float32) and Cast around"))
    for t in model.graph.initializer:
        if t.data_type == TensorProto.DOUBLE:
            v.append(Violation(t.name, "DOUBLE tensor: TensorRT casts it down silently; write FP32 or FP16"))
        elif t.data_type == TensorProto.FLOAT16 and not np.all(np.isfinite(numpy_helper.to_array(t))):
            v.append(Violation(t.name, "FP16 weight with inf/NaN (an FP32 value beyond FP16's ±65504?)"))
    for vi in list(model.graph.input) + list(model.graph.output):
        if vi.type.tensor_type.elem_type == TensorProto.DOUBLE:
            v.append(Violation(vi.name, "DOUBLE graph input/output: TensorRT has no DOUBLE I/O"))
    return v


def has_fp16(model: onnx.ModelProto) -> bool:
    from onnx import TensorProto

    return any(t.data_type == TensorProto.FLOAT16 for t in model.graph.initializer) or any(
        n.op_type == "Cast" and any(a.name == "to" and a.i == TensorProto.FLOAT16 for a in n.attribute)
        for n in model.graph.node)


def check(model: onnx.ModelProto, dynamic_ok: bool = False, require_reduced: bool = True) -> list[Violation]:
    """The explicit-quantization and strong-typing rules; `require_reduced` also refuses a file with neither Q/DQ nor
    FP16 tensors (where an INT8 or FP16 file is expected)."""
    v: list[Violation] = check_types(model)
    opset = {o.domain or "ai.onnx": o.version for o in model.opset_import}.get("ai.onnx", 0)
    if not MIN_OPSET <= opset <= MAX_OPSET:
        v.append(Violation("<model>", f"opset {opset} outside what TensorRT 10/11 parse for Q/DQ "
                                      f"({MIN_OPSET}..{MAX_OPSET})"))
    if not dynamic_ok:
        for i in model.graph.input:
            dims = i.type.tensor_type.shape.dim
            if any(not d.HasField("dim_value") or d.dim_value <= 0 for d in dims):
                v.append(Violation(i.name, "dynamic input shape: give an optimization profile or export static"))
    inits = {t.name: t for t in model.graph.initializer}
    consts = {n.output[0]: n.attribute[0].t for n in model.graph.node if n.op_type == "Constant" and n.attribute}
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def arr(name):
        t = inits.get(name) or consts.get(name)
        return numpy_helper.to_array(t) if t is not None else None

    n_qdq = 0
    for n in model.graph.node:
        if n.op_type not in QDQ:
            continue
        n_qdq += 1
        if n.domain not in ("", "ai.onnx"):
            v.append(Violation(n.name, f"{n.op_type} from domain '{n.domain}': TensorRT parses only standard "
                                       f"ONNX Q/DQ"))
            continue
        zp = arr(n.input[2]) if len(n.input) > 2 and n.input[2] else None
        if zp is not None:
            if zp.dtype != np.int8:
                v.append(Violation(n.name, f"zero point of type {zp.dtype}: TensorRT explicit quantization is INT8 "
                                           f"symmetric (int8 zero point 0)"))
            elif np.any(zp != 0):
                v.append(Violation(n.name, "non-zero zero point: TensorRT supports only symmetric quantization"))
        if n.op_type == "DequantizeLinear":
            x = arr(n.input[0])
            if x is not None and x.dtype == np.int32:
                v.append(Violation(n.name, "int32 DequantizeLinear (a quantized bias): TensorRT's parser accepts only "
                                           "activation types here; keep biases float"))
            scale = arr(n.input[1])
            if x is not None and scale is not None and scale.size > 1:
                axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
                for c in consumers.get(n.output[0], []):
                    if c.op_type in ("Conv", "Gemm") and c.input[1] == n.output[0]:
                        want = 0
                    elif c.op_type == "ConvTranspose" and c.input[1] == n.output[0]:
                        want = 1
                    else:
                        continue
                    ax = axis % x.ndim
                    if ax != want or scale.size != x.shape[want]:
                        v.append(Violation(n.name, f"per-channel scale on axis {ax} (size {scale.size}) of the "
                                                   f"{c.op_type} weight; TensorRT needs the output-channel axis "
                                                   f"{want}"))
    if require_reduced and n_qdq == 0 and not has_fp16(model):
        v.append(Violation("<model>", "no QuantizeLinear/DequantizeLinear nodes (and no FP16 tensors): not an "
                                      "explicitly quantized or strongly typed reduced-precision model"))
    return v


def load(path: str | Path) -> onnx.ModelProto:
    """An ONNX file, or one line naming it and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise UserError("ONNX file not found", path)
    try:
        model = onnx.load(str(path))
    except Exception as e:  # onnx raises DecodeError and friends
        raise UserError(f"not an ONNX model ({type(e).__name__})", path) from None
    if not model.ir_version or not model.graph.node:  # protobuf reads an empty file (and some others) as a model
        raise UserError("not an ONNX model (no IR version or no graph nodes)", path)
    return model


def check_file(path: str | Path, dynamic_ok: bool = False) -> list[Violation]:
    return check(load(path), dynamic_ok)


def assert_buildable(path: str | Path) -> None:
    v = check_file(path)
    if v:
        more = f" (and {len(v) - 1} more)" if len(v) > 1 else ""
        raise UserError(f"TensorRT would refuse this Q/DQ model: {v[0]}{more}", path)
