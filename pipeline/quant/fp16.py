"""Strongly typed ONNX on the dev box: every tensor's precision decided here and written into the file.

TensorRT 11 removed the weak-typing API (the FP16/INT8 builder flags, calibrators); TensorRT 10 (JetPack 6)
already builds strongly typed networks (NetworkDefinitionCreationFlag.STRONGLY_TYPED), where each tensor runs in
the type the ONNX gives it. So the FP16 and the INT8 variants are made here:

- fp16: every float op whose ONNX schema allows float16 runs in FP16, its weights stored FP16; graph inputs and
  outputs stay FP32 (Cast at the edges) so runners, the evaluator and the sidecar see the same I/O as the FP32 file;
  the detection head's decode stays FP32 (one FP16 step is 0.25 px at 256-512 px, and DESIGN keeps it float);
- int8: the quantize stage's explicit Q/DQ file with the same conversion around it: Q/DQ themselves keep FP32 scales
  and FP32 inputs/outputs (Casts on either side), see `trt_check` for why.

Why not onnxconverter-common's `convert_float_to_float16(keep_io_types=True)` (measured, 1.16.0): with a node block
list (the FP32 decode) it raises "The downstream node of the second cast node should be graph output", and without
one it writes an invalid model (Resize's `scales` input turned float16, which the ONNX schema forbids; ORT refuses
to load it). ModelOpt's AutoCast lives in its own venv (.venv-modelopt) and is not installed on every dev box. This
pass is ~150 lines driven by the ONNX schemas themselves: a position is converted only where its type parameter
admits tensor(float16), and concrete `tensor(float)` inputs (Resize scales) stay FP32.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FLOAT, HALF = TensorProto.FLOAT, TensorProto.FLOAT16
FP16_MAX = float(np.finfo(np.float16).max)
# ops whose output type comes from an attribute, and Q/DQ (FP32 scales, FP32 around them: trt_check)
KEEP_OPS = {"Cast", "CastLike", "ConstantOfShape", "RandomNormal", "RandomUniform", "RandomNormalLike",
            "RandomUniformLike", "EyeLike", "QuantizeLinear", "DequantizeLinear", "Range"}


@dataclass
class Fp16Report:
    fp16_nodes: int = 0
    fp32_nodes: list[str] = field(default_factory=list)  # float nodes kept FP32 (asked, or the schema forbids FP16)
    casts: int = 0
    clipped_weights: int = 0  # weight values beyond FP16's range, clipped to ±65504
    flushed_weights: int = 0  # non-zero weights that became 0 in FP16

    def as_dict(self) -> dict:
        return {"fp16_nodes": self.fp16_nodes, "fp32_float_nodes": len(self.fp32_nodes), "casts": self.casts,
                "clipped_weights": self.clipped_weights, "flushed_weights": self.flushed_weights}


def _types(model: onnx.ModelProto) -> dict[str, int]:
    g = model.graph
    t = {v.name: v.type.tensor_type.elem_type for v in list(g.value_info) + list(g.input) + list(g.output)}
    t.update({i.name: i.data_type for i in g.initializer})
    return t


def _positions(n: onnx.NodeProto, schema, types: dict[str, int]):
    """(inputs, outputs): per position, 'half' (a float tensor whose type parameter admits float16), 'keep' (a
    concrete tensor(float) input, e.g. Resize scales), 'block' (a float tensor whose parameter forbids float16) or
    None (not a float tensor)."""
    allowed = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}

    def kind(formals, i, name):
        if not name or types.get(name) != FLOAT or not formals:
            return None
        ts = formals[min(i, len(formals) - 1)].type_str
        if ts in allowed:
            return "half" if "tensor(float16)" in allowed[ts] else "block"
        return "keep"

    return ([kind(schema.inputs, i, x) for i, x in enumerate(n.input)],
            [kind(schema.outputs, i, x) for i, x in enumerate(n.output)])


def convert(src: onnx.ModelProto, keep_fp32: list[str] | tuple = (), emulate: bool = False
            ) -> tuple[onnx.ModelProto, Fp16Report]:
    """FP16 everywhere the schema allows, except nodes named in `keep_fp32` and KEEP_OPS; FP32 graph I/O.

    emulate=True writes the *same* graph in FP32 with every FP16 weight and FP16 activation rounded to FP16 (a Cast
    pair where the real file stores FP16): what ONNX Runtime's CPU runs where it lacks an FP16 kernel."""
    model = onnx.shape_inference.infer_shapes(src, check_type=True, strict_mode=True)
    g = model.graph
    opset = {o.domain or "ai.onnx": o.version for o in model.opset_import}["ai.onnx"]
    types = _types(model)
    for n in g.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            types[n.output[0]] = n.attribute[0].t.data_type
    keep = set(keep_fp32)
    rep = Fp16Report()
    half_in: dict[int, set[int]] = {}  # node index -> input positions that take FP16
    half_out: dict[str, bool] = {}  # tensor -> produced in FP16
    consumers: dict[str, list[tuple[int, int]]] = {}
    for k, n in enumerate(g.node):
        for i, x in enumerate(n.input):
            consumers.setdefault(x, []).append((k, i))
    for k, n in enumerate(g.node):
        if n.op_type == "Constant":
            continue
        try:
            schema = onnx.defs.get_schema(n.op_type, opset, n.domain or "")
        except onnx.defs.SchemaError:
            schema = None
        ins, outs = _positions(n, schema, types) if schema is not None else ([], [])
        is_float = any(p is not None for p in ins + outs) or (schema is None and any(
            types.get(x) == FLOAT for x in list(n.input) + list(n.output)))
        if not is_float:
            continue
        if n.name in keep or n.op_type in KEEP_OPS or schema is None or "block" in ins + outs:
            rep.fp32_nodes.append(n.name)
            continue
        rep.fp16_nodes += 1
        half_in[k] = {i for i, p in enumerate(ins) if p == "half"}
        for i, p in enumerate(outs):
            if p == "half":
                half_out[n.output[i]] = True

    def wants_half(x: str) -> list[bool]:
        return [i in half_in.get(k, ()) for k, i in consumers.get(x, [])]

    inits = {t.name: t for t in g.initializer}
    const_nodes = {n.output[0]: n for n in g.node if n.op_type == "Constant" and n.attribute
                   and n.attribute[0].name == "value" and n.attribute[0].t.data_type == FLOAT}

    def to_half(a: np.ndarray) -> np.ndarray:
        rep.clipped_weights += int(np.sum(np.abs(a) > FP16_MAX))
        h = np.clip(a, -FP16_MAX, FP16_MAX).astype(np.float16)
        rep.flushed_weights += int(np.sum((a != 0) & (h == 0)))
        return h.astype(np.float32) if emulate else h

    # weights and constants: stored FP16 when every consumer reads FP16, a second FP16 copy when some do
    renamed: dict[tuple[str, int], str] = {}
    new_inits = []
    for name, t in list(inits.items()):
        if t.data_type != FLOAT:
            continue
        w = wants_half(name)
        if not any(w):
            continue
        h = numpy_helper.from_array(to_half(numpy_helper.to_array(t)), name if all(w) else name + "__fp16")
        if all(w):
            t.CopyFrom(h)
        else:
            new_inits.append(h)
            for (k, i), wh in zip(consumers[name], w):
                if wh:
                    renamed[(k, i)] = h.name
    g.initializer.extend(new_inits)
    for name, n in const_nodes.items():
        w = wants_half(name)
        if w and all(w):
            a = numpy_helper.to_array(n.attribute[0].t)
            n.attribute[0].t.CopyFrom(numpy_helper.from_array(to_half(a), n.attribute[0].t.name))
            half_out[name] = True
    done_weights = {n for n, t in inits.items() if t.data_type == HALF or emulate and any(wants_half(n))}

    def produced_half(x: str) -> bool:
        return half_out.get(x, False)

    casts: dict[tuple[str, int], str] = {}
    new_nodes: list[onnx.NodeProto] = []

    def cast(x: str, to: int) -> str:
        key = (x, to)
        if key not in casts:
            out = f"{x}__to_{'fp16' if to == HALF else 'fp32'}"
            if emulate:  # round to FP16 and come back: the value the real file would hold, in FP32
                mid = out + "__h"
                new_nodes.append(helper.make_node("Cast", [x], [mid], name=mid + "_cast", to=HALF))
                new_nodes.append(helper.make_node("Cast", [mid], [out], name=out + "_cast", to=FLOAT))
            else:
                new_nodes.append(helper.make_node("Cast", [x], [out], name=out + "_cast", to=to))
            rep.casts += 1
            casts[key] = out
        return casts[key]

    for k, n in enumerate(g.node):
        for i, x in enumerate(n.input):
            if (k, i) in renamed:
                n.input[i] = renamed[(k, i)]
                continue
            if not x or x in done_weights or types.get(x) != FLOAT and not produced_half(x):
                continue
            want = i in half_in.get(k, ())
            have = produced_half(x)
            if want and not have:
                n.input[i] = cast(x, HALF)
            elif have and not want:
                n.input[i] = cast(x, FLOAT)
        new_nodes.append(n)
        if emulate and k in half_in:  # an FP16 op's outputs are FP16 values
            for j, o in enumerate(n.output):
                if produced_half(o):
                    n.output[j] = o + "__raw"
                    mid = o + "__h"
                    new_nodes.append(helper.make_node("Cast", [o + "__raw"], [mid], name=mid + "_cast", to=HALF))
                    new_nodes.append(helper.make_node("Cast", [mid], [o], name=o + "_round", to=FLOAT))
    if not emulate:
        for o in g.output:
            if produced_half(o.name):  # FP32 graph outputs: the producer writes name__fp16, a Cast writes name
                raw = o.name + "__fp16"
                for n in new_nodes:
                    for j, x in enumerate(n.output):
                        if x == o.name:
                            n.output[j] = raw
                    for j, x in enumerate(n.input):
                        if x == o.name:
                            n.input[j] = raw
                new_nodes.append(helper.make_node("Cast", [raw], [o.name], name=o.name + "__to_fp32_cast", to=FLOAT))
                rep.casts += 1
    del g.node[:]
    g.node.extend(new_nodes)
    del g.value_info[:]
    out = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    onnx.checker.check_model(out, full_check=True)
    return out, rep


def convert_file(src: Path, dest: Path, keep_fp32: list[str] | tuple = (), emulate: bool = False) -> Fp16Report:
    m, rep = convert(onnx.load(str(src)), keep_fp32, emulate)
    onnx.save(m, str(dest))
    return rep


def tensor_dtypes(model: onnx.ModelProto) -> dict[str, int]:
    """Counts of float element types over the graph's initializers and inferred tensors."""
    m = onnx.shape_inference.infer_shapes(model)
    out: dict[str, int] = {}
    for t in _types(m).values():
        name = TensorProto.DataType.Name(t).lower()
        out[name] = out.get(name, 0) + 1
    return out
