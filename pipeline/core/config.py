"""Recipes: one strict config object for a whole run, loaded from models/*.yaml and overridable from the CLI
(`--set bench.cap_s=60`). Unknown keys are rejected with the key and the file named.

The schema's defaults are the settings the project recommends: what models/default.yaml uses wherever its choice
is not specific to the built-in synthetic data, its shipped checkpoints or ONNX Runtime on this CPU (those keys say
why they differ), so a short recipe (`yolo-edge init` writes one) prunes and fine-tunes as the default run does."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.core.errors import UserError
from pipeline.eval.interleaved import Schedule


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SyntheticCfg(Strict):
    seed: int = 0
    train: int = Field(480, ge=1)
    val: int = Field(120, ge=1)
    imgsz: int = Field(320, ge=64)


class SelectionCfg(Strict):
    """A selection split carved out of train (`images` of them, a seeded sample; never in the eval split): nothing
    trains on it (the fine-tune, sparsity training and `make base` see train without it), bench scores every variant
    on it beside the report's split, and the accuracy-aware INT8 search tunes on it. Recipe choices are compared on it,
    so the split that reports a result did not choose it. 0: none."""

    images: int = Field(0, ge=0)
    seed: int = 0


class DataCfg(Strict):
    source: str = "synthetic"  # "synthetic", a YOLO data yaml, a COCO directory or JSON, or a Pascal VOC directory
    synthetic: SyntheticCfg = SyntheticCfg()
    selection: SelectionCfg = SelectionCfg()
    strict: bool = False  # refuse dirty boxes (no area, past the border) instead of dropping/clipping them
    names: list[str] | None = None  # a VOC set's classes in this order (default: the names its objects use, sorted)


class ModelCfg(Strict):
    weights: str | None = None  # a user's .pt; for the default: the shipped base checkpoint
    arch: str = "yolo11n.yaml"  # what `make base` trains when weights are absent or to reproduce them
    # yolov8 | yolo11 | yolo26; read from the checkpoint's structure when unset (pipeline/adapters/family.py)
    family: Literal["yolov8", "yolo11", "yolo26"] | None = None
    imgsz: int = Field(320, ge=32)  # the synthetic data's size; `yolo-edge init` writes the checkpoint's own


class TrainSetup(Strict):
    """What every ultralytics training run here is given, besides its length."""

    batch: int = Field(16, ge=1)
    # ultralytics' nominal batch size: gradients accumulate over round(nbs / batch) batches per optimizer step.
    # Its default 64 means 7.5 steps an epoch on 480 images; nbs = batch steps after every batch.
    nbs: int = Field(64, ge=1)
    seed: int = 0
    workers: int = Field(2, ge=0)
    device: str = "cpu"  # as ultralytics takes it: cpu, 0, cuda:0, 0,1

    def trainer_args(self) -> dict:
        """These settings as the adapter's train/finetune keyword arguments."""
        return {"batch": self.batch, "nbs": self.nbs, "seed": self.seed, "workers": self.workers, "device": self.device}

    @field_validator("device", mode="before")
    @classmethod
    def _device_index(cls, v):
        return str(v) if isinstance(v, int) and not isinstance(v, bool) else v  # --set x.device=0 reads as an int


class TrainCfg(TrainSetup):
    epochs: int = Field(10, ge=1)  # what a 15-minute run on 2 cores affords; `yolo-edge init` sizes it to the data


class BasePhase(Strict):
    epochs: int = Field(..., ge=1)
    nbs: int | None = Field(None, ge=1)  # this phase's nominal batch (default: base.nbs)
    close_mosaic: int | None = Field(None, ge=0)  # mosaic off for the last N epochs (ultralytics' default 10)
    warmup_epochs: float | None = Field(None, ge=0)  # ultralytics' default 3


