"""The report's rows, built in one place for the dev box's bench (pipeline/stages/bench.py) and the device's
(pipeline/device/bundle_bench.py): one variant's accuracy, timing, size and model counts, then each row against its
base. Torch-free: the device imports it."""

from __future__ import annotations

SCHEMA = "yolo-edge/report/1"  # report.json's and device_report.json's schema name


def variant_row(*, name: str, precision: str, role: str | None, note: str, model: dict, runner: dict, acc: dict,
                names: list[str], cat_ids: list[int], timed: dict, params, macs, detections: int, **extra) -> dict:
    """One variant's row: what it is, its file ({path, sha256, size_bytes}), the runner, mAP50-95 / mAP50 and per-class
    AP (acc: pipeline.eval.coco.coco_eval's dict), the timing fields (pipeline.eval.measure.timing_fields), params,
    MACs, the number of detections, and any further fields (`extra`) in that order."""
    return {"name": name, "precision": precision, **({"role": role} if role else {}), "note": note, "model": model,
            "runner": runner, "map50_95": acc["map50_95"], "map50": acc["map50"],
            "per_class_ap50_95": {names[cat_ids.index(k)]: a for k, a in acc["per_class_ap50_95"].items()},
            **timed, "params": params, "macs": macs, "detections": detections, **extra}


def add_vs_base(rows: list[dict], bases: dict[str, str], timing, tvs: dict) -> None:
    """Each row against its base row (`bases`: row name -> base row name): MACs, params and size ratios, the mAP
    change, the speed-ups with their intervals (pipeline.eval.measure.speedup_fields; in place). A row whose base is
    absent, or lacks MAC counts, gets none."""
    from pipeline.eval.measure import speedup_fields

    by = {r["name"]: r for r in rows}
    for r in rows:
        base = by.get(bases.get(r["name"]))
        if base is None or not base.get("macs") or not r.get("macs"):
            continue
        r["vs_base"] = {"against": base["name"], "macs_ratio": r["macs"] / base["macs"],
                        "params_ratio": r["params"] / base["params"],
                        "size_ratio": r["model"]["size_bytes"] / base["model"]["size_bytes"],
                        "map50_95_delta": r["map50_95"] - base["map50_95"],
                        **speedup_fields(timing, tvs[r["name"]], tvs[base["name"]])}
