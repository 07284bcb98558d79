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
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from pipeline.core.stage import Context, console, lib_versions
from pipeline.core.store import atomic_path, sha256_json, sha256_tree

VERSION = 1


def settings(ctx: Context) -> dict:
    s = ctx.recipe.prune.sparsity
    return {"phases": [p.model_dump() for p in s.phases], "batch": s.batch, "nbs": s.nbs, "seed": s.seed,
            "close_mosaic": s.close_mosaic, "warmup_epochs": s.warmup_epochs, "imgsz": ctx.recipe.model.imgsz,
            "version": VERSION}


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


def key_of(ctx: Context, model: Path, data: Path) -> dict:
    want = {"model_digest": weights_digest(model), "data_digest": sha256_tree(data), "settings": settings(ctx)}
    return {**want, "key": sha256_json(want)}


def shipped_matches(path: Path, key: str) -> tuple[bool, str]:
    meta = path.with_suffix(".json")
    if not path.is_file() or not meta.is_file():
        return False, f"{path} (or its .json record) is absent"
    rec = json.loads(meta.read_text())
    if rec.get("key") != key:
        return False, (f"{path} was trained from other inputs or settings (its record's key "
                       f"{str(rec.get('key'))[:12]} is not this run's {key[:12]})")
    return True, ""


def train(ctx: Context, model_path: Path, data_dir: Path, dest: Path, want: dict) -> dict:
    """Train the sparsity phases from `model_path` and write the folded checkpoint (FP16, lossless) to `dest` with
    its record (dest.json). Returns the record."""
    from pipeline.adapters import ultralytics_yolo as ua
    from pipeline.adapters import yolo11_prune as yp
    from pipeline.adapters.yolo11_blocks import fold_into

    s = ctx.recipe.prune.sparsity
    work = ctx.run_dir / ".work" / f"sparsity-{want['key'][:16]}"
    work.mkdir(parents=True, exist_ok=True)
    stock = ua.load_detection_model(model_path)
    history = []
    for i, ph in enumerate(s.phases, 1):
        folded = work / f"phase{i}.pt"
        if not folded.is_file():
            console.print(f"  sparsity phase {i}/{len(s.phases)}: {ph.epochs} epochs, group regularization "
                          f"{ph.reg:g}, on the rewritten model")
            start = work / f"phase{i}-start.pt"
            ua.save_checkpoint(yp.prepare(stock), start, train_args=stock.args)
            last = ua.finetune(start, data_dir / "data.yaml", work / f"phase{i}", epochs=ph.epochs,
                               imgsz=ctx.recipe.model.imgsz, batch=s.batch, seed=s.seed, workers=s.workers,
                               device=s.device, sparsity=ph.reg, nbs=s.nbs, close_mosaic=s.close_mosaic,
                               warmup_epochs=s.warmup_epochs, patience=0)
            ua.save_checkpoint(fold_into(stock, ua.load_detection_model(last)), folded, train_args=stock.args)
        else:
            console.print(f"  sparsity phase {i}/{len(s.phases)}: done earlier ({folded})")
        stock = ua.load_detection_model(folded)
        history += [{**r, "phase": i, "reg": ph.reg} for r in ua.training_history(work / f"phase{i}")]
    # FP16, as ultralytics stores checkpoints: lossless here, every weight comes from the trainer's FP16 last.pt
    ua.save_checkpoint(stock, dest, train_args=stock.args, half=True)
    rec = {**want, "history": history, "final_val_map50_95": history[-1]["map50_95"],
           "epochs": sum(p.epochs for p in s.phases), "env": lib_versions()}
    with atomic_path(dest.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps(rec, indent=1))
    shutil.rmtree(work, ignore_errors=True)
    return rec


def sparse_weights(ctx: Context, model_path: Path, data_dir: Path) -> tuple[Path, dict]:
    """The sparsity-trained weights for this run (shipped if they match, else trained) and their record."""
    s = ctx.recipe.prune.sparsity
    want = key_of(ctx, model_path, data_dir)
    if s.shipped:
        ok, why = shipped_matches(Path(s.shipped), want["key"])
        if ok:
            rec = json.loads(Path(s.shipped).with_suffix(".json").read_text())
            console.print(f"  sparsity training: the shipped {s.shipped} matches this run's model, data and "
                          f"settings ({rec['epochs']} epochs; val mAP50-95 {rec['final_val_map50_95']:.4f}): used")
            return Path(s.shipped), {**rec, "source": "shipped", "path": s.shipped}
        console.print(f"  [yellow]sparsity training: {why}: training here "
                      f"({sum(p.epochs for p in s.phases)} epochs)[/]")
    dest = ctx.run_dir / ".work" / f"sparse-{want['key'][:16]}.pt"
    if dest.is_file() and shipped_matches(dest, want["key"])[0]:
        rec = json.loads(dest.with_suffix(".json").read_text())
    else:
        rec = train(ctx, model_path, data_dir, dest, want)
    return dest, {**rec, "source": "trained", "path": str(dest)}
