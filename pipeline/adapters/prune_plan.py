"""Where to prune: per-group sensitivity (accuracy) and per-group latency (measured on the target runner), turned
into the non-uniform per-group ratios that `pruning.prune` searches to a MACs target.

A *group* is one Torch-Pruning dependency group (channels that must go together), named by its root conv.
- Sensitivity: each group is pruned alone at one ratio and the model's mAP50-95 is measured on held-out images;
  the drop is that group's sensitivity (a table and a plot are saved).
- Latency: the unpruned (rewritten) model is exported to ONNX and profiled with ONNX Runtime; the time of every
  ultralytics Conv (conv + activation) is attributed to the groups that prune its output or input channels. A
  second profile, of the uniformly pruned model at the same MACs target, gives each conv's elasticity (the share
  of its time that really goes when its MACs go: small convs on low-resolution maps are mostly overhead), so a
  group's "buy" is the measured milliseconds that pruning it removes on this runner. The final candidate itself
  is then timed against the uniform one, side by side.
- Weights: `sensitivity` prunes more where the drop is small: w = d̄ / (d + d̄); `latency` prunes more where
  the measured time bought per point of accuracy is large: w = (t / t̄) · d̄ / (d + d̄). A single scale α then
  sets ratio_g = min(cap, α·w_g) and is bisected to the MACs target.
"""

from __future__ import annotations

import collections
import copy
import json
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from pipeline.adapters import pruning as yp
from pipeline.core.console import task


@dataclass
class Group:
    root: str  # module name of the root conv (the key of Torch-Pruning's pruning_ratio_dict)
    channels: int
    out_convs: list[str]
    in_convs: list[str]


def groups(prepared: nn.Module, imgsz: int, fam) -> list[Group]:
    """Every prunable dependency group of a prepared (rewritten) model, as MetaPruner would enumerate them."""
    dg = yp.dependency_graph(prepared, imgsz, fam)
    out = []
    for g in yp.prunable_groups(dg, prepared, fam):
        root = g[0].dep.target.module
        outs, ins = [], []
        for dep, _ in g:
            mod = dep.target.module
            if isinstance(mod, nn.Conv2d):
                name = dg._module2name[mod]
                (outs if dg.is_out_channel_pruning_fn(dep.handler) else ins).append(name)
        out.append(Group(dg._module2name[root], int(dg.get_out_channels(root)), sorted(set(outs)),
                         sorted(set(ins) - set(outs))))
    return out


def sensitivity(prepared: nn.Module, imgsz: int, spec: yp.PruneSpec, grps: list[Group], evaluate: Callable,
                ratio: float, fam, log=print, grads_fn=None) -> dict:
    """mAP50-95 of the model with each group alone pruned at `ratio` (round_to honoured); `grads_fn` fills the
    gradients Taylor importance ranks by.

    One pruner picks every group's channels (each group its own ranking scope, as when it is pruned alone; nothing
    is pruned), and each group is measured on one working copy with the BatchNorm weight and bias of its channels
    at zero: every channel a group removes ends in a BN, so it then carries exactly zero downstream, as if removed
    (tests/test_prune_plan.py compares both), without a model copy and a dependency graph per group."""
    base_map = evaluate(prepared)
    work = copy.deepcopy(prepared).eval()
    names = {id(m): n for n, m in work.named_modules()}
    picked = {}
    pruner = yp._pruner(work, imgsz, spec, 0.0, fam, grads_fn, ratio_dict={g.root: ratio for g in grps})
    for group in pruner.step(interactive=True):
        picked[names[id(group[0].dep.target.module)]] = (len(group[0].idxs), yp.group_bn_channels(group))
    rows = []
    with task(f"sensitivity scan at ratio {ratio}: groups", len(grps)) as prog:
        for g in grps:
            n, zero = picked.get(g.root, (0, []))  # absent: round_to leaves this group whole at this ratio
            v = base_map
            if n:
                saved = [(bn, bn.weight.detach().clone(), bn.bias.detach().clone()) for bn, _ in zero]
                with torch.no_grad():
                    for bn, idx in zero:
                        bn.weight[idx] = 0.0
                        bn.bias[idx] = 0.0
                    v = evaluate(work)
                    for bn, w, b in saved:
                        bn.weight.copy_(w)
                        bn.bias.copy_(b)
            rows.append({"group": g.root, "channels": g.channels, "pruned_channels": n, "map50_95": v,
                         "drop": base_map - v})
            prog.advance(note=f"{g.root}: {v:.4f}")
    log(f"  sensitivity scan: {len(rows)} groups, base mAP50-95 {base_map:.4f}, "
        f"largest drop {max(r['drop'] for r in rows):.4f} ({max(rows, key=lambda r: r['drop'])['group']})")
    return {"ratio": ratio, "base_map50_95": base_map, "groups": rows}


