"""The one place that knows ultralytics (pinned: 8.4.190). Loads YOLO11 checkpoints and yamls, drives the
stock trainer, validator and ONNX exporter, offline. Nothing here patches ultralytics; contract tests in
tests/test_adapter.py say when an upgrade breaks what we rely on."""

from __future__ import annotations

import contextlib
import io
import shutil
import tempfile
from pathlib import Path

from pipeline.adapters.offline import setup_offline

setup_offline()

import torch  # noqa: E402
import ultralytics  # noqa: E402
from ultralytics import YOLO  # noqa: E402
from ultralytics.nn.tasks import DetectionModel  # noqa: E402

from pipeline.core.errors import UserError  # noqa: E402
from pipeline.core.store import atomic_path  # noqa: E402

ULTRALYTICS_VERSION = ultralytics.__version__
CFG_DIR = Path(ultralytics.__file__).parent / "cfg" / "models"


def is_yaml(spec: str | Path) -> bool:
    return str(spec).endswith((".yaml", ".yml"))


def resolve_yaml(spec: str | Path) -> Path:
    """A local yaml, or one of ultralytics' shipped architectures by name (yolo11n.yaml ... yolo11x.yaml)."""
    p = Path(spec)
    if p.is_file():
        return p
    hits = sorted(CFG_DIR.rglob(p.name))
    if not hits:
        # scale letter in the name (yolo11s.yaml) -> the family file yolo11.yaml with that scale
        stem = p.stem
        if stem[-1:] in "nsmlx" and sorted(CFG_DIR.rglob(stem[:-1] + p.suffix)):
            return p  # ultralytics resolves the scale itself from the name
        raise UserError("model architecture yaml not found (neither a file nor one ultralytics ships)", spec)
    return hits[0]


def load_detection_model(path: str | Path) -> DetectionModel:
    """Load a YOLO detection checkpoint as an FP32 DetectionModel; refuse anything else by name."""
    path = Path(path)
    if not path.is_file():
        raise UserError("model file not found", path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # pickle, zip and torch errors all mean: not a checkpoint we can read
        raise UserError(f"not a YOLO checkpoint (torch.load failed: {type(e).__name__})", path) from None
    model = (ckpt.get("ema") or ckpt.get("model")) if isinstance(ckpt, dict) else None
    if not isinstance(model, DetectionModel):
        got = type(model).__name__ if model is not None else type(ckpt).__name__
        raise UserError(f"not a YOLO detection checkpoint (holds {got}, expected an ultralytics DetectionModel)", path)
    model = model.float().eval()
    if not hasattr(model, "args") or not isinstance(model.args, dict):
        model.args = dict(ckpt.get("train_args") or {})
    return model


def build_from_yaml(spec: str | Path, nc: int, names: list[str] | None = None) -> DetectionModel:
    cfg = resolve_yaml(spec)
    with contextlib.redirect_stdout(io.StringIO()):
        model = DetectionModel(str(cfg) if Path(cfg).is_file() else str(spec), nc=nc, verbose=False)
    model.names = dict(enumerate(names or [str(i) for i in range(nc)]))
    model.args = {}
    return model.float().eval()


def save_checkpoint(model: torch.nn.Module, dest: str | Path, train_args: dict | None = None, **extra) -> Path:
    """An ultralytics checkpoint dict in FP32 that plain `YOLO(path)` loads."""
    from copy import deepcopy

    m = deepcopy(model).float().cpu().eval()
    if hasattr(m, "criterion"):
        m.criterion = None
    ckpt = {"model": m, "ema": None, "train_args": dict(train_args or getattr(model, "args", {}) or {}),
            "version": ULTRALYTICS_VERSION, **extra}
    with atomic_path(dest) as tmp:
        torch.save(ckpt, tmp)
    return Path(dest)


def names_of(model: torch.nn.Module) -> list[str]:
    names = getattr(model, "names", None) or {}
    return [names[k] for k in sorted(names)] if isinstance(names, dict) else list(names)


def model_stats(model: torch.nn.Module, imgsz: int) -> dict:
    """Parameters and MACs (Torch-Pruning's counter, at one imgsz x imgsz image)."""
    import torch_pruning as tp

    from copy import deepcopy

    m = deepcopy(model).float().eval()
    x = torch.zeros(1, 3, imgsz, imgsz)
    with torch.no_grad():
        macs, params = tp.utils.count_ops_and_params(m, x)
    return {"params": int(params), "macs": int(macs)}


def torch_forward(model: torch.nn.Module, x) -> "torch.Tensor":
    with torch.no_grad():
        y = model.eval()(torch.as_tensor(x))
    return (y[0] if isinstance(y, (list, tuple)) else y).numpy()


def train(model_spec: str | Path, data_yaml: str | Path, out_dir: str | Path, *, epochs: int, imgsz: int,
          batch: int, seed: int = 0, workers: int = 2, device: str = "cpu", **kw) -> Path:
    """Train with the stock trainer; returns the best checkpoint, re-saved in FP32 (ultralytics saves FP16)."""
    out_dir = Path(out_dir)
    y = YOLO(str(model_spec))
    y.train(data=str(data_yaml), epochs=epochs, imgsz=imgsz, batch=batch, seed=seed, workers=workers, device=device,
            project=str(out_dir.parent), name=out_dir.name, exist_ok=True, plots=False, amp=False,
            deterministic=True, verbose=False, **kw)
    best = out_dir / "weights" / "best.pt"
    model = load_detection_model(best)
    return save_checkpoint(model, out_dir / "weights" / "best_fp32.pt")


def val(weights: str | Path, data_yaml: str | Path, imgsz: int, conf: float = 0.001, iou: float = 0.7,
        max_det: int = 300, batch: int = 1) -> dict:
    """ultralytics' own validator on the same weights and data (the reference our bench is checked against)."""
    tmp = tempfile.mkdtemp(prefix="yolo-edge-val-")
    try:
        m = YOLO(str(weights))
        r = m.val(data=str(data_yaml), imgsz=imgsz, conf=conf, iou=iou, max_det=max_det, batch=batch, rect=False,
                  device="cpu", plots=False, verbose=False, project=tmp, name="val", workers=0, half=False)
        return {"map50_95": float(r.box.map), "map50": float(r.box.map50)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def export_onnx(weights: str | Path, dest: str | Path, *, imgsz: int, opset: int, simplify: bool) -> Path:
    """Static-shape (1, 3, imgsz, imgsz) ONNX of a checkpoint, via ultralytics' exporter; written atomically."""
    dest = Path(dest)
    with tempfile.TemporaryDirectory(prefix="yolo-edge-export-") as td:
        src = Path(td) / "model.pt"
        shutil.copyfile(weights, src)
        out = YOLO(str(src)).export(format="onnx", imgsz=imgsz, opset=opset, simplify=simplify, dynamic=False,
                                    half=False, device="cpu", batch=1, nms=False, verbose=False)
        with atomic_path(dest) as tmp:
            shutil.copyfile(out, tmp)
    return dest
