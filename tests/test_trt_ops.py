"""check-trt's ONNX operator tables (onnx-tensorrt docs/operators.md per TensorRT release): the tables read as the
source writes them, and one hand-made file per kind of rule, refused with its reason (or, where the releases differ,
refused by one and taken by the other)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import cli
from onnx import TensorProto, helper, numpy_helper

from pipeline.core.errors import UserError
from pipeline.quant import trt_ops


@pytest.mark.parametrize("trt", ["10.6", "11"])
def test_the_rows_both_tables_share_read_as_the_source_checked_by_hand(trt):
    t = trt_ops.matrix(trt)
    assert t.source["repository"] == "onnx/onnx-tensorrt" and t.source["path"] == "docs/operators.md"
    assert len(t.source["commit"]) == 40 and len(t.operators) > 190
    assert t.operators["NonMaxSuppression"]["types"] == {"FP32", "FP16"}
    assert t.operators["Cast"]["types"] == {"FP32", "FP16", "BF16", "INT32", "INT64", "UINT8", "BOOL"}
    assert t.operators["ReduceSum"]["restrictions"] == "`axes` must be an initializer"
    assert t.operators["TopK"]["restrictions"] == "`sorted` must be 1. `K` input must be less than 3840."
    assert not t.operators["Det"]["supported"] and not t.operators["NonMaxSuppression"]["restrictions"]


def test_the_tables_read_as_the_source_rows_checked_by_hand():
    t10, t11 = trt_ops.matrix("10.6"), trt_ops.matrix("11")
    assert t10.version == "10.6" and t11.version == "11.0" and trt_ops.matrix("10").version == "10.3"
    assert t10.opset_range == (9, 22) and t11.opset_range == (9, 24)
    assert t10.operators["ScatterND"]["restrictions"] == "`reduction` is not supported"
    assert t11.operators["ScatterND"]["restrictions"] == "`reduction` other than `none` is not supported"
    assert t10.operators["Pow"]["types"] == {"FP32", "FP16", "BF16"}
    assert t11.operators["Pow"]["types"] == {"FP32", "FP16", "BF16", "INT32", "INT64"}
    assert t10.operators["DequantizeLinear"]["types"] == {"INT8", "FP8", "INT4"}
    assert t11.operators["DequantizeLinear"]["types"] == {"INT8", "FP8", "FP4", "INT4"}
    assert "ConstantOfShape" in t10.operators and "INT64" in t10.operators["ConstantOfShape"]["types"]  # its INF64
    assert "Attention" in t11.operators and "Attention" not in t10.operators
    with pytest.raises(UserError, match="no ONNX operator table for TensorRT 9"):
        trt_ops.matrix("9")


def test_the_10_3_table_is_10_6_with_the_changelogs_10_4_to_10_6_changes_taken_back():
    """JetPack 6's 10.3 has no stored table: trt-10.3.json is 10.6's rows with what onnx-tensorrt's changelog says
    10.4 (tensor `axes` for Pad; the three window ops), 10.5 (STFT) and 10.6 (ONNX 1.17) added taken back."""
    t3, t6 = trt_ops.matrix("10.3"), trt_ops.matrix("10.6")
    assert t3.source["derived_from"] == "trt-10.6.json" and t3.source["path"] == "docs/Changelog.md"
    assert t3.source["commit"] == t6.source["commit"] and t3.opset_range == (9, 19)
    changed = {op for op in t6.operators if t3.operators[op] != t6.operators[op]}
    assert changed == {"Pad", "STFT", "BlackmanWindow", "HammingWindow", "HannWindow"}
    assert t3.operators["Pad"]["restrictions"] == "`axes` must be an initializer"
    assert t6.operators["STFT"]["supported"] and not t3.operators["STFT"]["supported"]


def _model(nodes, inputs, outputs, inits=(), opset=17):
    g = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def _f(name, shape, t=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, t, shape)


def _topk(k=10, sorted_=1, k_input=False):
    inits = [] if k_input else [numpy_helper.from_array(np.array([k], np.int64), "k")]
    ins = [_f("x", [1, 5000])] + ([_f("k", [1], TensorProto.INT64)] if k_input else [])
    return _model([helper.make_node("TopK", ["x", "k"], ["v", "i"], name="topk", sorted=sorted_)], ins,
                  [_f("v", None), _f("i", None, TensorProto.INT64)], inits)


def _reduce_sum(axes_input):
    inits = [] if axes_input else [numpy_helper.from_array(np.array([1], np.int64), "axes")]
    ins = [_f("x", [2, 3], TensorProto.INT32)] + ([_f("axes", [1], TensorProto.INT64)] if axes_input else [])
    return _model([helper.make_node("ReduceSum", ["x", "axes"], ["y"], name="rsum")], ins,
                  [_f("y", None, TensorProto.INT32)], inits)


def _resize(mode="linear", antialias=0):
    sizes = numpy_helper.from_array(np.array([1, 3, 8, 8], np.int64), "sizes")
    return _model([helper.make_node("Resize", ["x", "", "", "sizes"], ["y"], name="rs", mode=mode,
                                    antialias=antialias)], [_f("x", [1, 3, 4, 4])], [_f("y", None)], [sizes],
                  opset=18)


def _maxpool(kernel=(2, 2), dilations=None):
    kw = {"dilations": list(dilations)} if dilations else {}
    return _model([helper.make_node("MaxPool", ["x"], ["y"], name="mp", kernel_shape=list(kernel), **kw)],
                  [_f("x", [1, 3, 8] + [8] * (len(kernel) - 1))], [_f("y", None)])


def _scatter(reduction=None):
    kw = {"reduction": reduction} if reduction else {}
    inits = [numpy_helper.from_array(np.array([[0]], np.int64), "idx"),
             numpy_helper.from_array(np.ones(1, np.float32), "upd")]
    return _model([helper.make_node("ScatterND", ["x", "idx", "upd"], ["y"], name="sc", **kw)],
                  [_f("x", [4])], [_f("y", None)], inits, opset=18)


def _uint8_inside():
    return _model([helper.make_node("Identity", ["x"], ["mid"], name="id"),
                   helper.make_node("Cast", ["mid"], ["y"], name="cast", to=TensorProto.FLOAT)],
                  [_f("x", [4], TensorProto.UINT8)], [_f("y", None)])


def _custom_domain():
    m = _model([helper.make_node("Plugged", ["x"], ["y"], name="pl", domain="com.example")], [_f("x", [4])],
               [_f("y", [4])])
    m.opset_import.append(helper.make_opsetid("com.example", 1))
    return m


def _unsupported():
    return _model([helper.make_node("Det", ["x"], ["y"], name="det")], [_f("x", [3, 3])], [_f("y", None)])


def _pow_int32():
    return _model([helper.make_node("Pow", ["x", "x"], ["y"], name="pow")], [_f("x", [4], TensorProto.INT32)],
                  [_f("y", None, TensorProto.INT32)])


def _clean_opset(opset):
    return _model([helper.make_node("Relu", ["x"], ["y"], name="relu")], [_f("x", [4])], [_f("y", None)],
                  opset=opset)


@pytest.mark.parametrize("make,needle", [
    (lambda: _topk(k=4000), "K = 4000 must be less than 3840"),
    (lambda: _topk(sorted_=0), "`sorted` must be 1"),
    (lambda: _topk(k_input=True), "`K` must be a constant here"),
    (lambda: _reduce_sum(axes_input=True), "input `axes` (axes) must be an initializer"),
    (lambda: _resize(mode="cubic"), "`mode` 'cubic' is not one of ['linear', 'nearest']"),
    (lambda: _resize(antialias=1), "antialiasing is not supported"),
    (lambda: _maxpool(dilations=(2, 2)), "`dilations` [2, 2] must be empty or all ones"),
    (lambda: _maxpool(kernel=(2,)), "1D pooling: 2D or 3D only"),
    (lambda: _scatter("add"), "`reduction` 'add' is not supported"),
    (_uint8_inside, "a UINT8 tensor inside the network"),
    (_custom_domain, "op from domain 'com.example'"),
    (_unsupported, "not supported in TensorRT"),
], ids=["topk-k", "topk-sorted", "topk-k-input", "reducesum-axes", "resize-mode", "resize-antialias",
        "maxpool-dilations", "maxpool-1d", "scatternd-reduction", "uint8-inside", "custom-domain", "unsupported"])
@pytest.mark.parametrize("trt", ["10", "11"])
def test_each_kind_of_rule_is_refused_with_its_reason(make, needle, trt):
    v = [str(x) for x in trt_ops.check_ops(make(), trt)]
    assert any(needle in x for x in v), (needle, v)
    assert all(x.startswith("node '") for x in v)


@pytest.mark.parametrize("make", [lambda: _topk(), lambda: _reduce_sum(False), lambda: _resize(), lambda: _maxpool(),
                                  lambda: _scatter(), lambda: _scatter("none")], ids=["topk", "reducesum", "resize",
                                                                                     "maxpool", "scatternd",
                                                                                     "scatternd-none"])
def test_the_same_ops_within_the_rules_pass(make):
    assert trt_ops.check_ops(make(), "10") == [] and trt_ops.check_ops(make(), "11") == []


def test_where_the_releases_differ_the_answers_differ():
    v10 = [str(x) for x in trt_ops.check_ops(_pow_int32(), "10")]
    assert v10 and "INT32 tensor 'x': TensorRT 10.3 takes BF16, FP16, FP32 here" in v10[0]
    assert trt_ops.check_ops(_pow_int32(), "11") == []
    assert "opset 23: TensorRT 10.3 parses opsets 9 to 19" in str(trt_ops.check_ops(_clean_opset(23), "10")[0])
    assert trt_ops.check_ops(_clean_opset(23), "11") == []


def _pad_axes_input():
    ins = [_f("x", [1, 3, 4, 4]), _f("axes", [2], TensorProto.INT64)]
    inits = [numpy_helper.from_array(np.array([1, 1, 1, 1], np.int64), "pads")]
    return _model([helper.make_node("Pad", ["x", "pads", "", "axes"], ["y"], name="pad")], ins, [_f("y", None)],
                  inits, opset=18)


@pytest.mark.parametrize("make,needle", [
    (_pad_axes_input, "input `axes` (axes) must be an initializer (TensorRT 10.3)"),
    (lambda: _clean_opset(20), "opset 20: TensorRT 10.3 parses opsets 9 to 19"),
], ids=["pad-tensor-axes", "opset-20"])
def test_what_10_4_to_10_6_added_is_refused_for_jetpack_6_and_taken_by_10_6(make, needle):
    assert any(needle in str(x) for x in trt_ops.check_ops(make(), "10.3"))
    assert trt_ops.check_ops(make(), "10.6") == [] and trt_ops.check_ops(make(), "11") == []


@pytest.mark.parametrize("trt", ["10", "11"])
def test_where_is_checked_on_its_values_not_its_condition(trt):
    def where(t):
        return _model([helper.make_node("Where", ["c", "x", "y"], ["z"], name="where")],
                      [_f("c", [4], TensorProto.BOOL), _f("x", [4], t), _f("y", [4], t)], [_f("z", None, t)])

    assert trt_ops.check_ops(where(TensorProto.INT32), trt) == []
    v = [str(x) for x in trt_ops.check_ops(where(TensorProto.INT8), trt)]
    assert {"INT8 tensor 'x'", "INT8 tensor 'y'", "INT8 tensor 'z'"} <= {x[x.find("INT8 tensor"):][:15] for x in v}


def test_check_trt_gives_the_two_answers_from_the_command_line(tmp_path):
    f = tmp_path / "pow.onnx"
    onnx.save(_pow_int32(), str(f))
    r10 = cli("check-trt", f, "--trt", "10")
    assert r10.returncode == 2 and len(r10.stderr.strip().splitlines()[-1:]) == 1
    assert "TensorRT 10.3 would refuse it: 2 violation(s), first: node 'pow' (Pow): INT32 tensor 'x'" in r10.stderr
    r11 = cli("check-trt", f, "--trt", "11")
    assert r11.returncode == 0 and "passes TensorRT 11.0's ONNX operator table" in r11.stdout, r11.stderr
    r = cli("check-trt", f, "--trt", "8")
    assert r.returncode == 2 and "no ONNX operator table for TensorRT 8" in r.stderr
