"""The trade-off picture and the nightly gate: plots and a self-contained HTML page for a run
(`plots`, `html`), the benchmark history in SQLite (`history`), baselines with two-sided tolerances and the gate
(`gate`), and the nightly matrix (`nightly`). `rows` reads a report.json into devices, variants and metrics."""
