"""`make base`: train the default base model (YOLO11n from its yaml) on the run's dataset with the stock
trainer, and ship it as models/base/<name>.pt (FP32) with its training history beside it, so a fresh clone's
`make pipeline` need not spend hours of CPU on it and anyone can reproduce it.

Training is a sequence of stock ultralytics runs (base.phases: the first from the yaml, each later one from the
previous run's last weights, each with its own epochs and nominal batch). The shipped weights are the last run's
final epoch. Phases appended to the recipe continue the shipped weights: when the record beside them holds the first
phases (same model, data and setup; the file unchanged), only the new ones are trained. Convergence is shown, not
assumed: with base.check_epochs > 0 one further run (not shipped; the finetune section's settings, or with
base.check_settings=last_phase the last phase's) continues from the shipped weights, and the base counts as
converged when the mean val mAP50-95 of that run's last base.converged_window epochs is less than
base.converged_gain above the mean of the shipped run's last as many epochs. A check with the last phase's settings
is kept (its final weights beside the record, `<name>.check.pt`): when it failed, appending that same schedule to
base.phases takes it as the next phase instead of training it again."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from pipeline.core.stage import Context, console, lib_versions
from pipeline.core.store import atomic_path, sha256_file, sha256_json


def _history(train_dir: Path, phase: int, offset: int) -> list[dict]:
    """One phase's val mAP per epoch (ultralytics' results.csv), numbered on from `offset` epochs before it."""
    from pipeline.adapters.ultralytics_yolo import training_history

    return [{"epoch": offset + r["epoch"], "phase": phase, "map50_95": r["map50_95"], "map50": r["map50"]}
            for r in training_history(train_dir)]


def convergence(history: list[dict], check: list[dict], converged_gain: float, window: int) -> dict:
    """Did `check` (epochs trained on from the shipped weights) still raise the val mAP? Both runs end their own LR
    schedule, so the mean of the check's last `window` epochs is set against the mean of the shipped run's last
    `window` epochs: one epoch's val mAP moves by ±0.4 pt on the default data, so the check's best epoch against the
    shipped final one (kept as `best_gain`) would show a gain from noise alone."""
    shipped = [r for r in history if r["phase"] == history[-1]["phase"]]
    w = max(1, min(window, len(shipped), len(check)))
    tail_s = sum(r["map50_95"] for r in shipped[-w:]) / w
    tail_c = sum(r["map50_95"] for r in check[-w:]) / w
    best = max(r["map50_95"] for r in check)
    final = history[-1]["map50_95"]
    return {"window": w, "shipped_tail_map50_95": round(tail_s, 5), "check_tail_map50_95": round(tail_c, 5),
            "gain": round(tail_c - tail_s, 5), "shipped_map50_95": final, "best_map50_95": best,
            "final_map50_95": check[-1]["map50_95"], "best_gain": round(best - final, 5),
            "converged_gain": converged_gain, "converged": tail_c - tail_s < converged_gain}


def _same_data(recorded, ctx: Context) -> bool:
    """The record's data section is the recipe's, read through today's schema (keys added since take their
    defaults)."""
    from pydantic import ValidationError

    from pipeline.core.config import DataCfg

    try:
        return DataCfg.model_validate(recorded).model_dump() == ctx.recipe.data.model_dump()
    except ValidationError:
        return False


def _shipped_prefix(ctx: Context, dest: Path, phases: list[dict]) -> dict | None:
    """The record beside `dest` when it holds the first phases of `phases` for this recipe's model, data and
    training setup and `dest` is still the file it describes: `make base` then trains only the phases after them."""
    try:
        rec = json.loads(dest.with_suffix(".json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    b = ctx.recipe.base
    done = rec.get("phases") if isinstance(rec, dict) else None
    if (not isinstance(done, list) or not done or done != phases[:len(done)] or rec.get("start") is not None
            or rec.get("arch") != str(ctx.recipe.model.arch) or rec.get("imgsz") != ctx.recipe.model.imgsz
            or rec.get("batch") != b.batch or rec.get("seed") != b.seed
            or not _same_data(rec.get("data"), ctx) or not dest.is_file()
            or rec.get("sha256") != sha256_file(dest)):
        return None
    return rec


def recipe_phases(b) -> list[dict]:
    """base.phases as the record writes them (each phase's nbs filled in from base.nbs)."""
    return [{"epochs": p.epochs, "nbs": p.nbs or b.nbs,
             **{k: getattr(p, k) for k in ("close_mosaic", "warmup_epochs") if getattr(p, k) is not None}}
            for p in b.phases]


def check_file(dest: Path) -> Path:
    """Where a last_phase check's final weights are kept (beside the shipped checkpoint)."""
    return dest.with_name(dest.stem + ".check.pt")


def check_as_phase(prev: dict, phase: dict, dest: Path) -> bool:
    """Is `phase`, the first phase after the shipped ones, the schedule the record's check already trained,
    with its weights still beside `dest` as they were?"""
    c = prev.get("convergence_check") or {}
    w = c.get("weights") or {}
    f = check_file(dest)
    return (bool(c.get("as_phase")) and c["as_phase"] == phase and w.get("file") == f.name and f.is_file()
            and w.get("sha256") == sha256_file(f))


def work_dir(ctx: Context, dest: Path, phases: list[dict], start: Path | None, prev: dict | None) -> Path:
    """Where one `make base` call trains: named by what it trains (model, data, setup, phases, the weights it starts
    from), so that a call cut off (kill, Ctrl-C, a lost session) and made again resumes there: finished phases are
    kept, the interrupted one goes on from its last epoch. Removed once the base is shipped."""
    b = ctx.recipe.base
    key = sha256_json({"dest": str(dest.resolve()), "phases": phases, "arch": str(ctx.recipe.model.arch),
                       "imgsz": ctx.recipe.model.imgsz, "batch": b.batch, "seed": b.seed,
                       "data": ctx.recipe.data.model_dump(), "start": sha256_file(start) if start else None,
                       "shipped": prev["sha256"] if prev is not None else None})
    return ctx.run_dir / f"base-{key[:12]}"


def trained_on(device: str) -> str:
    """The processor a run trained on, for the record: numerics (and so the exact mAP path) differ between a CPU
    and a GPU, and between thread counts."""
    import torch

    from pipeline.adapters.offline import cpu_threads

    d = str(device).strip().lower()
    if d != "cpu" and torch.cuda.is_available():
        first = d.split(",")[0].removeprefix("cuda:")
        idx = int(first) if first.isdigit() else 0
        return f"cuda:{idx} {torch.cuda.get_device_name(idx)} (torch {torch.__version__})"
    return f"cpu, {cpu_threads()} threads (torch {torch.__version__})"


def check_settings(ctx: Context, last_phase: dict) -> dict:
    """The convergence check's trainer settings (base.check_settings)."""
    b, f = ctx.recipe.base, ctx.recipe.finetune
    if b.check_settings == "last_phase":
        return {"batch": b.batch, "nbs": last_phase["nbs"], "optimizer": "auto",
                "close_mosaic": last_phase.get("close_mosaic"), "warmup_epochs": last_phase.get("warmup_epochs"),
                "warmup_bias_lr": None, "lr0": None}
    return {"batch": f.batch, "nbs": f.nbs, "optimizer": f.optimizer, "close_mosaic": f.close_mosaic,
            "warmup_epochs": f.warmup_epochs, "warmup_bias_lr": f.warmup_bias_lr, "lr0": f.lr0}


def _train_phases(ctx: Context, phases: list[dict], spec, work: Path, data_yaml: Path, history: list[dict],
                  skip: set[int]):
    """Train the phases not in `skip` in order, each from the one before's last weights (history extended in place).
    Returns (the last weights, the phases trained)."""
    from pipeline.adapters import ultralytics_yolo as ua

    b = ctx.recipe.base
    trained = []
    for i, ph in enumerate(phases, 1):
        if i in skip:
            continue
        trained.append(i)
        before = ua.prior_run(work / f"phase{i}")
        state = {"finished": "finished earlier: kept", "resumable": "resuming"}.get(before, "training")
        console.print(f"phase {i}/{len(phases)}: {state} {spec} for {ph['epochs']} epochs (nbs {ph['nbs']}) at "
                      f"{ctx.recipe.model.imgsz}px on {data_yaml}")
        ua.train(spec, data_yaml, work / f"phase{i}", epochs=ph["epochs"], imgsz=ctx.recipe.model.imgsz,
                 batch=b.batch, seed=b.seed, workers=b.workers, device=b.device, patience=0,
                 **{k: v for k, v in ph.items() if k != "epochs"})
        history += _history(work / f"phase{i}", i, len(history))
        spec = work / f"phase{i}" / "weights" / "last.pt"
    return spec, trained


def _convergence_check(ctx: Context, phases: list[dict], spec, work: Path, data_yaml: Path, history: list[dict],
                       dest: Path) -> dict | None:
    """base.check_epochs more epochs from the final weights (not shipped): did they still raise val mAP?"""
    from pipeline.adapters import ultralytics_yolo as ua

    b = ctx.recipe.base
    if not b.check_epochs:
        return None
    # By default the check trains the shipped weights exactly as the pruned model is fine-tuned (the finetune
    # section: nominal batch, warm-up, mosaic, optimizer): if that does not raise the base's mAP, what fine-tuning
    # wins back for the pruned model is not something the base merely lacked. `last_phase` trains one more schedule
    # like the base's own last one instead (a stronger test when that one raised it most).
    settings = check_settings(ctx, phases[-1])
    console.print(f"convergence check: {b.check_epochs} more epochs from the final weights with the "
                  f"{'fine-tune' if b.check_settings == 'finetune' else 'last phase'}'s settings (not shipped"
                  f"{'' if b.check_settings == 'finetune' else '; kept as ' + str(check_file(dest))})")
    check_dir = work / f"check-{sha256_json([b.check_epochs, settings])[:8]}"
    ua.train(spec, data_yaml, check_dir, epochs=b.check_epochs, imgsz=ctx.recipe.model.imgsz, seed=b.seed,
             workers=b.workers, device=b.device, patience=0, **{k: v for k, v in settings.items() if v is not None})
    ch = _history(check_dir, 0, len(history))
    check = {"epochs": b.check_epochs, "settings": settings, "settings_from": b.check_settings,
             "trained_on": trained_on(b.device), "history": ch,
             **convergence(history, ch, b.converged_gain, b.converged_window)}
    if b.check_settings == "last_phase":
        # One more schedule like the last phase: keep it, so that appending that schedule to base.phases (when it
        # still raised the base) makes it the next phase without training it again.
        check["as_phase"] = {"epochs": b.check_epochs, **{k: v for k, v in phases[-1].items() if k != "epochs"}}
        with atomic_path(check_file(dest)) as tmp:
            shutil.copyfile(check_dir / "weights" / "last.pt", tmp)
        check["weights"] = {"file": check_file(dest).name, "sha256": sha256_file(check_file(dest))}
    console.print(f"  mean of the last {check['window']} epochs: shipped run {check['shipped_tail_map50_95']:.4f}, "
                  f"{b.check_epochs} more epochs {check['check_tail_map50_95']:.4f} (gain {check['gain']:+.4f}): "
                  f"{'converged' if check['converged'] else 'NOT converged'}")
    return check


def train_base(ctx: Context, dest: Path, epochs: int | None = None, start: Path | None = None) -> Path:
    """Train (all phases, or one phase of `epochs` from `start` weights) and ship to `dest`. When the record beside
    `dest` already holds the recipe's first phases (same model, data and setup, the file unchanged), only the phases
    after them are trained, from `dest`'s weights; with none left, only the convergence check runs again."""
    from pipeline.adapters import ultralytics_yolo as ua

    b = ctx.recipe.base
    ua.check_model_spec(start or ctx.recipe.model.arch)  # before anything is made: one line naming a bad file
    phases = [{"epochs": epochs, "nbs": b.nbs}] if epochs else recipe_phases(b)
    data_yaml = ctx.output("data", "yolo") / "data.yaml"
    spec: str | Path = start or ctx.recipe.model.arch
    history: list[dict] = []
    prev = None if (epochs or start) else _shipped_prefix(ctx, dest, phases)
    work = work_dir(ctx, dest, phases, start, prev)
    if work.is_dir() and any(work.glob("*/weights/last.pt")):  # phases or a check an earlier call left
        console.print(f"resuming the interrupted training in {work} (its finished phases are kept)")
    work.mkdir(parents=True, exist_ok=True)
    if prev is not None:
        spec = work / "shipped.pt"  # `dest` is replaced at the end: train from a copy
        shutil.copyfile(dest, spec)
        history = list(prev["history"])
        console.print(f"{dest} holds phases 1-{len(prev['phases'])} of {len(phases)} ({prev['epochs']} epochs, its "
                      f"record matches): training {'only the rest' if len(prev['phases']) < len(phases) else 'none'}")
    from_check = None
    if prev is not None and len(phases) > len(prev["phases"]) and check_as_phase(prev, phases[len(prev["phases"])],
                                                                                 dest):
        from_check = len(prev["phases"]) + 1  # the record's check trained this phase already: take its weights
        shutil.copyfile(check_file(dest), work / "check-as-phase.pt")
        spec = work / "check-as-phase.pt"
        history += [{**r, "phase": from_check} for r in prev["convergence_check"]["history"]]
        console.print(f"phase {from_check}/{len(phases)} is the schedule of the record's convergence check: "
                      f"its weights ({check_file(dest)}) are taken, not trained again")
    skip = set(range(1, len(prev["phases"]) + 1)) if prev is not None else set()
    spec, trained = _train_phases(ctx, phases, spec, work, data_yaml, history, skip | {from_check})
    check = _convergence_check(ctx, phases, spec, work, data_yaml, history, dest)
    with atomic_path(dest) as tmp:
        shutil.copyfile(spec, tmp)
    meta = {"arch": str(ctx.recipe.model.arch), "imgsz": ctx.recipe.model.imgsz, "phases": phases,
            "epochs": sum(p["epochs"] for p in phases), "batch": b.batch, "seed": b.seed,
            "start": str(start) if start else None,
            "data": ctx.recipe.data.model_dump(), "sha256": sha256_file(dest), "history": history,
            # where this call's phases trained (earlier ones: extended_from; a phase taken from a check: its check's)
            "trained_on": {"phases": trained, "device": trained_on(b.device)} if trained else None,
            "shipped": "final epoch of the last phase (last.pt, EMA weights)", "convergence_check": check,
            "converged": None if check is None else check["converged"], "env": lib_versions()}
    if (check is None or "weights" not in check) and check_file(dest).is_file():
        check_file(dest).unlink()  # a kept check of weights no longer shipped
    if from_check is not None:
        meta["phase_from_check"] = {"phase": from_check, "file": check_file(dest).name,
                                    "sha256": prev["convergence_check"]["weights"]["sha256"]}
    if prev is not None:
        # What the record said before: its checks (of the weights then shipped), notes, environment; not its history.
        meta["extended_from"] = {k: v for k, v in prev.items() if k != "history"}
    with atomic_path(dest.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps(meta, indent=1))
    shutil.rmtree(work, ignore_errors=True)
    return dest