def _ort_session(model: nn.Module, imgsz: int, path: Path, threads: int, fam, profile_prefix: str | None = None):
    """An ONNX Runtime CPU session over a static (1, 3, imgsz, imgsz) export of `model`'s deployed form (legacy
    exporter)."""
    import onnxruntime as ort

    m = copy.deepcopy(fam.deploy_form(model)).eval()
    for p in m.parameters():
        p.requires_grad_(False)
    torch.onnx.export(m, torch.zeros(1, 3, imgsz, imgsz), str(path), opset_version=17, dynamo=False,
                      input_names=["images"])
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def onnx_node_times(model: nn.Module, imgsz: int, fam, threads: int = 2, runs: int = 30) -> dict[str, float]:
    """Mean milliseconds per ONNX Runtime node (CPU), profiled on an ONNX export of `model`'s deployed form."""

    with tempfile.TemporaryDirectory(prefix="yolo-edge-lat-") as td:
        sess = _ort_session(model, imgsz, Path(td) / "m.onnx", threads, fam, profile_prefix=str(Path(td) / "prof"))
        x = torch.rand(1, 3, imgsz, imgsz).numpy()
        for _ in range(runs):
            sess.run(None, {"images": x})
        events = json.loads(Path(sess.end_profiling()).read_text())
    agg = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            agg[e["name"][: -len("_kernel_time")]] += e["dur"] / 1000.0
    return {k: v / runs for k, v in agg.items()}


def _scope_times(node_times: dict[str, float]) -> dict[str, float]:
    """Node times summed per ultralytics Conv wrapper. Torch's ONNX scopes name a container's child by its
    path under the container ('/model.23/cv2.0/cv2.0.0/conv/Conv' is module 'model.23.cv2.0.0.conv'), so a
    component that extends the previous one replaces it."""
    out = collections.Counter()
    for node, ms in node_times.items():
        parts = node.strip("/").split("/")
        cut = next((i for i, c in enumerate(parts) if c in ("conv", "act", "bn")), len(parts) - 1)
        mod: list[str] = []
        for c in parts[:cut]:
            if mod and c.startswith(mod[-1] + "."):
                mod[-1] = c
            else:
                mod.append(c)
        if mod:
            out[".".join(mod)] += ms
    return out


def conv_elasticity(base: nn.Module, pruned: nn.Module, base_times: dict[str, float],
                    pruned_times: dict[str, float]) -> dict[str, float]:
    """How much of each conv's measured time goes when its MACs go, from two profiles on the target runner (the
    unpruned model and a uniformly pruned one): e = (1 - t'/t) / (1 - f), f = the conv's kept MAC fraction.
    1 means time falls in proportion to MACs; a small conv on a low-resolution map is mostly fixed overhead
    (e near 0), which a linear MACs-to-time estimate would overrate. Convs that kept all channels get 1."""
    bt, pt = _scope_times(base_times), _scope_times(pruned_times)
    pconv = dict(pruned.named_modules())
    out = {}
    for name, m in base.named_modules():
        if not isinstance(m, nn.Conv2d) or name not in pconv:
            continue
        q = pconv[name]
        f = (q.in_channels * q.out_channels / q.groups) / (m.in_channels * m.out_channels / m.groups)
        scope = name.rsplit(".", 1)[0]
        t, t2 = bt.get(scope), pt.get(scope)
        if not t or t2 is None or f > 0.95:
            out[name] = 1.0
            continue
        out[name] = float(min(max((1 - t2 / t) / (1 - f), 0.0), 1.5))
    return out


def group_latency(grps: list[Group], node_times: dict[str, float],
                  elasticity: dict[str, float] | None = None) -> dict[str, float]:
    """Measured ms each group's convs take (out- and in-pruned convs; a conv counted once per group), each
    scaled by its measured elasticity when given: the ms that pruning the group would really buy."""
    scope = _scope_times(node_times)
    res = {}
    for g in grps:
        convs = set(g.out_convs) | set(g.in_convs)
        res[g.root] = float(sum(scope.get(c.rsplit(".", 1)[0], 0.0) * (elasticity or {}).get(c, 1.0)
                                for c in convs))
    return res


def weights(mode: str, sens: dict, lat: dict[str, float] | None = None) -> dict[str, float]:
    drops = {r["group"]: max(r["drop"], 0.0) for r in sens["groups"]}
    dbar = sum(drops.values()) / max(len(drops), 1) + 1e-6
    w = {g: dbar / (d + dbar) for g, d in drops.items()}
    if mode == "latency":
        if not lat:
            raise ValueError("latency mode needs measured group latencies")
        tbar = sum(lat.values()) / max(len(lat), 1) + 1e-9
        w = {g: v * lat.get(g, 0.0) / tbar for g, v in w.items()}
    return w


