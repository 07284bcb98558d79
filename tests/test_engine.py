"""Strongly typed FP16/INT8 ONNX decided on the dev box, checked by ORT and check-trt (and the checks refuse a wrong
file); the Polygraphy build chain, the plan sidecar and cache key, and the refusals; all without TensorRT."""

import ast
import json
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from conftest import ROOT, cli
from onnx import TensorProto, helper, numpy_helper

from pipeline.adapters.family import family_named
from pipeline.core.errors import UserError
from pipeline.eval.detect import PrePost, letterbox
from pipeline.quant import fp16, trt_check
from pipeline.quant import ort_qdq as oq

F11 = family_named("yolo11")


@pytest.fixture(scope="module")
def files(tmp_path_factory, base_ckpt_path):
    """FP32 export of the shipped base at 320, a minmax Q/DQ of it, and 4 letterboxed synthetic images."""
    from pipeline.adapters import ultralytics_yolo as ua
    from pipeline.data.synthetic import SynthSpec, generate

    d = tmp_path_factory.mktemp("eng")
    fp32 = ua.export_onnx(base_ckpt_path, d / "base.onnx", imgsz=320, opset=17, simplify=True)
    ds = generate(d / "ds", SynthSpec(seed=3, train=8, val=4))
    lb = lambda ps: np.concatenate([letterbox(cv2.imread(str(p)), PrePost(imgsz=320))[0] for p in ps])
    x = lb(sorted((ds / "images" / "val").glob("*.jpg")))
    calib = lb(sorted((ds / "images" / "train").glob("*.jpg")))
    dec = oq.head_decode_nodes(onnx.load(str(fp32)), ["detect-decode"])
    cache = oq.compute_ranges(fp32, calib, "minmax", d / "c.json", d, decode=dec)
    qdq = oq.quantize(fp32, d / "int8.onnx", cache, "minmax", dec)
    return {"dir": d, "fp32": fp32, "qdq": qdq, "x": x, "decode": dec}


def _types(path):
    m = onnx.load(str(path))
    return m, {t.name: t.data_type for t in m.graph.initializer}


@pytest.mark.slow
def test_fp16_variant_is_strongly_typed_and_matches_fp32(files):
    from pipeline.stages.engine import fp16_parity_failure, make_variant

    dest = files["dir"] / "base-fp16.onnx"
    info = make_variant("fp16", files["fp32"], dest, files["fp32"], files["x"], 320, files["dir"], F11)
    m, inits = _types(dest)
    assert [i.type.tensor_type.elem_type for i in list(m.graph.input) + list(m.graph.output)] == [TensorProto.FLOAT] * 2
    weights = {n.name: n.input[1] for n in m.graph.node if n.op_type == "Conv"}
    assert inits[weights["/model.0/conv/Conv"]] == TensorProto.FLOAT16
    assert inits[weights["/model.23/dfl/conv/Conv"]] == TensorProto.FLOAT  # the head decode stays FP32
    assert info["fp16_nodes"] > 250 and info["fp32_float_nodes"] == len(files["decode"])
    assert info["trt_check"] == "passed (TensorRT 10.3)" and trt_check.check_file(dest) == []
    # ORT's CPU has no FP16 Conv: the record names it and the gate is the FP16-rounded graph
    assert "Conv" in info["ort_cpu_missing_fp16"]
    for k in ("parity_emulated", "parity_ort"):
        assert fp16_parity_failure(info[k], 320) is None and info[k]["nonfinite"] == 0, info


@pytest.mark.slow  # its module fixture exports and converts the shipped base (~8 s)
def test_emulated_graph_rounds_weights_and_activations_to_fp16(files):
    d = files["dir"]
    fp16.convert_file(files["fp32"], d / "emu.onnx", files["decode"], emulate=True)
    m, inits = _types(d / "emu.onnx")
    assert set(inits.values()) <= {TensorProto.FLOAT, TensorProto.INT64}
    w = next(numpy_helper.to_array(t) for t in m.graph.initializer if t.name == next(
        n.input[1] for n in m.graph.node if n.name == "/model.0/conv/Conv"))
    assert np.array_equal(w, w.astype(np.float16).astype(np.float32))  # FP16 values, stored FP32
    rounds = [n for n in m.graph.node if n.op_type == "Cast" and n.name.endswith("_round")]
    assert len(rounds) > 250


