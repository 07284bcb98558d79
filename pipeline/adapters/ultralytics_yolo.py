"""The one place that knows ultralytics (pinned: 8.4.190). Loads YOLO11 checkpoints and yamls, drives the
stock trainer, validator and ONNX exporter, offline. Nothing here patches ultralytics; contract tests in
tests/test_adapter.py say when an upgrade breaks what this adapter relies on."""

from __future__ import annotations

import contextlib
import io
import re
import shutil
import tempfile
from pathlib import Path

import torch
import ultralytics
import yaml
from ultralytics import YOLO
from ultralytics.nn.tasks import DetectionModel
from ultralytics.utils import LOGGER

from pipeline.adapters.log_filter import collapsed_repeats, silenced
from pipeline.adapters.offline import cpu_threads
from pipeline.core.console import task
from pipeline.core.errors import UserError
from pipeline.core.store import atomic_path

ULTRALYTICS_VERSION = ultralytics.__version__
CFG_DIR = Path(ultralytics.__file__).parent / "cfg" / "models"


DETECT_HEADS = ("Detect", "v10Detect")  # the last layer of a detection model's config (Segment, Pose... are not)
MODEL_YAML = "a YOLO detection model config (backbone: and head: lists, the head ending in Detect)"


def resolve_yaml(spec: str | Path) -> Path:
    """A local yaml, or one of ultralytics' shipped architectures by name (yolo11n.yaml ... yolo11x.yaml); refused
    by name when it is not a detection model config (a dataset yaml, a recipe, an empty file, a list...)."""
    p = Path(spec)
    if p.is_file():
        _check_model_yaml(p, spec)
        return p
    hits = sorted(CFG_DIR.rglob(p.name))
    if not hits:
        # scale letter in the name (yolo11s.yaml, yolo11n-seg.yaml) -> the family file (yolo11.yaml, yolo11-seg.yaml)
        # with that scale, as ultralytics' yaml_model_load resolves it
        family_name = re.sub(r"(\d+)([nslmx])(.+)?$", r"\1\3", p.stem) + p.suffix
        family = sorted(CFG_DIR.rglob(family_name)) if family_name != p.name else []
        if family:
            _check_model_yaml(family[0], spec)
            return p  # ultralytics resolves the scale itself from the name
        raise UserError("model architecture yaml not found (neither a file nor one ultralytics ships)", spec)
    _check_model_yaml(hits[0], spec)
    return hits[0]


def _check_model_yaml(path: Path, shown: str | Path) -> None:
    """What ultralytics needs of a model yaml before it builds one; else a one-line error naming `shown`."""
    try:
        d = yaml.safe_load(path.read_text())
    except UnicodeDecodeError:
        raise UserError(f"not a text file: expected {MODEL_YAML}", shown) from None
    except yaml.YAMLError as e:
        raise UserError(f"not valid YAML ({str(e).splitlines()[0]})", shown) from None
    if d is None:
        raise UserError(f"empty file: expected {MODEL_YAML}", shown)
    if not isinstance(d, dict):
        raise UserError(f"holds a YAML {type(d).__name__}, not {MODEL_YAML}", shown)
    if not (isinstance(d.get("backbone"), list) and isinstance(d.get("head"), list) and d["head"]):
        keys = set(d)
        if isinstance(d.get("model"), dict) or {"prune", "finetune", "quantize", "calib", "bench"} & keys:
            what = "a yolo-edge recipe (--recipe), not a model"
        elif {"train", "val", "test", "names", "path"} & keys:
            what = "a dataset yaml (--data), not a model"
        else:
            what = "no backbone: and head: lists"
        raise UserError(f"{what}: expected a YOLO .pt checkpoint or {MODEL_YAML}", shown)
    last = d["head"][-1]
    module = last[2] if isinstance(last, list) and len(last) >= 3 else None
    if module not in DETECT_HEADS:
        raise UserError(f"the model config's head ends in {module!s}, not Detect: expected {MODEL_YAML}", shown)


