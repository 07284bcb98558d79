"""The trade-off picture and report.html. The data behind tradeoff.png (every variant's point on every
device, the Pareto front), the files `yolo-edge report` writes, and the HTML embedding its images. No training."""

from __future__ import annotations

import base64
import json
import re

import pytest
from conftest import cli
from report_fixture import E2E, ROWS, synthetic_report, write_run

from pipeline.report import history as hist
from pipeline.report.plots import pareto, tradeoff_data
from pipeline.report.render import render_run


def test_pareto_front():
    pts = [{"variant": n, "latency_ms": x, "map50_95": y} for n, x, y in
           [("a", 1, 0.5), ("b", 2, 0.7), ("c", 3, 0.6), ("d", 4, 0.8), ("e", 4, 0.79), ("f", 0.5, 0.4)]]
    assert [p["variant"] for p in pareto(pts)] == ["f", "a", "b", "d"]


def test_the_front_is_drawn_only_where_intervals_separate():
    from pipeline.report.plots import front_segments

    def pt(n, x, y, lat_ci=None, map_ci=None):
        return {"variant": n, "latency_ms": x, "map50_95": y, "lat_ci": lat_ci, "map_ci": map_ci}

    fast, slow = pt("fast", 5.0, 0.80, [4.8, 5.2], [0.78, 0.82]), pt("slow", 9.0, 0.85, [8.7, 9.4], [0.83, 0.87])
    assert front_segments([fast, slow]) == [["fast", "slow"]]  # both differences resolved: a real trade-off
    close = pt("close", 5.3, 0.81, [5.0, 5.6], [0.79, 0.83])  # within the fast one's intervals on both axes
    assert front_segments([fast, close]) == []
    tied = pt("tied", 9.0, 0.81, [8.7, 9.4], [0.79, 0.83])  # slower, but not resolvably more accurate
    assert front_segments([fast, tied]) == []
    assert front_segments([pt("a", 1, 0.5), pt("b", 2, 0.6)]) == [["a", "b"]]  # no intervals: exact values


def test_tradeoff_data_has_every_variant_and_the_front():
    d = tradeoff_data(synthetic_report())
    assert list(d) == ["x86_64-2cpu"]
    pts = d["x86_64-2cpu"]["points"]
    plain, e2e = [r[0] for r in ROWS], [r[0] for r in E2E]
    assert sorted(p["variant"] for p in pts if p["kind"] == "engine") == sorted(plain)
    assert sorted(p["variant"] for p in pts if p["kind"] == "end_to_end") == sorted(plain + e2e)
    pf = next(p for p in pts if p["variant"] == "pruned-fp32" and p["kind"] == "engine")
    assert (pf["latency_ms"], pf["map50_95"], pf["size_bytes"]) == (5.85, 0.8196, 5880000)
    assert d["x86_64-2cpu"]["front"] == {"engine": ["pruned-fp32", "base-fp32"],
                                         "end_to_end": ["pruned-fp32-e2e", "base-fp32-e2e"]}
    assert d["x86_64-2cpu"]["state"] == "clocks: not recorded"


@pytest.mark.slow
def test_devices_section_adds_a_device(tmp_path):
    rep = synthetic_report()
    rep["devices"] = {"orin-nano": {"clocks_locked": False, "variants": [rep["variants"][0]]}}
    d = tradeoff_data(rep)
    assert list(d) == ["x86_64-2cpu", "orin-nano"] and len(d["orin-nano"]["points"]) == 2
    run = write_run(tmp_path / "run", rep)
    out = render_run(run, history=tmp_path / "none.db")
    html = out["html"].read_text()
    assert "orin-nano" in html and "clocks NOT locked" in html


