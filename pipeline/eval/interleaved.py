"""Latency of many timed items measured together, so that every ratio between them (speed-ups, end-to-end ÷ engine)
compares numbers taken on the same machine state.

`time_interleaved` warms each item up, then runs *rounds*: in each round every item makes `per_round` calls, the
items in a freshly shuffled order (seeded). A transient load (a package install, thermal throttling) then lands on
all items of the rounds it spans instead of on one item's slot. Each sample keeps its round index; a tracked ratio's
estimate is the median over rounds of the per-round ratio (each side's median call in that round), and its 95%
interval comes from a bootstrap over rounds (round indices resampled with replacement), so both sides of a ratio
always come from the same rounds.
Timing stops once every tracked ratio's interval is narrow enough, at a time cap, or at a round cap.

numpy (and rich for the progress bar) only: the Jetson bench imports this as it is."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field

import numpy as np

# What the defaults rest on, measured on the 2-core dev box (ONNX Runtime CPU, 2 threads, 320 px) with the default
# run's 12 variants = 21 timed items (engine-only and end-to-end of 9 models, 3 end-to-end graphs; 5-20 ms a call),
# 30 tracked ratios. Quiet: a round of 3 calls per item takes 0.74 s; the widest ratio interval is ±4.5% after 10
# rounds, ±3.3% after 15, ±2.6% after 40; the bench stage stopped converged after 10-15 rounds (8-12 s of timing,
# the whole stage 44 s). Beside one CPU-bound process for the whole session: 1.47 s a round, widest ±82% after 10
# rounds, ±57% after 30, ±36% after 60 (88 s), so the 90 s cap ends it and the report says the intervals are wide.
# 300 resamples put an interval's ends within 0.2% (median; 0.9% at the 90th percentile) of those of 20000
# resamples, at 10 ms per check at 40 rounds and 70 ms at 300.
# An interval covers the round-to-round noise of one session: a load that lasts the whole session can change a ratio
# itself (the CPU-bound process above moved pruned-fp32's engine speed-up from 1.67 to 1.14: its cost to a call is
# not proportional to the call's length), which no interval of that session shows.


@dataclass(frozen=True)
class Schedule:
    warmup: int = 5  # untimed calls per item before the first round
    per_round: int = 3  # calls per item in each round
    min_rounds: int = 10  # rounds before the first stop check
    max_rounds: int = 300
    rel_width: float = 0.10  # stop once every tracked ratio's (hi - lo) / estimate is at most this (0.10 = ±5%)
    cap_s: float = 90.0  # wall seconds of timing (warm-up included) after which it stops whatever the widths
    check_every: int = 5  # rounds between stop checks after min_rounds
    resamples: int = 300  # bootstrap resamples per check
    seed: int = 0  # the order of the items in each round and the bootstrap's draws

    @classmethod
    def of(cls, settings: Mapping, **overrides) -> Schedule:
        """A schedule from a mapping holding some of its fields (a recipe's bench section, a bundle's manifest);
        other keys are ignored, None overrides too."""
        names = {f for f in cls.__dataclass_fields__}
        kw = {k: v for k, v in settings.items() if k in names}
        kw.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**kw)


@dataclass
class Timing:
    """What `time_interleaved` measured: per item, percentiles of its milliseconds and the 95% interval of its p50;
    per tracked (numerator, denominator) ratio, the estimate and its 95% interval; a summary of the session."""
    items: dict[str, dict]
    ratios: dict[tuple[str, str], dict]
    summary: dict
    samples: dict[str, np.ndarray] = field(repr=False)  # ms, one row per round

    def ratio(self, num: str, den: str) -> dict:
        """A tracked ratio; an item over itself is exactly 1."""
        if num == den:
            return {"estimate": 1.0, "ci": [1.0, 1.0]}
        return self.ratios[(num, den)]


def percentiles(samples_ms) -> dict:
    a = np.asarray(samples_ms, dtype=np.float64).ravel()
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "mean": float(a.mean()), "min": float(a.min()), "n": int(a.size)}


def timed_call(fn: Callable[[int], object], i: int) -> float:
    """Milliseconds of fn(i): the float it returns (its own measurement, e.g. CUDA events), else wall time."""
    t0 = time.perf_counter()
    ret = fn(i)
    wall = (time.perf_counter() - t0) * 1e3
    return float(ret) if isinstance(ret, (float, np.floating)) else wall


def bootstrap_medians(samples: Mapping[str, np.ndarray], rounds: int, resamples: int,
                      rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Per item, the pooled median of its samples over `resamples` draws of `rounds` round indices (with
    replacement): the bootstrap of each item's own p50 (ratios use `ratio_intervals`, paired within rounds)."""
    idx = rng.integers(0, rounds, (resamples, rounds))
    return {k: np.median(a[:rounds][idx].reshape(resamples, -1), axis=1) for k, a in samples.items()}


def interval(draws: np.ndarray) -> list[float]:
    lo, hi = np.percentile(draws, [2.5, 97.5])
    return [float(lo), float(hi)]


def round_ratios(samples: Mapping[str, np.ndarray], rounds: int, num: str, den: str) -> np.ndarray:
    """Per round, the median of the numerator's calls over the median of the denominator's: both sides of each
    ratio measured under the same machine state."""
    return np.median(samples[num][:rounds], axis=1) / np.median(samples[den][:rounds], axis=1)


