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
LATENCY = ("engine_p50_speedup", "e2e_over_engine")


@dataclass(frozen=True)
class Rule:
    """How a metric's tolerance follows from its measured spread: max(margin x spread, floor). `kind` 'tol' is
    absolute (mAP), 'rtol' relative to the reference (ratios, counts). `spread` is the default where a baseline
    records none of its own (`baseline update --spread RUN ...` measures it)."""
    kind: str
    margin: float
    floor: float
    spread: float
    why: str

    def tolerance(self, spread: float | None) -> float:
        return max(self.margin * (self.spread if spread is None else spread), self.floor)


# The default spreads are the largest half-ranges measured over four runs of the default recipe that differ only in
# what honest variation changes: OMP_NUM_THREADS 1 vs 2 (float summation order, as another CPU has) and the
# fine-tune's seed 0, 1, 2 (benchmarks/RESULTS.md, 2026-12-04). A baseline written with `--spread` carries its own.
RULES = {
    "map-fp32": Rule("tol", 2.0, 0.002, 0.0013,
                     "FP32 mAP: the fine-tune moves with summation order and seed (pruned-fp32: 0.13 pt half-range); "
                     "2x the measured half-range, at least 0.2 pt"),
    "map-lowp": Rule("tol", 2.0, 0.004, 0.0037,
                     "INT8/FP16 mAP: the fine-tune's spread passed through calibration and the accuracy-aware search "
                     "(0.08-0.37 pt half-ranges); 2x that, at least 0.4 pt (INT8 kernels round differently per ISA: "
                     "0.21-0.26 pt seen between two machines)"),
    "speedup": Rule("rtol", 2.0, 0.15, 0.038,
                    "a speed-up over base within one run, timed interleaved: 0.9-3.8% half-ranges on one machine; "
                    "another machine of the same CPU model and vector units is not measured, so at least 15% (a 1.3x "
                    "slowdown, -23% with a ±3% interval, still fails); fails only when the run's 95% interval lies "
                    "outside the band"),
    "e2e-ratio": Rule("rtol", 2.0, 0.15, 0.023,
                      "end-to-end / engine-only p50 within one run, timed interleaved: 0.4-2.3% half-ranges; as the "
                      "speed-ups"),
    "counted": Rule("rtol", 1.0, 0.001, 0.0,
                    "params and MACs are counted, not measured: any change is a change of architecture; 0.1% is "
                    "rounding room"),
}


def rule_for(metric: str, precision: str) -> str:
    if metric in ("map50_95", "map50"):
        return "map-fp32" if precision == "fp32" else "map-lowp"
    if metric == "engine_p50_speedup":
        return "speedup"
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
    status: str  # ok | regression | gain | missing-* | not-comparable | skipped
    line: str
    interval: tuple[float, float] | None = None

    @property
    def failed(self) -> bool:
        return self.status not in ("ok", "not-comparable", "skipped")


def _fmt(metric: str, x: float) -> str:
    if metric in ("params", "macs"):
        return f"{x / 1e6:.3f} M" if metric == "params" else f"{x / 1e9:.3f} G"
    if metric.startswith("map"):
        return f"{x:.4f}"
    return f"{x:.3f}×"


def _tolerance(metric: str, spec: dict) -> tuple[str, float]:
    """('tol' | 'rtol', value) of one baseline metric: a hand-set tolerance as written, else its rule applied to the
    spread the baseline measured."""
    rule = RULES.get(spec.get("rule", ""))
    if rule is None:  # set by hand in the file
        return ("rtol", float(spec["rtol"])) if "rtol" in spec else ("tol", float(spec.get("tol", 0.0)))
    return rule.kind, rule.tolerance(spec.get("spread"))


def _band(metric: str, spec: dict) -> tuple[float, float, str]:
    ref = float(spec["ref"])
    kind, t = _tolerance(metric, spec)
    rule = RULES.get(spec.get("rule", ""))
    how = ""
    if rule is not None and spec.get("rule") != "hand":
        sp = rule.spread if spec.get("spread") is None else float(spec["spread"])
        unit = (lambda x: f"{100 * x:.2g} pt") if kind == "tol" else (lambda x: f"{100 * x:.2g}%")
        how = (f" = {rule.margin:g}x measured spread {unit(sp)}" if rule.margin * sp >= rule.floor
               else f" (floor; measured spread {unit(sp)})")
    if kind == "rtol":
        return ref * (1 - t), ref * (1 + t), f"±{100 * t:.3g}%{how}"
    return ref - t, ref + t, (f"±{100 * t:.3g} pt" if metric.startswith("map") else f"±{t:g}") + how


