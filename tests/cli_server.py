"""A fork server for the tests' `cli()` (conftest.py): every `yolo-edge` process the suite starts spent ~6 s of its
life importing torch, ultralytics, ONNX Runtime and Torch-Pruning before doing anything. This process imports them
once and then forks one child per command: each child is a fresh process (its own pid, cwd, environment, argv,
stdout/stderr files and exit code) that runs the console script's `main()` exactly as `.venv/bin/yolo-edge` does.

Forking is only safe before any OpenMP parallel region has run in the forking process (GNU libgomp's pool does not
survive a fork: the child hangs at its first parallel op), so this process never runs a tensor op: it imports and
forks. At start it proves that once (a forked child runs a convolution within 60 s) and exits 3 if not, and
conftest falls back to plain subprocesses.

Protocol (one JSON line per command on stdin): {"argv", "cwd", "env", "stdout", "stderr"}; it answers the child's
pid on one line and, when the child ends, its exit code (as subprocess reports it: -N for a signal) on another.
"""

import json
import os
import sys


def _child(req: dict) -> None:
    code = 1
    try:
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        for fd, path in ((1, req["stdout"]), (2, req["stderr"])):
            f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(f, fd)
            os.close(f)
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        sys.argv = list(req["argv"])
        from pipeline.entry import main  # the console script's entry point

        try:
            main()
            code = 0
        except SystemExit as e:  # what the interpreter does with it
            if e.code is None:
                code = 0
            elif isinstance(e.code, int):
                code = e.code
            else:
                print(e.code, file=sys.stderr)
                code = 1
        except BaseException:  # an uncaught exception: the traceback on stderr, exit 1, as in a real process
            import traceback

            traceback.print_exc()
            code = 1
        try:  # interpreter shutdown: wait for non-daemon threads, then the atexit handlers
            import threading

            threading._shutdown()
        except Exception:
            pass
        import atexit

        atexit._run_exitfuncs()
    finally:
        for s in (sys.stdout, sys.stderr):
            try:
                s.flush()
            except Exception:
                pass
        os._exit(code & 0xFF)


def _probe() -> bool:
    """A forked child can run a multi-threaded tensor op (no OpenMP pool was inherited half-alive)."""
    import signal
    import time

    pid = os.fork()
    if pid == 0:
        import torch

        torch.nn.functional.conv2d(torch.ones(2, 16, 64, 64), torch.ones(16, 16, 3, 3), padding=1)
        os._exit(0)
    deadline = time.time() + 60
    while time.time() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status) == 0
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return False


def serve() -> int:
    # the imports every command pays for; nothing here may run a tensor op (see the module docstring)
    import importlib
    import pkgutil

    from pipeline.adapters.offline import setup_offline

    setup_offline()
    import matplotlib  # the report's plots (Agg, as pipeline/report/plots.py sets it)
    import onnx  # noqa: F401
    import onnxruntime  # noqa: F401
    import torch  # noqa: F401
    import torch_pruning  # noqa: F401
    import torchvision  # noqa: F401
    import ultralytics  # noqa: F401
    from ultralytics.models.yolo.detect import DetectionTrainer, DetectionValidator  # noqa: F401

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401
    import onnxslim  # noqa: F401  (ultralytics' ONNX export)
    import polars  # noqa: F401  (ultralytics' results.csv; its thread pool starts on first use, not on import)

    import pipeline

    for mod in pkgutil.walk_packages(pipeline.__path__, "pipeline."):
        try:
            importlib.import_module(mod.name)
        except Exception:  # optional backends (tensorrt, ...) import what they need lazily or not at all here
            pass
    proto_in = os.fdopen(os.dup(0), "r")
    proto_out = os.fdopen(os.dup(1), "w")
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)  # nothing stray may read or write the protocol
    os.dup2(null, 1)
    if not _probe():
        proto_out.write("unsafe\n")
        proto_out.flush()
        return 3
    proto_out.write("ready\n")
    proto_out.flush()
    for line in proto_in:
        req = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            proto_in.close()
            proto_out.close()
            _child(req)
        proto_out.write(f"{pid}\n")
        proto_out.flush()
        _, status = os.waitpid(pid, 0)
        proto_out.write(f"{os.waitstatus_to_exitcode(status)}\n")
        proto_out.flush()
    return 0


if __name__ == "__main__":
    sys.path[0] = os.path.dirname(sys.executable)  # as for the console script: its directory, not tests/
    sys.exit(serve())
