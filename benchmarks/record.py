"""Record a run's report.json in the benchmark history (benchmarks/history.db, SQLite; see pipeline/report/history.py).
Kept for old habits: `yolo-edge history record RUN_DIR` (make history) does the same. The dated JSON files it used to
append to (benchmarks/history/*.json) are imported into the database: `yolo-edge history import FILES`."""

from __future__ import annotations

import sys

from pipeline.report.history import default_db, record

if __name__ == "__main__":
    run_dir = sys.argv[1] if len(sys.argv) > 1 else "runs/default"
    new, total = record(run_dir, default_db())
    print(f"{default_db()}: {new} of {total} rows new ({run_dir})")
