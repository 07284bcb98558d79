"""The variants a run can produce: one typed table that the quantize, engine, bench and bundle stages, the report
and the gate read. Nothing is decided by parsing a variant's name: each entry says which network it is, in which
precision, made by which stage into which file, from which other variant, and what role it plays.

Roles: `base` (the unpruned model, in each precision), `pruned` (this project's pruned model, in each precision),
`peer` (another tool's file, scored beside this project's on the dev box and never bundled), `e2e` (an end-to-end
graph, letterbox + detector + post-processing, built by bench from the variant it names).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

ROLES = ("base", "pruned", "peer", "e2e")


@dataclass(frozen=True)
class Variant:
    name: str  # as reported: base-fp32, pruned-int8, ...
    model: str  # "base" | "pruned": the network
    precision: str  # "fp32" | "fp16" | "int8": what its convs compute in (TensorRT builds the file's own types)
    role: str  # one of ROLES
    stage: str  # the stage that writes its file (an e2e variant: its detector's)
    output: str  # that stage's output key; the file is <output>.onnx (the export stages': model.onnx)
    made_from: str = ""  # the variant its file is made from (quantized or converted: the FP32 one; e2e: the detector)
    method: str = ""  # how: "export" | "ptq" | "accuracy-aware" | "ultralytics" | "fp16" | "int8-fp16" | "e2e"

    @property
    def stats_stage(self) -> str:
        """The stage whose 'info' (params, MACs) describes the network."""
        return "load" if self.model == "base" else "finetune"

    def as_dict(self) -> dict:
        return asdict(self)


def _made(name, model, precision, role, stage, made_from, method) -> Variant:
    return Variant(name, model, precision, role, stage, name, made_from, method)


def _e2e(of: Variant) -> Variant:
    return Variant(f"{of.name}-e2e", of.model, of.precision, "e2e", of.stage, of.output, of.name, "e2e")


BASE_FP32 = Variant("base-fp32", "base", "fp32", "base", "export", "onnx", method="export")
PRUNED_FP32 = Variant("pruned-fp32", "pruned", "fp32", "pruned", "export-pruned", "onnx", method="export")
BASE_INT8 = _made("base-int8", "base", "int8", "base", "quantize", "base-fp32", "ptq")
PRUNED_INT8_PTQ = _made("pruned-int8-ptq", "pruned", "int8", "pruned", "quantize", "pruned-fp32", "ptq")
PRUNED_INT8 = _made("pruned-int8", "pruned", "int8", "pruned", "quantize", "pruned-fp32", "accuracy-aware")
ULTRALYTICS_INT8 = _made("pruned-ultralytics-int8", "pruned", "int8", "peer", "quantize", "pruned-fp32",
                         "ultralytics")
BASE_FP16 = _made("base-fp16", "base", "fp16", "base", "engine", "base-fp32", "fp16")
PRUNED_FP16 = _made("pruned-fp16", "pruned", "fp16", "pruned", "engine", "pruned-fp32", "fp16")
PRUNED_INT8_FP16 = _made("pruned-int8-fp16", "pruned", "int8", "pruned", "engine", "pruned-int8", "int8-fp16")
BASE_INT8_FP16 = _made("base-int8-fp16", "base", "int8", "base", "engine", "base-int8", "int8-fp16")

# Every variant a run can have, in the order the report lists them (e2e graphs after their detectors' table).
CATALOG = (BASE_FP32, PRUNED_FP32, BASE_INT8, PRUNED_INT8_PTQ, PRUNED_INT8, ULTRALYTICS_INT8, BASE_FP16, PRUNED_FP16,
           PRUNED_INT8_FP16, BASE_INT8_FP16)
E2E = tuple(_e2e(v) for v in (BASE_FP32, PRUNED_FP32, PRUNED_INT8))
BY_NAME = {v.name: v for v in CATALOG + E2E}
# The variants ultralytics' own validator scores too, from the checkpoint their file was exported from
CROSS_CHECKED = (BASE_FP32, PRUNED_FP32)


def fp32_source(v: Variant) -> str:
    """The FP32 variant a variant's file was made from, through every step (pruned-int8-fp16 -> pruned-int8 ->
    pruned-fp32); an FP32 variant's own name."""
    while v.precision != "fp32" and v.made_from:
        v = BY_NAME[v.made_from]
    return v.name


def made_by(stage: str) -> tuple[Variant, ...]:
    """The catalog's variants whose file `stage` writes."""
    return tuple(v for v in CATALOG if v.stage == stage)


def get(name: str) -> Variant:
    return BY_NAME[name]
