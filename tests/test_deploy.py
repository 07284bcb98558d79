"""Deploy to Jetson, tested for real: a bundle made from a small run, the torch-free device runtime, and
`yolo-edge deploy` over real OpenSSH to sshd instances on 127.0.0.1 (a fleet of two, plus a host that refuses).
The "device" is this machine, so deploy is given --remote-python (this venv) and --runner onnxruntime; on a Jetson
the default makes a --system-site-packages venv and installs the bundle's wheel."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, cli

from pipeline.device import sysinfo

SETS = ["--set", "data.synthetic.train=8", "--set", "data.synthetic.val=6", "--set", "prune.enabled=false",
        "--set", "quantize.enabled=false", "--set", "export.e2e.enabled=false", "--set", "bench.max_rounds=1",
        "--set", "bench.warmup=1"]
PY = sys.executable


def _one_line_error(r, *needles):
    err = r.stderr.strip()
    assert r.returncode == 2, (r.returncode, r.stdout[-1000:], r.stderr[-3000:])
    assert "Traceback" not in r.stderr
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ")
    for n in needles:
        assert n in err, (n, err)


@pytest.fixture(scope="module")
def run(tmp_path_factory, request):
    """A small run (data, load, export, engine: the strongly typed FP16 file, bench) and its bundle."""
    from conftest import BASE_CKPT

    if not BASE_CKPT.is_file():
        pytest.skip(f"{BASE_CKPT} is absent: `make base` makes it")
    d = tmp_path_factory.mktemp("deploy") / "run"
    sets = [*SETS, "--set", f"model.weights={BASE_CKPT}"]
    r = cli("run", "--run-dir", d, "--stages", "data,load,export,engine,bench", *sets)
    assert r.returncode == 0, r.stderr[-3000:]
    r = cli("stage", "bundle", "--run-dir", d, *sets)
    assert r.returncode == 0, r.stderr[-3000:]
    return d, sets


def _bundle(run_dir: Path) -> Path:
    return run_dir / "bundle" / "yolo-edge-bundle"


@pytest.mark.slow
def test_bundle_holds_the_variants_eval_set_and_wheel_under_a_verified_manifest(run):
    d, sets = run
    b = _bundle(d)
    m = json.loads((b / "manifest.json").read_text())
    rep = json.loads((d / "report.json").read_text())
    assert [v["name"] for v in m["variants"]] == [v["name"] for v in rep["variants"]] == ["base-fp32", "base-fp16"]
    for v in m["variants"]:
        src = next(x for x in rep["variants"] if x["name"] == v["name"])
        assert v["sha256"] == src["model"]["sha256"] and v["dev_box"]["map50_95"] == src["map50_95"]
        assert v["macs"] == src["macs"] and m["files"][v["file"]]["sha256"] == v["sha256"]
    assert m["wheel"].startswith("wheels/yolo_edge-") and m["wheel"] in m["files"]
    assert m["eval"]["images"] == 6 and len(list((b / "eval" / "images").iterdir())) == 6
    assert m["classes"] == rep["dataset"]["names"] and m["prepost"] == rep["prepost"]
    assert m["project"]["version"] and "git_commit" in m["project"] and len(m["recipe"]["digest"]) == 64
    assert not any(p.suffix in (".pt", ".pkl", ".pth") for p in b.rglob("*"))
    assert (d / "bundle" / "yolo-edge-bundle.tar.gz").is_file()
    # cached: unchanged inputs, nothing rebuilt (unless the source tree or its commit moved meanwhile: the wheel
    # is part of the bundle, so the key covers the source)
    before = json.loads((d / "bundle" / "record.json").read_text())["config"]
    r = cli("stage", "bundle", "--run-dir", d, *sets)
    assert r.returncode == 0, r.stderr[-2000:]
    if json.loads((d / "bundle" / "record.json").read_text())["config"] == before:
        assert "bundle: cached" in r.stderr, r.stderr[-2000:]


@pytest.mark.slow
def test_the_bundle_refuses_a_file_its_tensorrt_would_not_parse(run, tmp_path, monkeypatch):
    """Each file the bundle would carry is checked against the target TensorRT's operator table: with a hand-made
    table that lacks Conv, the first variant is refused in one line naming it, the node and the TensorRT."""
    from test_engine import table_without

    from pipeline.core.errors import UserError
    from pipeline.stages import bundle

    d, _ = run
    rep = json.loads((d / "report.json").read_text())
    m = json.loads((_bundle(d) / "manifest.json").read_text())
    assert m["tensorrt"]["target"] == "10.3" and "TensorRT 10.3's ONNX operator table" in m["tensorrt"]["checked"]
    inputs = {f"{v['name']}.model": d / v["model"]["path"] for v in rep["variants"]}
    (tmp_path / "models").mkdir()
    assert [r["name"] for r in bundle._model_rows(rep["variants"], inputs, tmp_path, "10.3")] == ["base-fp32",
                                                                                                  "base-fp16"]
    with pytest.raises(UserError, match=r"variant base-fp32: TensorRT 0\.1 would refuse it \(\d+ violation\(s\)\), "
                                        r"first: node '.*' \(Conv\): not supported in TensorRT 0\.1; the bundle "
                                        r"carries only files the device can build"):
        bundle._model_rows(rep["variants"], inputs, tmp_path, table_without(tmp_path, monkeypatch, "Conv"))


def _device(*args, blocker: bool = False, timeout: int = 300):
    """yolo-edge-device in a fresh interpreter; with blocker, torch, torchvision, ultralytics, torch_pruning, typer
    and pydantic are made unimportable first (a sys.meta_path finder that refuses them)."""
    code = ("import sys\n"
            "class Block:\n"
            "    NAMES = ('torch', 'torchvision', 'ultralytics', 'torch_pruning', 'typer', 'pydantic')\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in self.NAMES:\n"
            "            raise ImportError(f'{name} is blocked: the device runtime must not import it')\n"
            "        return None\n"
            + ("sys.meta_path.insert(0, Block())\n" if blocker else "")
            + "from pipeline.device.cli import run\n"
            "from pipeline.core.errors import UserError\n"
            "try:\n"
            f"    rc = run({[str(a) for a in args]!r})\n"
            "except UserError as e:\n"
            "    print(f'error: {e}', file=sys.stderr); sys.exit(2)\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in Block.NAMES)\n"
            "assert not bad, bad\n"
            "sys.exit(rc)\n")
    return subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, "COLUMNS": "200"})


@pytest.mark.slow
def test_device_runtime_verifies_and_benchmarks_without_torch_or_ultralytics(run, tmp_path):
    d, _ = run
    r = _device("verify", _bundle(d), blocker=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "verified" in r.stdout
    out = tmp_path / "device_report.json"
    r = _device("bench", d / "bundle" / "yolo-edge-bundle.tar.gz", "--runner", "onnxruntime", "--out", out,
                blocker=True)
    assert r.returncode == 0, r.stderr[-3000:]
    dev = json.loads(out.read_text())
    rep = json.loads((d / "report.json").read_text())
    assert dev["schema"] == rep["schema"] and dev["dataset"]["digest"] == json.loads(
        (_bundle(d) / "manifest.json").read_text())["eval"]["digest"]
    for v, ref in zip(dev["variants"], rep["variants"]):
        assert v["name"] == ref["name"] and v["map50_95"] == ref["map50_95"] and v["map50"] == ref["map50"]
        assert v["per_class_ap50_95"] == ref["per_class_ap50_95"]
        for k in ("engine", "end_to_end"):
            assert set(v["latency_ms"][k]) >= {"p50", "p90", "p99"} and v["latency_ms"][k]["n"] == 3
    assert dev["comparable"] is False and "not a Jetson" in dev["not_comparable"]
    # both variants timed together, interleaved (the bundle's bench settings: one round of 3 calls per item)
    assert dev["timing"]["method"] == "interleaved" and dev["timing"]["rounds"] == 1
    fp16 = dev["variants"][1]
    assert fp16["vs_base"]["against"] == "base-fp32" and len(fp16["vs_base"]["engine_p50_speedup_ci"]) == 2
    assert fp16["engine_timer"].startswith("perf_counter") and len(fp16["e2e_over_engine_ci"]) == 2
    assert {"model", "l4t", "tensorrt", "cuda", "nvpmodel", "clocks_locked"} <= set(dev["device"])


@pytest.mark.slow(seconds=150)
def test_the_wheel_alone_is_the_device_runtime(run, tmp_path):
    """A fresh venv (no system site packages) with nothing but the bundle's wheel and the dependencies it declares
    verifies and benchmarks the bundle: the same mAP as the dev box; no torch, ultralytics or typer came with it, and
    its `yolo-edge` says in one line that the dev-box commands need the train extra."""
    d, _ = run
    b = _bundle(d)
    wheel = b / json.loads((b / "manifest.json").read_text())["wheel"]
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    from conftest import network_env

    # pip with the session's own network settings: the offline block's closed-port proxies are not for it
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", str(wheel)], capture_output=True, text=True,
                       timeout=900, env=network_env())
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["?"])[-1]
        if any(s in r.stderr for s in ("No matching distribution", "Could not find a version", "Failed to establish",
                                       "Network is unreachable", "Temporary failure in name resolution")):
            pytest.skip(f"pip cannot reach a package index here: {last}")
        raise AssertionError(r.stderr[-3000:])
    have = subprocess.run([str(py), "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True).stdout
    names = {ln.split("==")[0].lower() for ln in have.splitlines()}
    assert {"onnxruntime", "onnx", "pycocotools", "polygraphy", "opencv-python-headless", "numpy"} <= names
    assert not names & {"torch", "ultralytics", "torch-pruning", "typer", "pydantic"}, names
    dev = venv / "bin" / "yolo-edge-device"
    r = subprocess.run([str(dev), "verify", str(b)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0 and "verified" in r.stdout, r.stderr[-3000:]
    out = tmp_path / "device_report.json"
    r = subprocess.run([str(dev), "bench", str(b), "--runner", "onnxruntime", "--out", str(out)],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((d / "report.json").read_text())
    assert [(v["name"], v["map50_95"]) for v in json.loads(out.read_text())["variants"]] == \
        [(v["name"], v["map50_95"]) for v in rep["variants"]]
    r = subprocess.run([str(venv / "bin" / "yolo-edge"), "run"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "yolo-edge[train]" in r.stderr, r.stderr


def _copy_bundle(run_dir: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "b"
    shutil.copytree(_bundle(run_dir), dest)
    return dest


@pytest.mark.slow  # its module fixture runs stages (~30 s)
@pytest.mark.parametrize("cmd", ["verify", "bench"])
@pytest.mark.parametrize("damage, needles", [
    ("flip", ["models/base-fp32.onnx", "sha256 differs"]),
    ("truncate", ["models/base-fp16.onnx", "truncated"]),
    ("extra", ["models/extra.onnx", "not listed in the manifest"]),
    ("newer", ["manifest.json", "format 99 is newer"]),
    ("missing", ["models/base-fp16.onnx", "missing from the bundle"]),
    ("variant", ["base-int8", "does not hold"]),
    ("pickle", ["models/base-fp32.onnx", "pickle"]),
])
def test_damaged_bundle_refused_in_one_line_naming_the_file(run, tmp_path, damage, needles, cmd):
    b = _copy_bundle(run[0], tmp_path)
    mpath = b / "manifest.json"
    m = json.loads(mpath.read_text())
    if damage == "flip":
        f = b / "models/base-fp32.onnx"
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 1
        f.write_bytes(bytes(data))
    elif damage == "truncate":
        f = b / "models/base-fp16.onnx"
        f.write_bytes(f.read_bytes()[:-100])
    elif damage == "extra":
        (b / "models/extra.onnx").write_bytes(b"x")
    elif damage == "newer":
        m["format"] = 99
        mpath.write_text(json.dumps(m))
    elif damage == "missing":
        (b / "models/base-fp16.onnx").unlink()
    elif damage == "variant":
        m["variants"].append({**m["variants"][0], "name": "base-int8", "file": "models/base-int8.onnx"})
        mpath.write_text(json.dumps(m))
    elif damage == "pickle":  # a pickle with a consistent manifest entry: refused all the same
        import hashlib
        import pickle

        f = b / "models/base-fp32.onnx"
        f.write_bytes(pickle.dumps({"model": [1, 2, 3]}, protocol=4))
        m["files"]["models/base-fp32.onnx"] = {"sha256": hashlib.sha256(f.read_bytes()).hexdigest(),
                                               "size": f.stat().st_size}
        mpath.write_text(json.dumps(m))
    extra = ["--runner", "onnxruntime", "--out", tmp_path / "r.json"] if cmd == "bench" else []
    r = _device(cmd, b, *extra)
    _one_line_error(r, *needles)
    assert not (tmp_path / "r.json").exists()


@pytest.mark.slow
def test_bundle_holding_a_pickle_is_refused_when_made(run, tmp_path):
    d, sets = run
    copy = tmp_path / "run"
    shutil.copytree(d, copy, ignore=shutil.ignore_patterns("bundle"))
    rp = copy / "bench" / "report.json"
    rep = json.loads(rp.read_text())
    pt = copy / "load" / "model.pt"
    import hashlib

    rep["variants"][0]["model"] = {"path": "load/model.pt", "sha256": hashlib.sha256(pt.read_bytes()).hexdigest(),
                                   "size_bytes": pt.stat().st_size}
    rp.write_text(json.dumps(rep))
    r = cli("stage", "bundle", "--run-dir", copy, *sets)
    _one_line_error(r, "model.pt", "pickle")
    assert not (copy / "bundle").exists()


# ---- parsers on real lines of each format ---------------------------------------------------------------------

ORIN_NANO = ("05-05-2025 06:05:39 RAM 2639/7620MB (lfb 9x4MB) SWAP 0/3810MB (cached 0MB) CPU [1%@729,4%@729,8%@729,"
             "4%@729,5%@729,4%@729] GR3D_FREQ 0% cpu@44.156C soc2@43.781C soc0@44.687C gpu@45.968C tj@45.968C "
             "soc1@45.312C VDD_IN 5263mW/5263mW VDD_CPU_GPU_CV 717mW/717mW VDD_SOC 1794mW/1794mW")
AGX_ORIN = ("04-11-2025 10:36:27 RAM 4321/62801MB (lfb 1759x4MB) SWAP 19/31400MB (cached 0MB) CPU [0%@729,0%@729,"
            "0%@729,0%@729,0%@729,0%@729,0%@729,0%@729,0%@729,0%@729,0%@729,0%@729] EMC_FREQ 0%@2133 "
            "GR3D_FREQ 0%@[0,0] "
            "VIC_FREQ 729 APE 174 CV0@-256C CPU@44.562C Tboard@32C SOC2@40.093C Tdiode@33C SOC0@41.093C CV1@-256C "
            "GPU@-256C tj@44.343C SOC1@41.25C CV2@-256C VDD_GPU_SOC 2340mW/2340mW VDD_CPU_CV 390mW/390mW "
            "VIN_SYS_5V0 4025mW/4025mW NC 0mW/0mW VDDQ_VDD2_1V8AO 301mW/301mW NC 0mW/0mW")
TX2 = ("RAM 2020/7852MB (lfb 1164x4MB) CPU [9%@345,21%@345,25%@345,3%@345,1%@345,1%@345] EMC_FREQ 0% GR3D_FREQ 0% "
       "PLL@42.5C MCPU@42.5C PMIC@100C Tboard@40C GPU@41C BCPU@42.5C thermal@41.9C Tdiode@41.25C VDD_SYS_GPU 153/158 "
       "VDD_SYS_SOC 536/547 VDD_4V0_WIFI 633/527 VDD_IN 3140/3208 VDD_SYS_CPU 536/590 VDD_SYS_DDR 557/601")


def test_tegrastats_parser_on_real_lines():
    a = sysinfo.parse_tegrastats(ORIN_NANO)
    assert a["ram_mb"] == (2639, 7620) and a["gr3d_pct"] == 0
    assert a["power_mw"] == 5263 and a["power_rail"] == "VDD_IN"
    assert a["rails_mw"] == {"VDD_IN": 5263, "VDD_CPU_GPU_CV": 717, "VDD_SOC": 1794}
    assert a["temps_c"]["tj"] == 45.968 and a["temps_c"]["gpu"] == 45.968 and len(a["temps_c"]) == 6
    b = sysinfo.parse_tegrastats(AGX_ORIN)  # no VDD_IN on AGX Orin: the sum of its rails; -256C sensors left out
    assert b["power_mw"] == 2340 + 390 + 4025 + 301 and b["power_rail"].startswith("sum of")
    assert "GPU" not in b["temps_c"] and b["temps_c"]["tj"] == 44.343
    c = sysinfo.parse_tegrastats(TX2)  # L4T 32: milliwatts without a unit
    assert c["power_mw"] == 3140 and c["temps_c"]["PMIC"] == 100.0
    s = sysinfo.summarize_tegrastats([ORIN_NANO, ORIN_NANO.replace("VDD_IN 5263mW", "VDD_IN 7263mW")])
    assert s["samples"] == 2 and s["power_mean_mw"] == 6263 and s["power_max_mw"] == 7263


def test_nv_tegra_release_parser_on_real_lines():
    r = sysinfo.parse_nv_tegra_release("# R36 (release), REVISION: 4.7, GCID: 42132812, BOARD: generic, EABI: "
                                       "aarch64, DATE: Thu Sep 18 22:54:44 UTC 2025\n# KERNEL_VARIANT: oot\n")
    assert r["release"] == "R36.4.7" and r["major"] == 36 and r["board"] == "generic" and r["gcid"] == "42132812"
    r = sysinfo.parse_nv_tegra_release("# R35 (release), REVISION: 3.1, GCID: 32827747, BOARD: t186ref, EABI: "
                                       "aarch64, DATE: Sun Mar 19 15:19:21 UTC 2023")
    assert r["release"] == "R35.3.1" and r["board"] == "t186ref"
    assert sysinfo.parse_nv_tegra_release("# R36 (release), REVISION: 4.0")["release"] == "R36.4.0"
    assert sysinfo.parse_nv_tegra_release("Ubuntu 22.04") is None


def test_jetson_clocks_parser_locked_and_not():
    unlocked = ("cpu0: Online=1 Governor=schedutil MinFreq=729600 MaxFreq=2201600 CurrentFreq=2201600 IdleStates: "
                "WFI=1 c7=1 \ncpu1: Online=1 Governor=schedutil MinFreq=729600 MaxFreq=2201600 CurrentFreq=2188800 "
                "IdleStates: WFI=1 c7=1 \nGPU MinFreq=306000000 MaxFreq=1300500000 CurrentFreq=306000000\n"
                "EMC MinFreq=204000000 MaxFreq=3199000000 CurrentFreq=2133000000 FreqOverride=0\n")
    c = sysinfo.parse_jetson_clocks(unlocked)
    assert c["locked"] is False and c["gpu"]["max"] == 1300500000 and c["emc"]["override"] is False
    locked = ("cpu0:  Online=1 Governor=schedutil MinFreq=1728000 MaxFreq=1728000 CurrentFreq=1728000 IdleStates: "
              "WFI=0 c7=0\nGPU MinFreq=1020000000 MaxFreq=1020000000 CurrentFreq=1020000000\n"
              "EMC MinFreq=204000000 MaxFreq=3199000000 CurrentFreq=3199000000 FreqOverride=1\n"
              "FAN Dynamic Speed Control=disabled hwmon0_pwm1=255\nNV Power Mode: MAXN_SUPER\n")
    c = sysinfo.parse_jetson_clocks(locked)
    assert c["locked"] is True and c["nvpmodel"] == "MAXN_SUPER" and c["emc"]["override"] is True
    assert sysinfo.parse_nvpmodel("NV Power Mode: MAXN\n0\n") == {"mode": "MAXN", "id": 0}


# ---- deploy over real OpenSSH ----------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Sshd:
    def __init__(self, root: Path, keys: Path):
        self.port = _free_port()
        root.mkdir(parents=True)
        hk = root / "host_ed25519"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(hk)], check=True)
        cfg = root / "sshd_config"
        cfg.write_text(f"ListenAddress 127.0.0.1\nPort {self.port}\nHostKey {hk}\n"
                       f"AuthorizedKeysFile {keys / 'authorized_keys'}\nPidFile {root / 'sshd.pid'}\n"
                       "StrictModes no\nUsePAM no\nPermitRootLogin yes\nPasswordAuthentication no\n"
                       "KbdInteractiveAuthentication no\nPubkeyAuthentication yes\nX11Forwarding no\n"
                       "PrintMotd no\nAcceptEnv LANG LC_*\nSubsystem sftp internal-sftp\n")
        self.log = root / "sshd.log"
        self.proc = subprocess.Popen([shutil.which("sshd") or "/usr/sbin/sshd", "-D", "-e", "-f", str(cfg)],
                                     stdout=subprocess.DEVNULL, stderr=open(self.log, "w"))
        deadline = time.time() + 10
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited: {self.log.read_text()[-500:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("sshd did not listen within 10 s")

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """Two sshd on 127.0.0.1 (two 'devices'), throwaway host and user keys, and the ssh options to reach them."""
    sshd = shutil.which("sshd") or ("/usr/sbin/sshd" if Path("/usr/sbin/sshd").exists() else None)
    if sshd is None or shutil.which("ssh") is None or shutil.which("ssh-keygen") is None:
        pytest.skip("OpenSSH server/client not installed (apt-get install openssh-server; .ci/run installs it)")
    root = tmp_path_factory.mktemp("ssh")
    key = root / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    (root / "authorized_keys").write_text((root / "id_ed25519.pub").read_text())
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege separation directory
    servers = []
    try:
        for n in ("a", "b"):
            servers.append(Sshd(root / f"sshd-{n}", root))
    except (RuntimeError, OSError, subprocess.CalledProcessError) as e:
        for s in servers:
            s.stop()
        pytest.skip(f"sshd cannot be started here: {e}")
    args = f"-i {key} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o IdentitiesOnly=yes " \
           f"-o LogLevel=ERROR"
    user = os.environ.get("USER") or subprocess.run(["id", "-un"], capture_output=True, text=True).stdout.strip()
    probe = subprocess.run(["ssh", *args.split(), "-p", str(servers[0].port), f"{user}@127.0.0.1", "true"],
                           capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        for s in servers:
            s.stop()
        pytest.skip(f"ssh to the test sshd fails: {probe.stderr.strip()[-300:]}")
    yield {"args": args, "user": user, "ports": [s.port for s in servers], "root": root}
    for s in servers:
        s.stop()


def _deploy(run_dir, sets, fleet, hosts, *extra, env=None):
    exe = Path(sys.executable).parent / "yolo-edge"
    args = ["deploy", "--run-dir", run_dir, *sets, *[x for h in hosts for x in ("--host", h)],
            "--runner", "onnxruntime", "--ssh-args", fleet["args"], "--remote-python", PY,
            "--remote-dir", str(fleet["root"] / "remote-{name}"), "--timeout", "60", *extra]
    return subprocess.run([str(exe), *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "COLUMNS": "200", **(env or {})})


@pytest.mark.slow
def test_deploy_to_a_fleet_merges_each_devices_report_and_reports_the_host_that_refuses(run, fleet, tmp_path):
    d, sets = run
    u, (pa, pb) = fleet["user"], fleet["ports"]
    refused = _free_port()
    before = json.loads((d / "report.json").read_text())
    hosts = [f"jetson-a={u}@127.0.0.1:{pa}", f"jetson-b={u}@127.0.0.1:{pb}", f"gone={u}@127.0.0.1:{refused}"]
    t0 = time.time()
    r = _deploy(d, sets, fleet, hosts)
    took = time.time() - t0
    assert r.returncode == 2, (r.stdout[-2000:], r.stderr[-3000:])
    errs = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errs) == 1 and "failed on 1 of 3 host(s): gone (unreachable: " in errs[0], errs
    assert "refused" in errs[0].lower() and "jetson-a" not in errs[0] and "were merged" in errs[0], errs
    rep = json.loads((d / "report.json").read_text())
    assert set(rep["devices"]) == {"jetson-a", "jetson-b"}
    assert [v["name"] for v in rep["variants"]] == [v["name"] for v in before["variants"]]
    for name in ("jetson-a", "jetson-b"):
        dev = rep["devices"][name]
        assert dev["device"]["runner"] == "onnxruntime" and dev["comparable"] is False
        assert [v["name"] for v in dev["variants"]] == ["base-fp32", "base-fp16"]
        for v, ref in zip(dev["variants"], before["variants"]):
            assert v["map50_95"] == ref["map50_95"] and v["map50"] == ref["map50"] and v["map_equals_dev_box"]
            # latency measured on the device side (its own timing block), not copied from the dev box
            assert v["latency_ms"]["engine"]["n"] == 3 and v["latency_ms"] != ref["latency_ms"]
        assert (d / "devices" / name / "device_report.json").is_file()
    assert "## Devices" in (d / "report.md").read_text()
    print(f"fleet deploy (2 devices + 1 refused) took {took:.1f}s")
    # again, to one device: the bundle is already there (by digest), so it is not copied
    r = _deploy(d, sets, fleet, [f"jetson-a={u}@127.0.0.1:{pa}"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "skipped: copy" in r.stderr, r.stderr[-2000:]
    rep2 = json.loads((d / "report.json").read_text())
    assert set(rep2["devices"]) == {"jetson-a", "jetson-b"}
    assert rep2["devices"]["jetson-a"]["skipped"] == ["copy"]


@pytest.mark.slow  # its module fixture runs stages (~30 s)
def test_deploy_to_an_unreachable_host_fails_in_one_line_and_leaves_the_report_alone(run, fleet):
    d, sets = run
    before = (d / "report.json").read_bytes()
    host = f"{fleet['user']}@127.0.0.1:{_free_port()}"
    r = _deploy(d, sets, fleet, [host])
    assert r.returncode == 2
    errs = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errs) == 1 and f"{host.split('@')[1]} (unreachable: " in errs[0], r.stderr[-2000:]
    assert "report.json unchanged" in errs[0] and "Traceback" not in r.stderr
    assert (d / "report.json").read_bytes() == before


@pytest.mark.slow
def test_deploy_copies_with_scp_where_rsync_is_not_used(run, fleet):
    d, sets = run
    r = _deploy(d, sets, fleet, [f"scp-device={fleet['user']}@127.0.0.1:{fleet['ports'][1]}"],
                env={"YOLO_EDGE_DEPLOY_COPY": "scp"})
    assert r.returncode == 0, r.stderr[-3000:]
    dev = json.loads((d / "report.json").read_text())["devices"]["scp-device"]
    assert dev["steps_s"]["copy_tool"] == "scp" and dev["skipped"] == []
    ref = json.loads((d / "report.json").read_text())["variants"]
    assert [v["map50_95"] for v in dev["variants"]] == [v["map50_95"] for v in ref]


def test_a_path_that_is_no_bundle_is_named_as_such(tmp_path):
    """The device CLI's bundle argument: a plain file is not a bundle, a missing path is no such bundle."""
    from pipeline.core.errors import UserError
    from pipeline.device.manifest import resolve

    f = tmp_path / "notes.md"
    f.write_text("x")
    with pytest.raises(UserError, match=r"not a bundle: a bundle is a directory or a \.tar\.gz") as e:
        resolve(f)
    assert str(f) in str(e.value)
    with pytest.raises(UserError, match="no such bundle"):
        resolve(tmp_path / "absent")
