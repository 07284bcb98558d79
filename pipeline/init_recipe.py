"""`yolo-edge init --data D --weights W`: a short recipe for a user's dataset and checkpoint, and the plan of what
`yolo-edge run` will do with it, stage by stage, with rough durations on this machine.

The recipe holds only what differs from the schema's defaults (pipeline/core/config.py: the project's recommended
settings, a gentle fine-tune among them): the data, the model and its input size, the fine-tune's length sized to the
number of train images, the device, sparsity training (on unless --no-sparsity), and INT8 off when the train split is
too small to calibrate on. It is validated by load_recipe before it is written (temp file + rename), and an existing
file is never overwritten without --force. The durations come from one timed training batch of the model on the
data (pipeline/adapters/train_timing.py) scaled by pipeline/estimate.py.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tempfile
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import yaml

from pipeline.core.config import Recipe, load_recipe
from pipeline.core.errors import UserError
from pipeline.core.store import atomic_path
from pipeline.stages.order import STAGES, plan

# Fine-tune length: about FT_IMAGES_SEEN training images seen (~1900 optimizer steps at batch 16, a step every batch),
# i.e. ceil(FT_IMAGES_SEEN / train images) epochs, within [FT_MIN_EPOCHS, FT_MAX_EPOCHS]. 30k is what `make nightly`
# gives the default run (60 epochs x 480 images), the longest fine-tune measured (README); below 300 images the cap
# (more passes over a few images only overfit them), above 6000 the floor (every image seen at least 5 times).
FT_IMAGES_SEEN = 30_000
FT_MIN_EPOCHS, FT_MAX_EPOCHS = 5, 100
DEFAULT_IMGSZ = 640  # ultralytics' own, for an architecture yaml or a checkpoint that does not say


def finetune_epochs(n_train: int) -> int:
    return max(FT_MIN_EPOCHS, min(FT_MAX_EPOCHS, math.ceil(FT_IMAGES_SEEN / max(n_train, 1))))


@dataclass
class Inputs:
    names: list[str]
    n_train: int
    n_val: int
    n_images: int
    model: object  # the DetectionModel (an untrained one built from a yaml)
    imgsz: int
    imgsz_from: str
    is_yaml: bool
    dataset: object = None  # pipeline.data.formats.Dataset
    family: object = None  # pipeline.adapters.family.ModelFamily


def default_out(data: Path, weights: str) -> Path:
    p = Path(data)
    stem = p.stem
    if p.suffix in (".yaml", ".yml", ".json") and (stem == "data" or stem.startswith("instances")):  # data.yaml,
        # annotations/instances_x.json: named after the dataset's folder
        stem = (p.parent.parent if p.parent.name == "annotations" else p.parent).name or stem
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{stem}-{Path(weights).stem}").strip("-.") or "recipe"
    return Path("models") / f"{name}.yaml"


def _checkpoint_imgsz(model) -> int | None:
    v = (getattr(model, "args", None) or {}).get("imgsz")
    if isinstance(v, (list, tuple)) and v:
        v = max(int(x) for x in v)
    return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 else None


def read_inputs(data: Path, weights: str, imgsz: int | None) -> Inputs:
    """The dataset's classes and image counts and the model (its input size from the checkpoint), checked against
    each other the way the run will check them."""
    from pipeline.adapters import ultralytics_yolo as ua
    from pipeline.data.formats import load_dataset

    ds = load_dataset(data)
    train = ds.splits.get("train") or []
    if not train:
        raise UserError("the dataset has no train images: `yolo-edge run` fine-tunes on them (`yolo-edge bench` "
                        "benchmarks a model without training)", data)
    if not ds.splits.get("val"):
        raise UserError("the dataset has no 'val' split: bench scores it", data)
    is_yaml = str(weights).endswith((".yaml", ".yml"))
    if is_yaml:
        model = ua.build_from_yaml(weights, nc=ds.nc, names=ds.names)
        found = None
    else:
        from pipeline.data.formats import is_voc
        from pipeline.stages.load import model_names

        model = ua.load_detection_model(weights)
        nc = int(model.model[-1].nc)
        if nc != ds.nc:
            raise UserError(f"the model predicts {nc} classes but the dataset has {ds.nc}", weights)
        mine = model_names(model)
        if is_voc(data) and sorted(mine) == sorted(ds.names) and mine != ds.names:
            ds = load_dataset(data, names=mine)  # a VOC set's class order is the checkpoint's
        found = _checkpoint_imgsz(model)
    from pipeline.adapters.family import family_of

    fam = family_of(model, None, weights)  # YOLOv8, YOLO11 or YOLO26: anything else is refused here, in one line
    if imgsz:
        size, src = imgsz, "--imgsz"
    elif found:
        size, src = found, "the checkpoint's training size"
    else:
        size, src = DEFAULT_IMGSZ, ("ultralytics' default (an architecture yaml carries no size)" if is_yaml else
                                    "ultralytics' default (the checkpoint does not say its size)")
    stride = int(max(model.stride))
    if size % stride:
        raise UserError(f"input size {size} is not a multiple of the model's largest stride {stride}")
    return Inputs(names=list(ds.names), n_train=len(train), n_val=len(ds.splits["val"]),
                  n_images=sum(len(v) for v in ds.splits.values()), model=model, imgsz=size, imgsz_from=src,
                  is_yaml=is_yaml, dataset=ds, family=fam)


def recipe_values(name: str, data: Path, weights: str, inp: Inputs, device: str, sparsity: bool,
                  speedup: float | None = None) -> dict:
    """The recipe as a nested dict: what differs from the schema's defaults, and the keys in ALWAYS."""
    cpu = device.strip().lower() in ("", "cpu")
    workers = min(8, os.cpu_count() or 2)
    from pipeline.data.formats import is_voc

    v: dict = {"name": name, "data": {"source": str(data), **({"names": list(inp.names)} if is_voc(data) else {})},
               "model": {"arch" if inp.is_yaml else "weights": str(weights), "imgsz": inp.imgsz},
               "prune": {"sparsity": {"enabled": sparsity, **({} if cpu else {"device": device, "workers": workers})},
                         **({"target": {"speedup": speedup}} if speedup else {})},
               "finetune": {"epochs": finetune_epochs(inp.n_train),
                            **({} if cpu else {"device": device, "workers": workers})}}
    if inp.n_train < Recipe().calib.min_count:
        v["quantize"] = {"enabled": False}
    return _prune_defaults(v, Recipe().model_dump())


