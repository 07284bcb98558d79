"""A report.json read as devices × variants × metrics: what the plots, the history and the gate share.

The host the bench ran on is one device (report['device']; its id is `<machine>-<cpus>cpu`, e.g. x86_64-2cpu, so
that a box whose CPU model string changes stays the same device). A report may also carry a 'devices' section (a
list, or a dict keyed by id) from other machines, Jetsons: each entry an id ('id' or 'name'), its state (e.g.
'clocks_locked', 'nvpmodel', 'jetpack') and optionally its own 'variants' / 'e2e_variants' rows in the bench schema.
Absent, the host is the only device."""

from __future__ import annotations

import re
from typing import Any

# metric -> better when higher (True) or lower (False); what the gate names a regression vs a gain
BETTER_HIGHER = {"map50_95": True, "map50": True, "engine_p50_speedup": True, "e2e_p50_speedup": True,
                 "e2e_over_engine": False, "params": False, "macs": False, "size_bytes": False, "fps": True,
                 "engine_p50_ms": False, "e2e_p50_ms": False}


def host_id(dev: dict) -> str:
    """A device's id: a Jetson's model as a slug (pipeline/device/sysinfo.device_state), else <machine>-<cpus>cpu."""
    if dev.get("jetson") and dev.get("model"):
        return re.sub(r"[^a-z0-9]+", "-", str(dev["model"]).lower()).strip("-")
    return f"{dev.get('machine') or 'unknown'}-{dev.get('cpus') or '?'}cpu"


def clocks_state(state: dict) -> str:
    v = state.get("clocks_locked")
    if v is None:
        return "clocks: not recorded"
    return "clocks locked" if v else "clocks NOT locked (latency is not comparable)"


def devices(rep: dict) -> list[dict]:
    """[{id, description, state, host, variants, e2e_variants}] for every device the report has results or a
    state for; the host first."""
    host_state = dict(rep.get("device") or {})
    out = [{"id": host_id(host_state), "host": True, "state": host_state,
            "description": ", ".join(str(x) for x in (host_state.get("cpu"), f"{host_state.get('cpus')} CPUs")
                                     if x),
            "variants": list(rep.get("variants") or []), "e2e_variants": list(rep.get("e2e_variants") or [])}]
    extra: Any = rep.get("devices") or []
    if isinstance(extra, dict):
        extra = [{"id": k, **(v or {})} for k, v in extra.items()]
    for d in extra:
        # an entry is either {id, <state keys>, variants} or a device report ({device: <state>, variants, ...})
        state = dict(d["device"]) if isinstance(d.get("device"), dict) else \
            {k: v for k, v in d.items() if k not in ("variants", "e2e_variants")}
        did = str(d.get("id") or d.get("name") or (host_id(state) if state.get("jetson") else None)
                  or d.get("hostname") or f"device-{len(out)}")
        entry = {"id": did, "host": False, "state": state,
                 "description": str(d.get("description") or state.get("model") or d.get("name") or did),
                 "variants": list(d.get("variants") or []), "e2e_variants": list(d.get("e2e_variants") or [])}
        if did == out[0]["id"]:  # the host described again: merge its state, keep its rows
            out[0]["state"].update(state)
            out[0]["variants"] += entry["variants"]
            out[0]["e2e_variants"] += entry["e2e_variants"]
        else:
            out.append(entry)
    return out


def all_rows(dev: dict) -> list[dict]:
    return list(dev["variants"]) + list(dev["e2e_variants"])


def row_metrics(r: dict) -> dict[str, float]:
    """Every number of one variant row worth keeping over time, flat (the history's metric names)."""
    m: dict[str, float] = {}
    for k in ("map50_95", "map50", "params", "macs", "fps", "e2e_over_engine"):
        if isinstance(r.get(k), (int, float)):
            m[k] = float(r[k])
    if isinstance((r.get("model") or {}).get("size_bytes"), (int, float)):
        m["size_bytes"] = float(r["model"]["size_bytes"])
    lat = r.get("latency_ms") or {}
    for kind, short in (("engine", "engine"), ("end_to_end", "e2e")):
        for p in ("p50", "p90", "p99"):
            v = (lat.get(kind) or {}).get(p)
            if isinstance(v, (int, float)):
                m[f"{short}_{p}_ms"] = float(v)
    vb = r.get("vs_base") or {}
    for k in ("engine_p50_speedup", "e2e_p50_speedup", "map50_95_delta", "macs_ratio", "params_ratio", "size_ratio"):
        if isinstance(vb.get(k), (int, float)) and vb.get("against", "") != r.get("name"):
            m[k] = float(vb[k])
    return m
