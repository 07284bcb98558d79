"""The device's state during a bench: model, L4T release, TensorRT/CUDA versions, nvpmodel mode, whether the clocks
are locked (`jetson_clocks --show`), and power/temperature sampled by `tegrastats` while the timed runs go. Standard
library only; every parser takes text so it is tested on real lines of each format.

Formats (real lines):
  /etc/nv_tegra_release  "# R36 (release), REVISION: 4.7, GCID: 42132812, BOARD: generic, EABI: aarch64, DATE: ..."
  tegrastats (Orin Nano) "... RAM 2639/7620MB (lfb 9x4MB) SWAP 0/3810MB (cached 0MB) CPU [1%@729,...] GR3D_FREQ 0%
                          cpu@44.156C ... tj@45.968C soc1@45.312C VDD_IN 5263mW/5263mW VDD_CPU_GPU_CV 717mW/717mW ..."
  tegrastats (TX2, L4T 32) "... VDD_IN 3140/3208 VDD_SYS_CPU 536/590 ..." (milliwatts, no unit)
  jetson_clocks --show   "cpu0: Online=1 Governor=schedutil MinFreq=729600 MaxFreq=2201600 CurrentFreq=..."
                         "GPU MinFreq=306000000 MaxFreq=1300500000 CurrentFreq=306000000", "NV Power Mode: MAXN"
"""

from __future__ import annotations

import platform
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

DEVICE_TREE_MODEL = Path("/proc/device-tree/model")
NV_TEGRA_RELEASE = Path("/etc/nv_tegra_release")


def parse_nv_tegra_release(text: str) -> dict | None:
    """{'release': 'R36.4.7', 'major': 36, 'revision': '4.7', 'board': 'generic', ...} from the file's first line."""
    line = next((ln for ln in text.splitlines() if ln.strip()), "")
    m = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", line)
    if not m:
        return None
    out = {"release": f"R{m.group(1)}.{m.group(2)}", "major": int(m.group(1)), "revision": m.group(2)}
    for key in ("GCID", "BOARD", "EABI", "DATE"):
        k = re.search(rf"{key}:\s*([^,]+)", line)
        if k:
            out[key.lower()] = k.group(1).strip()
    return out


_RAIL = re.compile(r"\b([A-Z][A-Z0-9_]*)\s+(\d+)(?:mW)?/(\d+)(?:mW)?\b")
_TEMP = re.compile(r"\b([A-Za-z][A-Za-z0-9_]*)@(-?[\d.]+)C\b")


def parse_tegrastats(line: str) -> dict:
    """One tegrastats line -> {'ram_mb': (used, total), 'gr3d_pct': int, 'rails_mw': {rail: instant mW},
    'power_mw': total input power (VDD_IN / POM_5V_IN, else the sum of the rails), 'power_rail': which,
    'temps_c': {sensor: C} (sensors reading -256, i.e. absent, left out)}."""
    out: dict = {}
    m = re.search(r"RAM (\d+)/(\d+)MB", line)
    if m:
        out["ram_mb"] = (int(m.group(1)), int(m.group(2)))
    m = re.search(r"GR3D_FREQ (\d+)%", line)
    if m:
        out["gr3d_pct"] = int(m.group(1))
    rails = {k: int(a) for k, a, _ in _RAIL.findall(line) if k not in ("RAM", "SWAP")}
    out["rails_mw"] = rails
    for total in ("VDD_IN", "POM_5V_IN"):
        if total in rails:
            out["power_mw"], out["power_rail"] = rails[total], total
            break
    else:
        if rails:
            out["power_mw"], out["power_rail"] = sum(rails.values()), "sum of " + "+".join(rails)
    out["temps_c"] = {k: float(v) for k, v in _TEMP.findall(line) if float(v) > -200}
    return out


def summarize_tegrastats(lines: list[str]) -> dict:
    """Mean/max power and max temperatures over the samples taken during the timed runs."""
    samples = [parse_tegrastats(ln) for ln in lines if ln.strip()]
    samples = [s for s in samples if "power_mw" in s or s.get("temps_c")]
    if not samples:
        return {"samples": 0}
    p = [s["power_mw"] for s in samples if "power_mw" in s]
    temps: dict[str, float] = {}
    for s in samples:
        for k, v in s["temps_c"].items():
            temps[k] = max(v, temps.get(k, v))
    out = {"samples": len(samples), "temp_max_c": temps}
    if p:
        out.update({"power_mean_mw": sum(p) / len(p), "power_max_mw": max(p),
                    "power_rail": next(s["power_rail"] for s in samples if "power_rail" in s)})
    g = [s["gr3d_pct"] for s in samples if "gr3d_pct" in s]
    if g:
        out["gpu_load_mean_pct"] = sum(g) / len(g)
    return out