def save_table_and_plot(sens: dict, lat: dict[str, float] | None, ratios: dict[str, float] | None, out: Path) -> None:
    rows = []
    for r in sens["groups"]:
        rows.append({**r, "latency_ms": (lat or {}).get(r["group"]), "ratio": (ratios or {}).get(r["group"])})
    (out / "sensitivity.json").write_text(json.dumps({**sens, "groups": rows}, indent=1))
    with open(out / "sensitivity.csv", "w") as f:
        f.write("group,channels,pruned_channels,map50_95,drop,latency_ms,chosen_ratio\n")
        for r in rows:
            f.write(f"{r['group']},{r['channels']},{r['pruned_channels']},{r['map50_95']:.5f},{r['drop']:.5f},"
                    f"{'' if r['latency_ms'] is None else round(r['latency_ms'], 4)},"
                    f"{'' if r['ratio'] is None else round(r['ratio'], 4)}\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(rows)
    fig, ax = plt.subplots(figsize=(max(8, n * 0.18), 4.5))
    ax.bar(range(n), [r["drop"] * 100 for r in rows], color="tab:red", label="mAP50-95 drop (points)")
    ax.set_xticks(range(n), [r["group"].removeprefix("model.").removesuffix(".conv") for r in rows], rotation=90,
                  fontsize=6)
    ax.set_ylabel(f"mAP50-95 drop, group pruned alone at {sens['ratio']} (points)")
    if ratios:
        ax2 = ax.twinx()
        ax2.plot(range(n), [ratios.get(r["group"], 0.0) for r in rows], "o", color="tab:blue", ms=3,
                 label="chosen ratio")
        ax2.set_ylabel("chosen pruning ratio")
        ax2.set_ylim(0, 1)
    ax.set_title("Per-group pruning sensitivity")
    fig.tight_layout()
    fig.savefig(out / "sensitivity.png", dpi=110)
    plt.close(fig)


def as_dicts(grps: list[Group]) -> list[dict]:
    return [asdict(g) for g in grps]


class Evaluator:
    """mAP50-95 of an in-memory model (PyTorch eager, in batches) on a fixed set of held-out images: letterboxed
    once, post-processed and scored as bench scores a runner (eval.measure.detections, pycocotools), against the
    dataset's own ground truth for them."""

    def __init__(self, images, dataset, spec, fam):
        import cv2

        from pipeline.eval.detect import letterbox

        self.spec, self.fam = spec, fam
        self.cat_ids = [dataset.cat_id(i) for i in range(dataset.nc)]
        self.items = []
        for im in images:
            img = cv2.imread(str(im.path))
            x, undo = letterbox(img, spec)
            self.items.append((im.id, x, undo, img.shape[:2]))
        self.gt = dataset.coco_dict_of(images)

    def __call__(self, model: nn.Module, batch: int = 16) -> float:
        import numpy as np

        from pipeline.eval.coco import coco_eval
        from pipeline.eval.measure import detections

        model = self.fam.deploy_form(model).eval()
        dets = []
        for i in range(0, len(self.items), batch):
            chunk = self.items[i:i + batch]
            with torch.no_grad():  # not inference_mode: Detect caches anchors that a later traced forward reuses
                out = model(torch.from_numpy(np.concatenate([x for _, x, _, _ in chunk])))
            out = (out[0] if isinstance(out, (tuple, list)) else out).numpy()
            for (iid, _, undo, shape), o in zip(chunk, out):
                dets += detections(o[None], undo, shape, iid, self.cat_ids, self.spec)
        return coco_eval(self.gt, dets)["map50_95"]


def measure_latency(models: dict[str, nn.Module], imgsz: int, fam, threads: int = 2, rounds: int = 7,
                    iters: int = 10) -> dict[str, float]:
    """Median ONNX Runtime CPU latency (ms) of each model, exported to ONNX and timed in interleaved rounds so
    that load drift on the machine hits every model alike."""
    import time

    import numpy as np

    sessions = {}
    with tempfile.TemporaryDirectory(prefix="yolo-edge-lat-") as td:
        for name, model in models.items():
            sessions[name] = _ort_session(model, imgsz, Path(td) / f"{len(sessions)}.onnx", threads, fam)
    x = np.random.default_rng(0).random((1, 3, imgsz, imgsz), dtype=np.float32)
    samples: dict[str, list[float]] = {n: [] for n in sessions}
    for s in sessions.values():
        for _ in range(3):
            s.run(None, {"images": x})
    for _ in range(rounds):
        for n, s in sessions.items():
            t0 = time.perf_counter()
            for _ in range(iters):
                s.run(None, {"images": x})
            samples[n].append((time.perf_counter() - t0) * 1e3 / iters)
    return {n: float(np.median(v)) for n, v in samples.items()}