def _interval(row: dict, metric: str) -> tuple[float, float] | None:
    """The run's own 95% interval of a metric, where the bench measured one."""
    ci = {"engine_p50_speedup": (row.get("vs_base") or {}).get("engine_p50_speedup_ci"),
          "e2e_over_engine": row.get("e2e_over_engine_ci"), "map50_95": row.get("map50_95_ci"),
          "map50": row.get("map50_ci")}.get(metric)
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(isinstance(x, (int, float)) for x in ci):
        return float(ci[0]), float(ci[1])
    return None


def latency_comparable(base_dev: dict, state: dict) -> str | None:
    """None when the run's latency can be compared with the baseline's on this device, else why not: another CPU
    model or other vector units (speed-ups depend on them), or a Jetson whose clocks were not locked."""
    if state.get("clocks_locked") is False:
        return "clocks not locked on the device"
    want, got = base_dev.get("cpu"), state.get("cpu")
    if want and got and want != got:
        return f"timed on another CPU ({got}; the baseline's: {want})"
    want, got = base_dev.get("isa"), state.get("isa")
    if want is not None and got is not None and sorted(want) != sorted(got):
        return f"timed with other vector units ({' '.join(got) or 'none'}; the baseline's: {' '.join(want) or 'none'})"
    return None


def _change(metric: str, x: float, ref: float) -> str:
    if metric.startswith("map"):
        return f"{100 * (x - ref):+.2f} pt"
    return f"{100 * (x / ref - 1):+.1f}%" if ref else f"{x - ref:+g}"


def compare(rep: dict, baseline: dict, required: dict[str, list[str]] | None = None,
            latency: bool = True) -> list[Check]:
    """Every check of a report against a baseline (ok ones too: the summary table shows what moved). `required`
    ({device: [variant]}) adds what the matrix says must be in the run even where the baseline lacks it. A metric
    with an interval in the run (latency ratios timed interleaved, mAP bootstrapped over images) fails only when
    the whole interval lies outside the band for the ratios; mAP is judged on its value (the interval over images
    is the eval set's sampling, the same in every run) and the interval is shown. `latency=False` skips the latency
    ratios (CI: another machine)."""
    devs = {d["id"]: d for d in devices(rep)}
    have = {k: {r["name"]: r for r in all_rows(d)} for k, d in devs.items()}
    checks = []
    bdevs = baseline.get("devices") or {}
    want = {dev: dict(spec.get("variants") or {}) for dev, spec in bdevs.items()}
    for dev, vs in (required or {}).items():
        for v in vs:
            want.setdefault(dev, {}).setdefault(v, None)
    for dev, variants in want.items():
        if dev not in have:
            checks.append(Check(dev, "*", "*", None, None, "", "missing-device",
                                f"{dev}: device missing from the run ({len(variants)} variant(s) expected on it; "
                                f"devices in the run: {', '.join(have) or 'none'})"))
            continue
        why_not = latency_comparable(bdevs.get(dev) or {}, devs[dev]["state"])
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
                checks.append(_check(dev, v, m, spec, got.get(m), _interval(row, m),
                                     "skipped" if m in LATENCY and not latency else
                                     why_not if m in LATENCY else None))
    return checks


def _check(dev: str, v: str, m: str, spec: dict, x: float | None, ci: tuple[float, float] | None,
           skip: str | None) -> Check:
    lo, hi, words = _band(m, spec)
    ref = float(spec["ref"])
    name = f"{dev} {v} {m}"
    if x is None:
        return Check(dev, v, m, ref, None, words, "missing-metric",
                     f"{name}: missing from the run (baseline {_fmt(m, ref)})")
    shown = f"{_fmt(m, x)}" + (f" [{_fmt(m, ci[0])}, {_fmt(m, ci[1])}]" if ci else "")
    d = _change(m, x, ref)
    if skip:
        status = "skipped" if skip == "skipped" else "not-comparable"
        return Check(dev, v, m, ref, x, words, status, f"{name}: {shown} vs {_fmt(m, ref)} ({d}): not gated: "
                     + ("latency checks off (--no-latency)" if skip == "skipped" else skip), ci)
    # ratios: the run's interval must reach the band; mAP and counts: the value itself
    lo_x, hi_x = (ci if (ci and m in LATENCY) else (x, x))
    if hi_x >= lo - 1e-12 and lo_x <= hi + 1e-12:
        return Check(dev, v, m, ref, x, words, "ok", f"{name}: {shown} vs {_fmt(m, ref)} ({d}, within {words})", ci)
    worse = (hi_x < lo) if BETTER_HIGHER.get(m, True) else (lo_x > hi)
    what = ("regression" if worse else
            "unexplained gain: update the baseline on purpose (yolo-edge baseline update --reason ...)")
    return Check(dev, v, m, ref, x, words, "regression" if worse else "gain",
                 f"{name}: {shown} vs baseline {_fmt(m, ref)} ({d}; tolerance {words}): {what}", ci)


