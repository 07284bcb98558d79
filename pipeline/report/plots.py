"""tradeoff.png (mAP50-95 against latency, every variant on every device, the Pareto front) and history.png (each
gated metric's trend over the nightly history, with the baseline band). Matplotlib with the Agg backend: no
display needed. `tradeoff_data` is the data behind the picture (the tests check it)."""

from __future__ import annotations

import math
from pathlib import Path

from pipeline.report.rows import all_rows, clocks_state, devices

KINDS = {"engine": ("engine only (model on a ready tensor)", "o"),
         "end_to_end": ("end to end (frame in, detections out)", "^")}


def pareto(points: list[dict]) -> list[dict]:
    """The points no other point beats on both latency (lower) and mAP (higher), by latency."""
    front, best = [], -math.inf
    for p in sorted(points, key=lambda p: (p["latency_ms"], -p["map50_95"])):
        if p["map50_95"] > best:
            front.append(p)
            best = p["map50_95"]
    return front


def separates(a: dict, b: dict) -> bool:
    """Whether two front points' trade-off is resolved: b slower than a and more accurate, each beyond the other's
    95% interval (a point without an interval counts as exact)."""
    a_lat_hi = (a.get("lat_ci") or (a["latency_ms"],) * 2)[1]
    b_lat_lo = (b.get("lat_ci") or (b["latency_ms"],) * 2)[0]
    a_map_hi = (a.get("map_ci") or (a["map50_95"],) * 2)[1]
    b_map_lo = (b.get("map_ci") or (b["map50_95"],) * 2)[0]
    return b_lat_lo > a_lat_hi and b_map_lo > a_map_hi


def front_segments(front: list[dict]) -> list[list[str]]:
    """The Pareto front's steps worth drawing: between consecutive front points (by latency) whose intervals
    separate on both axes; where they overlap the two are not told apart and no step is drawn."""
    return [[a["variant"], b["variant"]] for a, b in zip(front, front[1:]) if separates(a, b)]


def tradeoff_data(rep: dict) -> dict:
    """{device id: {"points": [{variant, kind, latency_ms, lat_ci, map50_95, map_ci, size_bytes, precision}], "front":
    {kind: [variant, ...]}, "steps": {kind: [[variant, variant], ...]}, "state": ...}}. A plain variant gives two
    points (engine-only and end-to-end p50); an `-e2e` variant (the whole path in one graph: its engine time is its
    end-to-end time) gives one, end to end. `front` is the Pareto front of the point estimates; `steps` are its
    segments whose intervals separate (front_segments), the only ones drawn."""
    out = {}
    for dev in devices(rep):
        pts = []
        for r in all_rows(dev):
            lat = r.get("latency_ms") or {}
            kinds = ["end_to_end"] if r.get("e2e") else ["engine", "end_to_end"]
            for k in kinds:
                p50 = (lat.get(k) or {}).get("p50")
                if p50 is None or r.get("map50_95") is None:
                    continue
                pts.append({"variant": r["name"], "kind": k, "latency_ms": float(p50),
                            "lat_ci": (lat.get(k) or {}).get("p50_ci"), "map_ci": r.get("map50_95_ci"),
                            "map50_95": float(r["map50_95"]), "precision": r.get("precision", "?"),
                            "size_bytes": int((r.get("model") or {}).get("size_bytes") or 0),
                            "e2e": bool(r.get("e2e")), "source": _source(r)})
        if not pts:
            continue
        fronts = {k: pareto([p for p in pts if p["kind"] == k]) for k in KINDS}
        out[dev["id"]] = {"points": pts, "description": dev["description"], "state": clocks_state(dev["state"]),
                          "front": {k: [p["variant"] for p in f] for k, f in fronts.items()},
                          "steps": {k: front_segments(f) for k, f in fronts.items()}}
    return out


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colors(names: list[str]) -> dict[str, tuple]:
    plt = _plt()
    cmap = plt.get_cmap("tab20" if len(names) > 10 else "tab10")
    return {n: cmap(i % cmap.N) for i, n in enumerate(names)}


def _source(r: dict) -> str:
    """The variant a row's model comes from: an end-to-end graph's detector (its `e2e.of`), else the row itself."""
    return str((r.get("e2e") or {}).get("of") or r["name"])