class BaseTrainCfg(TrainSetup):
    """`make base`: stock ultralytics runs in sequence, the first from the yaml, each later one from the previous
    run's last weights (a restart: new warm-up and LR schedule). The shipped checkpoint is the last run's final
    epoch (not a best-epoch pick on the val split, which bench scores). `yolo-edge run` never trains a base: these
    defaults are one stock schedule; models/default.yaml's phases are how the shipped synthetic base was trained."""

    phases: list[BasePhase] = Field(default_factory=lambda: [BasePhase(epochs=60)], min_length=1)
    check_epochs: int = Field(0, ge=0)  # a further run, not shipped, that shows whether more epochs still help
    # that run's trainer settings: the finetune section's (how the pruned model is fine-tuned), or the last phase's
    # (nominal batch, warm-up, mosaic; ultralytics' auto optimizer): one more schedule like the ones that trained it
    check_settings: Literal["finetune", "last_phase"] = "last_phase"
    converged_gain: float = Field(0.005, ge=0)  # converged: that run gains less than this mAP50-95 ...
    converged_window: int = Field(10, ge=1)  # ... mean of its last N epochs vs the shipped run's last N (one epoch's
                                             # val mAP moves ±0.4 pt: a best-of-60 pick would gain from noise alone)


class SensitivityCfg(Strict):
    ratio: float = Field(0.5, gt=0, lt=1)  # each group is pruned alone at this ratio
    images: int = Field(48, ge=4)  # held-out train images (never the eval split) the drop is measured on
    seed: int = 0
    latency_runs: int = Field(30, ge=1)  # ONNX Runtime profile runs (latency mode)


class ReconstructCfg(Strict):
    """Layer-wise least-squares feature reconstruction right after pruning (pipeline/adapters/reconstruct.py)."""

    enabled: bool = True
    images: int = Field(64, ge=1)  # held-out train images (never the eval split, never the sensitivity images)
    positions: int = Field(256, ge=1)  # output positions sampled per image and layer
    alpha: float = Field(0.1, gt=0)  # ridge toward the pruned weights, relative to the mean input energy
    seed: int = 0


class DistillLoss(Strict):
    """The knowledge-distillation loss from the unpruned model."""

    head_weight: float = Field(1.0, ge=0)  # KD on the Detect head's outputs (class scores + DFL distributions)
    feature_weight: float = Field(0.0, ge=0)  # ultralytics' own neck-feature distillation (its `dis`; it uses 6.0)
    temperature: float = Field(1.0, gt=0)
    channel_weight: float = Field(0.0, ge=0)  # channel-wise KD on the neck levels (spatial softmax per channel)
    channel_temperature: float = Field(1.0, gt=0)

    def key_excludes(self) -> set[str]:
        """The fields left out of a stage's key while channel-wise KD is off (keys made before it existed hold)."""
        return {"channel_weight", "channel_temperature"} if self.channel_weight == 0 else set()

    def trainer_args(self) -> dict:
        """The loss weights as the adapter's finetune keyword arguments (the teacher is passed beside them)."""
        return {"feature_weight": self.feature_weight,
                "head_kd": {"head_weight": self.head_weight, "temperature": self.temperature,
                            "channel_weight": self.channel_weight,
                            "channel_temperature": self.channel_temperature}}


class DistillCfg(DistillLoss):
    """Knowledge distillation from the unpruned model during fine-tuning."""

    enabled: bool = False


class SparsityPhase(Strict):
    epochs: int = Field(..., ge=1)
    reg: float = Field(0.0, ge=0)  # Torch-Pruning GroupNormPruner's reg: 1x (strongest group) .. 16x (weakest)
    # A fade phase (the last one): the cut is planned first (the prune stage's search, on the weights the phase
    # starts from); the planned channels then fade linearly to exactly zero over `fade` epochs while the rest
    # trains, and stay at zero for the phase's remaining epochs. The prune stage cuts exactly that plan.
    fade: int | None = Field(None, ge=1)
    # A hold phase (after the fade phase): the cut's channels stay exactly zero while the rest of the network
    # trains on, a schedule of its own (a new warm-up and learning-rate decay, as each base phase): the pruned
    # network gets more training without the cut being made yet.
    hold: bool | None = None
    # Distil this phase from the dense model the phases start from (prune.sparsity.distill's loss settings).
    distill: bool | None = None

    @model_validator(mode="after")
    def _one_kind(self):
        if self.hold and (self.fade is not None or self.reg > 0):
            raise ValueError("a hold phase keeps the faded cut at zero: it takes neither reg nor fade")
        if self.fade is None and self.reg <= 0 and not self.hold:
            raise ValueError("a sparsity phase needs reg > 0 (group regularization), fade (a planned cut) or hold "
                             "(after the fade phase)")
        if self.fade is not None and self.fade > self.epochs:
            raise ValueError(f"fade ({self.fade} epochs) must not exceed the phase's epochs ({self.epochs})")
        return self


