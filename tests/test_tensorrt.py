"""TensorRT: real code, run where TensorRT is importable (a Jetson, a GPU box); skipped here, saying why.

What needs no TensorRT (the strongly typed ONNX, the Polygraphy chain, sidecar, cache key, refusals) is in
test_engine.py."""

import json

import numpy as np
import pytest

from pipeline.backends.tensorrt import BuildSpec, EngineBuilder, TensorRTRunner, tensorrt_available

OK, WHY = tensorrt_available()


def test_unavailable_runner_is_refused_with_the_reason():
    from pipeline.backends.factory import get_runner
    from pipeline.core.errors import UserError

    if OK:
        pytest.skip("TensorRT is importable here: the refusal path does not apply")
    with pytest.raises(UserError, match="runner 'tensorrt' is not available here: tensorrt is not importable"):
        get_runner("tensorrt", "model.plan")
    assert "JetPack" in WHY


def test_the_module_imports_no_tensorrt_and_has_no_cudart_buffer_code():
    import sys
    from pathlib import Path

    import pipeline.backends.tensorrt as t

    if not OK:
        assert "tensorrt" not in sys.modules
    src = Path(t.__file__).read_text()
    assert "cudart" not in src and "cudaMalloc" not in src, "device buffers are Polygraphy's TrtRunner's job"


@pytest.mark.tensorrt
@pytest.mark.skipif(not OK, reason=f"TensorRT not available: {WHY}")
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_build_and_run_strongly_typed_engine_matches_onnxruntime(tmp_path, precision):
    from conftest import BASE_CKPT

    from pipeline.adapters import ultralytics_yolo as ua
    from pipeline.backends.onnxruntime import OnnxRuntimeRunner
    from pipeline.quant import fp16
    from pipeline.quant.ort_qdq import head_decode_nodes

    onnx_path = ua.export_onnx(BASE_CKPT, tmp_path / "m.onnx", imgsz=320, opset=17, simplify=True)
    ref_path = onnx_path
    if precision == "fp16":
        import onnx

        dec = head_decode_nodes(onnx.load(str(onnx_path)), ["detect-decode"])
        fp16.convert_file(onnx_path, tmp_path / "m_fp16.onnx", dec)
        onnx_path = tmp_path / "m_fp16.onnx"
    spec = BuildSpec(precision=precision)
    plan = EngineBuilder().build(onnx_path, spec, tmp_path / "plans")
    side = json.loads(plan.with_suffix(".json").read_text())
    assert side["strongly_typed"] and side["spec"]["precision"] == precision and side["tensorrt"]
    assert side["inputs"][0]["dtype"] == "float" and side["onnx_sha256"]
    assert (tmp_path / "plans" / "timing.cache").is_file()  # saved for the next build
    x = np.random.default_rng(0).random((1, 3, 320, 320), dtype=np.float32)
    trt_out = TensorRTRunner(plan).infer({"images": x})[0]
    ort_out = OnnxRuntimeRunner(ref_path).infer({"images": x})[0]
    tol = 1e-2 if precision == "fp32" else 0.5  # boxes in px; scores share the tensor
    assert np.abs(trt_out - ort_out).max() < tol
    assert EngineBuilder().build(onnx_path, spec, tmp_path / "plans") == plan  # cached by key
