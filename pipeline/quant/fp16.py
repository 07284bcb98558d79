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
pass is ~170 lines driven by the ONNX schemas themselves: a position is converted only where its type parameter
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


def tensor_types(model: onnx.ModelProto, constants: bool = False) -> dict[str, int]:
    """{tensor name: ONNX element type} from the graph's declared values and initializers (and, with `constants`,
    the outputs of Constant nodes)."""
    g = model.graph
    t = {v.name: v.type.tensor_type.elem_type for v in list(g.value_info) + list(g.input) + list(g.output)}
    t.update({i.name: i.data_type for i in g.initializer})
    if constants:
        for n in g.node:
            if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
                t[n.output[0]] = n.attribute[0].t.data_type
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


class _Rewrite:
    """One FP16 conversion of a shape-inferred model, in place, in four steps: decide each float node's precision
    (`plan`), store the weights and constants FP16 readers take in FP16 (`weights`), insert the Casts between FP16
    and FP32 tensors (`wire`), and give the graph's outputs back in FP32 (`fp32_outputs`)."""

    def __init__(self, model: onnx.ModelProto, keep_fp32, emulate: bool):
        self.model, self.g, self.emulate = model, model.graph, emulate
        self.opset = {o.domain or "ai.onnx": o.version for o in model.opset_import}["ai.onnx"]
        self.types = tensor_types(model, constants=True)
        self.keep = set(keep_fp32)
        self.rep = Fp16Report()
        self.half_in: dict[int, set[int]] = {}  # node index -> input positions that take FP16
        self.half_out: dict[str, bool] = {}  # tensor -> produced in FP16
        self.consumers: dict[str, list[tuple[int, int]]] = {}
        for k, n in enumerate(self.g.node):
            for i, x in enumerate(n.input):
                self.consumers.setdefault(x, []).append((k, i))
        self.renamed: dict[tuple[str, int], str] = {}  # (node, input) -> the FP16 copy of a weight it reads
        self.done_weights: set[str] = set()
        self.casts: dict[tuple[str, int], str] = {}
        self.new_nodes: list[onnx.NodeProto] = []

    def plan(self) -> None:
        for k, n in enumerate(self.g.node):
            if n.op_type == "Constant":
                continue
            try:
                schema = onnx.defs.get_schema(n.op_type, self.opset, n.domain or "")
            except onnx.defs.SchemaError:
                schema = None
            ins, outs = _positions(n, schema, self.types) if schema is not None else ([], [])
            is_float = any(p is not None for p in ins + outs) or (schema is None and any(
                self.types.get(x) == FLOAT for x in list(n.input) + list(n.output)))
            if not is_float:
                continue
            if n.name in self.keep or n.op_type in KEEP_OPS or schema is None or "block" in ins + outs:
                self.rep.fp32_nodes.append(n.name)
                continue
            self.rep.fp16_nodes += 1
            self.half_in[k] = {i for i, p in enumerate(ins) if p == "half"}
            for i, p in enumerate(outs):
                if p == "half":
                    self.half_out[n.output[i]] = True

    def _wants_half(self, x: str) -> list[bool]:
        return [i in self.half_in.get(k, ()) for k, i in self.consumers.get(x, [])]

    def _to_half(self, a: np.ndarray) -> np.ndarray:
        self.rep.clipped_weights += int(np.sum(np.abs(a) > FP16_MAX))
        h = np.clip(a, -FP16_MAX, FP16_MAX).astype(np.float16)
        self.rep.flushed_weights += int(np.sum((a != 0) & (h == 0)))
        return h.astype(np.float32) if self.emulate else h

    def weights(self) -> None:
        """Weights and constants: stored FP16 when every consumer reads FP16, a second FP16 copy when some do."""
        g = self.g
        inits = {t.name: t for t in g.initializer}
        const_nodes = {n.output[0]: n for n in g.node if n.op_type == "Constant" and n.attribute
                       and n.attribute[0].name == "value" and n.attribute[0].t.data_type == FLOAT}
        new_inits = []
        for name, t in list(inits.items()):
            if t.data_type != FLOAT:
                continue
            w = self._wants_half(name)
            if not any(w):
                continue
            h = numpy_helper.from_array(self._to_half(numpy_helper.to_array(t)), name if all(w) else name + "__fp16")
            if all(w):
                t.CopyFrom(h)
            else:
                new_inits.append(h)
                for (k, i), wh in zip(self.consumers[name], w):
                    if wh:
                        self.renamed[(k, i)] = h.name
        g.initializer.extend(new_inits)
        for name, n in const_nodes.items():
            w = self._wants_half(name)
            if w and all(w):
                a = numpy_helper.to_array(n.attribute[0].t)
                n.attribute[0].t.CopyFrom(numpy_helper.from_array(self._to_half(a), n.attribute[0].t.name))
                self.half_out[name] = True
        self.done_weights = {n for n, t in inits.items()
                             if t.data_type == HALF or self.emulate and any(self._wants_half(n))}

    def _cast(self, x: str, to: int) -> str:
        key = (x, to)
        if key not in self.casts:
            out = f"{x}__to_{'fp16' if to == HALF else 'fp32'}"
            if self.emulate:  # round to FP16 and come back: the value the real file would hold, in FP32
                mid = out + "__h"
                self.new_nodes.append(helper.make_node("Cast", [x], [mid], name=mid + "_cast", to=HALF))
                self.new_nodes.append(helper.make_node("Cast", [mid], [out], name=out + "_cast", to=FLOAT))
            else:
                self.new_nodes.append(helper.make_node("Cast", [x], [out], name=out + "_cast", to=to))
            self.rep.casts += 1
            self.casts[key] = out
        return self.casts[key]

    def wire(self) -> None:
        """Every node in order, a Cast before each input whose producer's precision is not the one it reads."""
        produced_half = self.half_out.get
        for k, n in enumerate(self.g.node):
            for i, x in enumerate(n.input):
                if (k, i) in self.renamed:
                    n.input[i] = self.renamed[(k, i)]
                    continue
                if not x or x in self.done_weights or self.types.get(x) != FLOAT and not produced_half(x, False):
                    continue
                want = i in self.half_in.get(k, ())
                have = produced_half(x, False)
                if want and not have:
                    n.input[i] = self._cast(x, HALF)
                elif have and not want:
                    n.input[i] = self._cast(x, FLOAT)
            self.new_nodes.append(n)
            if self.emulate and k in self.half_in:  # an FP16 op's outputs are FP16 values
                for j, o in enumerate(n.output):
                    if produced_half(o, False):
                        n.output[j] = o + "__raw"
                        mid = o + "__h"
                        self.new_nodes.append(helper.make_node("Cast", [o + "__raw"], [mid], name=mid + "_cast",
                                                               to=HALF))
                        self.new_nodes.append(helper.make_node("Cast", [mid], [o], name=o + "_round", to=FLOAT))

    def fp32_outputs(self) -> None:
        """FP32 graph outputs: the producer writes name__fp16, a Cast writes name."""
        for o in self.g.output:
            if not self.half_out.get(o.name, False):
                continue
            raw = o.name + "__fp16"
            for n in self.new_nodes:
                for j, x in enumerate(n.output):
                    if x == o.name:
                        n.output[j] = raw
                for j, x in enumerate(n.input):
                    if x == o.name:
                        n.input[j] = raw
            self.new_nodes.append(helper.make_node("Cast", [raw], [o.name], name=o.name + "__to_fp32_cast", to=FLOAT))
            self.rep.casts += 1


