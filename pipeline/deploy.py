"""`yolo-edge deploy`: the bundle to one Jetson or a fleet over plain OpenSSH, benchmarked there, merged back.

Per host (hosts run in parallel; one failing is reported for that host and the others finish):
  1. ssh: make the remote directory, see whether the bundle (by its manifest digest) is already there;
  2. copy it when it is not: rsync where both ends have it, else scp -r (YOLO_EDGE_DEPLOY_COPY=scp forces scp), into
     a fresh partial directory renamed into place (a copy cut off never looks complete);
  3. install: a venv on the device that sees JetPack's TensorRT (`python3 -m venv --system-site-packages`) and the
     bundle's wheel with its own dependencies (the device runtime: no torch, no ultralytics; those are the `train`
     extra); skipped when that venv already holds this wheel. `--remote-python PATH`
     uses an interpreter that already has yolo-edge instead (the tests: the "device" is this machine);
  4. `python -m pipeline.device.cli bench` (engines cached on the device), fetch device_report.json;
then every successful host's report is merged into runs/<run>/report.json under "devices" in one atomic write (and
kept as runs/<run>/devices/<name>/device_report.json). A host is `[name=]user@host[:port]`; ssh reads the user's
~/.ssh/config and agent as usual; `--ssh-args` adds options (identity, host-key policy, jump hosts).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.core.errors import UserError
from pipeline.core.store import atomic_path, write_json
from pipeline.device import manifest as mf

SSH_BASE = ["-o", "BatchMode=yes", "-o", "ConnectTimeout=15", "-o", "ServerAliveInterval=15"]


@dataclass
class Host:
    spec: str
    target: str  # user@host (what ssh is given)
    port: int | None
    name: str  # the device's name in the report

    @classmethod
    def parse(cls, spec: str) -> Host:
        name, _, rest = spec.rpartition("=") if "=" in spec else ("", "", spec)
        target, port = rest, None
        if rest.count(":") == 1:
            target, p = rest.split(":")
            if not p.isdigit():
                raise UserError(f"--host {spec}: the port after ':' must be a number")
            port = int(p)
        if not target or target.startswith("-"):
            raise UserError(f"--host {spec}: expected [name=]user@host[:port]")
        if not name:
            name = target.split("@")[-1] + (f":{port}" if port else "")
        return cls(spec, target, port, name)


@dataclass
class Outcome:
    host: Host
    ok: bool = False
    error: str = ""
    report: dict | None = None
    skipped: list[str] = field(default_factory=list)
    steps: dict = field(default_factory=dict)


class StepError(Exception):
    def __init__(self, step: str, msg: str):
        super().__init__(f"{step}: {msg}")


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "(no output)"


class Remote:
    def __init__(self, host: Host, ssh_args: list[str], timeout: float):
        self.host, self.ssh_args, self.timeout = host, ssh_args, timeout

    def ssh_cmd(self) -> list[str]:
        return ["ssh", *SSH_BASE, *self.ssh_args, *(["-p", str(self.host.port)] if self.host.port else [])]

    def run(self, step: str, script: str, timeout: float | None = None) -> str:
        cmd = [*self.ssh_cmd(), self.host.target, script]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout or self.timeout,
                               stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise StepError(step, f"timed out after {timeout or self.timeout:.0f}s") from None
        if r.returncode == 255 and step == "connect":
            raise StepError("unreachable", _last_line(r.stderr))
        if r.returncode != 0:
            raise StepError(step, _last_line(r.stderr or r.stdout))
        return r.stdout

    def copy_dir(self, local: Path, remote: str, rsync: bool) -> None:
        port = ["-p", str(self.host.port)] if self.host.port else []
        if rsync:
            e = shlex.join(["ssh", *SSH_BASE, *self.ssh_args, *port])
            cmd = ["rsync", "-a", "--partial", "-e", e, f"{local}/", f"{self.host.target}:{remote}/"]
        else:
            cmd = ["scp", "-q", "-r", *SSH_BASE, *self.ssh_args, *(["-P", str(self.host.port)] if self.host.port
                                                                     else []), str(local),
                   f"{self.host.target}:{remote}"]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=max(self.timeout, 1800),
                               stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise StepError("copy", "timed out") from None
        if r.returncode != 0:
            raise StepError("copy", f"{'rsync' if rsync else 'scp'}: {_last_line(r.stderr)}")


def _q(path: str) -> str:
    """A remote path for a POSIX shell: '~/x' expands to the home directory, the rest quoted."""
    if path == "~" or path.startswith("~/"):
        return '"$HOME"' + (shlex.quote(path[1:]) if len(path) > 1 else "")
    return shlex.quote(path)


@dataclass
class _Paths:
    """Where one host keeps things: <rd>/bundles/<digest>, <rd>/venv, <rd>/engines, <rd>/reports/<digest>/."""
    rd: str
    digest: str

    def __post_init__(self):
        self.bundle = f"{self.rd}/bundles/{self.digest}"
        self.partial = f"{self.rd}/bundles/{self.digest}.partial-{uuid.uuid4().hex[:8]}"
        self.report = f"{self.rd}/reports/{self.digest}/{uuid.uuid4().hex[:12]}.json"
        self.venv = f"{self.rd}/venv"


def _connect(rem: Remote, at: _Paths) -> str:
    """Make the directories; say whether the bundle is there already and whether the host has rsync."""
    return rem.run("connect", f"mkdir -p {_q(at.rd)}/bundles {_q(at.rd)}/reports/{at.digest} {_q(at.rd)}/engines && "
                              f"(test -f {_q(at.bundle)}/manifest.json && echo have-bundle || true) && "
                              f"(command -v rsync >/dev/null && echo have-rsync || true)")


def _copy(rem: Remote, bundle: Path, at: _Paths, rsync: bool) -> None:
    """The bundle into a fresh partial directory, renamed into place (a copy cut off never looks complete)."""
    rem.copy_dir(bundle, at.partial, rsync=rsync)
    rem.run("copy", f"if [ -e {_q(at.bundle)}/manifest.json ]; then rm -rf {_q(at.partial)}; "
                    f"else rm -rf {_q(at.bundle)} && mv -T {_q(at.partial)} {_q(at.bundle)}; fi")


def _install(rem: Remote, at: _Paths, m: dict, timeout: float) -> bool:
    """The bundle's wheel in the host's venv (made with JetPack's site packages visible), skipped when the venv
    holds this wheel already (by its sha256). Returns whether it was skipped."""
    venv, wheel, sha = _q(at.venv), _q(f"{at.bundle}/{m['wheel']}"), shlex.quote(m["files"][m["wheel"]]["sha256"])
    marker = _q(f"{at.venv}/.yolo-edge-wheel")
    out = rem.run("install", (
        f"if [ \"$(cat {marker} 2>/dev/null)\" = {sha} ]; then echo already-installed; else "
        f"(test -x {venv}/bin/python || python3 -m venv --system-site-packages {venv}) && "
        # this exact wheel (a rebuilt 0.1.0 too), then whatever it requires that the venv (and JetPack's site
        # packages: TensorRT, numpy) does not have yet
        f"{venv}/bin/python -m pip install -q --no-deps --force-reinstall {wheel} && "
        f"{venv}/bin/python -m pip install -q {wheel} && "
        f"echo {sha} > {marker}; fi"), timeout=max(timeout, 1800))
    return "already-installed" in out


def _bench(rem: Remote, at: _Paths, py: str, runner: str, bench_args: list[str], timeout: float) -> dict:
    """`yolo-edge-device bench` on the host (engines cached there), its device_report.json fetched and checked."""
    rem.run("bench", f"{_q(py)} -m pipeline.device.cli bench {_q(at.bundle)} --runner {shlex.quote(runner)} "
                     f"--out {_q(at.report)} --engine-cache {_q(at.rd)}/engines " + shlex.join(bench_args),
            timeout=max(timeout, 3600))
    text = rem.run("fetch", f"cat {_q(at.report)}")
    try:
        rep = json.loads(text)
    except json.JSONDecodeError:
        raise StepError("fetch", "device_report.json is not JSON") from None
    if rep.get("bundle", {}).get("digest") != at.digest:
        raise StepError("fetch", f"the device report is for bundle {rep.get('bundle', {}).get('digest')}, not "
                                 f"{at.digest}")
    return rep


def deploy_one(host: Host, bundle: Path, m: dict, digest: str, *, ssh_args: list[str], remote_dir: str,
               remote_python: str | None, runner: str, timeout: float, bench_args: list[str]) -> Outcome:
    o = Outcome(host)
    rem = Remote(host, ssh_args, timeout)
    at = _Paths(remote_dir.format(name=host.name.replace(":", "_").replace("/", "_")), digest)
    t0 = time.time()
    try:
        probe = _connect(rem, at)
        o.steps["connect_s"] = time.time() - t0
        if "have-bundle" in probe:
            o.skipped.append("copy")
        else:
            t = time.time()
            rsync = ("have-rsync" in probe and shutil.which("rsync") is not None
                     and os.environ.get("YOLO_EDGE_DEPLOY_COPY") != "scp")
            _copy(rem, bundle, at, rsync)
            o.steps["copy_tool"] = "rsync" if rsync else "scp"
            o.steps["copy_s"] = time.time() - t
        py = remote_python
        if py is None:
            t = time.time()
            if _install(rem, at, m, timeout):
                o.skipped.append("install")
            o.steps["install_s"] = time.time() - t
            py = f"{at.venv}/bin/python"
        t = time.time()
        o.report, o.ok = _bench(rem, at, py, runner, bench_args, timeout), True
        o.steps["bench_s"] = time.time() - t
    except StepError as e:
        o.error = str(e)
    o.steps["total_s"] = time.time() - t0
    return o


def merge(report_path: Path, outcomes: list[Outcome]) -> dict:
    """Every successful host's report into report.json's "devices" section, one atomic write."""
    rep = json.loads(report_path.read_text())
    dev_rows = {v["name"]: v for v in rep.get("variants", [])}
    devices = dict(rep.get("devices") or {})
    for o in outcomes:
        if not o.ok:
            continue
        d = o.report
        for v in d["variants"]:
            src = dev_rows.get(v["name"])
            v["dev_box_map50_95"] = src["map50_95"] if src else None
            v["map_equals_dev_box"] = bool(src) and v["map50_95"] == src["map50_95"]
        devices[o.host.name] = {"host": o.host.target + (f":{o.host.port}" if o.host.port else ""),
                                "device": d["device"], "comparable": d["comparable"],
                                **({"not_comparable": d["not_comparable"]} if not d["comparable"] else {}),
                                "bundle": d["bundle"], "bench": d["bench"], "dataset": d["dataset"],
                                "deployed": time.time(), "skipped": o.skipped, "steps_s": o.steps,
                                "variants": d["variants"]}
        write_json(report_path.parent / "devices" / o.host.name.replace("/", "_") / "device_report.json", d)
    rep["devices"] = devices
    write_json(report_path, rep)
    return rep


def preflight(ctx, hosts: list[str]) -> list[Host]:
    """The hosts parsed and everything deploy needs checked before any work (or the run directory's lock): one line
    naming what is missing."""
    if not hosts:
        raise UserError("no --host given (make deploy HOSTS='user@jetson ...')")
    parsed = [Host.parse(h) for h in hosts]
    names = [h.name for h in parsed]
    if len(set(names)) != len(names):
        raise UserError(f"two hosts share the name {next(n for n in names if names.count(n) > 1)}: give "
                        f"name=user@host")
    report_path = ctx.run_dir / "report.json"
    if not report_path.is_file():
        raise UserError("no report.json: run the pipeline (make pipeline) first", report_path)
    for tool in ("ssh", "scp"):
        if shutil.which(tool) is None:
            raise UserError(f"'{tool}' is not on PATH: deploy uses plain OpenSSH")
    return parsed


def deploy(ctx, parsed: list[Host], *, ssh_args: str = "", remote_dir: str = "yolo-edge",
           remote_python: str | None = None, runner: str = "tensorrt", timeout: float = 120,
           bench_args: list[str] | None = None, log=print) -> tuple[dict | None, list[Outcome]]:
    """Bundle (the stage: cached when unchanged), verify it here, deploy to every host in parallel (`preflight`'s
    hosts), merge."""
    from pipeline.report.markdown import render_devices, render_markdown
    from pipeline.stages import bundle as bundle_stage

    names, report_path = [h.name for h in parsed], ctx.run_dir / "report.json"
    bundle_stage.run(ctx)
    bundle = ctx.output("bundle", "bundle")
    m = mf.verify(bundle)
    digest = mf.digest(bundle)
    args = shlex.split(ssh_args)
    log(f"deploy: bundle {digest[:12]} ({', '.join(v['name'] for v in m['variants'])}) to {', '.join(names)}")
    with ThreadPoolExecutor(max_workers=min(16, len(parsed))) as ex:
        futs = [ex.submit(deploy_one, h, bundle, m, digest, ssh_args=args, remote_dir=remote_dir,
                          remote_python=remote_python, runner=runner, timeout=timeout, bench_args=bench_args or [])
                for h in parsed]
        outcomes = [f.result() for f in futs]
    for o in outcomes:
        if o.ok:
            log(f"  {o.host.name}: ok in {o.steps['total_s']:.1f}s"
                + (f" (skipped: {', '.join(o.skipped)}: already on the device)" if o.skipped else "")
                + ("" if o.report["comparable"] else f"; not comparable: {o.report.get('not_comparable')}"))
    rep = None
    if any(o.ok for o in outcomes):
        rep = merge(report_path, outcomes)
        with atomic_path(ctx.run_dir / "report.md") as tmp:
            tmp.write_text(render_markdown(rep) + render_devices(rep))
        from pipeline.report.render import render_run

        render_run(ctx.run_dir)  # the trade-off plot and report.html with the devices' points
    return rep, outcomes