@pytest.mark.slow
def test_int8_variant_keeps_fp32_qdq_scales_and_fp16_around(files):
    from pipeline.stages.engine import INT8_FP16_RATIO, make_variant

    dest = files["dir"] / "int8_fp16.onnx"
    info = make_variant("int8", files["qdq"], dest, files["fp32"], files["x"], 320, files["dir"], F11)
    m, inits = _types(dest)
    qdq = [n for n in m.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq and all(inits[n.input[1]] == TensorProto.FLOAT for n in qdq)
    assert TensorProto.FLOAT16 in inits.values()
    prod = {o: n for n in m.graph.node for o in n.output}
    conv = next(n for n in m.graph.node if n.name == "/model.2/cv1/conv/Conv")
    assert prod[conv.input[1]].op_type == "Cast" and prod[prod[conv.input[1]].input[0]].op_type == "DequantizeLinear"
    assert 0 < info["fp16_alone_error"] < info["int8_error"]
    assert info["int8_fp16_error_emulated"] <= INT8_FP16_RATIO * info["int8_error"]
    assert trt_check.check_file(dest) == []
    assert len(oq.quantized_nodes(onnx.load(str(files["qdq"])))) > 50


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["fp16", "int8"])
def test_the_parity_checks_refuse_a_wrong_conversion(files, kind, monkeypatch):
    """A conversion bug in the file written, the FP16-rounded reference graph right: one mid-network conv lost
    (weights zero). Both checks must refuse the file. (They are coarse by design: a 10% error in that conv moves
    FP16 scores by 3e-2, within the tolerance, and INT8's own rounding hides even a 50% one, 1.07x the INT8 error;
    bench's mAP of each variant is the finer check.)"""
    from pipeline.stages.engine import make_variant

    real = fp16.convert_file

    def buggy(src, dest, keep_fp32=(), emulate=False):
        rep = real(src, dest, keep_fp32, emulate)
        if not emulate:
            m = onnx.load(str(dest))
            conv = next(n for n in m.graph.node if n.name == "/model.8/cv1/conv/Conv")
            prod = {o: n for n in m.graph.node for o in n.output}
            w = conv.input[1] if conv.input[1] not in prod else prod[conv.input[1]].input[0]  # INT8: Cast <- DQ
            w = w if w not in prod else prod[w].input[1]  # the DQ's scale (FP32), else the FP16 weight itself
            t = next(t for t in m.graph.initializer if t.name == w)
            a = numpy_helper.to_array(t)
            t.CopyFrom(numpy_helper.from_array((a * 0.0).astype(a.dtype), t.name))
            onnx.save(m, str(dest))
        return rep

    monkeypatch.setattr(fp16, "convert_file", buggy)
    src = files["fp32"] if kind == "fp16" else files["qdq"]
    with pytest.raises(UserError, match="FP16 output differs|INT8 with FP16 around it") as e:
        make_variant(kind, src, files["dir"] / f"{kind}_wrong.onnx", files["fp32"], files["x"], 320, files["dir"], F11)
    print(f"{kind}: {e.value}")


def test_fp16_parity_reads_percentiles_and_bounds_one_anchor_loosely():
    """One live anchor's box 1.3 px off (a pruned YOLO26n's honest FP16 rounding at 416 px, a 153 px box) passes; a
    shift of every live box by 1 px, a non-finite output, or one anchor 8 px off does not."""
    from pipeline.stages.engine import LIVE, _diff, fp16_parity_failure

    rng = np.random.default_rng(0)
    ref = []
    for _ in range(4):
        a = np.zeros((1, 7, 3549), np.float32)
        a[0, :4] = rng.uniform(0, 416, (4, 3549))
        a[0, 4:] = rng.uniform(0, 0.2, (3, 3549))
        a[0, 4, :300] = rng.uniform(LIVE + 0.01, 0.9, 300)  # 300 live anchors an image
        ref.append(a)

    def run(change):
        got = [a.copy() for a in ref]
        change(got)
        return fp16_parity_failure(_diff(ref, got), 416)

    def one_anchor(px):
        def change(got):
            got[1][0, 2, 7] += px
        return change

    def shift_all(got):
        for g in got:
            g[0, :4] += 1.0

    def overflow(got):
        got[2][0, 0, 3000] = np.inf

    assert run(lambda got: None) is None and run(one_anchor(1.3)) is None
    assert "99th percentile of live anchors' box coordinates" in run(shift_all)
    assert "non-finite" in run(overflow)
    assert "the largest live anchor's box coordinate" in run(one_anchor(8.0))