def load_detection_model(path: str | Path) -> DetectionModel:
    """Load a YOLO detection checkpoint as an FP32 DetectionModel; refuse anything else by name."""
    path = Path(path)
    if not path.is_file():
        raise UserError("model file not found", path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # pickle, zip and torch errors all mean: not a readable checkpoint
        raise UserError(f"not a YOLO checkpoint (torch.load failed: {type(e).__name__})", path) from None
    model = (ckpt.get("ema") or ckpt.get("model")) if isinstance(ckpt, dict) else None
    if model is not None and hasattr(model, "student_model"):  # a checkpoint saved while distilling
        model = model.student_model
    if not isinstance(model, DetectionModel):
        got = type(model).__name__ if model is not None else type(ckpt).__name__
        raise UserError(f"not a YOLO detection checkpoint (holds {got}, expected an ultralytics DetectionModel)", path)
    layers = getattr(model, "model", None)
    head = layers[-1] if isinstance(layers, torch.nn.Sequential) and len(layers) else None
    if type(model) is not DetectionModel or type(head).__name__ not in DETECT_HEADS:
        # SegmentationModel, PoseModel, OBBModel, RTDETRDetectionModel... are DetectionModels with another head
        raise UserError(f"not a YOLO detection checkpoint (holds a {type(model).__name__} whose head is "
                        f"{type(head).__name__}, expected an ultralytics DetectionModel with a Detect head)", path)
    model = model.float().eval()
    bad = next((k for k, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()),
               None)
    if bad is not None:
        raise UserError(f"the checkpoint holds non-finite weights (NaN or inf in {bad}): a training that diverged?",
                        path)
    if not hasattr(model, "args") or not isinstance(model.args, dict):
        model.args = dict(ckpt.get("train_args") or {})
    return model


def check_model_spec(spec: str | Path, family: str | None = None):
    """A model the user names (a .pt checkpoint, a model .yaml): refused by name unless it is a detection model of a
    supported family (YOLOv8, YOLO11, YOLO26; `family` overrides the detection) that ultralytics loads or builds.
    A config is built once to be sure (quietly: the stage that builds it again logs what ultralytics has to say).
    Returns the model's family."""
    from pipeline.adapters.family import family_of

    if str(spec).endswith((".yaml", ".yml")):
        resolve_yaml(spec)
        with silenced(LOGGER):
            model = build_from_yaml(spec, nc=1)
    else:
        model = load_detection_model(spec)
    return family_of(model, family, spec)


def check_pruned_checkpoint(path: str | Path, imgsz: int, fam) -> None:
    """A checkpoint that says it was pruned must come with a history that rebuilds its architecture."""
    from pipeline.adapters import pruning as yp

    path = Path(path)
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    meta = ckpt.get("pruning") if isinstance(ckpt, dict) else None
    if not meta:
        return
    name = meta.get("history_file", "history.json") if isinstance(meta, dict) else None
    if not isinstance(name, str) or not name:
        raise UserError(f"the checkpoint's 'pruning' entry ({str(meta)[:60]}) does not name its history file", path)
    hist = path.parent / name
    if not hist.is_file():
        raise UserError(f"pruned checkpoint without its pruning history ({hist.name} is not beside it)", path)
    yp.verify_history(load_detection_model(path), yp.load_history(hist), imgsz, fam, path)


def build_from_yaml(spec: str | Path, nc: int, names: list[str] | None = None) -> DetectionModel:
    cfg = resolve_yaml(spec)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            model = DetectionModel(str(cfg) if Path(cfg).is_file() else str(spec), nc=nc, verbose=False)
    except Exception as e:
        if not Path(spec).is_file():  # one ultralytics ships: not the user's input
            raise
        # the user's own config: a module ultralytics does not know, arguments that do not fit...
        why = (str(e).splitlines() or [""])[0][:120]
        raise UserError(f"ultralytics cannot build a model from this config ({type(e).__name__}: {why})",
                        spec) from None
    model.names = dict(enumerate(names or [str(i) for i in range(nc)]))
    model.args = {}
    return model.float().eval()


def save_checkpoint(model: torch.nn.Module, dest: str | Path, train_args: dict | None = None, half: bool = False,
                    **extra) -> Path:
    """An ultralytics checkpoint dict in FP32 (FP16 with `half`, as ultralytics stores its own) that plain
    `YOLO(path)` loads."""
    from copy import deepcopy

    m = deepcopy(model).float().cpu().eval()
    if half:
        m = m.half()
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


def model_stats(model: torch.nn.Module, imgsz: int, fam) -> dict:
    """Parameters and MACs of the family's deployed form (Torch-Pruning's counter, at one imgsz x imgsz image)."""
    from copy import deepcopy

    macs, params = fam.macs_params(deepcopy(model).float().eval(), imgsz)
    return {"params": int(params), "macs": int(macs)}


def torch_forward(model: torch.nn.Module, x) -> torch.Tensor:
    with torch.no_grad():
        y = model.eval()(torch.as_tensor(x))
    return (y[0] if isinstance(y, (list, tuple)) else y).numpy()


def _all_cpu_threads(runner) -> None:
    """A trainer/validator callback: on the CPU, compute on every core (offline.cpu_threads). Ultralytics'
    `select_device` sets torch to min(8, cores - 1) threads for CPU work, one core on a 2-core box, although it
    runs the data loading in the main process there too; its callbacks run after that call."""
    device = getattr(runner, "device", None)
    if getattr(device, "type", device) == "cpu":
        torch.set_num_threads(cpu_threads())


def _on_epoch(t):
    """An on_fit_epoch_end callback that advances progress task `t` (core/console.task) with the epoch's val
    mAP50-95."""

    def on_epoch(trainer):
        if t.start is None:  # a resumed run's first epoch: the ETA counts from the epoch it went on from
            t.resumed_at(getattr(trainer, "start_epoch", 0) or 0)
        m = (getattr(trainer, "metrics", None) or {}).get("metrics/mAP50-95(B)")
        t.update(trainer.epoch + 1, f"val mAP50-95 {m:.4f}" if isinstance(m, float) else "")

    return on_epoch


def prior_run(out_dir: Path) -> str | None:
    """What an earlier `train` left in `out_dir`: "finished" (its done marker, or a last.pt ultralytics already
    stripped of epoch and optimizer at the end, with best.pt beside it), "resumable" (an unfinished run's last.pt,
    epoch and optimizer in it) or None (nothing, or a last.pt cut off mid-write or from another version)."""
    w = Path(out_dir) / "weights"
    if not (w / "last.pt").is_file():
        return None
    if (w / "done").exists() and (w / "best.pt").is_file():
        return "finished"
    try:
        ck = torch.load(w / "last.pt", map_location="cpu", weights_only=False)
    except Exception:
        return None
    if not isinstance(ck, dict) or ck.get("model") is None:
        return None
    if ck.get("epoch", -1) >= 0 and ck.get("optimizer") is not None:
        return "resumable"
    return "finished" if ck.get("epoch") == -1 and (w / "best.pt").is_file() else None


def train(model_spec: str | Path, data_yaml: str | Path, out_dir: str | Path, *, epochs: int, imgsz: int,
          batch: int, seed: int = 0, workers: int = 2, device: str = "cpu", progress: str = "training", **kw) -> Path:
    """Train with the stock trainer, given the model family's own arguments (YOLO26: nms=False, so each epoch's val
    mAP is its one-to-one head's); returns the best checkpoint as ultralytics wrote it (FP16 weights, optimizer
    stripped): the load stage turns it into FP32. A run in `out_dir` that was cut off (kill, Ctrl-C, a lost
    session) resumes from its last epoch (this machine's data path, device and workers); a finished one (its
    `weights/done` marker) is not trained again."""
    kw = {**check_model_spec(model_spec).train_args, **kw}
    out_dir = Path(out_dir).resolve()
    last, done, best = (out_dir / "weights" / f for f in ("last.pt", "done", "best.pt"))
    state = prior_run(out_dir)
    if state == "finished":
        done.touch()
        return best
    resume = state == "resumable"
    if not resume and out_dir.exists():
        shutil.rmtree(out_dir)  # a run cut off before its first epoch was saved: start over
    y = YOLO(str(last if resume else model_spec))
    for event in ("on_train_start", "on_val_start"):  # the final validation selects the device again
        y.add_callback(event, _all_cpu_threads)
    with task(progress, epochs) as t, collapsed_repeats(LOGGER):
        y.add_callback("on_fit_epoch_end", _on_epoch(t))
        if resume:
            LOGGER.info(f"resuming {out_dir} from {last}")
            y.train(resume=str(last), data=str(data_yaml), device=device, workers=workers, save_dir=str(out_dir))
        else:
            y.train(data=str(data_yaml), epochs=epochs, imgsz=imgsz, batch=batch, seed=seed, workers=workers,
                    device=device, project=str(out_dir.parent), name=out_dir.name, exist_ok=True, plots=False,
                    amp=False, deterministic=True, verbose=False, **kw)
    load_detection_model(best)  # refuse a result that is not a detection checkpoint
    done.touch()
    return best


def val(weights: str | Path, data_yaml: str | Path, imgsz: int, conf: float = 0.001, iou: float = 0.7,
        max_det: int = 300, batch: int = 1, **kw) -> dict:
    """ultralytics' own validator on the same weights and data (the reference the bench is checked against); `kw`:
    the family's own arguments (YOLO26: nms=False, its one-to-one head)."""
    tmp = tempfile.mkdtemp(prefix="yolo-edge-val-")
    try:
        m = YOLO(str(weights))
        m.add_callback("on_val_start", _all_cpu_threads)
        r = m.val(data=str(data_yaml), imgsz=imgsz, conf=conf, iou=iou, max_det=max_det, batch=batch, rect=False,
                  device="cpu", plots=False, verbose=False, project=tmp, name="val", workers=0, half=False, **kw)
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


# ------------------------------------------------------------------------------------------------ fine-tuning
from dataclasses import dataclass, field

from ultralytics.models.yolo.detect import DetectionTrainer


@dataclass
class Distill:
    """Distillation from an unpruned teacher: ultralytics' feature loss at `feature_weight` and, with `head_kd`
    ({"head_weight", "temperature", "channel_weight", "channel_temperature"}), the head-output loss (distill.py)."""

    teacher: str | Path
    feature_weight: float = 0.0
    head_kd: dict | None = None


@dataclass
class Sparsify:
    """Sparsity training of a rewritten model (its family's `prepare`): Torch-Pruning's group regularization at
    `reg` and, with `fade` ({"targets": pruning.fade_targets(...), "epochs": n}), the planned cut's BN channels fading
    to zero over n epochs (n = 0: they are zero, and held there)."""

    fam: object
    reg: float = 0.0
    fade: dict | None = None


@dataclass
class TrainOptions:
    """One fine-tuning run: its length and input size, the stock trainer's own arguments (batch, nbs, seed, workers,
    device, optimizer, lr0, close_mosaic, warmup...), and what this project adds to its steps."""

    epochs: int
    imgsz: int
    trainer: dict = field(default_factory=dict)
    distill: Distill | None = None
    sparsify: Sparsify | None = None
    label: str = "fine-tune"  # the progress line's name


class KeepArchitectureTrainer(DetectionTrainer):
    """The stock detection trainer, except that the model it trains is the checkpoint's own module.

    `YOLO(pruned).train()` would rebuild the unpruned network from the yaml the pruned model still carries and
    load what weights fit. The trainer's public hook `get_model(cfg, weights)` receives the loaded checkpoint
    module as `weights`; returning it keeps the pruned architecture (and, on resume, the EMA weights it saved).
    """

    options: TrainOptions | None = None  # distillation and sparsity (the rest reached the stock trainer as overrides)
    _regularizer = None
    _fade_state = None

    @property
    def _sparsify(self) -> Sparsify | None:
        return self.options.sparsify if self.options else None

    def get_model(self, cfg=None, weights=None, verbose=True):
        if not isinstance(weights, torch.nn.Module):
            raise UserError("fine-tuning starts from a checkpoint (.pt) holding the model to train", self.args.model)
        if hasattr(weights, "student_model"):
            weights = weights.student_model
        return self.set_model_names_for_load(weights)

    def final_eval(self):
        """The stock trainer validates best.pt once more after the last epoch; what is shipped is last.pt (its metrics
        are the last epoch's row of results.csv), so that extra pass over the val split is skipped and only the
        optimizer is stripped from both checkpoints, as the stock one does."""
        from ultralytics.utils import RANK
        from ultralytics.utils.torch_utils import strip_optimizer

        if RANK in {-1, 0}:
            ckpt = strip_optimizer(self.last) if self.last.exists() else {}
            if self.best.exists():
                strip_optimizer(self.best, updates={"train_results": ckpt.get("train_results")})

    def optimizer_step(self):
        """With sparsity training, Torch-Pruning's group regularizer adds its gradient before the stock step (which
        unscales, clips and steps: with AMP the gradients are still scaled here, so the term is scaled alike)."""
        sp = self._sparsify
        if sp is not None and sp.reg:
            from pipeline.adapters import pruning as yp

            student = getattr(self.model, "student_model", self.model)  # distilling: the student, not the teacher
            if self._regularizer is None:
                self._regularizer = yp.sparsity_regularizer(student, self.args.imgsz, sp.reg, sp.fam)
            scale = self.scaler.get_scale() if self.scaler.is_enabled() else 1.0
            self._regularizer.reg = sp.reg * scale
            with yp.fast_index_mapping():
                self._regularizer.regularize(student)
        super().optimizer_step()
        if sp is not None and sp.fade:
            self._fade_step(sp.fade)

    @torch.no_grad()
    def _fade_step(self, fade: dict):
        """Scale the fading BN channels (weight and bias, in the model and its EMA, which is what gets saved) so
        that they follow s = 1 - progress / fade epochs down to exactly zero, and hold them there after. The
        optimizer may move them between steps; the factor s_now / s_before is applied to whatever they are."""
        st = self._fade_state
        if st is None or st["epoch"] != self.epoch:
            st = self._fade_state = {"epoch": self.epoch, "batches": 0, "s": (st or {}).get("s")}
        st["batches"] += self.accumulate
        progress = self.epoch + min(1.0, st["batches"] / max(len(self.train_loader), 1))
        s = max(0.0, 1.0 - progress / fade["epochs"]) if fade["epochs"] > 0 else 0.0  # 0: held
        if st["s"] is None:  # the first step (or the first after a resume): the weights are where they were left
            st["s"] = s
        factor = s / st["s"] if st["s"] > 0 else 0.0
        st["s"] = s
        for model in (self.model, self.ema.ema if self.ema else None):
            if model is None:
                continue
            mods = dict(getattr(model, "student_model", model).named_modules())  # distilling: the student
            for name, idxs in fade["targets"].items():
                bn = mods[name]
                i = torch.as_tensor(idxs, device=bn.weight.device)
                bn.weight.data[i] *= factor
                bn.bias.data[i] *= factor

    def set_model_attributes(self):
        """The stock attributes; then, when distilling with head KD, the model becomes a HeadDistillationModel
        (ultralytics' DistillationModel with the head-output loss added) before the trainer would wrap it in a
        plain one. On resume ultralytics rebuilds its plain wrapper from the checkpoint: it is re-wrapped here,
        its trained projector kept."""
        from ultralytics.nn.distill_model import DistillationModel

        from pipeline.adapters.distill import HeadDistillationModel

        super().set_model_attributes()
        kd = self.options.distill if self.options else None
        head_kd = kd.head_kd if kd is not None else None
        if self.args.distill_model is None or not head_kd or isinstance(self.model, HeadDistillationModel):
            return
        projector = None
        if isinstance(self.model, DistillationModel):
            student, teacher, projector = self.model.student_model, self.model.teacher_model, self.model.projector
        else:
            student, teacher = self.model, self.args.distill_model
        student.args = self.args
        self.model = HeadDistillationModel(teacher, student, **head_kd)
        if projector is not None:
            self.model.projector.load_state_dict(projector.state_dict())


def finetune(weights: str | Path, data_yaml: str | Path, out_dir: str | Path, opts: TrainOptions) -> Path:
    """Fine-tune the model in `weights` without changing its architecture; resumes from out_dir/weights/last.pt
    when a previous run was cut off. Returns the final epoch's checkpoint (EMA weights, FP16 as ultralytics saves
    them), not ultralytics' best.pt: that one is picked on the val split, which bench scores. `opts` says how
    (TrainOptions: the stock trainer's arguments, distillation, sparsity training)."""

    bar = task(opts.label, opts.epochs)
    progress = bar.__enter__()

    def trainer(overrides):
        t = KeepArchitectureTrainer(overrides=overrides)
        for event in ("on_train_start", "on_val_start"):  # the final validation selects the device again
            t.add_callback(event, _all_cpu_threads)
        t.add_callback("on_fit_epoch_end", _on_epoch(progress))
        t.options = opts
        return t

    tr = opts.trainer
    try:
        return _finetune(weights, data_yaml, Path(out_dir).resolve(), opts, tr, trainer)
    finally:
        bar.__exit__(None, None, None)


def _finetune(weights, data_yaml, out_dir: Path, opts: TrainOptions, tr: dict, trainer) -> Path:
    last = out_dir / "weights" / "last.pt"
    if last.is_file() and (out_dir / "weights" / "done").exists():
        return last  # finished; the stage around it was cut off after training
    if last.is_file():
        try:
            # this machine's data path, device, workers and folder: a run begun on another one (a GPU) goes on here
            overrides = {"resume": str(last), "model": str(last), "data": str(data_yaml),
                         "device": tr.get("device", "cpu"), "workers": tr.get("workers", 2), "save_dir": str(out_dir)}
            with collapsed_repeats(LOGGER):  # a resume: ~200 frozen-layer notices, one line
                trainer(overrides).train()
            (out_dir / "weights" / "done").touch()
            return last
        except AssertionError:  # ultralytics: nothing left to resume
            pass
        except Exception as e:  # a last.pt cut off mid-write, or from another version: start over
            LOGGER.warning(f"cannot resume from {last} ({type(e).__name__}: {str(e)[:120]}); starting over")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    overrides = dict(model=str(weights), data=str(data_yaml), epochs=opts.epochs, imgsz=opts.imgsz,
                     project=str(out_dir.parent), name=out_dir.name, exist_ok=True, plots=False, amp=False,
                     deterministic=True, verbose=False, **{"seed": 0, "workers": 2, "device": "cpu", **tr})
    if opts.distill is not None:
        overrides.update(distill_model=str(opts.distill.teacher), dis=opts.distill.feature_weight)
    with collapsed_repeats(LOGGER):  # distilling: a "Freezing layer" notice per teacher parameter, one line
        trainer(overrides).train()
    (out_dir / "weights" / "done").touch()
    return last


def training_history(out_dir: str | Path) -> list[dict]:
    import csv

    rows = []
    with open(Path(out_dir) / "results.csv") as f:
        for row in csv.DictReader(f):
            row = {k.strip(): v for k, v in row.items()}
            losses = {k.split("/", 1)[1]: float(v) for k, v in row.items() if k.startswith("train/") and v}
            rows.append({"epoch": int(float(row["epoch"])), "map50_95": float(row["metrics/mAP50-95(B)"]),
                         "map50": float(row["metrics/mAP50(B)"]), "train_loss": losses})
    # A run killed between writing an epoch's row and its last.pt resumes from the epoch before and trains that
    # epoch again, appending a second row for it: the later row is the epoch the weights went on from.
    by_epoch = {r["epoch"]: r for r in rows}
    return [by_epoch[e] for e in sorted(by_epoch)]


def taylor_grads_fn(data_yaml: str | Path, imgsz: int, n_batches: int, batch: int = 8):
    """A function that accumulates detection-loss gradients over `n_batches` train batches into a model, for
    Taylor importance. Uses ultralytics' own dataset, collate and loss."""
    from ultralytics.cfg import get_cfg
    from ultralytics.data import build_dataloader, build_yolo_dataset
    from ultralytics.data.utils import check_det_dataset

    cfg = get_cfg(overrides={"imgsz": imgsz, "batch": batch, "workers": 0})
    data = check_det_dataset(str(data_yaml))

    def fn(model: torch.nn.Module) -> None:
        ds = build_yolo_dataset(cfg, data["train"], batch, data, mode="val", stride=int(model.stride.max()))
        loader = build_dataloader(ds, batch, 0, shuffle=False)
        model.args = cfg
        model.criterion = None
        for i, b in enumerate(loader):
            if i >= n_batches:
                break
            b["img"] = b["img"].float() / 255
            loss, _ = model.loss(b)
            loss.sum().backward()
        model.criterion = None

    return fn


def export_int8_onnx(weights: str | Path, dest: str | Path, *, imgsz: int, data_yaml: str | Path) -> Path:
    """Ultralytics' own INT8 ONNX export (its ONNX Runtime static quantization), calibrated on the split 'val'
    of `data_yaml`: the peer the project's Q/DQ models are compared with."""
    dest = Path(dest)
    with tempfile.TemporaryDirectory(prefix="yolo-edge-int8-") as td:
        src = Path(td) / "model.pt"
        shutil.copyfile(weights, src)
        out = YOLO(str(src)).export(format="onnx", imgsz=imgsz, quantize=8, data=str(data_yaml), fraction=1.0,
                                    dynamic=False, device="cpu", batch=1, nms=False, verbose=False)
        with atomic_path(dest) as tmp:
            shutil.copyfile(out, tmp)
    return dest
