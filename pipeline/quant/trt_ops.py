"""TensorRT's ONNX operator support, op by op and type by type, checked on the dev box.

The tables are onnx-tensorrt's `docs/operators.md` (TensorRT's ONNX parser), one per TensorRT release, stored as
data in `trt_tables/*.json` with the repository, file and commit they were read from. For every node of a model, after
ONNX shape inference (so every tensor's type is known), `check_ops` asks:
- is the op in the table and marked supported (standard domain only: another domain needs a plugin)?
- are its data tensors of a type the table lists for it (the tensors that share the type parameter of its first
  input in the ONNX schema; Cast/CastLike: its input and its output)?
- the restrictions a graph can show: inputs that must be initializers or constants, attribute values (TopK's
  `sorted` and K limit, Resize's modes, pooling dilations and rank, ScatterND's reduction, Q/DQ zero points);
- the table's header notes: UINT8 only as a network input or output, the opset range.
A restriction whose text names nothing checkable here (the shape of a loop's carried values, say) is left to the
device. Kernel selection, layer fusion, DLA placement and speed are only the device's to tell.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from pipeline.core.errors import UserError
from pipeline.quant.fp16 import tensor_types
from pipeline.quant.trt_check import Violation

DATA = Path(__file__).parent / "trt_tables"
# The stored tables; the aliases name what a recipe or a user asks for. "10" is JetPack 6's TensorRT, 10.3, whose
# table is derived: 10.6's with the parser changes of 10.4-10.6 taken back (trt_tables/README.md).
FILES = {"10.3": "trt-10.3.json", "10.6": "trt-10.6.json", "11.0": "trt-11.json"}
ALIASES = {"10": "10.3", "11": "11.0"}
# ONNX element type -> the table's name (looked up by name: no TensorRT precision identifier in this package's code)
TYPE_NAMES = {TensorProto.DataType.Value(onnx_name): name for onnx_name, name in (
    ("FLOAT", "FP32"), ("FLOAT16", "FP16"), ("BFLOAT16", "BF16"), ("INT32", "INT32"), ("INT64", "INT64"),
    ("BOOL", "BOOL"), ("UINT8", "UINT8"), ("INT8", "INT8"), ("DOUBLE", "DOUBLE"), ("FLOAT8E4M3FN", "FP8"),
    ("INT4", "INT4"), ("INT16", "INT16"), ("UINT16", "UINT16"), ("UINT32", "UINT32"), ("UINT64", "UINT64"),
    ("STRING", "STRING"))}
TYPO = {"INF64": "INT64"}  # 10.6's ConstantOfShape row


@dataclass(frozen=True)
class Matrix:
    version: str
    source: dict
    opset_range: tuple[int, int]
    operators: dict

    @property
    def label(self) -> str:
        return f"TensorRT {self.version}"

    @property
    def provenance(self) -> str:
        """Where the table comes from, in a few words."""
        src = self.source
        if src.get("derived_from"):
            return (f"derived: {src['derived_from']}, onnx-tensorrt {src['commit'][:10]}, with its changelog's "
                    f"changes since {self.version} taken back")
        return f"onnx-tensorrt {src['commit'][:10]} {src['path']}"

    @property
    def digest(self) -> str:
        """sha256 of the stored table file (a stage's record keys on it: a changed table checks again)."""
        import hashlib

        return hashlib.sha256((DATA / FILES[self.version]).read_bytes()).hexdigest()


def resolve(version: str) -> str:
    v = ALIASES.get(str(version), str(version))
    if v not in FILES:
        raise UserError(f"no ONNX operator table for TensorRT {version} (stored: {', '.join(FILES)}; aliases: "
                        f"{', '.join(f'{a} -> {b}' for a, b in ALIASES.items())})")
    return v


def matrix(version: str) -> Matrix:
    """The operator table of a TensorRT release (an alias or a stored version)."""
    return _load(resolve(version))


@lru_cache(maxsize=None)
def _load(v: str) -> Matrix:
    d = json.loads((DATA / FILES[v]).read_text())
    ops = {name: {"supported": bool(row["supported"]),
                  "types": {TYPO.get(t.strip(), t.strip()) for t in row.get("types") or [] if t.strip()},
                  "restrictions": (row.get("restrictions") or "").strip()}
           for name, row in d["operators"].items()}
    return Matrix(v, d["source"], tuple(d["opset_range"]), ops)


def _infer(model: onnx.ModelProto) -> onnx.ModelProto:
    try:
        return onnx.shape_inference.infer_shapes(model, strict_mode=True)
    except Exception:  # the strong-typing check reports a model that does not type-check; read what is known
        return onnx.shape_inference.infer_shapes(model)


def _attr(n: onnx.NodeProto, name: str, default=None):
    a = next((a for a in n.attribute if a.name == name), None)
    return default if a is None else onnx.helper.get_attribute_value(a)


def _text(v):
    return v.decode() if isinstance(v, bytes) else v


def _data_tensors(n: onnx.NodeProto, schema) -> list[str]:
    """The tensors the table's type list is about: Cast's input and output; otherwise every input and output whose
    formal type is the first type parameter of the inputs (the first input alone when every input is concrete)."""
    if n.op_type in ("Cast", "CastLike"):
        return [x for x in (n.input[:1] + n.output[:1]) if x]
    if schema is None or not schema.inputs or not n.input:
        return list(n.input[:1])
    # the first type parameter that admits more than one type (Where: X and Y's T, not the condition's B = bool)
    allowed = {c.type_param_str: c.allowed_type_strs for c in schema.type_constraints}
    param = next((f.type_str for f in schema.inputs if len(allowed.get(f.type_str, ())) > 1), None)
    if param is None:
        return [n.input[0]] if n.input[0] else []

    def formal(formals, i):
        return formals[min(i, len(formals) - 1)].type_str if formals else None

    return [x for i, x in enumerate(n.input) if x and formal(schema.inputs, i) == param] + \
           [x for i, x in enumerate(n.output) if x and formal(schema.outputs, i) == param]


def _restrictions(n: onnx.NodeProto, schema, text: str, consts: dict, inits: set) -> list[str]:
    """The violations of a row's restrictions that the graph shows (each a short reason)."""
    out = []
    names = {f.name: n.input[i] for i, f in enumerate(schema.inputs) if i < len(n.input)} if schema else {}
    for m in re.finditer(r"`(\w+)` (?:input )?must be (an initializer|a constant tensor|resolvable to a constant|"
                         r"a build-time constant)", text):
        x = names.get(m.group(1))
        if x and x not in inits and (m.group(2) == "an initializer" or x not in consts):
            out.append(f"input `{m.group(1)}` ({x}) must be {m.group(2)}")
    for m in re.finditer(r"`(\w+)` must be (?:zero|0)\b", text):
        x = names.get(m.group(1))
        if x and x in consts and np.any(consts[x] != 0):
            out.append(f"`{m.group(1)}` must be zero")
    if re.search(r"`sorted` must be 1", text) and _attr(n, "sorted", 1) != 1:
        out.append("`sorted` must be 1")
    m = re.search(r"`K` input must be less than (\d+)", text)
    if m:
        k = consts.get(names.get("K", ""))
        if k is None:
            out.append("`K` must be a constant here (its limit cannot be checked otherwise)")
        elif int(np.max(k)) >= int(m.group(1)):
            out.append(f"K = {int(np.max(k))} must be less than {m.group(1)}")
    if "`reduction`" in text and _text(_attr(n, "reduction", "none")) != "none":
        out.append(f"`reduction` {_text(_attr(n, 'reduction'))!r} is not supported")
    if "`dilations` must be empty or all ones" in text and any(d != 1 for d in _attr(n, "dilations", []) or []):
        out.append(f"`dilations` {list(_attr(n, 'dilations'))} must be empty or all ones")
    if re.search(r"2D or 3D [Pp]ooling only", text) and len(_attr(n, "kernel_shape", []) or []) not in (2, 3):
        out.append(f"{len(_attr(n, 'kernel_shape', []) or [])}D pooling: 2D or 3D only")
    if "`Indices` output tensor unsupported" in text and len(n.output) > 1 and n.output[1]:
        out.append("the `Indices` output is unsupported")
    if n.op_type == "Resize":
        out += _resize(n, text)
    return out


def _resize(n: onnx.NodeProto, text: str) -> list[str]:
    def listed(label: str) -> set[str] | None:
        m = re.search(label + r":\s*(.*?)(?:<br\s*/?>|\.\s|$)", text)
        return set(re.findall(r"`(\w+)`", m.group(1))) if m else None

    out = []
    checks = [("coordinate_transformation_mode", "half_pixel", listed(r"transformation modes")),
              ("mode", "nearest", listed(r"resize modes")),
              ("keep_aspect_ratio_policy", "stretch", listed(r"aspect ratio policy"))]
    if _text(_attr(n, "mode", "nearest")) == "nearest":
        checks.append(("nearest_mode", "round_prefer_floor", listed(r"nearest modes")))
    for attr, default, allowed in checks:
        v = _text(_attr(n, attr, default))
        if allowed is not None and v not in allowed:
            out.append(f"`{attr}` {v!r} is not one of {sorted(allowed)}")
    if "Antialiasing is not supported" in text and _attr(n, "antialias", 0):
        out.append("antialiasing is not supported")
    return out


def check_ops(model: onnx.ModelProto, version: str = "10") -> list[Violation]:
    """Every node against the ONNX operator table of TensorRT `version`; one Violation per problem."""
    mx = matrix(version)
    m = _infer(model)
    g = m.graph
    v: list[Violation] = []
    opset = {o.domain or "ai.onnx": o.version for o in m.opset_import}.get("ai.onnx", 0)
    lo, hi = mx.opset_range
    if not lo <= opset <= hi:
        v.append(Violation("<model>", f"opset {opset}: {mx.label} parses opsets {lo} to {hi}"))
    types = {k: v for k, v in tensor_types(m, constants=True).items() if v}
    inits = {t.name for t in g.initializer}
    consts = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    consts.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in g.node
                   if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"})
    edges = {x.name for x in [*g.input, *g.output]}
    for name, t in types.items():
        if t == TensorProto.UINT8 and name not in edges and name not in inits:
            v.append(Violation(name, f"a UINT8 tensor inside the network: {mx.label} takes UINT8 only as a network "
                                     f"input or output"))
    for n in g.node:
        name, op = n.name or n.output[0], n.op_type
        if n.domain not in ("", "ai.onnx"):
            v.append(Violation(name, f"op from domain '{n.domain}': {mx.label}'s parser needs a plugin for it", op))
            continue
        row = mx.operators.get(op)
        if row is None or not row["supported"]:
            v.append(Violation(name, f"not {'supported' if row else 'in the operator table'} in {mx.label}", op))
            continue
        try:
            schema = onnx.defs.get_schema(op, opset, "")
        except onnx.defs.SchemaError:
            schema = None
        if row["types"]:
            for x in _data_tensors(n, schema):
                t = TYPE_NAMES.get(types.get(x, 0))
                if t is not None and t not in row["types"] and not (t == "UINT8" and x in edges):
                    v.append(Violation(name, f"{t} tensor '{x}': {mx.label} takes "
                                             f"{', '.join(sorted(row['types']))} here", op))
        for why in _restrictions(n, schema, row["restrictions"], consts, inits):
            v.append(Violation(name, f"{why} ({mx.label})", op))
    return v


def check_file(path: str | Path, version: str, dynamic_ok: bool = False, require_reduced: bool = False
               ) -> list[Violation]:
    """Everything checked before the device for one ONNX file: `version`'s operator table (check_ops) and TensorRT's
    explicit-quantization and strong-typing rules (trt_check.check; `require_reduced`: the file must carry FP16, as
    the engine stage's strongly typed files do; without it FP32 files pass)."""
    from pipeline.quant.trt_check import check, load

    model = load(path)
    return check_ops(model, version) + check(model, dynamic_ok=dynamic_ok, require_reduced=require_reduced)