# ---- check-trt: one file per rule ----------------------------------------------------------------------------------

def _qdq_model(opset=17, zp=np.int8(0), scale_dtype=np.float32, w_axis=0, domain="", dyn=False, extra=None):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n" if dyn else 1, 4, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    w = np.random.default_rng(0).integers(-5, 5, (8, 4, 3, 3)).astype(np.int8)
    ws = np.full(8 if w_axis == 0 else 4, 0.01, scale_dtype)
    inits = [numpy_helper.from_array(np.array(0.1, scale_dtype), "s"), numpy_helper.from_array(np.array(zp), "zp"),
             numpy_helper.from_array(w, "w"), numpy_helper.from_array(ws, "ws"),
             numpy_helper.from_array(np.zeros(ws.shape, np.int8), "wzp")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"], name="q", domain=domain),
             helper.make_node("DequantizeLinear", ["xq", "s", "zp"], ["xd"], name="dq", domain=domain),
             helper.make_node("DequantizeLinear", ["w", "ws", "wzp"], ["wd"], name="wdq", axis=w_axis),
             helper.make_node("Conv", ["xd", "wd"], ["y"], name="conv", pads=[1, 1, 1, 1])]
    if extra:
        extra(nodes, inits)
    ops = [helper.make_opsetid("", opset)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    return helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits), opset_imports=ops)


def test_check_trt_passes_a_clean_qdq_model():
    assert trt_check.check(_qdq_model()) == []


@pytest.mark.parametrize("kw,needle", [
    ({"zp": np.uint8(0)}, "zero point of type uint8"),
    ({"zp": np.int8(3)}, "non-zero zero point"),
    ({"w_axis": 1}, "TensorRT needs the output-channel axis 0"),
    ({"domain": "com.microsoft"}, "from domain 'com.microsoft'"),
    ({"opset": 12}, "opset 12 outside"),
    ({"dyn": True}, "dynamic input shape"),
    ({"opset": 19, "scale_dtype": np.float16}, "scale of type FLOAT16"),
])
def test_check_trt_refuses_each_rule(kw, needle):
    v = trt_check.check(_qdq_model(**kw))
    assert any(needle in str(x) for x in v), (needle, [str(x) for x in v])


def test_check_trt_refuses_strong_typing_breaks(tmp_path):
    def mixed(nodes, inits):  # an Add of an FP16 and an FP32 tensor: a strongly typed network inserts no cast
        inits.append(numpy_helper.from_array(np.ones(1, np.float16), "h"))
        nodes.append(helper.make_node("Add", ["y", "h"], ["z"], name="mixed_add"))

    v = trt_check.check(_qdq_model(extra=mixed))
    assert any("does not type-check strictly" in str(x) for x in v), v

    def double(nodes, inits):
        inits.append(numpy_helper.from_array(np.ones(1, np.float64), "d"))

    assert any("DOUBLE tensor" in str(x) for x in trt_check.check(_qdq_model(extra=double)))

    def inf16(nodes, inits):
        inits.append(numpy_helper.from_array(np.array([np.inf], np.float16), "big"))

    assert any("inf/NaN" in str(x) for x in trt_check.check(_qdq_model(extra=inf16)))
    bad = tmp_path / "bad.onnx"
    onnx.save(_qdq_model(extra=double), str(bad))
    r = cli("check-trt", bad)
    assert r.returncode == 2 and "DOUBLE tensor" in r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("source", ["fp32", "qdq"])
