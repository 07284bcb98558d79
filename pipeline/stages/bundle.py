"""`bundle` stage: what travels to the Jetson, verified. Reads the bench report (the variants, their dev-box mAP,
MACs and files) and the data stage's eval set; writes

    runs/<run>/bundle/yolo-edge-bundle/          manifest.json, models/<variant>.onnx, eval/, wheels/<project>.whl
    runs/<run>/bundle/yolo-edge-bundle.tar.gz    the same directory, one file

The ONNX files are the ones bench scored (FP32, the engine stage's strongly typed FP16 / INT8+FP16 files, the
quantize stage's INT8 Q/DQ), each checked against the sha256 the report holds and against the ONNX operator table
and rules of the TensorRT the recipe targets (`engine.tensorrt`, JetPack 6's 10.3 by default): a file that TensorRT
would not parse is refused. Peers (another tool's files, such as ultralytics' INT8 export, scored beside this
project's on the dev box) are not carried; the manifest names them and why. The eval set is the bench split's
images with their ground truth, so the device scores the same images with the same evaluator. The wheel is built
from this source tree (`pip wheel --no-deps --no-build-isolation`, from a clean copy) so the device installs exactly
this version. Anything that is a pickle (by name, header or zip member) is refused before the manifest is written.
The end-to-end (`*-e2e`) variants are not bundled: their graphs are built per frame size from the FP32/INT8 files.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from pipeline.core.errors import UserError
from pipeline.core.stage import Context, StageResult, run_stage
from pipeline.core.store import StageRecord, sha256_file, sha256_json, sha256_tree
from pipeline.device import manifest as mf
from pipeline.stages.order import RECORDS

VERSION = 1
NAME = "yolo-edge-bundle"


def source_root() -> Path:
    import pipeline

    root = Path(pipeline.__file__).resolve().parents[1]
    if not (root / "pyproject.toml").is_file():
        raise UserError("the bundle needs the project's source tree (pyproject.toml beside pipeline/) to build the "
                        "wheel the device installs", root)
    return root


def source_digest(root: Path) -> str:
    files = sorted(p for p in (root / "pipeline").rglob("*.py") if "__pycache__" not in p.parts)
    files.append(root / "pyproject.toml")
    return sha256_json([(str(f.relative_to(root)), sha256_file(f)) for f in files])


def git_commit(root: Path) -> dict:
    def git(*a):
        try:
            r = subprocess.run(["git", "-C", str(root), *a], capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return r.stdout.strip() if r.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "pipeline", "pyproject.toml")
    return {"git_commit": commit, "git_dirty": bool(dirty) if commit else None}


def build_wheel(root: Path, dest: Path) -> Path:
    """The project's wheel, built offline from a clean copy of the source (no stale build/ directory in it)."""
    with tempfile.TemporaryDirectory(prefix="yolo-edge-wheel-") as td:
        src = Path(td) / "src"
        src.mkdir()
        shutil.copytree(root / "pipeline", src / "pipeline", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        for f in ("pyproject.toml", "README.md", "LICENSE"):
            if (root / f).is_file():
                shutil.copy2(root / f, src / f)
        r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "--no-index", "-w", str(dest), str(src)], capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            last = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise UserError(f"building the project's wheel failed: {last}", root / "pyproject.toml")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise UserError(f"expected one wheel, pip wrote {len(wheels)}", dest)
    return wheels[0]