# written even where they equal the schema's default: what the recipe is about
ALWAYS = ("name", "data.source", "data.names", "model.weights", "model.arch", "model.imgsz", "finetune.epochs",
          "prune.sparsity.enabled")


def _prune_defaults(v: dict, default: dict, prefix: str = "") -> dict:
    out = {}
    for k, x in v.items():
        if isinstance(x, dict):
            sub = _prune_defaults(x, default.get(k) or {}, f"{prefix}{k}.")
            if sub:
                out[k] = sub
        elif default.get(k, object()) != x or f"{prefix}{k}" in ALWAYS:
            out[k] = x
    return out


def _scalar(x) -> str:
    return yaml.safe_dump(x, default_flow_style=True, width=1000).strip().removesuffix("...").strip()


def render(values: dict, comments: dict[str, str], header: list[str]) -> str:
    """YAML text of `values` (nested mappings of scalars), a comment after the keys `comments` names (dotted)."""
    lines = [f"# {h}" if h else "#" for h in header]

    def walk(d: dict, indent: int, prefix: str) -> None:
        for k, x in d.items():
            key = f"{prefix}{k}"
            if isinstance(x, dict):
                lines.append(" " * indent + f"{k}:")
                walk(x, indent + 2, key + ".")
            else:
                line = " " * indent + f"{k}: {_scalar(x)}"
                if key in comments:
                    line = f"{line:<32} # {comments[key]}"
                lines.append(line)

    walk(values, 0, "")
    return "\n".join(lines) + "\n"


def _names_line(names: list[str], show: int = 8) -> str:
    more = f", ... {len(names) - show} more" if len(names) > show else ""
    return ", ".join(names[:show]) + more


