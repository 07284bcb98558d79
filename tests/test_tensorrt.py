"""TensorRT: real code, run where TensorRT is importable (a Jetson, a GPU box); skipped here, saying why."""

import pytest

from pipeline.backends.tensorrt import BuildSpec, EngineBuilder, TensorRTRunner, tensorrt_available

OK, WHY = tensorrt_available()


def test_unavailable_runner_is_refused_with_the_reason():
    from pipeline.backends.base import get_runner
    from pipeline.core.errors import UserError

    if OK:
        pytest.skip("TensorRT is importable here: the refusal path does not apply")
    with pytest.raises(UserError, match="runner 'tensorrt' is not available here: tensorrt is not importable"):
        get_runner("tensorrt", "model.plan")
    assert "JetPack" in WHY


@pytest.mark.tensorrt
@pytest.mark.skipif(not OK, reason=f"TensorRT not available: {WHY}")
def test_build_and_run_engine_matches_onnxruntime(tmp_path):
    import numpy as np
    from conftest import BASE_CKPT

    from pipeline.adapters import ultralytics_yolo as ua
    from pipeline.backends.onnxruntime import OnnxRuntimeRunner

    onnx_path = ua.export_onnx(BASE_CKPT, tmp_path / "m.onnx", imgsz=320, opset=17, simplify=True)
    plan = EngineBuilder().build(onnx_path, BuildSpec(precision="fp32"), tmp_path)
    x = np.random.default_rng(0).random((1, 3, 320, 320), dtype=np.float32)
    trt_out = TensorRTRunner(plan).infer({"images": x})[0]
    ort_out = OnnxRuntimeRunner(onnx_path).infer({"images": x})[0]
    assert np.abs(trt_out - ort_out).max() < 1e-2
    assert EngineBuilder().build(onnx_path, BuildSpec(precision="fp32"), tmp_path) == plan  # cached by key
