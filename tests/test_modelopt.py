"""The ModelOpt backend lives in its own venv (`make modelopt-venv`); it is run where that venv exists."""

import pytest

from pipeline.core.errors import UserError
from pipeline.quant import modelopt_backend as mo


def test_percentile_cannot_be_honoured_by_modelopt():
    with pytest.raises(UserError, match="cannot be honoured by ModelOpt"):
        mo.method_for("percentile")
    assert mo.method_for("minmax") == "max" and mo.method_for("entropy") == "entropy"


def test_missing_venv_is_said_plainly(monkeypatch, tmp_path):
    monkeypatch.setattr(mo, "VENV_PY", tmp_path / "nope" / "bin" / "python")
    with pytest.raises(UserError, match="make modelopt-venv"):
        mo.ensure_available()


@pytest.mark.skipif(not mo.VENV_PY.is_file(), reason=f"{mo.VENV_PY} absent: `make modelopt-venv` makes it")
def test_modelopt_quantizes_to_a_trt_buildable_file(tmp_path):
    import numpy as np
    from conftest import BASE_CKPT

    from pipeline.adapters import ultralytics_yolo as ua
    from pipeline.quant import trt_check

    fp32 = ua.export_onnx(BASE_CKPT, tmp_path / "m.onnx", imgsz=320, opset=17, simplify=True)
    calib = tmp_path / "calib.npy"
    np.save(calib, np.random.default_rng(0).random((4, 3, 320, 320), dtype=np.float32))
    assert mo.quantize(fp32, tmp_path / "q.onnx", calib, "minmax", ["/model.23/dfl/conv/Conv"]) == "max"
    assert trt_check.check_file(tmp_path / "q.onnx") == []
