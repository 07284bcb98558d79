"""`load` stage: a user's YOLOv8, YOLO11 or YOLO26 `.pt`, or a `.yaml` architecture built with the dataset's class
count, re-saved as an FP32 ultralytics checkpoint with its family (read from its structure; `model.family`
overrides), parameter and MAC counts (of the deployed form). A training record beside the
weights (`<name>.json`, as `make base` writes it) is read for how the model was trained and whether its
convergence check passed; bench reports it next to base-fp32."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.core.errors import UserError
from pipeline.core.stage import Context, StageResult, run_stage
from pipeline.core.store import StageRecord
from pipeline.stages import data as data_stage

VERSION = 3  # 3: the model family


def family(ctx: Context):
    """The run's model family, as the load stage recorded it (pipeline/adapters/family.py)."""
    from pipeline.adapters.family import family_named

    return family_named(json.loads(ctx.output("load", "info").read_text()).get("family", "yolo11"))


def prepost(ctx: Context):
    """The letterbox and post-processing every stage that runs the detector uses: the recipe's input size and bench
    thresholds, the family's post-processing (NMS, or YOLO26's top-K)."""
    from pipeline.eval.detect import PrePost

    return PrePost.from_recipe(ctx.recipe, post=family(ctx).post)


def weights_spec(ctx: Context) -> str:
    w = ctx.recipe.model.weights or ctx.recipe.model.arch
    if not str(w).endswith((".yaml", ".yml")) and not Path(w).is_file():
        hint = " (the default base model: `make base` trains it)" if "models/base" in str(w) else ""
        raise UserError(f"model file not found{hint}", w)
    return w


def preflight(ctx: Context) -> None:
    """The model the recipe names: a .pt that loads as a detection model, or a detection model config that builds, of
    a supported family; a pruned checkpoint with the history that rebuilds it. Refused in one line otherwise."""
    from pipeline.adapters.ultralytics_yolo import check_model_spec, check_pruned_checkpoint

    spec = weights_spec(ctx)
    if not spec.endswith((".yaml", ".yml")):
        check_against_record(Path(spec))
    fam = check_model_spec(spec, ctx.recipe.model.family)
    if not spec.endswith((".yaml", ".yml")):
        check_pruned_checkpoint(spec, ctx.recipe.model.imgsz, fam)


def check_against_record(weights: Path) -> None:
    """A checkpoint with a training record beside it (`make base` writes <name>.json with the file's sha256) must be
    the file the record describes: a corrupted or replaced base is refused in one line, before any work."""
    from pipeline.core.store import sha256_file

    if weights.suffix == ".json":  # the record itself given as the weights: torch.load says what it is
        return
    try:
        rec = json.loads(weights.with_suffix(".json").read_text())
    except (OSError, ValueError):
        return
    want = rec.get("sha256") if isinstance(rec, dict) and "epochs" in rec else None
    if isinstance(want, str) and sha256_file(weights) != want:
        raise UserError(f"the checkpoint is not the file its training record ({weights.with_suffix('.json').name}) "
                        f"describes (sha256 {sha256_file(weights)[:12]}, recorded {want[:12]}): it was corrupted or "
                        f"replaced; restore it (git checkout) or retrain it (make base)", weights)


def model_names(model) -> list[str]:
    names = getattr(model, "names", None)
    if isinstance(names, dict):
        return [str(names[k]) for k in sorted(names)]
    return [str(n) for n in names] if isinstance(names, (list, tuple)) else []


def placeholder_names(names: list[str]) -> bool:
    """Class names ultralytics makes up when it has none ("0", "1"... or "class0"...): they name no class."""
    return all(n in (str(i), f"class{i}") for i, n in enumerate(names))


