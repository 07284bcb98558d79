"""yolo-edge-device: the Jetson side (no torch, no ultralytics, no typer/pydantic: argparse and the standard library
around numpy, OpenCV, pycocotools and TensorRT/Polygraphy).

    yolo-edge-device verify BUNDLE                   every manifest digest, no extra file, no pickle
    yolo-edge-device build  BUNDLE                   the TensorRT engines (cached by ONNX digest, spec, TRT, device)
    yolo-edge-device bench  BUNDLE [--runner onnxruntime] [--out device_report.json]
    yolo-edge-device info                            the device state (model, L4T, TensorRT, CUDA, clocks) as JSON

BUNDLE is the bundle directory or its .tar.gz. Errors are one line naming the file, exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline.core.errors import UserError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="yolo-edge-device", description="yolo-edge on the device: verify a deploy "
                                "bundle, build its TensorRT engines, benchmark it (mAP, latency, power).")
    sub = p.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("verify", help="check every file against the manifest (digests, sizes, no extras, no pickle)")
    v.add_argument("bundle", type=Path)
    b = sub.add_parser("build", help="build (or find cached) the TensorRT engine of every variant")
    b.add_argument("bundle", type=Path)
    b.add_argument("--engine-cache", type=Path, default=None, help="plan cache (default ~/.cache/yolo-edge/engines)")
    b.add_argument("--workspace-mib", type=int, default=2048)
    b.add_argument("--dla-core", type=int, default=-1)
    b.add_argument("--opt-level", type=int, default=3)
    n = sub.add_parser("bench", help="mAP + latency + device state of every variant -> device_report.json")
    n.add_argument("bundle", type=Path)
    n.add_argument("--runner", choices=["tensorrt", "onnxruntime"], default="tensorrt")
    n.add_argument("--out", type=Path, default=Path("device_report.json"))
    n.add_argument("--engine-cache", type=Path, default=None)
    # the interleaved timer's settings (pipeline/eval/interleaved.py); each defaults to the bundle's bench settings
    n.add_argument("--warmup", type=int, default=None, help="untimed calls per timed item first")
    n.add_argument("--per-round", type=int, default=None, help="calls per timed item in each round")
    n.add_argument("--min-rounds", type=int, default=None, help="rounds before the first stop check")
    n.add_argument("--max-rounds", type=int, default=None, help="rounds at most")
    n.add_argument("--rel-width", type=float, default=None,
                   help="stop once every speed-up's 95%% interval width / estimate is at most this")
    n.add_argument("--cap-s", type=float, default=None, help="seconds of timing at most")
    n.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads (default: the bundle's)")
    n.add_argument("--variant", action="append", default=None, help="only this variant (repeatable)")
    sub.add_parser("info", help="the device state as JSON")
    return p


def run(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    if a.cmd == "verify":
        from pipeline.device import manifest as mf

        root = mf.resolve(a.bundle)
        m = mf.verify(root)
        print(f"{root}: verified {len(m['files'])} files against manifest.json (format {m['format']}, "
              f"digest {mf.digest(root)[:12]}); variants: {', '.join(v['name'] for v in m['variants'])}")
    elif a.cmd == "build":
        from pipeline.device import manifest as mf
        from pipeline.device.bundle_bench import DEFAULT_ENGINE_CACHE, build_engines

        root = mf.resolve(a.bundle)
        m = mf.verify(root)
        build_engines(root, m, a.engine_cache or DEFAULT_ENGINE_CACHE, workspace_mib=a.workspace_mib,
                      dla_core=a.dla_core, opt_level=a.opt_level)
    elif a.cmd == "bench":
        from pipeline.device.bundle_bench import bench, summary_lines

        timing = {k: getattr(a, k) for k in ("per_round", "min_rounds", "max_rounds", "rel_width", "cap_s")}
        rep = bench(a.bundle, a.runner, a.out, a.engine_cache, a.warmup, a.threads, a.variant, timing)
        print("\n".join(summary_lines(rep)))
        print(f"wrote {a.out}")
    elif a.cmd == "info":
        from pipeline.device.sysinfo import device_state

        print(json.dumps(device_state(), indent=1))
    return 0


def main() -> None:
    try:
        sys.exit(run())
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
