"""The `yolo-edge` console script. The package alone (`pip install yolo-edge`) is the device runtime; the dev-box
commands need the `train` extra, and without it the script says so in one line instead of a traceback."""

from __future__ import annotations

import sys

TRAIN_EXTRA = {"typer", "pydantic", "torch", "torchvision", "ultralytics", "torch_pruning", "matplotlib", "onnxslim"}


def main() -> None:
    try:
        from pipeline.cli import main as cli_main
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] not in TRAIN_EXTRA:
            raise
        print(f"error: yolo-edge's dev-box commands need the train extra (pip install 'yolo-edge[train]'): {e.name} "
              f"is not installed; on a device, yolo-edge-device verifies and benchmarks a bundle", file=sys.stderr)
        sys.exit(2)
    cli_main()