class SparsityCfg(TrainSetup):
    """Sparsity training before the cut (pipeline/stages/sparsity.py): the model trains on the run's data with
    Torch-Pruning's group regularizer, phase after phase, so that whole channel groups fade before they are cut.
    `shipped` weights are reused when their record names the same model, data and settings."""

    # On: the most accurate cut measured on the real-photo benchmark (models/bccd.yaml: these 80 epochs, then a
    # 40-epoch fine-tune: +1.07, +0.98 and +0.55 pt over the base in three runs, against +0.02 / +0.13 for a 60-epoch
    # fine-tune alone; every interval crosses zero). It is most of the cut's extra training: `yolo-edge init
    # --no-sparsity` skips it and says what that saves. models/default.yaml sets its own schedule (390 epochs, a hold
    # phase) for the synthetic demo.
    enabled: bool = True
    # The schedule: group regularization over two phases, then a fade phase toward the planned cut.
    phases: list[SparsityPhase] = Field(
        default_factory=lambda: [SparsityPhase(epochs=20, reg=5e-4), SparsityPhase(epochs=20, reg=5e-3),
                                 SparsityPhase(epochs=40, fade=20)], min_length=1)
    nbs: int = Field(16, ge=1)
    close_mosaic: int = Field(3, ge=0)
    warmup_epochs: float = Field(1.0, ge=0)
    shipped: str | None = None  # weights made by `yolo-edge sparsify` (default.yaml's: for its synthetic data only)
    # The loss of the phases that distil (`distill: true` in a phase) from the dense model the phases start from.
    distill: DistillLoss = DistillLoss()

    @model_validator(mode="after")
    def _fade_last(self):
        fade = next((i for i, p in enumerate(self.phases) if p.fade), len(self.phases))
        if any(not p.hold for p in self.phases[fade + 1:]):  # a second fade phase is one of these
            raise ValueError("only the last sparsity phase may fade (it trains toward the cut); only hold phases "
                             "may follow it")
        if any(p.hold for p in self.phases[:fade]):
            raise ValueError("a hold phase keeps a faded cut at zero: it must follow the fade phase")
        return self


class TargetCfg(Strict):
    """prune.target: what the cut must reach, one of: a fraction of the base's MACs or parameters to keep, a speed-up
    over the base, or a latency in ms, the last two on `runner`: the dev box's ONNX Runtime (each candidate timed
    beside the base with the project's interleaved timer) or `device:<name>` (the TensorRT layer-time table an earlier
    `deploy` recorded for that device; absent, the dev box stands in, and the run says so). The cut lands on the
    safe side: at most the MACs or parameters, at least the speed-up, at most the latency."""

    macs: float | None = Field(None, gt=0, lt=1)
    params: float | None = Field(None, gt=0, lt=1)
    speedup: float | None = Field(None, gt=1)
    latency_ms: float | None = Field(None, gt=0)
    runner: str = "onnxruntime"

    @model_validator(mode="after")
    def _one(self):
        given = [k for k in ("macs", "params", "speedup", "latency_ms") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of macs, params, speedup, latency_ms (got "
                             f"{', '.join(given) or 'none'})")
        if self.runner != "onnxruntime" and not (self.runner.startswith("device:") and len(self.runner) > 7):
            raise ValueError(f"runner is onnxruntime or device:<name>, not {self.runner!r}")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("macs", "params", "speedup", "latency_ms") if getattr(self, k) is not None)

    @property
    def value(self) -> float:
        return getattr(self, self.kind)

    def describe(self) -> str:
        v = self.value
        return {"macs": f"{v:g}x the MACs", "params": f"{v:g}x the parameters",
                "speedup": f"a {v:g}x speed-up on {self.runner}", "latency_ms": f"{v:g} ms on {self.runner}"}[self.kind]