def ratio_intervals(samples: Mapping[str, np.ndarray], rounds: int, pairs: Iterable[tuple[str, str]],
                    resamples: int, rng: np.random.Generator) -> dict[tuple[str, str], dict]:
    """Each ratio's estimate, the median over the first `rounds` rounds of its per-round ratio, and its 95% bootstrap
    interval over rounds. Pairing within a round is what interleaving buys: a load that lasts from some round to the
    end slows both sides of those rounds alike, while a ratio of pooled medians would set the loaded samples of one
    side against the quiet ones of the other (measured: 2.57 [1.56, 3.24] against 1.91 quiet, two 2-thread models
    with a CPU-bound process per core from the middle of the session on; per round: 1.91 [1.88, 1.94])."""
    out = {}
    idx = rng.integers(0, rounds, (resamples, rounds))
    for n, d in pairs:
        rr = round_ratios(samples, rounds, n, d)
        out[(n, d)] = {"estimate": float(np.median(rr)), "ci": interval(np.median(rr[idx], axis=1))}
    return out


def rel_width(r: dict) -> float:
    lo, hi = r["ci"]
    return (hi - lo) / r["estimate"]


def item_intervals(samples: Mapping[str, np.ndarray], rounds: int, resamples: int,
                   rng: np.random.Generator) -> dict[str, dict]:
    """Each item's p50 over the first `rounds` rounds and its 95% bootstrap interval over rounds."""
    boot = bootstrap_medians(samples, rounds, resamples, rng)
    return {k: {"estimate": float(np.median(samples[k][:rounds])), "ci": interval(b)} for k, b in boot.items()}


def widest(samples: Mapping[str, np.ndarray], rounds: int, pairs: list[tuple[str, str]], s: Schedule,
           rng: np.random.Generator) -> float:
    """The widest relative 95% interval among the tracked ratios (with none tracked: among the items' p50s)."""
    found = (ratio_intervals(samples, rounds, pairs, s.resamples, rng) if pairs
             else item_intervals(samples, rounds, s.resamples, rng))
    return max(rel_width(r) for r in found.values())


class _Progress:
    """Progress over the rounds (pipeline/core/console.task; a no-op when off)."""

    def __init__(self, label: str, total: int, on: bool):
        self.label, self.cm, self.t = label, None, None
        if on:
            from pipeline.core.console import task

            self.cm = task(f"{label}: rounds", total)

    def __enter__(self):
        if self.cm is not None:
            self.t = self.cm.__enter__()
        return self

    def __exit__(self, *exc):
        if self.cm is not None:
            self.cm.__exit__(*exc)
        return False

    def update(self, rounds: int, width: float | None, s: Schedule):
        if self.t is not None:
            w = "" if width is None else f"widest interval ±{50 * width:.1f}% "
            self.t.update(rounds, f"{w}(stops at ±{50 * s.rel_width:g}% or {s.cap_s:g} s)")


def stop_reason(kind: str, s: Schedule, rounds: int) -> str:
    return {"converged": f"converged: every ratio's 95% interval within ±{50 * s.rel_width:g}%",
            "time_cap": f"time cap {s.cap_s:g}s reached",
            "max_rounds": f"max rounds ({rounds}) reached"}[kind]


def time_interleaved(items: Mapping[str, Callable[[int], object]], ratios: Iterable[tuple[str, str]] = (),
                     schedule: Schedule = Schedule(), *, label: str = "timing", progress: bool = True,
                     on_round: Callable[[int], None] | None = None) -> Timing:
    """Time `items` (name -> fn(i); i counts that item's calls) together in shuffled rounds until every ratio in
    `ratios` ((numerator, denominator) item names) has a 95% interval within `schedule.rel_width` of its estimate,
    or the time cap, or max_rounds. `on_round(n)` is called after round n (n from 1)."""
    s = schedule
    names = list(items)
    if not names:
        raise ValueError("no items to time")
    pairs = list(dict.fromkeys((n, d) for n, d in ratios if n != d))
    unknown = sorted({k for p in pairs for k in p} - set(names))
    if unknown:
        raise ValueError(f"ratios name items that are not timed: {', '.join(unknown)}")
    order_rng, boot_rng = np.random.default_rng(s.seed), np.random.default_rng(s.seed + 1)
    samples = {k: np.empty((s.max_rounds, s.per_round)) for k in names}
    calls = dict.fromkeys(names, 0)

    def call(k: str) -> float:
        ms = timed_call(items[k], calls[k])
        calls[k] += 1
        return ms

    t0 = time.perf_counter()
    width, kind, rounds = None, "max_rounds", 0
    with _Progress(label, s.max_rounds, progress) as bar:
        for k in names:
            for _ in range(s.warmup):
                call(k)
        for r in range(s.max_rounds):
            for k in order_rng.permutation(names):
                samples[k][r] = [call(k) for _ in range(s.per_round)]
            rounds = r + 1
            if on_round is not None:
                on_round(rounds)
            if rounds >= s.min_rounds and (rounds - s.min_rounds) % s.check_every == 0:
                width = widest(samples, rounds, pairs, s, boot_rng)
                if width <= s.rel_width:
                    kind = "converged"
                    break
            bar.update(rounds, width, s)
            if time.perf_counter() - t0 >= s.cap_s:
                kind = "time_cap"
                break
    wall = time.perf_counter() - t0
    samples = {k: a[:rounds] for k, a in samples.items()}
    p50s = item_intervals(samples, rounds, s.resamples, boot_rng)
    stats = {k: {**percentiles(samples[k]), "p50_ci": p50s[k]["ci"]} for k in names}
    found = ratio_intervals(samples, rounds, pairs, s.resamples, boot_rng) if pairs else {}
    final = max((rel_width(r) for r in found.values()), default=None)
    summary = {"method": "interleaved", "order": "shuffled per round", "rounds": rounds, **asdict(s),
               "stop": stop_reason(kind, s, rounds), "stopped_by": kind, "widest_rel_width": final,
               "items": len(names), "ratios": len(pairs), "wall_s": wall}
    return Timing(items=stats, ratios=found, summary=summary, samples=samples)