def _model_rows(variants: list[dict], inputs: dict, tree: Path, tensorrt: str) -> list[dict]:
    """Every variant's ONNX file copied under models/ (the file bench scored, by sha256; never a pickle; one that
    TensorRT `tensorrt` would parse) and its manifest row: what it is, how the device builds it, what the dev box
    measured."""
    from pipeline.quant import trt_ops

    mx = trt_ops.matrix(tensorrt)
    rows = []
    for v in variants:
        src = inputs[f"{v['name']}.model"]
        why = mf.pickle_reason(src)
        if why:
            raise UserError(f"variant {v['name']}: {why}", src)
        if sha256_file(src) != v["model"]["sha256"]:
            raise UserError(f"variant {v['name']}: the file differs from the one bench scored (sha256): re-run "
                            f"bench", src)
        bad = trt_ops.check_file(src, mx.version)
        if bad:
            raise UserError(f"variant {v['name']}: {mx.label} would refuse it ({len(bad)} violation(s)), first: "
                            f"{bad[0]}; the bundle carries only files the device can build", src)
        rel = f"models/{v['name']}{src.suffix}"
        shutil.copyfile(src, tree / rel)
        rows.append({"name": v["name"], "precision": v["precision"], "role": v.get("role"),
                     "made_from": v.get("made_from", ""), "file": rel, "sha256": v["model"]["sha256"],
                     "size": v["model"]["size_bytes"], "params": v.get("params"), "macs": v.get("macs"),
                     "note": v.get("note", ""), "build": {"precision": v["precision"]},
                     "dev_box": {"map50_95": v["map50_95"], "map50": v["map50"], "runner": v["runner"],
                                 "engine_p50_ms": v["latency_ms"]["engine"]["p50"],
                                 "e2e_p50_ms": v["latency_ms"]["end_to_end"]["p50"]}})
    return rows


def _copy_eval_set(ctx: Context, src: Path, dest: Path):
    """The eval set bench scored, self-contained under dest (images/, eval_set.json with base "."), checked to be
    the same eval set by digest. Returns (the source EvalSet, the number of images)."""
    from pipeline.data.evalset import SCHEMA as EVAL_SCHEMA
    from pipeline.data.evalset import EvalSet

    es = EvalSet.load(src)
    if ctx.record("bench").inputs["eval"]["digest"] != sha256_tree(src):
        raise UserError("the eval set differs from the one bench scored (digest): re-run bench", src)
    meta = json.loads((src / "eval_set.json").read_text())
    used, recs = set(), []
    for n, (im, rec) in enumerate(zip(es.images, meta["images"])):
        name = Path(im.file_name).name
        if name in used:
            name = f"{n:06d}_{name}"
        used.add(name)
        shutil.copyfile(im.path, dest / "images" / name)
        recs.append({**rec, "file": f"images/{name}"})
    shutil.copyfile(src / "ground_truth.json", dest / "ground_truth.json")
    (dest / "eval_set.json").write_text(json.dumps({**meta, "schema": EVAL_SCHEMA, "base": ".", "images": recs},
                                                   indent=1))
    if EvalSet.load(dest).digest != es.digest:  # the copy is the same eval set
        raise UserError("the bundled eval set's digest differs from the source's", dest)
    return es, len(recs)


def _manifest(ctx: Context, report: dict, rows: list[dict], es, n_images: int, wheel: Path, tree: Path,
              root: Path, source: str, peers: list[str], mx) -> dict:
    from pipeline import __version__

    cfg = ctx.recipe.bench
    return {
        "schema": mf.SCHEMA, "format": mf.FORMAT, "created": time.time(), "run": report["run"],
        "project": {"name": "yolo-edge", "version": __version__, **git_commit(root), "source_digest": source},
        "recipe": {"name": ctx.recipe.name, "digest": sha256_json(ctx.recipe.model_dump())},
        "variants": rows,
        "tensorrt": {"target": mx.version, "checked": f"every variant's file against {mx.label}'s ONNX operator table "
                                                      f"({mx.provenance}) and its explicit-quantization and "
                                                      f"strong-typing rules"},
        "not_carried": [{"name": p, "why": "a peer (another tool's file), scored beside this project's variants on "
                                           "the dev box only"} for p in peers],
        "classes": es.names, "category_ids": es.category_ids,
        "input": {"shape": [1, 3, ctx.recipe.model.imgsz, ctx.recipe.model.imgsz], "dtype": "float32",
                  "layout": "NCHW", "color": "RGB", "scale": "1/255", "letterbox_pad": report["prepost"]["pad_value"]},
        "prepost": report["prepost"],
        "prepost_spec": "ultralytics LetterBox (centered, bilinear, pad 114) -> RGB /255 NCHW float32; output "
                        + ("(1, 4+nc, N) xywh + class scores; multi-label class-aware NMS (conf, iou, max_det, "
                           "max_nms, max_wh)" if report["prepost"].get("post", "nms") == "nms" else
                           "(1, 4+nc, N) x1y1x2y2 + class scores; top-K selection, no NMS (max_det anchors by best "
                           "class score, then the max_det best anchor-class pairs over conf)")
                        + " -> boxes scaled back to the frame (pipeline.eval.detect)",
        "bench": {**cfg.model_dump(), "runner": cfg.runner},
        "dataset": {"split": es.split, "images": n_images, "digest": es.digest, "names": es.names},
        "eval": {"dir": "eval", "images": n_images, "digest": es.digest},
        "wheel": wheel.relative_to(tree).as_posix(),
        "lineage": {s: {"key": r.key, "stage_version": r.stage_version, "finished": r.finished}
                    for s in RECORDS if s != "bundle" and (r := ctx.record(s)) is not None},
        "files": mf.file_table(tree),
    }


