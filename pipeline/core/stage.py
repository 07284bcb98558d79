"""Running a stage: content-addressed skip, atomic outputs, the record as commit point.

A stage is a function `fn(ctx, out: Path, inputs: dict[str, Path]) -> StageResult` that writes its files into
`out` (a fresh temp directory). Its key is the digest of (stage name, stage version, config, input digests):
paths never enter it. When the key equals the key of the record already in `runs/<run>/<stage>/` and the
recorded outputs still have their digests, the stage is skipped. Otherwise the new directory, record
included, replaces the old one in a single rename; a crash or Ctrl-C before that leaves the old one intact.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from rich.console import Console

from pipeline.core.config import Recipe
from pipeline.core.store import Artifact, StageRecord, atomic_dir, sha256_json, sha256_tree

console = Console(stderr=True, highlight=False)
LIBS = ("torch", "torchvision", "ultralytics", "torch-pruning", "onnx", "onnxruntime", "onnxslim", "pycocotools",
        "numpy", "opencv-python-headless", "yolo-edge")


def lib_versions() -> dict:
    out = {}
    for name in LIBS:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return {"python": platform.python_version(), "platform": platform.platform(), **out}


@dataclass
class StageResult:
    outputs: dict[str, str]  # name -> file name inside the stage directory
    metrics: dict = field(default_factory=dict)
    requested: dict = field(default_factory=dict)
    effective: dict = field(default_factory=dict)


@dataclass
class Context:
    run_dir: Path
    recipe: Recipe
    recipe_path: Path
    force: bool = False

    def stage_dir(self, stage: str) -> Path:
        return self.run_dir / stage

    def record(self, stage: str) -> StageRecord | None:
        p = self.stage_dir(stage) / "record.json"
        if not p.is_file():
            return None
        try:
            return StageRecord.from_json(json.loads(p.read_text()))
        except (json.JSONDecodeError, TypeError):
            return None

    def output(self, stage: str, name: str) -> Path:
        rec = self.record(stage)
        if rec is None or name not in rec.outputs:
            from pipeline.core.errors import UserError

            raise UserError(f"stage '{stage}' has not produced '{name}' yet: run `yolo-edge run --stages {stage}` "
                            f"(or `make {stage}`) first", self.run_dir)
        return self._resolve(stage, rec.outputs[name])

    def _resolve(self, stage: str, art: dict) -> Path:
        """An output's path in this run directory (records keep it relative to the stage, so a run directory that
        is moved or copied keeps its cache and never reads another directory's files)."""
        return self.stage_dir(stage) / art["rel"] if "rel" in art else Path(art["path"])


def _outputs_intact(ctx: Context, stage: str, rec: StageRecord) -> bool:
    for a in rec.outputs.values():
        p = ctx._resolve(stage, a)
        if not p.exists() or sha256_tree(p) != a["digest"]:
            return False
    return True


def run_stage(ctx: Context, stage: str, version: int, config: dict, inputs: dict[str, Path],
              fn: Callable[[Context, Path, dict[str, Path]], StageResult]) -> StageRecord:
    in_arts = {k: Artifact.of(k, p) for k, p in inputs.items()}
    key = sha256_json({"stage": stage, "version": version, "config": config,
                       "inputs": {k: a.digest for k, a in in_arts.items()}})
    old = ctx.record(stage)
    if old and old.key == key and not ctx.force and _outputs_intact(ctx, stage, old):
        console.print(f"[green]✓[/] {stage}: cached (inputs, config and stage version unchanged; key {key[:12]})")
        return old
    final = ctx.stage_dir(stage)
    console.print(f"[cyan]▶[/] {stage}: running")
    started = time.time()
    with atomic_dir(final) as tmp:
        res = fn(ctx, tmp, inputs)
        outs = {}
        for name, rel in res.outputs.items():
            a = Artifact.of(name, tmp / rel)
            a.path = str(final / rel)
            outs[name] = {**a.__dict__, "rel": str(rel)}
        rec = StageRecord(stage=stage, stage_version=version, key=key, config=config,
                          inputs={k: a.__dict__ for k, a in in_arts.items()}, outputs=outs, env=lib_versions(),
                          requested=res.requested, effective=res.effective, metrics=res.metrics,
                          started=started, finished=time.time())
        (tmp / "record.json").write_text(json.dumps(rec.to_json(), indent=1, default=str))
    console.print(f"[green]✓[/] {stage}: done in {rec.finished - started:.1f}s")
    return rec