class PruneCfg(Strict):
    enabled: bool = True
    macs_target: float | None = Field(0.5, gt=0, lt=1, description="fraction of the base MACs to keep")
    # instead of macs_target: a params fraction, a speed-up or a latency (TargetCfg); {macs: x} is macs_target: x
    target: TargetCfg | None = None
    ratio: float | None = Field(None, gt=0, lt=1, description="a channel ratio instead of a MACs target")
    # relative to the MACs target (0.02 of 0.5: 0.49-0.50x): the band the search aims for. A cut round_to's steps
    # cannot place in it lands on the nearest one at or below the target, and the record says how far it landed
    tolerance: float = Field(0.02, gt=0, lt=1)
    macs_at_most: bool = True  # the target is a ceiling: land in [target * (1 - tolerance), target], not +- tolerance
    importance: Literal["l1", "l2", "taylor", "bn_scale", "lamp"] = "l2"
    global_pruning: bool = False
    isomorphic: bool = False
    # multiples of 16: ONNX Runtime's AVX-512 kernels work in 16-channel blocks; TensorRT's tensor cores want multiples
    # of 8, which 16 are
    round_to: int = Field(16, ge=1)
    max_layer_ratio: float = Field(0.9, gt=0, lt=1)
    taylor_batches: int = Field(4, ge=1)
    # where to prune: uniform ratios; per-group ratios from a sensitivity scan; or from measured latency per point.
    # latency is the measured best: on BCCD's photos at 0.49x MACs, timed side by side (`yolo-edge compare`), the
    # latency-mode cut with round_to 16 ran 1.78x [1.68, 1.86] faster than the base, uniform ratios with round_to 8
    # 1.52x [1.48, 1.57] (0.88 vs 0.75 of the MACs cut). It costs a scan (a held-out evaluation per group, 69 on
    # YOLO11n, and two ONNX Runtime profiles) and times the CPU it runs on, not the Jetson's TensorRT: the cut can
    # differ between machines (the run's prune/plan.json records it). uniform is deterministic and takes seconds.
    mode: Literal["uniform", "sensitivity", "latency"] = "latency"
    sensitivity: SensitivityCfg = SensitivityCfg()
    steps: int = Field(1, ge=1)  # iterative: prune in k steps toward the target, fine-tuning between steps
    step_epochs: int = Field(2, ge=1)  # fine-tune epochs after each step but the last (finetune does the last)
    max_step_drop: float | None = Field(None, gt=0)  # stop early when a step loses more mAP50-95 than this
    reconstruct: ReconstructCfg = ReconstructCfg()
    sparsity: SparsityCfg = SparsityCfg()


class FinetuneCfg(TrainCfg):
    """Winning back what the cut of a trained model cost (models/bccd.yaml's, measured on BCCD's photos: the pruned
    YOLO11n at 0.49x MACs ended +0.02 pt from its converged base): AdamW at lr 1e-3 (about the base's own), an
    optimizer step every batch, a short warm-up with no bias-lr jolt, no mosaic in the last 10 epochs, and
    distillation from the unpruned model's head outputs. A cut that sparsity training made exact needs only a gentle
    continuation (models/default.yaml: lr 1e-4, no distillation)."""

    nbs: int = Field(16, ge=1)  # an optimizer step every batch of 16 (ultralytics' 64: 7.5 steps an epoch on 480)
    lr0: float | None = 1e-3  # None: ultralytics' (for its auto optimizer, picked from the iteration count)
    optimizer: str = "AdamW"
    close_mosaic: int = Field(10, ge=0)
    warmup_epochs: float = Field(1.0, ge=0)  # the model is trained already: a short warm-up
    # Where the bias lr starts its warm-up. Ultralytics' 0.1 suits SGD (its auto optimizer sets 0 for AdamW, but
    # only for auto): a named AdamW at 0.1 takes steps of ~0.1 on every bias and knocks a trained model down.
    warmup_bias_lr: float = Field(0.0, ge=0)
    distill: DistillCfg = DistillCfg(enabled=True)

    def trainer_args(self) -> dict:
        """The optimizer and schedule as well as the setup (the length and the distillation are passed beside)."""
        return {**super().trainer_args(), "optimizer": self.optimizer, "close_mosaic": self.close_mosaic,
                "warmup_epochs": self.warmup_epochs, "warmup_bias_lr": self.warmup_bias_lr,
                **({"lr0": self.lr0} if self.lr0 is not None else {})}


class CalibCfg(Strict):
    source: str = "train"  # "train": a seeded sample of the train split; or a text file of image paths (calib/)
    count: int = Field(64, ge=1)
    min_count: int = Field(64, ge=1)
    seed: int = 0
    force: bool = False  # accept fewer images than min_count
    # images for accuracy-aware INT8 (never calib, never eval): the selection split where data.selection carves one,
    # else held-out train images
    tuning_images: int = Field(256, ge=8)


