"""Keep ultralytics offline: `offline()` around the work (the CLI opens it around every command), before
`import ultralytics`. Importing this module (or any other of the package) changes nothing.

- YOLO_OFFLINE=1 makes ultralytics' own online check answer False; YOLO_AUTOINSTALL=0 stops pip installs.
- A project-local YOLO_CONFIG_DIR with the fonts its plotting code wants (its font check ignores
  YOLO_OFFLINE and would otherwise download Arial.ttf), copied from matplotlib's DejaVuSans.
- HTTP(S) proxies pointed at a closed local port: any download ultralytics still attempts (a hub weight
  name, a missing dataset) is refused at once instead of hanging on DNS or a firewall.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

REFUSE_PROXY = "http://127.0.0.1:9"  # discard port: nothing listens, connections are refused at once
PROXIES = ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy")
SET = ("YOLO_OFFLINE", "YOLO_AUTOINSTALL", "YOLO_CONFIG_DIR", *PROXIES, "NO_PROXY", "no_proxy")
# OMP_NUM_THREADS as the user set it, read before ultralytics' import sets it to 1 when unset.
USER_OMP_THREADS = os.environ.get("OMP_NUM_THREADS")


def cpu_threads() -> int:
    """How many threads CPU training and validation use: OMP_NUM_THREADS when the user set it, else every core this
    process may run on. Ultralytics' own choice, min(8, cores - 1), leaves one core idle for data-loader workers,
    but it forces those to 0 on the CPU: on a 2-core box its training ran on one core."""
    try:
        if USER_OMP_THREADS and int(USER_OMP_THREADS) > 0:
            return int(USER_OMP_THREADS)
    except ValueError:
        pass
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def project_root() -> Path:
    return Path(__file__).resolve().parents[2]


def setup_offline(config_dir: str | Path | None = None) -> Path:
    """Set the environment for offline ultralytics (for the rest of the process; `offline()` undoes it) and make sure
    the config dir holds the fonts. Returns the config dir."""
    cfg = Path(config_dir or os.environ.get("YOLO_CONFIG_DIR") or project_root() / ".cache" / "ultralytics")
    os.environ["YOLO_OFFLINE"] = "1"
    os.environ["YOLO_AUTOINSTALL"] = "0"
    os.environ["YOLO_CONFIG_DIR"] = str(cfg)
    for k in PROXIES:
        os.environ[k] = REFUSE_PROXY
    for k in ("NO_PROXY", "no_proxy"):
        os.environ.pop(k, None)
    fonts = cfg / "Ultralytics"
    if all((fonts / name).exists() for name in ("Arial.ttf", "Arial.Unicode.ttf")):
        return cfg
    fonts.mkdir(parents=True, exist_ok=True)
    import matplotlib

    src = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    for name in ("Arial.ttf", "Arial.Unicode.ttf"):
        if not (fonts / name).exists():
            tmp = fonts / f".{name}.{os.getpid()}.tmp"  # processes starting together each write their own
            shutil.copyfile(src, tmp)
            os.replace(tmp, fonts / name)
    return cfg


@contextlib.contextmanager
def offline(config_dir: str | Path | None = None):
    """Offline ultralytics for the length of the block (yields the config dir); afterwards every variable it set is
    as it was. Ultralytics reads some of them once, at its import: import it inside the first such block."""
    saved = {k: os.environ.get(k) for k in SET}
    try:
        yield setup_offline(config_dir)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