def test_check_trt_passes_our_strongly_typed_files(files, tmp_path, source):
    fp16.convert_file(files[source], tmp_path / "a.onnx", files["decode"])
    r = cli("check-trt", tmp_path / "a.onnx")
    assert r.returncode == 0 and "strong-typing rules" in r.stdout, r.stderr[-800:]


def table_without(tmp_path, monkeypatch, *ops) -> str:
    """A hand-made operator table (JetPack 6's with `ops` marked unsupported) stored as TensorRT '0.1'. The loaded
    tables' cache is emptied first, so an earlier test's '0.1' (another op removed) is never read back; after the
    test, '0.1' leaves trt_ops.FILES again and no lookup reaches the cache."""
    from pipeline.quant import trt_ops

    trt_ops._load.cache_clear()
    d = json.loads((trt_ops.DATA / "trt-10.3.json").read_text())
    for op in ops:
        d["operators"][op]["supported"] = False
    (tmp_path / "trt-0.1.json").write_text(json.dumps(d))
    monkeypatch.setitem(trt_ops.FILES, "0.1", str(tmp_path / "trt-0.1.json"))
    return "0.1"


@pytest.mark.slow
def test_the_engine_stage_refuses_a_file_its_tensorrt_would_not_parse(files, tmp_path, monkeypatch):
    """make_variant checks the file it writes against the target TensorRT's operator table: with a table that
    lacks Sigmoid, the strongly typed file is refused in one line naming the node, the op and the TensorRT."""
    from pipeline.stages.engine import make_variant

    trt = table_without(tmp_path, monkeypatch, "Sigmoid")
    with pytest.raises(UserError, match=r"TensorRT 0\.1 would not build the strongly typed fp16 model \(\d+ "
                                        r"violation\(s\)\), first: node '.*' \(Sigmoid\): not supported in "
                                        r"TensorRT 0\.1"):
        make_variant("fp16", files["fp32"], tmp_path / "a.onnx", files["fp32"], files["x"], 320, tmp_path, F11,
                     files["decode"], tensorrt=trt)


def test_a_recipe_names_a_tensorrt_with_a_stored_table(tmp_path):
    from pipeline.core.config import load_recipe

    assert load_recipe(ROOT / "models" / "default.yaml").engine.tensorrt == "10.3"
    assert load_recipe(ROOT / "models" / "default.yaml", ["engine.tensorrt=11"]).engine.tensorrt == "11"
    with pytest.raises(UserError, match=r"recipe key 'engine.tensorrt': .*no ONNX operator table for TensorRT 8\.6"):
        load_recipe(ROOT / "models" / "default.yaml", ["engine.tensorrt=8.6"])


# ---- no precision flag anywhere ----------------------------------------------------------------------------------

def test_no_code_path_sets_a_tensorrt_precision_flag():
    """AST-level grep over the package: no BuilderFlag.FP16/INT8/BF16/FP8/TF32, no CreateConfig(fp16=/int8=...),
    no INT8 calibrator or platform_has_fast_* query."""
    banned_attr = {"FP16", "INT8", "BF16", "FP8", "TF32", "INT4", "FP4", "platform_has_fast_fp16",
                   "platform_has_fast_int8", "IInt8EntropyCalibrator2", "IInt8MinMaxCalibrator", "int8_calibrator"}
    banned_kw = {"fp16", "int8", "bf16", "fp8", "tf32", "calibrator"}
    hits = []
    for p in sorted((ROOT / "pipeline").rglob("*.py")):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in banned_attr:
                hits.append(f"{p.relative_to(ROOT)}:{node.lineno} .{node.attr}")
            if isinstance(node, ast.Call) and any(k.arg in banned_kw for k in node.keywords):
                hits.append(f"{p.relative_to(ROOT)}:{node.lineno} {[k.arg for k in node.keywords]}")
    assert not hits, hits
    assert "set_flag" not in (ROOT / "pipeline/backends/tensorrt.py").read_text().replace(
        "config.set_flag(trt.BuilderFlag.GPU_FALLBACK)", "")


# ---- Polygraphy chain, sidecar, cache key, refusals (no TensorRT needed) ------------------------------------------