def parse_jetson_clocks(text: str) -> dict:
    """`jetson_clocks --show` -> {'locked': bool, 'gpu': {min,max,cur}, 'cpus_locked': bool, 'emc': {...},
    'nvpmodel': 'MAXN'}. Locked: the GPU's min = max = current frequency and every online CPU's min = max."""
    out: dict = {}
    g = re.search(r"GPU MinFreq=(\d+) MaxFreq=(\d+) CurrentFreq=(\d+)", text)
    if g:
        out["gpu"] = {"min": int(g.group(1)), "max": int(g.group(2)), "cur": int(g.group(3))}
    e = re.search(r"EMC MinFreq=(\d+) MaxFreq=(\d+) CurrentFreq=(\d+)(?: FreqOverride=(\d))?", text)
    if e:
        out["emc"] = {"min": int(e.group(1)), "max": int(e.group(2)), "cur": int(e.group(3)),
                      "override": None if e.group(4) is None else e.group(4) == "1"}
    cpus = re.findall(r"cpu(\d+):\s*(?:Online=(\d)\s+)?Governor=\S+ MinFreq=(\d+) MaxFreq=(\d+) "
                      r"CurrentFreq=(\d+)", text)
    on = [c for c in cpus if c[1] != "0"]
    out["cpus_locked"] = bool(on) and all(c[2] == c[3] for c in on)
    m = re.search(r"NV Power Mode:\s*(\S+)", text)
    if m:
        out["nvpmodel"] = m.group(1)
    gpu = out.get("gpu")
    out["locked"] = bool(gpu) and gpu["min"] == gpu["max"] == gpu["cur"] and out["cpus_locked"]
    return out


def parse_nvpmodel(text: str) -> dict:
    """`nvpmodel -q` -> {'mode': 'MAXN', 'id': 0}."""
    out = {}
    m = re.search(r"NV Power Mode:\s*(\S+)", text)
    if m:
        out["mode"] = m.group(1)
    ids = [ln.strip() for ln in text.splitlines() if ln.strip().isdigit()]
    if ids:
        out["id"] = int(ids[0])
    return out


def _run(cmd: list[str], timeout: float = 10) -> str | None:
    if not shutil.which(cmd[0]):
        return None
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout if r.returncode == 0 else None


def _read(p: Path) -> str | None:
    try:
        return p.read_bytes().decode(errors="replace").strip("\x00\n ")
    except OSError:
        return None


def versions() -> dict:
    out = {}
    try:
        import tensorrt

        out["tensorrt"] = tensorrt.__version__
    except ImportError:
        out["tensorrt"] = None
    cuda = None
    v = _read(Path("/usr/local/cuda/version.json"))
    if v:
        m = re.search(r'"cuda"\s*:\s*\{[^}]*"version"\s*:\s*"([\d.]+)"', v)
        cuda = m.group(1) if m else None
    if cuda is None:
        t = _run(["nvcc", "--version"]) or ""
        m = re.search(r"release ([\d.]+)", t)
        cuda = m.group(1) if m else None
    out["cuda"] = cuda
    try:
        import onnxruntime

        out["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return out


def device_state() -> dict:
    """Everything about the machine that the numbers depend on. Missing tools give None, never an error."""
    model = _read(DEVICE_TREE_MODEL)
    rel = _read(NV_TEGRA_RELEASE)
    l4t = parse_nv_tegra_release(rel) if rel else None
    clocks_txt = _run(["jetson_clocks", "--show"])
    clocks = parse_jetson_clocks(clocks_txt) if clocks_txt else None
    nvp_txt = _run(["nvpmodel", "-q"])
    nvp = parse_nvpmodel(nvp_txt) if nvp_txt else ({"mode": clocks["nvpmodel"]} if clocks and "nvpmodel" in clocks
                                                   else None)
    jetson = l4t is not None or (model or "").lower().find("jetson") >= 0
    locked = clocks["locked"] if clocks else None
    if jetson:
        comparable = bool(locked)
        why = "" if comparable else ("clocks not locked (run `sudo jetson_clocks`)" if clocks else
                                     "clock state unknown (`jetson_clocks --show` needs root)")
    else:
        comparable, why = False, "not a Jetson: latency is this machine's, not comparable with a device's"
    return {"model": model or platform.node(), "jetson": jetson, "machine": platform.machine(),
            "l4t": l4t, "nv_tegra_release": (rel or "").splitlines()[0] if rel else None, **versions(),
            "nvpmodel": nvp, "clocks": clocks, "clocks_locked": locked, "comparable": comparable,
            "not_comparable_because": why or None}


class TegraStats:
    """`tegrastats --interval MS` in the background while the timed runs go (a no-op where it is absent)."""

    def __init__(self, interval_ms: int = 100, cmd: list[str] | None = None):
        self.cmd = cmd or ["tegrastats", "--interval", str(interval_ms)]
        self.lines: list[str] = []
        self.proc = None
        self._t = None

    def __enter__(self):
        if shutil.which(self.cmd[0]):
            try:
                self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            except OSError:
                self.proc = None
        if self.proc is not None:
            self._t = threading.Thread(target=self._read, daemon=True)
            self._t.start()
        return self

    def _read(self):
        for ln in self.proc.stdout:
            self.lines.append(ln.rstrip("\n"))

    def __exit__(self, *exc):
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            if self._t is not None:
                self._t.join(timeout=2)
        return False

    def summary(self) -> dict:
        if self.proc is None:
            return {"samples": 0, "note": "tegrastats not found: no power/temperature samples"}
        return summarize_tegrastats(self.lines)


def now() -> float:
    return time.time()