@pytest.mark.slow
def test_report_writes_table_plots_and_self_contained_html(tmp_path):
    run = write_run(tmp_path / "run")
    db = tmp_path / "h.db"
    for i in range(3):  # a history for history.png: three nights of this recipe
        hist.insert(hist.connect(db), [r | {"run_uid": f"n{i}", "time": f"2026-11-2{i}T02:00:00"}
                                       for r in hist.report_rows(run, commit="x")])
    r = cli("report", "--run-dir", run, "--history", db)
    assert r.returncode == 0, r.stderr
    assert "| pruned-fp32 |" in r.stdout and (run / "report.md").is_file()
    for f in ("tradeoff.png", "history.png", "report.html"):
        assert (run / f).is_file(), f
        assert f"wrote {run / f}" in r.stdout
    html = (run / "report.html").read_text()
    imgs = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(imgs) == 2
    assert base64.b64decode(imgs[0]) == (run / "tradeoff.png").read_bytes()
    assert base64.b64decode(imgs[1]) == (run / "history.png").read_bytes()
    assert not re.search(r'src="(?!data:)', html)  # nothing fetched from elsewhere
    rep = json.loads((run / "report.json").read_text())
    for row in rep["variants"] + rep["e2e_variants"]:
        assert f"<td>{row['name']}</td>" in html
    for stage in ("data", "load", "prune", "finetune", "export", "bench"):  # lineage: every stage record
        assert f"<td>{stage}</td>" in html
    assert "no &#x27;devices&#x27; section" in html or "no 'devices' section" in html


def _chromium() -> str | None:
    import shutil

    return next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None)


def _open_in_browser(exe: str, page, work) -> tuple[str, list[str]]:
    """(the DOM headless Chromium rendered from `page`, the URLs the page itself requested: its network log's
    requests with an initiator; the browser's own background requests have none)."""
    import subprocess

    net = work / "net.json"
    quiet = ["--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--no-default-browser-check", "--disable-features=Translate,MediaRouter,OptimizationHints"]
    p = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", *quiet,
                        f"--user-data-dir={work / 'profile'}", f"--log-net-log={net}",
                        "--proxy-server=http://127.0.0.1:9", "--dump-dom", page.as_uri()],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    log = json.loads(net.read_text())
    start = {v: k for k, v in log["constants"]["logEventTypes"].items()}
    urls = [e["params"]["url"] for e in log["events"] if start.get(e["type"]) == "URL_REQUEST_START_JOB"
            and e.get("params", {}).get("initiator", "not an origin") != "not an origin"]
    return p.stdout, urls


@pytest.mark.slow(seconds=20)
def test_report_html_renders_in_a_headless_browser_with_no_external_request(tmp_path):
    """report.html opened by a real browser (headless Chromium): the page renders, its tables and plots are in the
    rendered DOM, and the page requests nothing (its images are data: URIs). The check finds a page that does."""
    exe = _chromium()
    if exe is None:
        pytest.skip("no headless Chromium on this machine (Debian: apt-get install chromium; .ci/run installs it)")
    planted = tmp_path / "planted.html"
    planted.write_text('<html><body><table><tr><td>x</td></tr></table><img src="http://127.0.0.1:9/p.png">'
                       '</body></html>')
    (tmp_path / "p1").mkdir()
    _, urls = _open_in_browser(exe, planted, tmp_path / "p1")
    assert urls == ["http://127.0.0.1:9/p.png"], urls  # the check sees a page's own request
    run = write_run(tmp_path / "run")
    r = cli("report", "--run-dir", run, "--history", tmp_path / "h.db")
    assert r.returncode == 0, r.stderr
    (tmp_path / "p2").mkdir()
    dom, urls = _open_in_browser(exe, run / "report.html", tmp_path / "p2")
    assert "<table" in dom and urls == [], urls
    rep = json.loads((run / "report.json").read_text())
    for row in rep["variants"]:
        assert f"<td>{row['name']}</td>" in dom
    assert len(re.findall(r'<img[^>]+src="data:image/png;base64,', dom)) >= 1  # the trade-off plot, inline
