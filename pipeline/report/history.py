"""The benchmark history: one SQLite file (benchmarks/history.db by default), one row per (run, variant, device,
metric) with the commit, the recipe's name and digest, the library versions, the device's state and the time.

Many writers at once (nightlies on several runners, a `make history` beside them) lose no row: the database is in
WAL mode, every connection waits up to `BUSY_TIMEOUT_MS` for a lock, each run is written in one `BEGIN IMMEDIATE`
transaction (it takes the write lock up front, so two writers never deadlock upgrading a read lock), and a row is
keyed by (run_uid, variant, device, metric): recording the same run twice adds nothing."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import time
from datetime import datetime
from pathlib import Path

from pipeline.report.rows import all_rows, devices, row_metrics

DEFAULT_DB = Path("benchmarks/history.db")
BUSY_TIMEOUT_MS = 60_000
SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    run_uid TEXT NOT NULL,        -- one recorded run: '<run_dir>@<bench finished time>' or 'json:<file>#<i>'
    run TEXT NOT NULL,            -- the run's name (runs/<name>)
    time TEXT NOT NULL,           -- ISO 8601, local time of the bench (or of the JSON entry)
    commit_sha TEXT,              -- git HEAD when recorded (+'-dirty' when the tree had changes); NULL: unknown
    recipe TEXT,                  -- the recipe's name
    recipe_digest TEXT,           -- sha256 of the recipe as the report holds it (NULL for imported JSON)
    versions TEXT,                -- JSON: library versions (report['env'])
    device TEXT NOT NULL,         -- device id (pipeline.report.rows.host_id for the host)
    device_state TEXT,            -- JSON: what the report says of the device (CPU, clocks, nvpmodel, ...)
    variant TEXT NOT NULL,
    metric TEXT NOT NULL,
    value REAL,
    source TEXT,                  -- where the row came from (a report.json or a history JSON file)
    PRIMARY KEY (run_uid, variant, device, metric)
);
CREATE INDEX IF NOT EXISTS results_by_metric ON results (recipe, device, variant, metric, time);
"""
COLS = ("run_uid", "run", "time", "commit_sha", "recipe", "recipe_digest", "versions", "device", "device_state",
        "variant", "metric", "value", "source")


def connect(db: str | Path = DEFAULT_DB) -> sqlite3.Connection:
    Path(db).parent.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(str(db), timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
    con.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    for _ in range(50):  # switching to WAL needs a moment without other writers
        try:
            con.execute("PRAGMA journal_mode = WAL")
            break
        except sqlite3.OperationalError:
            time.sleep(0.05)
    con.execute("PRAGMA synchronous = NORMAL")
    _with_retry(lambda: con.executescript(SCHEMA))
    return con


def _with_retry(fn, tries: int = 20):
    for i in range(tries):
        try:
            return fn()
        except sqlite3.OperationalError as e:  # 'database is locked' past the busy timeout: try again
            if "locked" not in str(e) or i == tries - 1:
                raise
            time.sleep(0.05 * (i + 1))


def insert(con: sqlite3.Connection, rows: list[dict]) -> int:
    """Insert rows (dicts with COLS) in one transaction; returns how many were new."""
    def tx():
        con.execute("BEGIN IMMEDIATE")
        try:
            before = con.total_changes
            con.executemany(f"INSERT OR IGNORE INTO results ({', '.join(COLS)}) VALUES "
                            f"({', '.join('?' * len(COLS))})", [tuple(r.get(c) for c in COLS) for r in rows])
            n = con.total_changes - before
            con.execute("COMMIT")
            return n
        except BaseException:
            con.execute("ROLLBACK")
            raise
    return _with_retry(tx)


def git_commit(cwd: str | Path = ".") -> str | None:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (sha + ("-dirty" if dirty else "")) or None


def recipe_digest(rep: dict) -> str | None:
    from pipeline.core.store import sha256_json

    return sha256_json(rep["recipe"]) if rep.get("recipe") else None


def report_rows(run_dir: Path, rep: dict | None = None, commit: str | None = None) -> list[dict]:
    """The history rows of one run's report.json."""
    run_dir = Path(run_dir)
    rep = rep if rep is not None else json.loads((run_dir / "report.json").read_text())
    rec = run_dir / "bench" / "record.json"
    finished = json.loads(rec.read_text()).get("finished") if rec.is_file() else None
    finished = finished or (run_dir / "report.json").stat().st_mtime
    when = datetime.fromtimestamp(finished).isoformat(timespec="seconds")
    common = {"run_uid": f"{run_dir.resolve()}@{finished:.3f}", "run": rep.get("run") or run_dir.name,
              "time": when, "commit_sha": commit, "recipe": (rep.get("recipe") or {}).get("name"),
              "recipe_digest": recipe_digest(rep), "versions": json.dumps(rep.get("env") or {}, sort_keys=True),
              "source": str(run_dir / "report.json")}
    out = []
    for dev in devices(rep):
        state = json.dumps(dev["state"], sort_keys=True, default=str)
        for r in all_rows(dev):
            for m, v in row_metrics(r).items():
                out.append({**common, "device": dev["id"], "device_state": state, "variant": r["name"],
                            "metric": m, "value": v})
    return out


def record(run_dir: str | Path, db: str | Path = DEFAULT_DB, commit: str | None = None) -> tuple[int, int]:
    """Record a run's report.json in the history; returns (rows new, rows in the report)."""
    rows = report_rows(Path(run_dir), commit=commit if commit is not None else git_commit())
    con = connect(db)
    try:
        return insert(con, rows), len(rows)
    finally:
        con.close()


def series(db: str | Path, recipe: str | None, device: str, metrics: list[str]) -> dict:
    """{metric: {variant: [(datetime, value)]}} for one recipe and device, oldest first."""
    if not Path(db).is_file():
        return {}
    con = connect(db)
    try:
        q = (f"SELECT metric, variant, time, value FROM results WHERE device = ? AND metric IN "
             f"({', '.join('?' * len(metrics))})" + (" AND recipe = ?" if recipe else "") + " ORDER BY time")
        out: dict = {}
        for m, v, t, x in con.execute(q, [device, *metrics, *([recipe] if recipe else [])]):
            if x is not None:
                out.setdefault(m, {}).setdefault(v, []).append((datetime.fromisoformat(t), x))
        return out
    finally:
        con.close()


def count(db: str | Path) -> int:
    con = connect(db)
    try:
        return con.execute("SELECT COUNT(*) FROM results").fetchone()[0]
    finally:
        con.close()


def default_db() -> Path:
    return Path(os.environ.get("YOLO_EDGE_HISTORY", DEFAULT_DB))