def convert(src: onnx.ModelProto, keep_fp32: list[str] | tuple = (), emulate: bool = False
            ) -> tuple[onnx.ModelProto, Fp16Report]:
    """FP16 everywhere the schema allows, except nodes named in `keep_fp32` and KEEP_OPS; FP32 graph I/O.

    emulate=True writes the *same* graph in FP32 with every FP16 weight and FP16 activation rounded to FP16 (a Cast
    pair where the real file stores FP16): what ONNX Runtime's CPU runs where it lacks an FP16 kernel."""
    model = onnx.shape_inference.infer_shapes(src, check_type=True, strict_mode=True)
    rw = _Rewrite(model, keep_fp32, emulate)
    rw.plan()
    rw.weights()
    rw.wire()
    if not emulate:
        rw.fp32_outputs()
    del model.graph.node[:]
    model.graph.node.extend(rw.new_nodes)
    del model.graph.value_info[:]
    out = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    onnx.checker.check_model(out, full_check=True)
    return out, rw.rep


def convert_file(src: Path, dest: Path, keep_fp32: list[str] | tuple = (), emulate: bool = False) -> Fp16Report:
    m, rep = convert(onnx.load(str(src)), keep_fp32, emulate)
    onnx.save(m, str(dest))
    return rep


def tensor_dtypes(model: onnx.ModelProto) -> dict[str, int]:
    """Counts of float element types over the graph's initializers and inferred tensors."""
    m = onnx.shape_inference.infer_shapes(model)
    out: dict[str, int] = {}
    for t in tensor_types(m).values():
        name = TensorProto.DataType.Name(t).lower()
        out[name] = out.get(name, 0) + 1
    return out