class AccuracyAwareCfg(Strict):
    enabled: bool = True
    max_drop: float = Field(0.005, ge=0)  # mAP50-95 on the tuning images
    step: int = Field(2, ge=1)  # nodes returned to float per iteration
    max_float: int = Field(24, ge=1)
    # Return at least this many of the worst-ranked nodes to float even when the tuning drop is within budget:
    # a 64-image tuning mAP is noisier (about ±1 pt) than a 0.5 pt budget, the layer-error ranking is not.
    min_float: int = Field(2, ge=0)
    shortlist: int = Field(6, ge=1)  # top layer-error candidates tried one by one on the detector output
    # The stop rule: the tuning-set drop plus noise_z standard errors (from half-samples of the tuning images) must
    # be within max_drop: a 64-image estimate is about as noisy as a 0.5-point budget. Measured on the default run's
    # 256 tuning images over four fine-tunes (OMP_NUM_THREADS 1/2, seeds 0-2): drops 0.21-0.36 pt with SE 0.09-0.11
    # pt, so one SE is a third of the 0.5-pt budget's room; the val split then read -0.03 to 0.35 pt, all within it.
    noise_z: float = Field(1.0, ge=0)
    probe_images: int = Field(4, ge=1)  # calibration images for that output check


class QuantizeCfg(Strict):
    enabled: bool = True
    backend: Literal["onnxruntime", "modelopt"] = "onnxruntime"
    method: Literal["minmax", "entropy", "percentile"] = "percentile"
    # 99.999: measured on the real-photo benchmark (BCCD val, plain INT8 of five pruned models against their FP32):
    # 99.99 lost +0.71 pt on average (-0.01 to +1.25), 99.999 -0.36 (-0.69 to -0.07), minmax -0.04 (-0.60 to +0.55);
    # 99.99 clips the activations of detections these photos need. models/default.yaml keeps 99.99 for its demo.
    percentile: float = Field(99.999, gt=90, le=100)
    exclude: list[str] = ["detect-decode"]
    op_types: list[str] = ["Conv", "MatMul", "Add"]
    accuracy_aware: AccuracyAwareCfg = AccuracyAwareCfg()
    peer: bool = True  # ultralytics' own INT8 ONNX export of the pruned model, benchmarked beside the project's


class E2ECfg(Strict):
    """The end-to-end variants (`*-e2e`, pipeline/quant/e2e.py): one ONNX from a uint8 BGR camera frame to final
    detections (letterbox, the model, NMS inside), built from the fp32 and INT8 variants; bench scores it and times
    it on frames of this size."""

    enabled: bool = True
    frame_hw: tuple[int, int] = (720, 1280)  # the camera's frames, height x width: fixed in the graph
    resize: Literal["cv2", "onnx"] = "cv2"  # cv2: bit-exact cv2.resize in integer ops; onnx: one Resize op (faster
                                            # on some runtimes, within 1/255 of cv2's pixels)

    @field_validator("frame_hw")
    @classmethod
    def _positive(cls, v):
        if min(v) < 1:
            raise ValueError("frame_hw must be two positive sizes: [height, width]")
        return v


class ExportCfg(Strict):
    e2e: E2ECfg = E2ECfg()
    opset: int = Field(17, ge=13, le=21)
    simplify: bool = True
    # ORT vs PyTorch on 8 eval images: boxes in units of the input size, scores as probabilities. Measured 3.0e-6 to
    # 5.2e-6 (base and pruned, 320 px; OMP_NUM_THREADS 1 and 2, fine-tune seeds 0-2); 1e-3 is ~200x that, and a
    # wrong export (a rewrite that changes the math) moves outputs by >1e-2
    parity_atol: float = 1e-3
    dfl_last_axis: bool = True  # exact rewrite of the DFL (softmax on the last axis + MatMul)


class EngineCfg(Strict):
    """The TensorRT the device builds with. The engine stage and the bundle check every ONNX file they write or carry
    against its ONNX operator table (pipeline/quant/trt_ops.py) and its explicit-quantization and strong-typing
    rules, and refuse what it would not parse."""

    tensorrt: str = "10.3"  # JetPack 6's; 11 for TensorRT 11.x on x86 (any table or alias in trt_ops)

    @field_validator("tensorrt", mode="before")
    @classmethod
    def _known(cls, v):
        from pipeline.quant.trt_ops import resolve

        v = str(v)  # YAML reads 10.3 and 11 as numbers
        try:
            resolve(v)
        except UserError as e:
            raise ValueError(str(e)) from None  # names the stored tables
        return v