def summary_table(checks: list[Check]) -> str:
    """What moved, by how much, against which tolerance: one line per check."""
    lines = [f"{'device':14s} {'variant':24s} {'metric':19s} {'baseline':>9s} {'run':>9s} {'run 95% interval':>20s} "
             f"{'change':>9s}  {'tolerance':42s} verdict"]
    for c in checks:
        if c.ref is None or c.value is None:
            lines.append(f"{c.device:14s} {c.variant:24s} {c.metric:19s} {'':>9s} {'':>9s} {'':>20s} {'':>9s}  "
                         f"{'':42s} {c.status.upper()}")
            continue
        ci = f"[{_fmt(c.metric, c.interval[0])}, {_fmt(c.metric, c.interval[1])}]" if c.interval else ""
        verdict = {"ok": "ok", "regression": "REGRESSION", "gain": "UNEXPLAINED GAIN"}.get(c.status, c.status)
        lines.append(f"{c.device:14s} {c.variant:24s} {c.metric:19s} {_fmt(c.metric, c.ref):>9s} "
                     f"{_fmt(c.metric, c.value):>9s} {ci:>20s} {_change(c.metric, c.value, c.ref):>9s}  "
                     f"{c.band:42s} {verdict}")
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


def gate(run_dir: Path, baseline: Path | None = None, required: dict | None = None,
         latency: bool = True) -> tuple[list[Check], list[str]]:
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
    checks = compare(rep, b, required, latency=latency)
    nc = sorted({c.line.split(": not gated: ", 1)[1] for c in checks if c.status == "not-comparable"})
    for why in nc:
        notes.append(f"note: latency ratios not gated: {why}")
    return checks, notes


def gate_text(checks: list[Check], notes: list[str]) -> str:
    """gate.txt: the notes, the table of every check, one FAIL line per failure, the verdict."""
    bad = [c for c in checks if c.failed]
    verdict = (f"gate: {len(bad)} failure(s) of {len(checks)} checks" if bad else
               f"gate: all {sum(c.status == 'ok' for c in checks)} checks within tolerance"
               + (f" ({n} not gated)" if (n := sum(c.status in ('skipped', 'not-comparable') for c in checks))
                  else ""))
    return "\n".join([*notes, summary_table(checks), *(f"FAIL {c.line}" for c in bad), verdict])


# --- writing a baseline -------------------------------------------------------------------------------------------

HEADER = """\
# Baseline for the '{recipe}' recipe{entry}: the reference value of each gated metric per device and variant and the
# spread it was measured with. `yolo-edge gate RUN_DIR` fails (exit 2) when a metric leaves ref ± tolerance on either
# side: below a higher-is-better reference is a regression, above it an unexplained gain (update the baseline on
# purpose). Each tolerance is max(margin x spread, floor) of its rule; latency ratios fail only when the run's own 95%
# interval lies outside the band, and are not gated against a run on another CPU model. `spread` is the half-range
# of the metric over the runs under `spread_runs` (honest variation: thread counts, seeds); without one the rule's
# default applies. Written by `yolo-edge baseline update --reason '...' [--spread RUN ...]`; a metric with
# `rule: hand` keeps the tol/rtol written here.
# The rules:
{rules}
"""


def _q(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)


def render_baseline(b: dict) -> str:
    rules = "\n".join(f"#   {k}: {r.margin:g}x spread, floor {r.floor:g}{' (relative)' if r.kind == 'rtol' else ''}"
                      f" - {r.why}" for k, r in RULES.items())
    out = [HEADER.format(recipe=b["recipe"], entry=f" (nightly entry '{b['entry']}')" if b.get("entry") else "",
                         rules=rules)]
    out.append(f"recipe: {_q(b['recipe'])}")
    if b.get("entry"):
        out.append(f"entry: {_q(b['entry'])}")
    out.append(f"recipe_digest: {_q(b['recipe_digest']) if b.get('recipe_digest') else 'null'}")
    out.append("source: {" + ", ".join(f"{k}: {_q(str(v))}" for k, v in (b.get("source") or {}).items()) + "}")
    out.append("spread_runs:   # the runs each metric's spread was measured over")
    for u in b.get("spread_runs") or []:
        out.append("  - {" + ", ".join(f"{k}: {_q(str(v))}" for k, v in u.items()) + "}")
    out.append("updates:   # why the references changed, oldest first")
    for u in b.get("updates") or []:
        out.append("  - {" + ", ".join(f"{k}: {_q(str(v))}" for k, v in u.items()) + "}")
    out.append("devices:")
    for dev, spec in b["devices"].items():
        out.append(f"  {dev}:")
        for k in ("description", "cpu"):
            if spec.get(k):
                out.append(f"    {k}: {_q(spec[k])}")
        if spec.get("isa") is not None:
            out.append(f"    isa: [{', '.join(spec['isa'])}]")
        out.append("    variants:")
        for v, metrics in spec["variants"].items():
            out.append(f"      {v}:")
            for m, sp in metrics.items():
                ref = f"{sp['ref']:.6g}" if m not in ("params", "macs") else f"{int(round(sp['ref']))}"
                if sp.get("rule", "hand") not in RULES:
                    tol = f"rtol: {sp['rtol']:g}" if "rtol" in sp else f"tol: {sp['tol']:g}"
                    out.append(f"        {m + ':':19s} {{ref: {ref}, {tol}, rule: hand}}  # set by hand in this file")
                    continue
                spread = "" if sp.get("spread") is None else f"spread: {sp['spread']:.3g}, "
                out.append(f"        {m + ':':19s} {{ref: {ref}, {spread}rule: {sp['rule']}}}  "
                           f"# tolerance {_band(m, sp)[2]}")
    return "\n".join(out) + "\n"


