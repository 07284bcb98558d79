import atexit
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Under pytest-xdist (`make test`: one worker per core), each worker and the processes it starts compute on
# cores / workers threads unless OMP_NUM_THREADS says otherwise: two workers with two OpenMP threads each on two cores
# spin against each other (measured: two small pipeline runs side by side took 382 s at 2 threads each, 178 s at 1).
# pytest has imported torch already (pyproject's filterwarnings names torch.jit.TracerWarning): this process's
# threads are set with torch.set_num_threads, its children's with the variable.
if os.environ.get("PYTEST_XDIST_WORKER") and not os.environ.get("OMP_NUM_THREADS"):
    _workers = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    os.environ["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // _workers))
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
COCO8 = SHARED / "data" / "coco8" / "coco8.yaml"
BASE_CKPT = ROOT / yaml.safe_load((ROOT / "models" / "default.yaml").read_text())["model"]["weights"]  # shipped

from pipeline.adapters.offline import setup_offline

setup_offline()


class _CliServer:
    """tests/cli_server.py, started on the first `cli()` call of this pytest process (one per xdist worker)."""

    proc = None
    broken = None  # why it cannot be used: every cli() then starts a plain subprocess

    @classmethod
    def get(cls):
        if cls.broken or os.environ.get("YOLO_EDGE_TEST_SUBPROCESS") == "1":
            return None
        if cls.proc is None or cls.proc.poll() is not None:
            cls.proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "cli_server.py")], cwd=ROOT,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            hello = cls._line(cls.proc, 300)
            if hello != "ready":
                cls.broken = f"the cli fork server said {hello!r}"
                cls.proc.kill()
                print(f"\n{cls.broken}: cli() runs plain subprocesses", file=sys.stderr)
                return None
            atexit.register(cls.proc.kill)
        return cls.proc

    @staticmethod
    def _line(proc, timeout):
        """One answer line, read a byte at a time from the pipe (a buffered reader could swallow the next line
        and leave select waiting), or None after `timeout` seconds."""
        fd, buf, deadline = proc.stdout.fileno(), b"", time.monotonic() + timeout
        while not buf.endswith(b"\n"):
            if not select.select([fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
                return None
            b = os.read(fd, 1)
            if not b:
                return buf.decode().strip() or "(closed)"
            buf += b
        return buf.decode().strip()


# the commands that import torch, ultralytics or onnx (the others start in about half a second as plain processes)
TORCH_COMMANDS = {"run", "stage", "bench", "init", "base", "sparsify", "engine", "nightly", "deploy", "check-trt"}


def cli(*args, cwd=ROOT, timeout=600):
    """Run `yolo-edge ARGS` as its own process; returns CompletedProcess with text output.

    The process is forked from tests/cli_server.py, which has imported what every command imports (~6 s a process
    otherwise): a fresh process with its own cwd, environment, argv, stdout/stderr and exit code, running the
    console script's main(). Only for TORCH_COMMANDS; YOLO_EDGE_TEST_SUBPROCESS=1 runs the installed console script
    for every command; the tests that send signals (test_prune_plan's kill/resume) and the deploy tests always do."""
    exe = Path(sys.executable).parent / "yolo-edge"
    argv = [str(exe), *map(str, args)]
    env = {**os.environ, "COLUMNS": "200"}

    def plain():
        return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)

    server = _CliServer.get() if args and str(args[0]) in TORCH_COMMANDS else None
    if server is None:
        return plain()
    with tempfile.TemporaryDirectory(prefix="cli-") as d:
        out, err = Path(d) / "stdout", Path(d) / "stderr"
        try:
            server.stdin.write(json.dumps({"argv": argv, "cwd": str(cwd), "env": env, "stdout": str(out),
                                           "stderr": str(err)}) + "\n")
            server.stdin.flush()
            pid = _CliServer._line(server, 60)
        except OSError:  # BrokenPipeError: it is gone
            pid = None
        if not (pid or "").isdigit():  # the server died or hung: say so once, then plain subprocesses
            _CliServer.broken = f"the cli fork server stopped answering ({pid!r})"
            server.kill()
            print(f"\n{_CliServer.broken}: cli() runs plain subprocesses", file=sys.stderr)
            return plain()
        pid = int(pid)
        rc = _CliServer._line(server, timeout)
        if rc is None:  # as subprocess.run does on a timeout: kill it, then raise
            os.kill(pid, signal.SIGKILL)
            _CliServer._line(server, 60)
            raise subprocess.TimeoutExpired(argv, timeout, output=out.read_text(), stderr=err.read_text())
        return subprocess.CompletedProcess(argv, int(rc), out.read_text(errors="replace"),
                                           err.read_text(errors="replace"))


@pytest.fixture(scope="session")
def synth_small(tmp_path_factory):
    """A small synthetic COCO dataset (24 train, 12 val images)."""
    from pipeline.data.synthetic import SynthSpec, generate

    return generate(tmp_path_factory.mktemp("synth") / "ds", SynthSpec(seed=7, train=24, val=12))


@pytest.fixture(scope="session")
def val_synth(tmp_path_factory):
    """The default recipe's val split, first 40 images (same generator and seed as the shipped model's data)."""
    from pipeline.data.synthetic import SynthSpec, generate

    return generate(tmp_path_factory.mktemp("synthval") / "ds", SynthSpec(seed=0, train=1, val=40))


@pytest.fixture
def needs_shared():
    if not COCO8.is_file():
        pytest.skip(f"{COCO8} is absent (../shared is not beside this clone)")
    return COCO8


def _shipped_base():
    if not BASE_CKPT.is_file():
        pytest.skip(f"{BASE_CKPT} is absent: `make base` makes it")
    return BASE_CKPT


@pytest.fixture
def base_ckpt():
    return _shipped_base()


@pytest.fixture(scope="module")
def base_ckpt_path():
    """The shipped base checkpoint, for module-scoped fixtures."""
    return _shipped_base()


def pytest_report_header(config):
    from pipeline.backends.tensorrt import tensorrt_available

    ok, why = tensorrt_available()
    return f"tensorrt: {'available' if ok else 'not available: ' + why}"


# The test modules that define a module-scoped fixture (an export, a quantized set, a small run and its bundle):
# `make test` keeps each on one worker so that its fixture is built once, not once per worker that runs one of its
# tests (and again each time a worker comes back to the module).
SHARED_FIXTURE_MODULES = {p.stem for p in (ROOT / "tests").glob("test_*.py")
                          if '@pytest.fixture(scope="module")' in p.read_text()}


@pytest.hookimpl(tryfirst=True)  # before xdist's own choice of scheduler
def pytest_xdist_make_scheduler(config, log):
    """`--dist loadgroup`: pytest-xdist 3.8's own grouping (xdist_group marks) does nothing under pytest 9 (it renames
    `item._nodeid`, which pytest 9 no longer reads), so this scheduler groups by the rule above instead: one work
    unit per test, or per module for the modules in SHARED_FIXTURE_MODULES, handed out in collection order."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ModuleFixtureScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid):
            path = nodeid.split("::", 1)[0]
            return path if Path(path).stem in SHARED_FIXTURE_MODULES else nodeid

    return ModuleFixtureScheduling(config, log)


def pytest_collection_modifyitems(config, items):
    """The slow tests run first, the longest (marked slow(seconds=...)) first of all: under pytest-xdist (`make test`
    runs one worker per core, `--dist loadgroup --no-loadscope-reorder`, the scheduler above) each worker is handed
    the next tests in this order as it frees up, so the long ones overlap and the short ones fill the gaps at the
    end. A module in SHARED_FIXTURE_MODULES goes out whole where its slowest test stands in this order."""

    def weight(item):
        mark = item.get_closest_marker("slow")
        return 0.0 if mark is None else -float(mark.kwargs.get("seconds", 1.0))

    items.sort(key=weight)  # stable: within a weight, collection order
