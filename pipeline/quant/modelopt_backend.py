"""NVIDIA ModelOpt ONNX PTQ as a second quantization backend.

ModelOpt pins onnx and onnxruntime-gpu versions that clash with the main environment, so it lives in its own
virtual environment (`make modelopt-venv` -> .venv-modelopt) and runs as a subprocess on the same calibration
tensor. The stage says so, plainly, when that environment is missing."""

from __future__ import annotations

import subprocess
from pathlib import Path

from pipeline.core.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
VENV_PY = ROOT / ".venv-modelopt" / "bin" / "python"

SCRIPT = r"""
import sys
import numpy as np
from modelopt.onnx.quantization import quantize
src, dst, calib, method, exclude = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:]
quantize(onnx_path=src, quantize_mode="int8", calibration_data=np.load(calib), calibration_method=method,
         nodes_to_exclude=exclude or None, output_path=dst, high_precision_dtype="fp32", calibration_eps=["cpu"])
"""


def method_for(method: str) -> str:
    """ModelOpt's ONNX PTQ calibrates with max or entropy; a percentile request cannot be honoured: refused."""
    if method not in ("minmax", "entropy"):
        raise UserError(f"quantize.method={method} cannot be honoured by ModelOpt (it offers max and entropy "
                        f"calibration): use minmax or entropy with quantize.backend=modelopt")
    return {"minmax": "max", "entropy": "entropy"}[method]


def ensure_available() -> Path:
    if not VENV_PY.is_file():
        raise UserError("quantize.backend=modelopt needs ModelOpt's own environment, which is missing: run "
                        "`make modelopt-venv` (it pins onnx and onnxruntime-gpu, so it cannot share .venv)", VENV_PY)
    r = subprocess.run([str(VENV_PY), "-c", "import modelopt.onnx.quantization"], capture_output=True, text=True)
    if r.returncode != 0:
        raise UserError(f"ModelOpt does not import in its environment: {r.stderr.strip().splitlines()[-1][:200]}",
                        VENV_PY)
    return VENV_PY


def quantize(fp32: Path, dest: Path, calib_npy: Path, method: str, exclude: list[str]) -> str:
    """Quantize with ModelOpt; returns the calibration method name ModelOpt used."""
    ensure_available()
    mo_method = method_for(method)
    r = subprocess.run([str(VENV_PY), "-c", SCRIPT, str(fp32), str(dest), str(calib_npy), mo_method, *exclude],
                       capture_output=True, text=True)
    if r.returncode != 0 or not dest.is_file():
        raise UserError(f"ModelOpt quantization failed: {(r.stderr or r.stdout).strip().splitlines()[-1][:300]}", fp32)
    return mo_method