def init(data: Path, weights: str, out: Path | None = None, device: str = "cpu", sparsity: bool = True,
         imgsz: int | None = None, force: bool = False, speedup: float | None = None) -> tuple[Path, str]:
    """Write the recipe; returns (its path, the plan to print)."""
    from pipeline import estimate
    from pipeline.adapters.train_timing import time_train_batch, torch_device
    from pipeline.data.formats import write_yolo

    out = Path(out) if out else default_out(data, weights)
    if out.suffix not in (".yaml", ".yml"):
        raise UserError("the recipe must be a .yaml file", out)
    if out.exists() and not force:
        raise UserError("exists already: pass --force to overwrite it", out)
    device = str(device)
    torch_device(device)  # a device this machine has, before anything is timed
    inp = read_inputs(Path(data), str(weights), imgsz)
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", out.stem) or "recipe"
    if speedup is not None and not speedup > 1:
        raise UserError(f"--speedup {speedup:g}: a speed-up target is a factor over the base, above 1")
    values = recipe_values(name, Path(data), str(weights), inp, device, sparsity, speedup)
    recipe = Recipe.model_validate(values)  # as `yolo-edge run` will read it

    ds, b = inp.dataset, recipe.finetune.batch
    sample = dataclasses.replace(ds, splits={"train": ds.splits["train"][:b], "val": ds.splits["val"][:1]})
    with tempfile.TemporaryDirectory(prefix="yolo-edge-init-") as td:
        data_yaml = write_yolo(sample, Path(td) / "yolo")  # the trainer's layout (image symlinks), one batch of it
        t = time_train_batch(inp.model, data_yaml, inp.imgsz, b, device)  # batch: min(b, train images)
    timing = estimate.Timing.of(t, recipe.finetune.workers)
    groups = estimate.prunable_groups(inp.model, inp.imgsz) if recipe.prune.mode != "uniform" else 0
    sizes = estimate.Sizes(inp.n_train, inp.n_val, inp.n_images, groups)
    stages = plan(recipe, timing, sizes)
    # sparsity training's own cost, whether the recipe has it on or not
    with_sparsity = Recipe.model_validate(_set_in(values, ("prune", "sparsity", "enabled"), True))
    sparse_s = next(s.seconds for s in plan(with_sparsity, timing, sizes) if s.name == "sparsity")
    sp = recipe.prune.sparsity
    sp_epochs = sum(p.epochs for p in sp.phases)

    raw = math.ceil(FT_IMAGES_SEEN / inp.n_train)
    comments = {"model.imgsz": inp.imgsz_from,
                "finetune.epochs": f"~{FT_IMAGES_SEEN // 1000}k images seen: {FT_IMAGES_SEEN} / {inp.n_train} train "
                                   f"images" + (f" (= {raw}), within {FT_MIN_EPOCHS}..{FT_MAX_EPOCHS}"
                                                if raw != recipe.finetune.epochs else ""),
                "prune.sparsity.enabled": f"{sp_epochs} epochs before the cut, ~{estimate.human(sparse_s)} here",
                "quantize.enabled": f"{inp.n_train} train images: INT8 calibration wants "
                                    f"calib.min_count={recipe.calib.min_count}"}
    header = [f"yolo-edge init, {date.today().isoformat()}: {data} with {weights}",
              f"data: {len(inp.names)} classes ({_names_line(inp.names)}); {inp.n_train} train / {inp.n_val} val "
              f"images",
              f"model: {Path(str(weights)).name} ({inp.family.title}), input {inp.imgsz}x{inp.imgsz}"
              + (" (an architecture yaml: untrained weights)" if inp.is_yaml else ""),
              "Every key not set here is the schema's default: the project's recommended settings",
              f"(pipeline/core/config.py). Run: yolo-edge run --recipe {out}"]
    text = render(values, comments, header)
    with atomic_path(out) as tmp:
        tmp.write_text(text)
        written = load_recipe(tmp)  # what run will read: refused here, and nothing written, if it does not validate
        if written.model_dump() != recipe.model_dump():
            raise AssertionError(f"{out}: the rendered recipe reads back differently")
    return out, _plan_text(out, recipe, stages, timing, sparse_s, sp_epochs, inp)


def _set_in(d: dict, path: tuple[str, ...], value) -> dict:
    import copy

    d = copy.deepcopy(d)
    cur = d
    for k in path[:-1]:
        cur = cur.setdefault(k, {})
    cur[path[-1]] = value
    return d


def _plan_text(out: Path, recipe: Recipe, stages, timing, sparse_s: float, sp_epochs: int, inp: Inputs) -> str:
    from pipeline.estimate import human

    total = sum(s.seconds for s in stages)
    lines = [f"wrote {out}: `yolo-edge run --recipe {out}` will, roughly, on this machine:"]
    by = {s.name: s for s in stages}
    for name in STAGES:  # in the run's order; sparsity training is the prune stage's first part
        for s in ([by["sparsity"]] if name == "prune" and "sparsity" in by else []) + [by.get(name)]:
            if s is not None:
                lines.append(f"  {s.name:<10} ~{human(s.seconds):<9} {s.what}")
            elif name not in ("prune", "finetune", "calibrate", "quantize"):  # those: switched off in this recipe
                lines.append(f"  {name:<10} {'?':<10} (not estimated here)")
    lines.append(f"  {'total':<10} ~{human(total):<9} (run dir runs/{recipe.name}; a stage already done is skipped)")
    if recipe.prune.sparsity.enabled:
        lines.append(f"sparsity training: on ({sp_epochs} epochs before the cut, ~{human(sparse_s)} of the total; "
                     f"--no-sparsity skips it at some accuracy: the README measures what it buys)")
    else:
        lines.append(f"sparsity training: off (--sparsity: {sp_epochs} epochs before the cut, ~{human(sparse_s)} more "
                     f"here; the README measures what it buys)")
    if inp.is_yaml:
        lines.append(f"{Path(str(recipe.model.arch)).name} is an architecture: the run prunes and fine-tunes untrained "
                     f"weights (train them first: `yolo-edge base`, or start from a trained .pt)")
    if not recipe.quantize.enabled:
        lines.append(f"INT8: off, {inp.n_train} train images are fewer than calib.min_count={recipe.calib.min_count} "
                     f"(set quantize.enabled: true and calib.force: true to quantize anyway)")
    lines.append(f"estimated from one timed training batch ({timing.step_s:.2f} s for {timing.batch} images at "
                 f"{inp.imgsz}x{inp.imgsz} on {timing.device}) and one CPU forward "
                 f"({timing.infer_img_s * 1000:.0f} ms); other load on the machine changes them")
    return "\n".join(lines)
