"""`yolo-edge compare`: variants of different runs side by side, as one run's bench puts its own variants.

Each entry names a run and one of its variants (`runs/bccd:base-fp32`, optionally `=label`). Every entry must have
been scored on the same evaluation set (the report's dataset digest): the mAP intervals are paired over those
images (pipeline/eval/bootstrap.py) from the predictions each run stored, and every ONNX file is timed again here,
all in one interleaved session (pipeline/eval/interleaved.py), so the speed ratios are measured side by side on one
machine, never taken from runs made at other times. The first entry is the reference of every Δ and ratio."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.errors import UserError
from pipeline.core.store import atomic_path, sha256_file


@dataclass
class Entry:
    label: str
    run: Path
    variant: str
    row: dict
    report: dict

    def file(self, rel: str) -> Path:
        p = self.run / rel
        if not p.is_file():
            raise UserError(f"{self.variant}: {rel} is missing from the run", self.run)
        return p


def parse_entry(spec: str) -> Entry:
    """RUN_DIR:VARIANT[=LABEL] -> the variant's row of RUN_DIR/report.json."""
    body, _, label = spec.partition("=")
    run, sep, variant = body.rpartition(":")
    if not sep or not run or not variant:
        raise UserError(f"{spec!r}: expected RUN_DIR:VARIANT (e.g. runs/bccd:pruned-fp32), optionally =LABEL")
    f = Path(run) / "report.json"
    if not f.is_file():
        raise UserError("no report.json (run the pipeline first)", f.parent)
    rep = json.loads(f.read_text())
    rows = {r["name"]: r for r in rep.get("variants", [])}
    if variant not in rows:
        raise UserError(f"no variant {variant!r} in the report (it has {', '.join(rows)})", f)
    return Entry(label or f"{Path(run).name}:{variant}", Path(run), variant, rows[variant], rep)


def _check_same_eval(entries: list[Entry]) -> None:
    ref = entries[0]
    for e in entries[1:]:
        if e.report["dataset"]["digest"] != ref.report["dataset"]["digest"]:
            raise UserError(f"{e.label} was scored on another evaluation set than {ref.label} (dataset digest "
                            f"{e.report['dataset']['digest'][:12]} vs {ref.report['dataset']['digest'][:12]}): "
                            f"their mAP cannot be paired", e.run)
    if len({e.label for e in entries}) != len(entries):
        raise UserError("two entries have the same label: give one a =LABEL")


def accuracy(entries: list[Entry], resamples: int, seed: int) -> dict:
    """mAP of each entry with its 95% interval and each Δ against the first, paired over the same images."""
    from pipeline.eval.bootstrap import Matched, intervals

    gt = json.loads(entries[0].file(entries[0].row["ground_truth"]).read_text())
    matched = {e.label: Matched.from_coco(gt, json.loads(e.file(e.row["predictions"]).read_text()))
               for e in entries}
    ref = entries[0].label
    return intervals(matched, [(e.label, ref) for e in entries[1:]], resamples=resamples, seed=seed)


def timing(entries: list[Entry], threads: int, schedule: dict):
    """Every entry's ONNX file timed engine-only in one interleaved session on the first run's eval images, each at
    its own input size; ratios: the first entry's time over each other's (speed-up)."""
    from pipeline.backends.factory import get_runner
    from pipeline.data.evalset import EvalSet
    from pipeline.eval.detect import PrePost
    from pipeline.eval.interleaved import Schedule, time_interleaved
    from pipeline.eval.measure import TimingInputs, timed_calls

    es = EvalSet.load(entries[0].run / "data" / "eval", verify=False)
    calls, keep = {}, []
    for e in entries:
        spec = PrePost(**e.report["prepost"])
        model = e.file(e.row["model"]["path"])
        if sha256_file(model) != e.row["model"]["sha256"]:
            raise UserError(f"{e.label}: the model file changed since the run (sha256 differs)", model)
        runner = get_runner("onnxruntime", model, threads=threads)
        keep.append(runner)
        calls[e.label] = timed_calls(runner, TimingInputs.load([i.path for i in es.images], spec), spec)["engine"]
    ref = entries[0].label
    return time_interleaved(calls, [(ref, e.label) for e in entries[1:]], Schedule.of(schedule),
                            label="compare: timing")


def compare(specs: list[str], out: Path, threads: int = 2, schedule: dict | None = None, resamples: int = 1000,
            seed: int = 0) -> dict:
    entries = [parse_entry(s) for s in specs]
    if len(entries) < 2:
        raise UserError("compare needs at least two RUN_DIR:VARIANT entries")
    _check_same_eval(entries)
    acc = accuracy(entries, resamples, seed)
    t = timing(entries, threads, schedule or {})
    ref = entries[0]
    rows = []
    for e in entries:
        a = acc["variants"][e.label]
        d = acc["deltas"].get(f"{e.label} - {ref.label}")
        r = t.ratio(ref.label, e.label)
        rows.append({"label": e.label, "run": str(e.run), "variant": e.variant, "imgsz": e.report["prepost"]["imgsz"],
                     "params": e.row["params"], "macs": e.row["macs"], "macs_vs_ref": e.row["macs"] / ref.row["macs"],
                     "map50_95": a["map50_95"], "map50_95_ci": a["map50_95_ci"], "map50": a["map50"],
                     "delta_pt": None if d is None else 100 * d["map50_95"],
                     "delta_pt_ci": None if d is None else [100 * x for x in d["map50_95_ci"]],
                     "engine_ms": t.items[e.label], "speedup": r["estimate"], "speedup_ci": r["ci"]})
    res = {"schema": "yolo-edge/compare/1", "reference": ref.label, "rows": rows,
           "dataset": {k: ref.report["dataset"][k] for k in ("split", "images", "digest")},
           "accuracy": {k: v for k, v in acc.items() if k not in ("variants", "deltas")},
           "timing": {**t.summary, "runner": f"onnxruntime, {threads} threads"}}
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "compare.json") as tmp:
        tmp.write_text(json.dumps(res, indent=1))
    with atomic_path(out / "compare.md") as tmp:
        tmp.write_text(render(res))
    return res


def render(res: dict) -> str:
    ds = res["dataset"]
    lines = [f"Compared on {ds['images']} {ds['split']} images (digest {ds['digest'][:12]}); mAP50-95 with paired "
             f"image-bootstrap 95% intervals; engine latency timed interleaved ({res['timing']['runner']}, "
             f"{res['timing']['stop']}). Reference: {res['reference']}.", "",
             "| model | input | params | MACs (×ref) | mAP50-95 [95% CI] | Δ vs ref, pt [95% CI] | engine p50 ms "
             "| speed-up [95% CI] |", "|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        ci = r["map50_95_ci"]
        dl = "–" if r["delta_pt"] is None else (f"{r['delta_pt']:+.2f} [{r['delta_pt_ci'][0]:+.2f}, "
                                                f"{r['delta_pt_ci'][1]:+.2f}]")
        sp = (f"{r['speedup']:.2f}× [{r['speedup_ci'][0]:.2f}, {r['speedup_ci'][1]:.2f}]"
              if r["label"] != res["reference"] else "1.00×")
        lines.append(f"| {r['label']} | {r['imgsz']} | {r['params'] / 1e6:.2f} M | {r['macs'] / 1e9:.2f} G "
                     f"({r['macs_vs_ref']:.2f}×) | {r['map50_95']:.4f} [{ci[0]:.3f}, {ci[1]:.3f}] | {dl} | "
                     f"{r['engine_ms']['p50']:.2f} | {sp} |")
    return "\n".join(lines) + "\n"