def check_class_order(model, names: list[str], where) -> None:
    """A checkpoint whose classes are not the dataset's, or are in another order, would be scored against the wrong
    labels (a model whose names are ultralytics' placeholders is taken as it is)."""
    mine = model_names(model)
    if sorted(mine) == sorted(names) and mine != list(names):
        raise UserError(f"the model's classes {mine} are the dataset's {list(names)} in another order: set "
                        f"data.names to {mine}", where)
    if mine and not placeholder_names(mine) and sorted(mine) != sorted(names):
        raise UserError(f"the model's classes {mine} are not the dataset's {list(names)}", where)


def run(ctx: Context) -> StageRecord:
    spec = weights_spec(ctx)
    meta = data_stage.meta(ctx)
    config = {"model": ctx.recipe.model.model_dump(), "names": meta["names"]}
    inputs = {} if spec.endswith((".yaml", ".yml")) else {"weights": Path(spec)}
    if inputs and Path(spec).suffix != ".json" and Path(spec).with_suffix(".json").is_file():
        inputs["training"] = Path(spec).with_suffix(".json")

    def fn(ctx: Context, out: Path, inputs) -> StageResult:
        from pipeline.adapters import ultralytics_yolo as ua
        from pipeline.adapters.family import family_of

        if "weights" in inputs:
            model = ua.load_detection_model(inputs["weights"])
            nc = int(model.model[-1].nc)
            if nc != len(meta["names"]):
                raise UserError(f"the model predicts {nc} classes but the dataset has {len(meta['names'])}",
                                inputs["weights"])
            check_class_order(model, meta["names"], inputs["weights"])
        else:
            model = ua.build_from_yaml(spec, nc=len(meta["names"]), names=meta["names"])
        fam = family_of(model, ctx.recipe.model.family, spec)
        stride, imgsz = int(max(model.stride)), ctx.recipe.model.imgsz
        if imgsz % stride:
            raise UserError(f"model.imgsz {imgsz} is not a multiple of the model's largest stride {stride} "
                            f"(e.g. {max(stride, round(imgsz / stride) * stride)})", ctx.recipe_path)
        stats = {**ua.model_stats(model, ctx.recipe.model.imgsz, fam), "family": fam.name}
        ua.save_checkpoint(model, out / "model.pt")
        info = {**stats, "nc": len(meta["names"]), "names": ua.names_of(model) or meta["names"], "source": spec}
        if "training" in inputs:
            info["training"] = training_summary(inputs["training"])
        (out / "model.json").write_text(json.dumps(info, indent=1))
        return StageResult(outputs={"model": "model.pt", "info": "model.json"}, metrics=stats,
                           summary=f"{fam.title}, {stats['params'] / 1e6:.2f} M params, {stats['macs'] / 1e9:.2f} "
                                   f"GMACs at {ctx.recipe.model.imgsz} px")

    return run_stage(ctx, "load", VERSION, config, inputs, fn)


def training_summary(path: Path) -> dict | None:
    """How a shipped base was trained and whether more epochs still raised its mAP (from `make base`'s record)."""
    try:
        t = json.loads(Path(path).read_text())
    except (OSError, ValueError):  # not JSON, or not text: a file of the same name that is not such a record
        return None
    if not isinstance(t, dict) or "epochs" not in t:
        return None
    c = t.get("convergence_check")
    c = c if isinstance(c, dict) else {}
    # Longer runs from the shipped weights (one schedule each, not `make base`'s check): they can show that the check
    # was too short, and then the base counts as not converged (the record's own `converged` says so).
    checks = t.get("longer_checks")
    longer = [{k: x.get(k) for k in ("epochs", "gain", "window", "where")}
              for x in (checks if isinstance(checks, list) else []) if isinstance(x, dict)]
    return {"epochs": t["epochs"], "converged": t.get("converged"),
            "check_epochs": c.get("epochs"), "check_gain": c.get("gain"), "check_window": c.get("window"),
            "check_settings": c.get("settings_from", "finetune"),
            "check_converged": c.get("converged"), "shipped_map50_95": c.get("shipped_map50_95"),
            **({"longer_checks": longer} if longer else {})}
