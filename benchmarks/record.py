"""Append the latest run's variants to benchmarks/history/<date>.json (ratios against base-fp32 included)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def main(run_dir: str = "runs/default") -> Path:
    rep = json.loads((Path(run_dir) / "report.json").read_text())
    rows = [{k: v.get(k) for k in ("name", "map50_95", "map50", "params", "macs", "fps", "vs_base")} |
            {"engine_p50_ms": v["latency_ms"]["engine"]["p50"], "e2e_p50_ms": v["latency_ms"]["end_to_end"]["p50"],
             "e2e_over_engine": v.get("e2e_over_engine")}
            for v in rep["variants"] + rep.get("e2e_variants", [])]
    out = Path(__file__).parent / "history" / f"{time.strftime('%Y-%m-%d')}.json"
    out.parent.mkdir(exist_ok=True)
    hist = json.loads(out.read_text()) if out.is_file() else []
    hist.append({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "device": rep["device"], "variants": rows})
    out.write_text(json.dumps(hist, indent=1))
    return out


if __name__ == "__main__":
    print(main(*sys.argv[1:]))