def test_polygraphy_chain_is_strongly_typed_and_configured_without_building(files, tmp_path):
    from pipeline.backends import tensorrt as t

    tc = tmp_path / "timing.cache"
    tc.write_bytes(b"x")
    spec = t.BuildSpec(precision="fp16", workspace_mib=512, dla_core=-1, builder_optimization_level=4)
    network, config, engine = t.loaders(files["fp32"], spec, tc)
    assert type(network).__name__ == "NetworkFromOnnxPath" and network.strongly_typed is True
    assert network.path == str(files["fp32"])
    base = config._config
    assert type(base).__name__ == "CreateConfig"
    assert base.builder_optimization_level == 4 and base.timing_cache_path == str(tc)
    assert not (base.fp16 or base.int8 or base.bf16 or base.fp8 or base.tf32 or base.use_dla)
    assert base.calibrator is None
    assert type(engine).__name__ == "EngineFromNetwork" and engine.timing_cache_path == str(tc)
    _, config, _ = t.loaders(files["fp32"], spec, tmp_path / "absent.cache")
    assert config._config.timing_cache_path is None  # first build: no cache to load, one is saved


def test_postprocess_sets_pool_dla_core_fallback_and_records_layers(monkeypatch):
    from types import SimpleNamespace as NS

    from pipeline.backends import tensorrt as t

    fake = NS(MemoryPoolType=NS(WORKSPACE="ws"), DeviceType=NS(DLA="dla"), BuilderFlag=NS(GPU_FALLBACK="gpu_fb"))
    monkeypatch.setattr(t, "_trt", lambda: fake)
    layers = [NS(name="conv0"), NS(name="resize"), NS(name="conv1")]
    network = NS(num_layers=3, get_layer=lambda i: layers[i])
    calls = {}
    config = NS(set_memory_pool_limit=lambda k, v: calls.setdefault("pool", (k, v)),
                set_flag=lambda f: calls.setdefault("flags", []).append(f),
                can_run_on_DLA=lambda layer: layer.name != "resize")
    report = {}
    t._postprocess(t.BuildSpec("int8", workspace_mib=64, dla_core=1), report)(None, network, config)
    assert calls["pool"] == ("ws", 64 << 20) and calls["flags"] == ["gpu_fb"]
    assert config.default_device_type == "dla" and config.DLA_core == 1
    assert report["dla_fallback_layers"] == ["resize"]


ORIN_ENV = {"tensorrt": "10.3.0", "device": "Orin", "sm": "8.7", "l4t": "R36.4.3"}


@pytest.mark.parametrize("key,other", [("tensorrt", "11.0.0"), ("device", "NVIDIA H200"), ("sm", "9.0"),
                                       ("l4t", None)], ids=["tensorrt", "device", "sm", "l4t"])
def test_cache_key_changes_with_each_field_of_the_environment(key, other):
    from pipeline.backends import tensorrt as t

    spec = t.BuildSpec("fp16")
    assert t.cache_key("abc", spec, {**ORIN_ENV, key: other}) != t.cache_key("abc", spec, ORIN_ENV)


def test_cache_key_and_sidecar_refuse_another_tensorrt_or_device(tmp_path):
    from pipeline.backends import tensorrt as t

    env = ORIN_ENV
    spec = t.BuildSpec("fp16")
    k = t.cache_key("abc", spec, env)
    assert t.cache_key("abd", spec, env) != k and t.cache_key("abc", t.BuildSpec("int8"), env) != k
    t.check_compatible(env, env, "m.plan")
    with pytest.raises(UserError) as e:
        t.check_compatible({**env, "tensorrt": "10.3.0"}, {**env, "tensorrt": "11.0.0", "device": "NVIDIA H200",
                                                             "sm": "9.0", "l4t": None}, "m.plan")
    msg = str(e.value)
    assert "\n" not in msg and "TensorRT 10.3.0 on Orin (SM 8.7, L4T R36.4.3)" in msg
    assert "TensorRT 11.0.0 on NVIDIA H200 (SM 9.0, L4T none)" in msg
    rel = tmp_path / "nv_tegra_release"
    rel.write_text("# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64, DATE: x\n")
    assert t.l4t_release(rel) == "R36.4.3" and t.l4t_release(tmp_path / "absent") is None