def write_tradeoff(rep: dict, dest: Path) -> dict:
    """Draw tradeoff.png; returns tradeoff_data(rep)."""
    plt = _plt()
    from matplotlib.lines import Line2D

    data = tradeoff_data(rep)
    n = max(1, len(data))
    fig, axes = plt.subplots(1, n, figsize=(9.5 * n, 6.8), squeeze=False)
    names = sorted({p["source"] for d in data.values() for p in d["points"]},
                   key=lambda v: [_source(r) for d in devices(rep) for r in all_rows(d)].index(v))
    color = _colors(names)
    sizes = [p["size_bytes"] for d in data.values() for p in d["points"] if p["size_bytes"]] or [1]
    smax = max(sizes)

    def msize(b: int) -> float:  # marker area proportional to file size
        return 40 + 460 * (b / smax) if b else 40

    for ax, (dev, d) in zip(axes[0], data.items()):
        for p in d["points"]:
            c = color[p["source"]]
            e2e_graph = p["e2e"]
            ax.scatter(p["latency_ms"], p["map50_95"], s=msize(p["size_bytes"]), marker=KINDS[p["kind"]][1],
                       facecolors=c if p["kind"] == "engine" or e2e_graph else "none", edgecolors=c,
                       linewidths=1.6, alpha=0.85, zorder=3)
            x, y, lc, mc = p["latency_ms"], p["map50_95"], p.get("lat_ci"), p.get("map_ci")
            if lc or mc:  # the 95% intervals: latency p50 (bootstrap over rounds), mAP (bootstrap over images)
                ax.errorbar(x, y, xerr=[[x - lc[0]], [lc[1] - x]] if lc else None,
                            yerr=[[y - mc[0]], [mc[1] - y]] if mc else None, fmt="none", ecolor=c, elinewidth=1.0,
                            capsize=2.5, alpha=0.8, zorder=2.5)
        for k, style in (("engine", "-"), ("end_to_end", "--")):
            at = {p["variant"]: p for p in d["points"] if p["kind"] == k}
            for a, b in d["steps"][k]:  # only the steps whose intervals separate
                pa, pb = at[a], at[b]
                ax.plot([pa["latency_ms"], pb["latency_ms"], pb["latency_ms"]],
                        [pa["map50_95"], pa["map50_95"], pb["map50_95"]], linestyle=style, color="black",
                        linewidth=1.4, alpha=0.7, zorder=2)
        ys = [y for p in d["points"] for y in (p["map50_95"], *(p.get("map_ci") or ()))]
        pad = max(0.004, 0.08 * (max(ys) - min(ys)))
        ax.set_ylim(min(ys) - pad, max(ys) + pad)
        xs = [x for p in d["points"] for x in (p["latency_ms"], *(p.get("lat_ci") or ()))]
        ax.set_xlim(0, max(xs) * 1.22)
        _label(fig, ax, [p for p in d["points"] if p["kind"] == "engine" or p["e2e"]])
        ax.set_xlabel("latency p50 (ms, batch 1) — lower is better")
        ax.set_ylabel("mAP50-95 (COCO, pycocotools) — higher is better")
        ax.set_title(f"{dev}: {d['description']}\n{d['state']}", fontsize=10)
        ax.grid(True, alpha=0.3)
    h = [Line2D([], [], marker="o", linestyle="", color="0.3", markerfacecolor="0.3", label=KINDS["engine"][0]),
         Line2D([], [], marker="^", linestyle="", color="0.3", markerfacecolor="none", label=KINDS["end_to_end"][0]),
         Line2D([], [], marker="^", linestyle="", color="0.3", markerfacecolor="0.3",
                label="`-e2e` variant: the whole path in one graph"),
         Line2D([], [], color="black", alpha=0.7, linestyle="-",
                label="Pareto front, engine only (steps whose 95% intervals separate)"),
         Line2D([], [], color="black", alpha=0.7, linestyle="--", label="Pareto front, end to end"),
         Line2D([], [], color="0.4", marker="|", linestyle="-", label="95% intervals (mAP, latency p50)")]
    h += [Line2D([], [], marker="s", linestyle="", color=color[v], label=v) for v in names]
    for mb in sorted({round(smax / 1e6, 1), round(smax / 4e6, 1)}):
        h.append(Line2D([], [], marker="o", linestyle="", color="0.6", markersize=math.sqrt(msize(int(mb * 1e6))),
                        label=f"file {mb:g} MB"))
    axes[0][-1].legend(handles=h, loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False,
                       labelspacing=1.0)
    fig.suptitle(f"{rep.get('run', '?')}: accuracy vs latency per variant (marker size: model file size; filled: "
                 f"engine only, hollow: end to end; `-e2e`: the whole path in one graph)", fontsize=10)
    fig.tight_layout()
    dest.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(dest, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return data


def _label(fig, ax, pts: list[dict]) -> None:
    """Name each point without overlapping: greedy, in display space, nearest free slot first; a leader line where
    the label had to move away from its point."""
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    placed = []
    cands = [(8, 4), (8, -12), (-8, 4), (-8, -12)] + [(dx, dy) for d in range(1, 9)
                                                       for dx, dy in ((12, 12 * d), (12, -12 * d - 8),
                                                                      (-12, 12 * d), (-12, -12 * d - 8))]
    for p in sorted(pts, key=lambda p: (-p["map50_95"], p["latency_ms"])):
        x, y = ax.transData.transform((p["latency_ms"], p["map50_95"]))
        for dx, dy in cands:
            t = ax.annotate(p["variant"], (p["latency_ms"], p["map50_95"]), textcoords="offset points",
                            xytext=(dx, dy), fontsize=8, color="0.1", ha="left" if dx > 0 else "right", zorder=5)
            bb = t.get_window_extent(r).expanded(1.05, 1.15)
            if not any(bb.overlaps(o) for o in placed) and ax.bbox.contains(bb.x0, bb.y0) and \
                    ax.bbox.contains(bb.x1, bb.y1):
                placed.append(bb)
                if abs(dy) > 12:
                    t.arrow_patch = None
                    ax.annotate("", (p["latency_ms"], p["map50_95"]), xytext=(dx, dy + 3), textcoords="offset points",
                                arrowprops={"arrowstyle": "-", "color": "0.6", "lw": 0.7}, zorder=1)
                break
            t.remove()
        else:
            ax.annotate(p["variant"], (p["latency_ms"], p["map50_95"]), textcoords="offset points", xytext=(8, 4),
                        fontsize=8, color="0.1", zorder=5)


HISTORY_METRICS = [("map50_95", "mAP50-95"), ("engine_p50_speedup", "engine speed-up vs base (×, same run)"),
                   ("e2e_over_engine", "end to end ÷ engine (×, same run)")]


def write_history(series: dict, bands: dict, dest: Path, title: str) -> bool:
    """history.png: one panel per metric, one line per variant over time, the baseline band (ref ± tolerance)
    shaded in the variant's colour. series: {metric: {variant: [(datetime, value)]}}; bands: {metric: {variant:
    (lo, hi)}}. False (nothing written) when there is no history."""
    if not any(series.get(m) for m, _ in HISTORY_METRICS):
        return False
    plt = _plt()
    names = sorted({v for m in series.values() for v in m})
    color = _colors(names)
    fig, axes = plt.subplots(len(HISTORY_METRICS), 1, figsize=(11, 3.3 * len(HISTORY_METRICS)), sharex=True,
                             squeeze=False)
    for ax, (m, label) in zip(axes[:, 0], HISTORY_METRICS):
        for v, pts in sorted(series.get(m, {}).items()):
            if not pts:
                continue
            xs, ys = zip(*sorted(pts))
            ax.plot(xs, ys, marker="o", markersize=3.5, linewidth=1.2, color=color[v], label=v)
            if v in bands.get(m, {}):
                lo, hi = bands[m][v]
                ax.axhspan(lo, hi, color=color[v], alpha=0.12, linewidth=0)
        ax.set_ylabel(label, fontsize=9)
        ax.grid(True, alpha=0.3)
    axes[0, 0].set_title(title + "\n(lines: recorded runs; shaded: today's baseline, reference ± tolerance)",
                         fontsize=10)
    axes[0, 0].legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    axes[-1, 0].set_xlabel("run time")
    fig.autofmt_xdate()
    fig.tight_layout()
    dest.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(dest, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return True
