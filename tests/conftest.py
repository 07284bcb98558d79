import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
COCO8 = SHARED / "data" / "coco8" / "coco8.yaml"
BASE_CKPT = ROOT / yaml.safe_load((ROOT / "models" / "default.yaml").read_text())["model"]["weights"]  # shipped

from pipeline.adapters.offline import setup_offline

setup_offline()


def cli(*args, cwd=ROOT, timeout=600):
    """Run the real console script; returns CompletedProcess with text output."""
    exe = Path(sys.executable).parent / "yolo-edge"
    return subprocess.run([str(exe), *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "COLUMNS": "200"})


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
    """The slow tests run first, the longest (marked slow(seconds=...)) first of all: under pytest-xdist (`make test`
    runs one worker per core) each worker takes the next test when it is free, so the long ones overlap and the
    short ones fill the gaps at the end instead of one worker idling while the other finishes a long test."""

    def weight(item):
        mark = item.get_closest_marker("slow")
        return 0.0 if mark is None else -float(mark.kwargs.get("seconds", 1.0))

    items.sort(key=weight)  # stable: within a weight, collection order
    if len(items) > 2 and os.environ.get("PYTEST_XDIST_WORKER"):  # the workers' order is the one xdist follows
        # `make test` runs `-n N --maxschedchunk 1`: xdist gives worker 1 items 0-1, worker 2 items 2-3, and then one
        # item to whichever finishes: the second-longest goes to the other worker instead of queueing behind the first
        items[1], items[2] = items[2], items[1]