def spread_of(reports: list[dict]) -> dict[tuple[str, str, str], float]:
    """{(device, variant, metric): half-range} over several runs' reports (absolute for mAP, relative to the mean
    for ratios and counts): the honest variation a baseline's tolerances are set from."""
    vals: dict[tuple[str, str, str], list[float]] = {}
    for rep in reports:
        for dev in devices(rep):
            for r in all_rows(dev):
                for m, x in row_metrics(r).items():
                    if m in GATED:
                        vals.setdefault((dev["id"], r["name"], m), []).append(x)
    out = {}
    for k, xs in vals.items():
        if len(xs) < 2:
            continue
        half = (max(xs) - min(xs)) / 2
        out[k] = half if k[2].startswith("map") else half / (sum(xs) / len(xs))
    return out


def baseline_from_report(rep: dict, old: dict | None, reason: str, run_dir: Path, entry: str | None = None,
                         variants: list[str] | None = None, commit: str | None = None,
                         spread_reports: dict[str, dict] | None = None) -> dict:
    """A baseline from a run's report: references from it; spreads measured over it and `spread_reports`
    ({run: report}, the same recipe under honest variation) when given, else kept from the old baseline."""
    from pipeline.report.history import recipe_digest

    old = old or {}
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    spreads = spread_of([rep, *spread_reports.values()]) if spread_reports else None
    b = {"recipe": (rep.get("recipe") or {}).get("name", "?"), "entry": entry or old.get("entry"),
         "recipe_digest": recipe_digest(rep),
         "source": {"run": str(run_dir), "commit": commit or "unknown", "time": stamp},
         "spread_runs": ([{"run": str(run_dir), **_conditions(rep)}]
                         + [{"run": k, **_conditions(r)} for k, r in spread_reports.items()]
                         if spread_reports else list(old.get("spread_runs") or [])),
         "updates": list(old.get("updates") or []) + [{"time": stamp, "reason": reason, "run": str(run_dir),
                                                        "commit": commit or "unknown"}],
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
                if prev.get("rule") == "hand" or prev and "rule" not in prev:  # a hand-set tolerance: kept
                    ms[m] = {"ref": got[m], **{k: prev[k] for k in ("tol", "rtol") if k in prev}, "rule": "hand"}
                    continue
                sp = spreads.get((dev["id"], r["name"], m)) if spreads is not None else prev.get("spread")
                ms[m] = {"ref": got[m], **({"spread": sp} if sp is not None else {}),
                         "rule": rule_for(m, r.get("precision", "fp32"))}
            vs[r["name"]] = ms
        if vs:
            b["devices"][dev["id"]] = {"description": dev["description"], "cpu": dev["state"].get("cpu"),
                                       "isa": dev["state"].get("isa"), "variants": vs}
    return b


def _conditions(rep: dict) -> dict:
    """What a run varied: threads, the fine-tune's seed, the CPU."""
    rc = rep.get("recipe") or {}
    return {"omp_num_threads": (rep.get("env_vars") or {}).get("OMP_NUM_THREADS", "unset"),
            "finetune_seed": (rc.get("finetune") or {}).get("seed"), "cpu": (rep.get("device") or {}).get("cpu")}


def update_baseline(run_dir: Path, reason: str, baseline: Path | None = None,
                    spread_runs: list[Path] | None = None) -> Path:
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
    spread = {}
    for sr in spread_runs or []:
        if not (Path(sr) / "report.json").is_file():
            raise UserError(f"no report.json in {sr} (a --spread run)", sr)
        spread[str(sr)] = json.loads((Path(sr) / "report.json").read_text())
    b = baseline_from_report(rep, old, reason, Path(run_dir), entry=(e or {}).get("name"),
                             variants=[v for v in (e or {}).get("variants") or []] or None, commit=git_commit(),
                             spread_reports=spread or None)
    path.parent.mkdir(parents=True, exist_ok=True)
    from pipeline.core.store import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(render_baseline(b))
    return path
