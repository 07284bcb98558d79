"""Faults lose nothing and say so in one line: two commands on one run directory, corrupted shipped and cached
artifacts, a dataset changed between runs, a full disk, a read-only run directory (Ctrl-C and kill -9 at every
stage: test_signals.py). Each: one line, a non-zero exit, no traceback, and a later clean run that passes
check-report."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, SHARED, cli

SMALL = ["data.synthetic.train=32", "data.synthetic.val=16", "finetune.epochs=1", "finetune.batch=8",
         "bench.max_rounds=1", "bench.warmup=1", "calib.count=16", "calib.min_count=16", "calib.tuning_images=8",
         "quantize.accuracy_aware.max_float=2", "quantize.accuracy_aware.min_float=2", "prune.mode=uniform",
         "prune.sparsity.enabled=false", "quantize.peer=false"]


def _sets(*extra):
    return [a for s in (*SMALL, *extra) for a in ("--set", s)]


def one_line_error(r, *needles):
    """The fault's one line: non-zero, no traceback, the last stderr line an error naming what it should."""
    assert r.returncode not in (0, None), (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr + r.stdout, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    for n in needles:
        assert n in last, (n, last)
    return last


def check_report(run: Path) -> None:
    r = subprocess.run([sys.executable, str(SHARED / "tools" / "check-report"), str(run)], capture_output=True,
                       text=True, timeout=300)
    if not (SHARED / "tools" / "check-report").is_file():
        pytest.skip("../shared/tools/check-report is absent")
    assert r.returncode == 0, r.stdout[-2000:]


def _stale(run: Path) -> list[str]:
    return sorted(p.name for p in run.glob(".*") if p.is_dir() and p.name != ".work")


def test_a_second_command_on_the_same_run_dir_is_refused_in_one_line(tmp_path):
    from pipeline.core.store import run_lock

    run = tmp_path / "run"
    with run_lock(run, "`yolo-edge run` (a test)"):
        r = cli("run", "--stages", "data", "--run-dir", run, *_sets())
    one_line_error(r, "the run directory is in use by `yolo-edge run` (a test) (pid", "another --run-dir")
    assert not (run / "data").exists()
    r = cli("run", "--stages", "data", "--run-dir", run, *_sets())  # the lock is free again
    assert r.returncode == 0, r.stderr[-2000:]


def test_a_corrupted_shipped_base_is_refused_before_any_work(tmp_path, base_ckpt_path):
    w = tmp_path / "base.pt"
    shutil.copyfile(base_ckpt_path, w)
    shutil.copyfile(base_ckpt_path.with_suffix(".json"), w.with_suffix(".json"))
    with open(w, "r+b") as f:  # one byte of the weights flipped: still a loadable zip, not the recorded file
        f.seek(os.path.getsize(w) // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))
    r = cli("run", "--stages", "data,load", "--run-dir", tmp_path / "run", *_sets(f"model.weights={w}"))
    one_line_error(r, str(w), "is not the file its training record", "restore it")
    assert not (tmp_path / "run" / "data").exists()  # refused before any stage wrote


@pytest.mark.slow(seconds=40)
def test_a_corrupted_shipped_sparsity_checkpoint_is_refused_not_retrained(tmp_path, base_ckpt_path):
    src = Path(str(base_ckpt_path).replace(".pt", ".sparse.pt"))
    w = tmp_path / "sparse.pt"
    shutil.copyfile(src, w)
    shutil.copyfile(src.with_suffix(".json"), w.with_suffix(".json"))
    with open(w, "ab") as f:
        f.write(b"\0")
    r = cli("run", "--stages", "data,load,prune", "--run-dir", tmp_path / "run", "--set",
            f"prune.sparsity.shipped={w}")
    one_line_error(r, "sparsity-trained weights are not the file their record describes", "make sparse")
    assert (tmp_path / "run" / "load" / "record.json").is_file() and not (tmp_path / "run" / "prune").exists()


@pytest.mark.slow(seconds=30)
def test_a_corrupted_cached_onnx_is_noticed_by_digest_and_rebuilt(tmp_path, base_ckpt_path):
    run = tmp_path / "run"
    sets = _sets(f"model.weights={base_ckpt_path}")
    assert cli("run", "--stages", "data,load,export", "--run-dir", run, *sets).returncode == 0
    onnx_file = run / "export" / "model.onnx"
    good = onnx_file.read_bytes()
    onnx_file.write_bytes(good[:-100])  # truncated, as a crash or a full disk would leave it
    r = cli("run", "--stages", "data,load,export", "--run-dir", run, *sets)
    assert r.returncode == 0 and "▶ export: running" in r.stderr and "✓ load: cached" in r.stderr, r.stderr
    rec = json.loads((run / "export" / "record.json").read_text())
    from pipeline.core.store import sha256_file

    assert sha256_file(onnx_file) == rec["outputs"]["onnx"]["digest"] and (run / "export" / "log.txt").is_file()


@pytest.mark.slow(seconds=30)
def test_a_dataset_changed_between_two_runs_reruns_what_reads_it(tmp_path, base_ckpt_path):
    from pipeline.data.synthetic import SynthSpec, generate

    data = generate(tmp_path / "ds", SynthSpec(seed=3, train=24, val=8))  # a COCO directory of the user's
    run = tmp_path / "run"
    sets = _sets(f"model.weights={base_ckpt_path}", f"data.source={data}", "calib.count=8", "calib.min_count=8")
    r = cli("run", "--stages", "data,load,calibrate", "--run-dir", run, *sets)
    assert r.returncode == 0, r.stderr[-2000:]
    ann = data / "annotations" / "instances_train.json"
    coco = json.loads(ann.read_text())
    coco["annotations"].append({**coco["annotations"][0], "id": 10 ** 6})  # one box more in one train image
    ann.write_text(json.dumps(coco))
    r = cli("run", "--stages", "data,load,calibrate", "--run-dir", run, *sets)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "▶ data: running" in r.stderr and "✓ load: cached" in r.stderr and "▶ calibrate: running" in r.stderr


def _start(run: Path, *sets) -> subprocess.Popen:
    return subprocess.Popen([str(Path(sys.executable).parent / "yolo-edge"), "run", "--run-dir", str(run), *sets],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "COLUMNS": "200"}, preexec_fn=_default_sigint)


def _default_sigint() -> None:
    """A shell's background job (a CI script's `&`) starts with Ctrl-C ignored, which children inherit: undo it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _mount(point: Path, *opts: str) -> None:
    point.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(opts), "tmpfs", str(point)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (root and CAP_SYS_ADMIN needed): {r.stderr.strip()[:120]}")


@pytest.mark.heavy
@pytest.mark.slow(seconds=480)
def test_the_disk_fills_in_one_stage_after_another_then_the_run_dir_is_read_only(tmp_path, base_ckpt_path):
    """ENOSPC anywhere: the run directory on a tmpfs that starts nearly full and grows by 6 MiB after each failure, so
    one stage after another meets the full disk (while it trains, exports, quantizes, writes its record). Each stop:
    one line naming the disk and the stage, that stage without a record, the ones before it intact, no temporary
    directory left; the run that finally fits passes check-report. Then the same directory read-only."""
    mnt = tmp_path / "mnt"
    size = 6
    _mount(mnt, f"size={size}m")
    try:
        run = mnt / "run"
        sets = _sets(f"model.weights={base_ckpt_path}")
        stopped: list[str] = []
        for _ in range(30):
            r = cli("run", "--run-dir", run, *sets)
            if r.returncode == 0:
                break
            last = one_line_error(r, "the disk is full (No space left on device", "stage stopped",
                                  "earlier results are intact")
            stage = last.split(" stage stopped")[0].split()[-1]
            assert not (run / stage / "record.json").exists(), last
            done = [p.parent.name for p in run.glob("*/record.json")]
            assert stage not in done and "data" in done or stage == "data", (stage, done)
            assert _stale(run) == [], _stale(run)
            stopped.append(stage)
            size += 6
            subprocess.run(["mount", "-o", f"remount,size={size}m", str(mnt)], check=True)
        assert r.returncode == 0, (stopped, r.stderr[-2000:])
        assert len(set(stopped)) >= 4, stopped  # the load, the trainings, the exports, quantization...
        check_report(run)
        # Then mounted read-only (grown first: a forced bench needs room for its new directory beside the old one):
        # it stops with one line; writable again, what was there is intact.
        subprocess.run(["mount", "-o", "remount,size=2g", str(mnt)], check=True)
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        r = cli("run", "--stages", "bench", "--force", "--run-dir", run, *sets)
        one_line_error(r, "the file system is read-only")
        subprocess.run(["mount", "-o", "remount,rw", str(mnt)], check=True)
        check_report(run)
        r = cli("run", "--stages", "bench", "--force", "--run-dir", run, *sets)
        assert r.returncode == 0, r.stderr[-3000:]
        check_report(run)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
