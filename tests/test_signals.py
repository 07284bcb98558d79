"""Ctrl-C and kill -9 at every stage of a run: each stage of the pipeline is interrupted once in turn, the next
command picks up where the last good state ends (earlier stages cached, no half-made artifact used, temporary
directories removed), and the finished run passes check-report."""

import json
import signal
import subprocess
import time

import pytest
from conftest import cli
from test_faults import _sets, _stale, _start, check_report, one_line_error


def _next_new_stage(p, seen: set[str], timeout: float = 900) -> str | None:
    """Read stderr until a stage not yet interrupted starts running; None when the command ends first."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        ln = p.stderr.readline()
        if not ln:
            return None
        if ln.startswith("▶ ") and ": running" in ln:
            stage = ln[2:].split(":")[0].strip()
            if stage not in seen:
                return stage
    raise AssertionError("no stage started within the timeout")


@pytest.mark.heavy
@pytest.mark.slow(seconds=420)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "kill-9"])
def test_every_stage_interrupted_in_turn_then_the_run_finishes(tmp_path, base_ckpt_path, sig):
    run = tmp_path / "run"
    sets = _sets(f"model.weights={base_ckpt_path}", "finetune.epochs=2")
    seen: list[str] = []
    for _ in range(16):
        p = _start(run, *sets)
        stage = _next_new_stage(p, set(seen))
        if stage is None:
            p.communicate(timeout=60)
            assert p.returncode == 0, f"the run after {seen} failed"
            break
        time.sleep(1.0)
        p.send_signal(sig)
        out, err = p.communicate(timeout=300)
        seen.append(stage)
        if p.returncode == 0:  # the signal came after the last stage ended
            break
        if sig == signal.SIGINT:
            assert p.returncode == 130, err[-2000:]
            last = one_line_error(subprocess.CompletedProcess(p.args, p.returncode, out, err), "interrupted",
                                  "earlier ", "intact")
            if last.startswith("interrupted after the "):  # it came while the stage was put in place: kept whole
                done = last.split("interrupted after the ")[1].split(" stage finished")[0]
                assert json.loads((run / done / "record.json").read_text())["stage"] == done, last
                assert _stale(run) == [], f"Ctrl-C after {done} leaves {_stale(run)}"
                continue
            assert "stage in progress was discarded" in last, last
            hit = last.split("interrupted: the ")[1].split(" stage")[0]
            assert (run / f"{hit}.failed.log").is_file(), last
            assert not (run / hit / "record.json").exists(), f"{hit} was interrupted yet has a record"
            assert _stale(run) == [], f"Ctrl-C in {hit} leaves {_stale(run)}"
            for done in seen[:-1]:
                if done != hit:
                    assert json.loads((run / done / "record.json").read_text())["stage"] == done
        else:
            assert p.returncode == -signal.SIGKILL
    else:
        raise AssertionError(f"the run never finished: {seen}")
    assert len(seen) >= 6, f"too few stages interrupted: {seen}"
    r = cli("run", "--run-dir", run, *sets)  # all cached now: nothing half-made was kept
    assert r.returncode == 0 and ": running" not in r.stderr, r.stderr[-2000:]
    assert _stale(run) == [], _stale(run)
    for stage in seen:
        assert (run / stage / "log.txt").is_file(), stage
    check_report(run)