def run(ctx: Context) -> StageRecord:
    report_path = ctx.output("bench", "report")
    report = json.loads(report_path.read_text())
    from pipeline.quant import trt_ops
    from pipeline.stages.variants import present

    roles = {v.name: v.role for v in present(ctx)}  # the run's variant table: peers are scored, never bundled
    variants = [v for v in report["variants"] if v.get("model", {}).get("path")]
    peers = [v["name"] for v in variants if roles.get(v["name"]) == "peer"]
    variants = [v for v in variants if roles.get(v["name"]) not in ("peer", None)]
    if not variants:
        raise UserError("the bench report lists no variant with a model file", report_path)
    inputs: dict[str, Path] = {"report": report_path, "eval": ctx.output("data", "eval")}
    for v in variants:
        p = ctx.run_dir / v["model"]["path"]
        if not p.is_file():
            raise UserError(f"variant {v['name']}'s model file is missing (re-run bench)", p)
        why = mf.pickle_reason(p)  # refused before anything is written
        if why:
            raise UserError(f"variant {v['name']}: {why}", p)
        inputs[f"{v['name']}.model"] = p
    root = source_root()
    mx = trt_ops.matrix(ctx.recipe.engine.tensorrt)
    config = {"format": mf.FORMAT, "source": source_digest(root), "variants": [v["name"] for v in variants],
              "tensorrt": {"version": mx.version, "table": mx.digest}, **git_commit(root)}

    def fn(ctx: Context, out: Path, inputs) -> StageResult:
        tree = out / NAME
        (tree / "models").mkdir(parents=True)
        (tree / "eval" / "images").mkdir(parents=True)
        (tree / "wheels").mkdir()
        rows = _model_rows(variants, inputs, tree, mx.version)
        es, n_images = _copy_eval_set(ctx, inputs["eval"], tree / "eval")
        wheel = build_wheel(root, tree / "wheels")
        mf.refuse_pickles(tree)
        manifest = _manifest(ctx, report, rows, es, n_images, wheel, tree, root, config["source"], peers, mx)
        (tree / mf.MANIFEST).write_text(json.dumps(manifest, indent=1))
        mf.verify(tree)  # what the device will check, checked here first
        with tarfile.open(out / f"{NAME}.tar.gz", "w:gz") as t:
            t.add(tree, arcname=NAME)
        files = manifest["files"]
        return StageResult(outputs={"bundle": NAME, "archive": f"{NAME}.tar.gz"},
                           metrics={"files": len(files) + 1, "bytes": sum(f["size"] for f in files.values()),
                                    "digest": mf.digest(tree), "variants": [r["name"] for r in rows],
                                    "archive_bytes": os.path.getsize(out / f"{NAME}.tar.gz")},
                           summary=f"{len(rows)} variants, {os.path.getsize(out / f'{NAME}.tar.gz') / 1e6:.1f} MB "
                                   f"archive ({mx.label} parses every file)")

    return run_stage(ctx, "bundle", VERSION, config, inputs, fn)
