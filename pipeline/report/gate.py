"""Baselines and the gate. A baseline (benchmarks/baselines/<recipe>.yaml) holds, per device and variant, the
reference value of each gated metric and a two-sided tolerance; `compare` checks a run's report.json against it
the way NNCF's conformance suite checks its reference metrics: outside the band on the bad side is a regression,
outside it on the good side is an *unexplained gain* (it usually means the measurement broke) and fails too, and a
device or variant the baseline has and the run lacks fails. Latency is gated only as ratios within one run (the
pruned model's engine speed-up over base, end-to-end over engine-only), never as milliseconds: on the dev box the
absolute latency moves ±40% from run to run, the ratios far less."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from pipeline.report.rows import BETTER_HIGHER, all_rows, devices, row_metrics

BASELINES = Path("benchmarks/baselines")
MATRIX = Path("benchmarks/matrix.yaml")
GATED = ("map50_95", "map50", "engine_p50_speedup", "e2e_over_engine", "params", "macs")

# The tolerance rules: (rule id, kind 'tol' (absolute) or 'rtol' (relative to the reference), value, where it comes
# from). `baseline update` writes each metric's rule into the file beside its tolerance; a tolerance edited by hand
# in the file is kept by later updates.
RULES = {
    "map-fp32": ("tol", 0.001, "mAP is deterministic here (same code, data and seed: every mAP reproduced to 4 "
                               "decimals from a fresh clone, README Results); 0.001 = 0.1 pt leaves room for float "
                               "summation order between CPUs and stays below the smallest effect the project reports "
                               "(pruned vs base, -0.15 pt)"),
    "map-lowp": ("tol", 0.002, "INT8/FP16 mAP: deterministic on one box like FP32; ONNX Runtime's INT8 kernels round "
                               "differently per ISA (VNNI vs AVX2), so twice the FP32 tolerance"),
    "speedup-fp32": ("rtol", 0.15, "pruned/base engine p50 speed-up of FP32 within one run: 1.60-1.79 over 14 runs "
                                   "of this box's history (benchmarks/history, 2026-11-25..27 and README), at most "
                                   "6% from its median; 15% is 2.5x that"),
    "speedup-lowp": ("rtol", 0.40, "INT8/FP16 speed-up over base within one run on ONNX Runtime CPU: 0.49-0.95 "
                                   "typical, outliers 0.36 and 1.38 in 15 runs of the history (pruned-int8 median "
                                   "0.83, +-20% typical); 40% = the box's run-to-run latency spread (not what the "
                                   "device runs: TensorRT)"),
    "e2e-ratio": ("rtol", 0.25, "end-to-end p50 / engine-only p50 within one run: 1.09-1.70 across variants, each "
                                "variant within -10%..+16% of its median over the history's runs; 25% is 1.5x that"),
    "counted": ("rtol", 0.001, "params and MACs are counted, not measured: any change is a change of architecture; "
                               "0.1% is rounding room for references read from README's table (M, G)"),
}

SHORT = {"map-fp32": "mAP deterministic here; 0.1 pt of float-order room",
         "map-lowp": "deterministic; INT8/FP16 kernels differ per ISA: 0.2 pt",
         "speedup-fp32": "measured: <=6% run-to-run spread of this ratio, x2.5",
         "speedup-lowp": "measured: ONNX Runtime CPU INT8/FP16 ratio spread, ~40%",
         "e2e-ratio": "measured: -10%..+16% run-to-run spread of this ratio, x1.5",
         "counted": "counted, not measured; rounding room only"}


def rule_for(metric: str, precision: str) -> str:
    low = precision not in ("fp32",)
    if metric in ("map50_95", "map50"):
        return "map-lowp" if low else "map-fp32"
    if metric == "engine_p50_speedup":
        return "speedup-lowp" if low else "speedup-fp32"
    if metric == "e2e_over_engine":
        return "e2e-ratio"
    return "counted"


@dataclass
class Check:
    device: str
    variant: str
    metric: str
    ref: float | None
    value: float | None
    band: str  # the tolerance in words
    status: str  # ok | regression | gain | missing-device | missing-variant | missing-metric
    line: str

    @property
    def failed(self) -> bool:
        return self.status != "ok"


def _fmt(metric: str, x: float) -> str:
    if metric in ("params", "macs"):
        return f"{x / 1e6:.3f} M" if metric == "params" else f"{x / 1e9:.3f} G"
    if metric.startswith("map"):
        return f"{x:.4f}"
    return f"{x:.3f}×"


def _band(metric: str, spec: dict) -> tuple[float, float, str]:
    ref = float(spec["ref"])
    if "rtol" in spec:
        t = float(spec["rtol"])
        return ref * (1 - t), ref * (1 + t), f"±{100 * t:g}%"
    t = float(spec.get("tol", 0.0))
    words = f"±{100 * t:g} pt" if metric.startswith("map") else f"±{t:g}"
    return ref - t, ref + t, words


def compare(rep: dict, baseline: dict, required: dict[str, list[str]] | None = None) -> list[Check]:
    """Every check of a report against a baseline (ok ones too: the summary table shows what moved). `required`
    ({device: [variant]}) adds what the matrix says must be in the run even where the baseline lacks it."""
    have = {d["id"]: {r["name"]: r for r in all_rows(d)} for d in devices(rep)}
    checks = []
    want = {dev: dict(spec.get("variants") or {}) for dev, spec in (baseline.get("devices") or {}).items()}
    for dev, vs in (required or {}).items():
        for v in vs:
            want.setdefault(dev, {}).setdefault(v, None)
    for dev, variants in want.items():
        if dev not in have:
            checks.append(Check(dev, "*", "*", None, None, "", "missing-device",
                                f"{dev}: device missing from the run ({len(variants)} variant(s) expected on it; "
                                f"devices in the run: {', '.join(have) or 'none'})"))
            continue
        for v, metrics in variants.items():
            row = have[dev].get(v)
            if row is None:
                checks.append(Check(dev, v, "*", None, None, "", "missing-variant",
                                    f"{dev} {v}: variant missing from the run"))
                continue
            if metrics is None:
                checks.append(Check(dev, v, "*", None, None, "", "missing-metric",
                                    f"{dev} {v}: no reference in the baseline (the matrix requires it): run "
                                    f"`yolo-edge baseline update --reason ...`"))
                continue
            got = row_metrics(row)
            for m, spec in metrics.items():
                lo, hi, words = _band(m, spec)
                ref = float(spec["ref"])
                x = got.get(m)
                if x is None:
                    checks.append(Check(dev, v, m, ref, None, words, "missing-metric",
                                        f"{dev} {v} {m}: missing from the run (baseline {_fmt(m, ref)})"))
                    continue
                d = (f"{100 * (x - ref):+.2f} pt" if m.startswith("map") else f"{100 * (x / ref - 1):+.1f}%"
                     if ref else f"{x - ref:+g}")
                if lo - 1e-12 <= x <= hi + 1e-12:
                    checks.append(Check(dev, v, m, ref, x, words, "ok", f"{dev} {v} {m}: {_fmt(m, x)} vs "
                                                                       f"{_fmt(m, ref)} ({d}, within {words})"))
                    continue
                worse = (x < lo) if BETTER_HIGHER.get(m, True) else (x > hi)
                what = ("regression" if worse else
                        "unexplained gain: update the baseline on purpose (yolo-edge baseline update --reason ...)")
                checks.append(Check(dev, v, m, ref, x, words, "regression" if worse else "gain",
                                    f"{dev} {v} {m}: {_fmt(m, x)} vs baseline {_fmt(m, ref)} ({d}, tolerance "
                                    f"{words}): {what}"))
    return checks


def summary_table(checks: list[Check]) -> str:
    """What moved, by how much, against which tolerance: one line per check."""
    lines = [f"{'device':14s} {'variant':26s} {'metric':19s} {'baseline':>10s} {'run':>10s} {'change':>10s} "
             f"{'tolerance':>10s}  verdict"]
    for c in checks:
        if c.ref is None or c.value is None:
            lines.append(f"{c.device:14s} {c.variant:26s} {c.metric:19s} {'':>10s} {'':>10s} {'':>10s} {'':>10s}  "
                         f"{c.status.upper()}")
            continue
        ch = (f"{100 * (c.value - c.ref):+.2f} pt" if c.metric.startswith("map") else
              f"{100 * (c.value / c.ref - 1):+.1f}%" if c.ref else "")
        verdict = {"ok": "ok", "regression": "REGRESSION", "gain": "UNEXPLAINED GAIN"}.get(c.status, c.status)
        lines.append(f"{c.device:14s} {c.variant:26s} {c.metric:19s} {_fmt(c.metric, c.ref):>10s} "
                     f"{_fmt(c.metric, c.value):>10s} {ch:>10s} {c.band:>10s}  {verdict}")
    return "\n".join(lines)


def load_baseline(path: Path) -> dict:
    from pipeline.core.errors import UserError

    if not Path(path).is_file():
        raise UserError(f"no baseline at {path}: make one from a run with `yolo-edge baseline update --run-dir RUN "
                        f"--reason '...'`", path)
    b = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(b, dict) or not isinstance(b.get("devices"), dict):
        raise UserError("not a baseline (no 'devices' mapping)", path)
    return b


def matrix_entry_for(run_dir: Path, matrix: Path = MATRIX) -> dict | None:
    """The nightly matrix's entry whose run_dir is this run, if any (it names the run's baseline)."""
    if not Path(matrix).is_file():
        return None
    m = yaml.safe_load(Path(matrix).read_text()) or {}
    for e in m.get("entries") or []:
        if e.get("run_dir") and Path(e["run_dir"]).resolve() == Path(run_dir).resolve():
            return e
    return None


def baseline_path_for(run_dir: Path, rep: dict) -> Path:
    e = matrix_entry_for(run_dir)
    if e and e.get("baseline"):
        return Path(e["baseline"])
    return BASELINES / f"{(rep.get('recipe') or {}).get('name', 'default')}.yaml"


def gate(run_dir: Path, baseline: Path | None = None, required: dict | None = None) -> tuple[list[Check], list[str]]:
    """(checks, notes) for a run directory against its baseline."""
    from pipeline.core.errors import UserError
    from pipeline.report.history import recipe_digest

    rp = Path(run_dir) / "report.json"
    if not rp.is_file():
        raise UserError(f"no report.json in {run_dir}: the bench stage has not run there", run_dir)
    rep = json.loads(rp.read_text())
    path = Path(baseline) if baseline else baseline_path_for(Path(run_dir), rep)
    b = load_baseline(path)
    notes = [f"baseline: {path} (source: {(b.get('source') or {}).get('run', '?')}, "
             f"{(b.get('source') or {}).get('time', '?')})"]
    dig = recipe_digest(rep)
    if b.get("recipe_digest") and dig and b["recipe_digest"] != dig:
        notes.append(f"note: the run's recipe (digest {dig[:12]}) is not the baseline's ({b['recipe_digest'][:12]}):"
                     f" a changed setting explains a moved metric only if you update the baseline on purpose")
    have = {d["id"]: [r["name"] for r in all_rows(d)] for d in devices(rep)}
    for dev, vs in have.items():
        extra = [v for v in vs if v not in ((b["devices"].get(dev) or {}).get("variants") or {})]
        if extra:
            notes.append(f"note: {dev}: not in the baseline, not gated: {', '.join(extra)}")
    return compare(rep, b, required), notes


# --- writing a baseline -------------------------------------------------------------------------------------------

HEADER = """\
# Baseline for the '{recipe}' recipe{entry}: the reference value of each gated metric per device and variant, with a
# two-sided tolerance. `yolo-edge gate RUN_DIR` fails (exit 2) when a metric leaves its band on either side: below
# a higher-is-better reference is a regression, above it an unexplained gain (update the baseline on purpose).
# Written by `yolo-edge baseline update --reason '...'`; a tolerance edited by hand here is kept by later updates.
# Latency is gated as ratios within one run only (engine speed-up over base, end-to-end over engine), never in ms.
# Where each tolerance comes from (the `rule` of each metric):
{rules}
"""


def _q(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)


def render_baseline(b: dict) -> str:
    rules = "\n".join(f"#   {k}: {'±' + format(v, 'g') if kind == 'tol' else '±' + format(100 * v, 'g') + '%'} - "
                      f"{why}" for k, (kind, v, why) in RULES.items())
    out = [HEADER.format(recipe=b["recipe"], entry=f" (nightly entry '{b['entry']}')" if b.get("entry") else "",
                         rules=rules)]
    out.append(f"recipe: {_q(b['recipe'])}")
    if b.get("entry"):
        out.append(f"entry: {_q(b['entry'])}")
    out.append(f"recipe_digest: {_q(b['recipe_digest']) if b.get('recipe_digest') else 'null'}")
    out.append("source: {" + ", ".join(f"{k}: {_q(str(v))}" for k, v in (b.get("source") or {}).items()) + "}")
    out.append("updates:   # why the references changed, oldest first")
    for u in b.get("updates") or []:
        out.append("  - {" + ", ".join(f"{k}: {_q(str(v))}" for k, v in u.items()) + "}")
    out.append("devices:")
    for dev, spec in b["devices"].items():
        out.append(f"  {dev}:")
        if spec.get("description"):
            out.append(f"    description: {_q(spec['description'])}")
        out.append("    variants:")
        for v, metrics in spec["variants"].items():
            out.append(f"      {v}:")
            for m, s in metrics.items():
                tol = f"rtol: {s['rtol']:g}" if "rtol" in s else f"tol: {s['tol']:g}"
                ref = f"{s['ref']:.6g}" if m not in ("params", "macs") else f"{int(round(s['ref']))}"
                rule = s.get("rule", "")
                why = SHORT.get(rule, "set by hand in this file")
                out.append(f"        {m + ':':19s} {{ref: {ref}, {tol}, rule: {rule or 'hand'}}}  # {why}")
    return "\n".join(out) + "\n"


def baseline_from_report(rep: dict, old: dict | None, reason: str, run_dir: Path, entry: str | None = None,
                         variants: list[str] | None = None, commit: str | None = None) -> dict:
    from pipeline.report.history import recipe_digest

    old = old or {}
    b = {"recipe": (rep.get("recipe") or {}).get("name", "?"), "entry": entry or old.get("entry"),
         "recipe_digest": recipe_digest(rep),
         "source": {"run": str(run_dir), "commit": commit or "unknown",
                    "time": time.strftime("%Y-%m-%dT%H:%M:%S")},
         "updates": list(old.get("updates") or []) + [{"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "reason": reason,
                                                        "run": str(run_dir), "commit": commit or "unknown"}],
         "devices": {}}
    for dev in devices(rep):
        old_dev = ((old.get("devices") or {}).get(dev["id"]) or {}).get("variants") or {}
        vs = {}
        for r in all_rows(dev):
            if variants and r["name"] not in variants:
                continue
            got = row_metrics(r)
            ms = {}
            for m in GATED:
                if m not in got:
                    continue
                prev = (old_dev.get(r["name"]) or {}).get(m) or {}
                rule = rule_for(m, r.get("precision", "fp32"))
                if prev and prev.get("rule", "hand") not in RULES:  # a hand-set tolerance: kept
                    spec = {k: prev[k] for k in ("tol", "rtol") if k in prev} | {"rule": "hand"}
                else:
                    kind, val, _ = RULES[rule]
                    spec = {kind: val, "rule": rule}
                ms[m] = {"ref": got[m], **spec}
            vs[r["name"]] = ms
        if vs:
            b["devices"][dev["id"]] = {"description": dev["description"], "variants": vs}
    return b


def update_baseline(run_dir: Path, reason: str, baseline: Path | None = None) -> Path:
    from pipeline.core.errors import UserError
    from pipeline.report.history import git_commit

    if not reason.strip():
        raise UserError("--reason is required: say why the references change (it is kept in the file)")
    rp = Path(run_dir) / "report.json"
    if not rp.is_file():
        raise UserError(f"no report.json in {run_dir}: run the pipeline (or `make nightly`) first", run_dir)
    rep = json.loads(rp.read_text())
    path = Path(baseline) if baseline else baseline_path_for(Path(run_dir), rep)
    old = yaml.safe_load(path.read_text()) if path.is_file() else None
    e = matrix_entry_for(Path(run_dir))
    b = baseline_from_report(rep, old, reason, Path(run_dir), entry=(e or {}).get("name"),
                             variants=[v for v in (e or {}).get("variants") or []] or None, commit=git_commit())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_baseline(b))
    return path
