"""Sparsity training before the cut (`prune.sparsity`), part of the prune stage.

The model trains on the run's train split with the stock ultralytics trainer, in its rewritten form (the form
Torch-Pruning's dependency graph sees), while Torch-Pruning's group regularizer (GroupNormPruner.regularize,
called between backward and the optimizer step) pulls each group's weakest channels toward zero; after each phase
the model is folded back into the stock YOLO11 modules exactly. What the cut then removes carries little, so less
is lost at the cut and the fine-tune has less to win back.

It costs epochs of training, more than `make pipeline`'s budget affords on 2 cores, so the default recipe names
`shipped` weights (made by `make sparse`): they are used only when their record names the same model weights
(digest), data (digest) and sparsity settings as this run; anything else trains here, in a work directory kept
per key so an interrupted run resumes.

The last phase may instead be a fade phase (`fade: n`): the cut is planned first, with the prune stage's own search
on the weights the phase starts from, and the planned channels then fade to exactly zero over n epochs while the
rest of the network trains to do without them. The record keeps that plan (Torch-Pruning's history); the prune
stage applies it, and the cut changes no output. The search settings become part of the key. Hold phases
(`hold: true`) may follow it: the planned channels stay exactly zero while the rest trains on, each phase a
schedule of its own, as the base's phases are: more training for the pruned network before the cut.

Phases are kept per prefix: a schedule that extends another (the same first phases, model, data and settings)
starts from that schedule's result, shipped or cached, and trains only the new phases.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from pipeline.core.errors import UserError
from pipeline.core.stage import Context, console, lib_versions
from pipeline.core.store import atomic_path, sha256_file, sha256_json, sha256_tree

VERSION = 1


CUT_KEYS = ("macs_target", "ratio", "tolerance", "importance", "global_pruning", "isomorphic", "round_to",
            "max_layer_ratio", "taylor_batches", "mode", "sensitivity")


def settings(ctx: Context, n: int | None = None) -> dict:
    """The settings the first n phases (all by default) depend on."""
    s = ctx.recipe.prune.sparsity
    phases = s.phases[:n]
    out = {"phases": [p.model_dump(exclude_none=True) for p in phases], "batch": s.batch, "nbs": s.nbs,
           "seed": s.seed, "close_mosaic": s.close_mosaic, "warmup_epochs": s.warmup_epochs,
           "imgsz": ctx.recipe.model.imgsz, "version": VERSION}
    if any(p.distill for p in phases):  # only then: records made before the option existed keep their keys
        out["distill"] = s.distill.model_dump(exclude=s.distill.key_excludes())
    if any(p.fade for p in phases):  # the planned cut depends on the prune stage's search settings
        c = ctx.recipe.prune
        out["cut"] = {k: (v.model_dump() if hasattr(v, "model_dump") else v)
                      for k, v in ((k, getattr(c, k)) for k in CUT_KEYS)}
        out["cut"].update(eval_split=ctx.recipe.bench.split, threads=ctx.recipe.bench.threads)
        if c.macs_at_most:  # only when on: records made before the option existed keep their keys
            out["cut"]["macs_at_most"] = True
        if c.target is not None:  # only when set: records made before the option existed keep their keys
            out["cut"]["target"] = c.target.model_dump(exclude_none=True)
    return out


def weights_digest(path: Path) -> str:
    """Digest of a checkpoint's tensors (names, shapes, FP32 values): the same weights give the same digest
    whatever else the file pickles (paths, training arguments)."""
    import hashlib

    from pipeline.adapters import ultralytics_yolo as ua

    h = hashlib.sha256()
    for k, v in ua.load_detection_model(path).state_dict().items():
        t = v.detach().float().contiguous() if v.is_floating_point() else v.detach().contiguous()
        h.update(k.encode() + b"\0" + str(tuple(t.shape)).encode() + t.numpy().tobytes())
    return h.hexdigest()


def _keyed(model_digest: str, data_digest: str, sett: dict) -> dict:
    want = {"model_digest": model_digest, "data_digest": data_digest, "settings": sett}
    return {**want, "key": sha256_json(want)}


def key_of(ctx: Context, model: Path, data: Path, n: int | None = None) -> dict:
    return _keyed(weights_digest(model), sha256_tree(data), settings(ctx, n))


def read_record(path: Path) -> dict | None:
    meta = Path(path).with_suffix(".json")
    if not Path(path).is_file() or not meta.is_file():
        return None
    try:
        return json.loads(meta.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def shipped_matches(path: Path, key: str, want: dict | None = None) -> tuple[bool, str]:
    """Whether the weights at `path` are this run's (their record's key is `key`, and the file is the one the record
    describes, by sha256); if not, why, naming what differs from `want` (key_of's dict): the model weights, the data,
    which settings; or that the file was corrupted."""
    rec = read_record(path)
    if rec is None:
        return False, f"{path} (or its .json record) is absent"
    if rec.get("key") != key:
        return False, (f"{path} was trained from other inputs or settings ("
                       + (f"{differences(rec, want)}; " if want else "")
                       + f"its record's key {str(rec.get('key'))[:12]} is not this run's {key[:12]})")
    if rec.get("sha256") and sha256_file(path) != rec["sha256"]:
        return False, f"{path} is not the file its record describes (sha256): corrupted or replaced"
    return True, ""


def differences(rec: dict, want: dict) -> str:
    """What a sparsity record was made from that this run does not have, in words."""
    out = []
    if rec.get("model_digest") != want["model_digest"]:
        out.append("other model weights")
    if rec.get("data_digest") != want["data_digest"]:
        out.append("other data")
    have, need = rec.get("settings") or {}, want["settings"]
    keys = sorted(k for k in set(have) | set(need) if have.get(k) != need.get(k))
    if keys:
        out.append("other prune.sparsity settings: " + ", ".join(keys))
    return ", ".join(out) or "another key"


def made_prefix(ctx: Context, want: dict) -> tuple[int, Path | None, dict | None]:
    """The longest prefix of the phases already made (cached in the work directory, or the shipped weights):
    (its number of phases, its file, its record); (0, None, None) when none is."""
    s = ctx.recipe.prune.sparsity
    work = ctx.run_dir / ".work" / "sparsity"
    for i in range(len(s.phases), 0, -1):
        key = _keyed(want["model_digest"], want["data_digest"], settings(ctx, i))["key"]
        for cand in (work / f"{key[:16]}.pt", Path(s.shipped) if s.shipped else None):
            r = read_record(cand) if cand is not None else None
            if r is not None and r.get("key") == key and (not r.get("sha256") or sha256_file(cand) == r["sha256"]):
                return i, cand, r  # (a file its record does not describe, by sha256, is made again)
    return 0, None, None


def _write(model, dest: Path, rec: dict) -> None:
    from pipeline.adapters import ultralytics_yolo as ua

    # The old record goes first: a kill between the two writes leaves weights without a record (not reused), never
    # new weights under an old record's key.
    dest.with_suffix(".json").unlink(missing_ok=True)
    # FP16, as ultralytics stores checkpoints: lossless here, every weight comes from the trainer's FP16 last.pt
    ua.save_checkpoint(model, dest, train_args=getattr(model, "args", None), half=True)
    with atomic_path(dest.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps({**rec, "sha256": sha256_file(dest)}, indent=1))


def train(ctx: Context, model_path: Path, data_dir: Path, dest: Path, want: dict) -> dict:
    """Train the sparsity phases from `model_path` and write the folded checkpoint (FP16, lossless) to `dest` with
    its record (dest.json). Returns the record. The longest prefix of phases already made (a phase cached in the
    work directory, or the shipped weights) is the starting point."""
    from pipeline.adapters import pruning as yp
    from pipeline.adapters import ultralytics_yolo as ua
    from pipeline.adapters.blocks import fold_into
    from pipeline.stages.base_training import trained_on
    from pipeline.stages.load import family

    s = ctx.recipe.prune.sparsity
    fam = family(ctx)
    work = ctx.run_dir / ".work" / "sparsity"
    work.mkdir(parents=True, exist_ok=True)
    n = len(s.phases)
    prefix = [_keyed(want["model_digest"], want["data_digest"], settings(ctx, i)) for i in range(1, n + 1)]
    done, rec, stock = 0, {"history": []}, ua.load_detection_model(model_path)
    i, cand, r = made_prefix(ctx, want)  # the longest prefix already made
    if i:
        done, rec, stock = i, r, ua.load_detection_model(cand)
        console.print(f"  sparsity phases 1-{i}/{n}: made earlier ({cand}, its record matches)")
        if i < n and cand != work / f"{prefix[i - 1]['key'][:16]}.pt":
            rec = {**rec, "prefix_from": {"path": str(cand), "key": r["key"], "phases": i,
                                          **({"made_by": r["made_by"]} if "made_by" in r else {})}}
    for i in range(done + 1, n + 1):
        ph = s.phases[i - 1]
        tag = prefix[i - 1]["key"][:16]
        start = work / f"{tag}-start.pt"
        prepared = yp.prepare(stock, fam)
        fade = None
        if ph.fade:
            planned = work / f"{tag}-plan.json"  # kept: a resumed phase must fade toward the same plan (the
            if not planned.is_file():             # latency search times the model, so a new one could differ)
                from pipeline.cutting import plan_cut
                from pipeline.stages.cuts import cutter

                console.print(f"  sparsity phase {i}/{n}: planning the cut on the weights it starts from")
                cut = cutter(ctx, data_dir, ctx.recipe.prune.mode != "uniform")
                with atomic_path(planned) as tmp:
                    tmp.write_text(json.dumps(plan_cut(cut, stock, work / f"{tag}-plan")))
            rec = {**rec, "cut": json.loads(planned.read_text())}
        if ph.fade or ph.hold:  # a hold phase: the planned channels are zero already (0 fade epochs); they stay
            fade = {"targets": yp.fade_targets(prepared, rec["cut"]["history"], ctx.recipe.model.imgsz, fam),
                    "epochs": 0 if ph.hold else ph.fade}
            bns = sum(len(v) for v in fade["targets"].values())
            console.print(f"  sparsity phase {i}/{n}: {ph.epochs} epochs, "
                          + (f"the planned cut's {bns} BN channels held at zero" if ph.hold else
                             f"the planned channels ({bns} BN channels) fading to zero over {ph.fade}"
                             + (f", group regularization {ph.reg:g}" if ph.reg else ""))
                          + (", distilled from the dense model" if ph.distill else ""))
        else:
            console.print(f"  sparsity phase {i}/{n}: {ph.epochs} epochs, group regularization {ph.reg:g}, on the "
                          f"rewritten model" + (", distilled from the dense model" if ph.distill else ""))
        ua.save_checkpoint(prepared, start, train_args=stock.args)
        opts = ua.TrainOptions(ph.epochs, ctx.recipe.model.imgsz,
                               {**s.trainer_args(), "close_mosaic": s.close_mosaic,
                                "warmup_epochs": s.warmup_epochs, "patience": 0, **fam.train_args},
                               distill=ua.Distill(model_path, **s.distill.trainer_args()) if ph.distill else None,
                               sparsify=ua.Sparsify(fam, ph.reg, fade), label=f"sparsity phase {i}/{n}")
        last = ua.finetune(start, data_dir / "data.yaml", work / tag, opts)
        trained = ua.load_detection_model(last)
        if fade:  # exactly zero (the saved EMA followed the fade; FP16 keeps zeros)
            mods = dict(trained.named_modules())
            for name, idxs in fade["targets"].items():
                mods[name].weight.data[idxs] = 0
                mods[name].bias.data[idxs] = 0
        stock = fold_into(stock, trained)
        rows = [{**r, "phase": i, "reg": ph.reg, **({"fade": ph.fade} if ph.fade else {}),
                 **({"hold": True} if ph.hold else {}),
                 **({"distill": True} if ph.distill else {})}
                for r in ua.training_history(work / tag)]
        rec = {**rec, **prefix[i - 1], "history": rec["history"] + rows, "final_val_map50_95": rows[-1]["map50_95"],
               "epochs": sum(p.epochs for p in s.phases[:i]), "env": lib_versions(),
               "trained_on": {**rec.get("trained_on", {}), str(i): trained_on(s.device)}}  # numerics differ by device
        rec.pop("made_by", None)
        if i < n:  # a later phase (or run) starts from here, as saved
            _write(stock, work / f"{tag}.pt", rec)
            stock = ua.load_detection_model(work / f"{tag}.pt")
    _write(stock, dest, rec)
    shutil.rmtree(work, ignore_errors=True)
    return rec


def sparse_weights(ctx: Context, model_path: Path, data_dir: Path) -> tuple[Path, dict]:
    """The sparsity-trained weights for this run (shipped if they match, else trained) and their record."""
    s = ctx.recipe.prune.sparsity
    want = key_of(ctx, model_path, data_dir)
    if s.shipped:
        ok, why = shipped_matches(Path(s.shipped), want["key"], want)
        if not ok and why.endswith("corrupted or replaced"):  # never a silent retraining of hours
            raise UserError("the shipped sparsity-trained weights are not the file their record describes "
                            "(sha256): corrupted or replaced; restore them (git checkout) or retrain them "
                            "(make sparse)", s.shipped)
        if ok:
            rec = read_record(Path(s.shipped))
            console.print(f"  sparsity training: the shipped {s.shipped} matches this run's model, data and "
                          f"settings ({rec['epochs']} epochs; val mAP50-95 {rec['final_val_map50_95']:.4f}): used")
            return Path(s.shipped), {**rec, "source": "shipped", "path": s.shipped}
    dest = ctx.run_dir / ".work" / f"sparse-{want['key'][:16]}.pt"
    if shipped_matches(dest, want["key"])[0]:
        if s.shipped:
            console.print(f"  [yellow]sparsity training: {why}: using the weights this run trained earlier "
                          f"({dest})[/]")
        rec = read_record(dest)
    else:
        console.print(("  [yellow]sparsity training: " + why if s.shipped else
                       "  [yellow]sparsity training: no shipped weights (prune.sparsity.shipped)")
                      + f": training here, {to_train(ctx, want, model_path, data_dir)}[/]")
        rec = train(ctx, model_path, data_dir, dest, want)
    return dest, {**rec, "source": "trained", "path": str(dest)}


def to_train(ctx: Context, want: dict, model_path: Path, data_dir: Path) -> str:
    """What training here will cost, in words: the phases left after the longest prefix already made, their
    epochs and the estimated time (one timed batch of this model on this data and device, scaled)."""
    from pipeline import estimate
    from pipeline.stages.data import meta

    s = ctx.recipe.prune.sparsity
    n = len(s.phases)
    done, cand, _ = made_prefix(ctx, want)
    epochs = sum(p.epochs for p in s.phases[done:])
    what = (f"phases {done + 1}-{n} of {n} ({epochs} epochs; 1-{done} from {cand})" if done else
            f"from the start: {n} phase(s), {epochs} epochs")
    try:
        splits = meta(ctx)["splits"]
    except (UserError, KeyError, OSError, ValueError):
        return f"{what}, time not estimated (the data stage's record has no split sizes)"
    return f"{what}, " + estimate.sparsity_eta(s, ctx.recipe.model.imgsz, model_path, Path(data_dir) / "data.yaml",
                                               epochs, splits.get("train", 0), splits.get(ctx.recipe.bench.split, 0))
