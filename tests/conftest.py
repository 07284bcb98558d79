import json
import os
import subprocess
import sys
import traceback
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

from pipeline.adapters import offline  # noqa: E402

# The offline settings' variables as the session found them, before setup_offline() below put proxies at a closed
# port: kept in the environment by the first process, so pytest-xdist's workers (started after it) read the same.
_BEFORE = "YOLO_EDGE_TEST_BEFORE_OFFLINE"
if _BEFORE not in os.environ:
    os.environ[_BEFORE] = json.dumps({k: os.environ.get(k) for k in offline.SET})
offline.setup_offline()


def network_env() -> dict:
    """The environment for a process that needs the package index (pip in a fresh venv): this one's, with the
    offline settings' variables as they were before the session set them."""
    env = {k: v for k, v in os.environ.items() if k not in offline.SET}
    env.update({k: v for k, v in json.loads(os.environ[_BEFORE]).items() if v is not None})
    return env


def cli(*args, cwd=ROOT, timeout=600):
    """Run `yolo-edge ARGS` and return a CompletedProcess (returncode, stdout, stderr as text).

    In this process, through typer's CliRunner isolation (its own stdin, stdout, stderr and COLUMNS=200) and the
    console script's own `main()` (the offline block, one-line errors, exit codes), with the working directory and
    argv of the command; the process-wide state a command may change (the environment, the working directory,
    torch's thread count) is put back afterwards. YOLO_EDGE_TEST_SUBPROCESS=1 runs the installed console script as a
    process of its own instead (`timeout` applies there); the tests where the process boundary is the point (a
    signal mid-run, the console script's exit status) start processes themselves."""
    argv = [str(Path(sys.executable).parent / "yolo-edge"), *map(str, args)]
    if os.environ.get("YOLO_EDGE_TEST_SUBPROCESS") == "1":
        return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "COLUMNS": "200"})
    import torch
    from typer.testing import CliRunner

    from pipeline.entry import main

    saved = os.getcwd(), dict(os.environ), torch.get_num_threads(), sys.argv
    code = 0
    with CliRunner().isolation(env={"COLUMNS": "200"}) as (out, err, _):
        try:
            os.chdir(cwd)
            sys.argv = argv
            main()
        except SystemExit as e:  # what the interpreter makes of it
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if not isinstance(e.code, int) and e.code is not None:
                print(e.code, file=sys.stderr)
        except BaseException:  # a traceback, as the console script would print one
            traceback.print_exc()
            code = 1
        finally:
            os.chdir(saved[0])
            os.environ.clear()
            os.environ.update(saved[1])
            torch.set_num_threads(saved[2])
            sys.argv = saved[3]
        sys.stdout.flush()
        sys.stderr.flush()
        return subprocess.CompletedProcess(argv, code, out.getvalue().decode(errors="replace"),
                                           err.getvalue().decode(errors="replace"))


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


def pytest_collection_modifyitems(config, items):
    """The slow tests run first, the longest (marked slow(seconds=...)) first of all. `make test` runs one
    pytest-xdist worker per core with `--dist loadfile --no-loadscope-reorder`: each worker is handed the next whole
    module, modules in the order of their slowest test, so the long modules overlap and the short ones fill the gaps
    at the end, and a module-scoped fixture (an export, a quantized set, a small run and its bundle) is built once.
    Handing out whole modules costs about 5% of the wall time that single tests would (one `--durations=0` log
    replayed on 2 workers: 315 s against 301 s)."""

    def weight(item):
        mark = item.get_closest_marker("slow")
        return 0.0 if mark is None else -float(mark.kwargs.get("seconds", 1.0))

    items.sort(key=weight)  # stable: within a weight, collection order


def randomized(name: str, nc: int = 8, seed: int = 0):
    """A model built from `name` with random weights *and* random BN statistics, so an inexact rewrite or cut cannot
    hide."""
    import torch

    from pipeline.adapters import ultralytics_yolo as ua

    torch.manual_seed(seed)
    m = ua.build_from_yaml(name, nc=nc)
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.uniform_(-0.3, 0.3)
    return m.eval()