class BenchCfg(Strict):
    split: str = "val"
    conf: float = Field(0.001, ge=0, le=1)
    iou: float = Field(0.7, gt=0, le=1)
    max_det: int = Field(300, ge=1)
    # latency: every variant timed together in shuffled rounds (pipeline/eval/interleaved.py, which says what the
    # defaults rest on) until each speed-up and e2e ÷ engine ratio's 95% interval is within ±rel_width/2
    warmup: int = Field(Schedule.warmup, ge=0)  # untimed calls per timed item first
    per_round: int = Field(Schedule.per_round, ge=1)  # calls per item in each round
    min_rounds: int = Field(Schedule.min_rounds, ge=1)
    max_rounds: int = Field(Schedule.max_rounds, ge=1)  # below min_rounds: exactly this many rounds, no stop check
    rel_width: float = Field(Schedule.rel_width, gt=0)  # (hi - lo) / estimate each tracked ratio must reach
    cap_s: float = Field(Schedule.cap_s, gt=0)  # seconds of timing after which it stops whatever the widths
    threads: int = Field(2, ge=1)
    runner: Literal["onnxruntime", "tensorrt"] = "onnxruntime"
    # mAP intervals: a paired bootstrap over the eval images (pipeline/eval/bootstrap.py); 1000 resamples put a
    # 95% interval's ends within ~0.1 pt of 10,000's on the default run, at ~0.5 s a variant
    bootstrap_resamples: int = Field(1000, ge=100)
    bootstrap_seed: int = 0
    # fault injection (tests of the gate): {variant: factor} makes each infer call of that variant's runner take
    # factor × its own duration (a busy wait after the call); the report row says so
    inject_slowdown: dict[str, float] = {}

    @field_validator("inject_slowdown")
    @classmethod
    def _slower_only(cls, v):
        bad = {k: f for k, f in v.items() if not f >= 1}
        if bad:
            raise ValueError(f"a slowdown factor is at least 1 (a busy wait can only add time): {bad}")
        return v


class Recipe(Strict):
    name: str = "default"
    data: DataCfg = DataCfg()
    model: ModelCfg = ModelCfg()
    base: BaseTrainCfg = BaseTrainCfg()
    prune: PruneCfg = PruneCfg()
    finetune: FinetuneCfg = FinetuneCfg()
    calib: CalibCfg = CalibCfg()
    quantize: QuantizeCfg = QuantizeCfg()
    export: ExportCfg = ExportCfg()
    engine: EngineCfg = EngineCfg()
    bench: BenchCfg = BenchCfg()

    def section(self, name: str) -> dict:
        return getattr(self, name).model_dump()


def _set(d: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        d = d.setdefault(k, {})
        if not isinstance(d, dict):
            raise UserError(f"--set {dotted}: '{k}' is not a section")
    d[keys[-1]] = value


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise UserError("recipe not found", path)
    try:
        raw = yaml.safe_load(path.read_text())
    except UnicodeDecodeError:
        raise UserError("not a recipe: not a text file", path) from None
    except yaml.YAMLError as e:
        raise UserError(f"not valid YAML ({str(e).splitlines()[0]})", path) from None
    if raw is None:
        raise UserError("the recipe is empty (`yolo-edge init` writes one for your data)", path)
    if not isinstance(raw, dict):
        raise UserError("a recipe must be a mapping of sections", path)
    if "names" in raw and ("train" in raw or "val" in raw or "path" in raw):
        raise UserError("this is a dataset yaml, not a recipe: name it in a recipe's data.source (`yolo-edge init "
                        "--data` writes one)", path)
    for ov in overrides:
        if "=" not in ov:
            raise UserError(f"--set expects key=value, got '{ov}'")
        k, v = ov.split("=", 1)
        _set(raw, k.strip(), yaml.safe_load(v))
    try:
        return Recipe.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            raise UserError(f"unknown recipe key '{key}'", path) from None
        raise UserError(f"recipe key '{key}': {err['msg']} (got {err.get('input')!r})", path) from None