def test_refusals_are_one_line_user_errors(files, tmp_path):
    from pipeline.backends import tensorrt as t

    with pytest.raises(UserError, match="unknown precision 'int4'"):
        t.BuildSpec(precision="int4")
    t.validate(files["fp32"], t.BuildSpec("fp16", dla_core=0), num_dla_cores=2)
    with pytest.raises(UserError, match="has no DLA cores .Orin Nano has none."):
        t.validate(files["fp32"], t.BuildSpec("fp16", dla_core=0), num_dla_cores=0, device="Orin Nano")
    m = onnx.load(str(files["fp32"]))
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    dyn = tmp_path / "dyn.onnx"
    onnx.save(m, str(dyn))
    with pytest.raises(UserError, match="DLA needs static input shapes but 'images' is dynamic"):
        t.validate(dyn, t.BuildSpec("fp16", dla_core=0), num_dla_cores=2)
    t.validate(dyn, t.BuildSpec("fp16"), num_dla_cores=0)  # the GPU takes dynamic shapes (with a profile)


def test_trtexec_line_is_strongly_typed():
    from pipeline.backends import tensorrt as t

    line = t.trtexec_command("m.onnx", t.BuildSpec("int8", dla_core=0), "m.plan", "t.cache")
    assert line.startswith("trtexec --onnx=m.onnx --stronglyTyped --saveEngine=m.plan")
    assert "--memPoolSize=workspace:2048M" in line and "--timingCacheFile=t.cache" in line
    assert "--useDLACore=0 --allowGPUFallback" in line
    assert "--fp16" not in line and "--int8" not in line


# ---- the stage, as `make engine` runs it --------------------------------------------------------------------------

@pytest.mark.slow
def test_make_engine_writes_strongly_typed_onnx_then_needs_tensorrt(tmp_path, base_ckpt_path):
    from pipeline.backends.tensorrt import tensorrt_available

    run = tmp_path / "run"
    sets = ["--set", "data.synthetic.train=8", "--set", "data.synthetic.val=4", "--set", "prune.enabled=false",
            "--set", "quantize.enabled=false", "--set", f"model.weights={base_ckpt_path}"]
    r = cli("run", "--run-dir", run, "--stages", "data,load,export", *sets)
    assert r.returncode == 0, r.stderr[-2000:]
    r = cli("stage", "engine", "--run-dir", run, *sets)
    rec = json.loads((run / "engine" / "record.json").read_text())
    assert (run / "engine" / "base-fp16.onnx").is_file() and "base-fp16" in rec["outputs"]
    assert rec["metrics"]["base-fp16"]["trt_check"] == "passed (TensorRT 10.3)"
    assert rec["config"]["tensorrt"]["version"] == "10.3"
    ok, why = tensorrt_available()
    if ok:
        assert r.returncode == 0, r.stderr[-2000:]
        assert list((run / "engines").glob("base-fp16-*.plan"))
    else:
        last = r.stderr.strip().splitlines()[-1]
        assert r.returncode == 2 and "Traceback" not in r.stderr
        assert last.startswith("error: wrote the strongly typed ONNX files (base-fp16)")
        assert "building the TensorRT engines needs TensorRT (JetPack on the device)" in last
    r = cli("engine", "--run-dir", run, "--print-trtexec", *sets)
    assert r.returncode == 0 and "engine: cached" in r.stderr, r.stderr[-1500:]
    assert r.stdout.startswith("trtexec --onnx=") and "--stronglyTyped" in r.stdout
    assert Path(r.stdout.split()[1].split("=", 1)[1]).name == "base-fp16.onnx"
    # `yolo-edge run` runs the stage too: without TensorRT it says so in one line and goes on (exit 0)
    r = cli("run", "--run-dir", run, "--stages", "data,load,export,engine", *sets)
    assert r.returncode == 0, r.stderr[-2000:]
    if not ok:
        err = " ".join(r.stderr.split())
        assert "no TensorRT engine built here" in err and "`make engine` on the device" in err
