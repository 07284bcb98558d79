"""Structured channel pruning of YOLOv8, YOLO11 and YOLO26 with Torch-Pruning's dependency graph (DepGraph).

Plan first, change second: the model is rewritten exactly (its family's `prepare`: blocks.py), Detect's final
box/class convs and the DFL are protected (`protected_layers`), the C2PSA/PSA attention is a leaf with its own pruner
(its residual in/out width shrinks with the stream around it; its heads are kept whole), the graph is traced through
every head branch (`trace`), and Torch-Pruning's MetaPruner proposes and applies groups. A MACs target (counted on
the family's deployed form) is reached by bisection over the channel ratio, `round_to` honoured throughout. Every
function takes the model's family (pipeline/adapters/family.py) beside the model.
"""

from __future__ import annotations

import contextlib
import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch_pruning as tp
from torch import nn
from ultralytics.nn.tasks import DetectionModel

from pipeline.adapters.blocks import DecoupledAttention
from pipeline.core.errors import UnreachableTarget, UserError

SEARCH_MAX_RATIO = 0.7
IMPORTANCE = ("l1", "l2", "taylor", "bn_scale", "lamp")


_TENSORS_REGISTERED = [0]  # parameters and buffers (re)assigned on any module inside fast_index_mapping blocks
_PATCH = {"depth": 0, "undo": None, "memo": True}


def _count_registration(module, name, value):
    _TENSORS_REGISTERED[0] += 1


def _memoized(update):
    """Torch-Pruning (1.6) recomputes every concat/split/reshape index mapping of the whole graph on each
    `get_pruning_group` call: ~140 calls per MetaPruner pass on YOLO11, ~2/3 of its time, though the channels only
    change between the pass's group prunes. This recomputes them only when a parameter or buffer was assigned
    anywhere since the last computation for that graph (every group prune assigns some; the mappings are a function
    of the shapes, so the result is the same: tests/test_prune.py checks histories with and without it)."""

    def update_index_mapping(graph):
        key = _TENSORS_REGISTERED[0]
        if getattr(graph, "_yolo_edge_index_state", None) != key:
            update(graph)
            graph._yolo_edge_index_state = key

    update_index_mapping.unmemoized = update
    return update_index_mapping


def _install_memo():
    """Swap in the memo and the two process-wide torch hooks that count tensor assignments (Torch-Pruning replaces a
    pruned layer's tensors by assignment, `layer.weight = Parameter(...)`, which goes through them; nothing it does
    changes a shape in place). Returns the function that takes both out again."""
    im = tp.dependency.index_mapping
    plain = im.update_index_mapping
    _TENSORS_REGISTERED[0] += 1  # shapes may have changed since the last block: every graph refreshes once
    hooks = [torch.nn.modules.module.register_module_parameter_registration_hook(_count_registration),
             torch.nn.modules.module.register_module_buffer_registration_hook(_count_registration)]
    im.update_index_mapping = _memoized(plain)

    def undo():
        im.update_index_mapping = plain
        for h in hooks:
            h.remove()

    return undo


@contextlib.contextmanager
def fast_index_mapping():
    """Within this block (re-entrant), Torch-Pruning's index-mapping refresh is memoized and torch counts tensor
    assignments; the outermost block's exit restores both. The pruning entry points here open it themselves;
    outside it, Torch-Pruning and torch are as installed."""
    if _PATCH["depth"] == 0 and _PATCH["memo"]:
        _PATCH["undo"] = _install_memo()
    _PATCH["depth"] += 1
    try:
        yield
    finally:
        _PATCH["depth"] -= 1
        if _PATCH["depth"] == 0 and _PATCH["undo"] is not None:
            _PATCH["undo"]()
            _PATCH["undo"] = None


def memoize_index_mapping(enabled: bool = True) -> None:
    """Whether fast_index_mapping blocks opened from now on install the memo (on by default; off: Torch-Pruning's
    own refresh on every call, for comparison)."""
    _PATCH["memo"] = enabled


class AttentionPruner(tp.pruner.function.BasePruningFunc):
    """The C2PSA attention as one node: input width = qkv's input channels, output width = proj's output
    channels. Inner widths (heads, key/head dims, the positional conv) are left whole, so no head is broken."""

    TARGET_MODULES = DecoupledAttention

    def prune_out_channels(self, layer: DecoupledAttention, idxs):
        tp.prune_conv_out_channels(layer.proj.conv, idxs)
        tp.prune_batchnorm_out_channels(layer.proj.bn, idxs)
        return layer

    def prune_in_channels(self, layer: DecoupledAttention, idxs):
        tp.prune_conv_in_channels(layer.qkv.conv, idxs)
        return layer

    def get_out_channels(self, layer):
        return layer.proj.conv.out_channels

    def get_in_channels(self, layer):
        return layer.qkv.conv.in_channels




def _importance(kind: str):
    if kind == "l1":
        return tp.importance.MagnitudeImportance(p=1)
    if kind == "l2":
        return tp.importance.MagnitudeImportance(p=2)
    if kind == "taylor":
        return tp.importance.TaylorImportance()
    if kind == "bn_scale":
        return tp.importance.BNScaleImportance()
    if kind == "lamp":
        return tp.importance.LAMPImportance(p=2)
    raise UserError(f"unknown importance '{kind}' (one of {', '.join(IMPORTANCE)})")


@dataclass
class PruneSpec:
    ratio: float | None = None  # channel ratio; or
    macs_target: float | None = None  # fraction of the base MACs to keep (0.5 = 2x fewer)
    tolerance: float = 0.02  # relative, for macs_target
    at_most: bool = False  # the MACs target is a ceiling: land in [target - tolerance, target], not ± tolerance
    importance: str = "l2"
    global_pruning: bool = False
    isomorphic: bool = False
    round_to: int = 8
    max_layer_ratio: float = 0.9
    ratio_dict: dict | None = None  # module name -> ratio (fixed per-layer overrides)
    group_weights: dict | None = None  # group root name -> weight: non-uniform ratios min(cap, a*w), a searched
    # (low, high) MACs fractions a search may settle for when round_to's steps jump over its band: the trial nearest
    # the target inside them. Unset: the safe side, at or below the target (0, target); an iterative schedule's
    # waypoint needs only to lie between the model and the goal
    accept: tuple[float, float] | None = None

    @property
    def settle_range(self) -> tuple[float, float]:
        return self.accept if self.accept is not None else (0.0, self.macs_target)


_MACS_MEMO: dict = {}


def _structure(model: nn.Module) -> tuple:
    """Everything Torch-Pruning's op counter reads: every module's name, class, settings (strides, kernels,
    flags...) and tensor shapes. Two models with the same structure have the same MACs and parameters."""
    out = []
    for name, m in model.named_modules():
        plain = tuple(sorted((k, v) for k, v in vars(m).items()
                             if not k.startswith("_") and isinstance(v, (bool, int, float, str, tuple, type(None)))))
        shapes = tuple((k, tuple(t.shape)) for d in (m._parameters, m._buffers) for k, t in d.items() if t is not None)
        out.append((name, type(m).__module__, type(m).__qualname__, plain, shapes))
    return tuple(out)


def macs_params(model: nn.Module, imgsz: int, fam) -> tuple[int, int]:
    """(MACs, parameters) of the family's deployed form of `model` at a 1x3ximgszximgsz input."""
    return fam.macs_params(model, imgsz)


def count_macs_params(model: nn.Module, imgsz: int) -> tuple[int, int]:
    """(MACs, parameters) at a 1x3ximgszximgsz input, counted by Torch-Pruning (a forward pass on a copy), once per
    structure: a search meets the same pruned architecture more than once."""
    was = model.training
    model.eval()
    key = (imgsz, _structure(model))
    if key not in _MACS_MEMO:
        with torch.no_grad():
            macs, params = tp.utils.count_ops_and_params(model, torch.zeros(1, 3, imgsz, imgsz))
        if len(_MACS_MEMO) >= 256:
            _MACS_MEMO.pop(next(iter(_MACS_MEMO)))
        _MACS_MEMO[key] = int(macs), int(params)
    model.train(was)
    return _MACS_MEMO[key]


def prepare(model: DetectionModel, fam) -> DetectionModel:
    """A rewritten copy, ready for the dependency graph (the family's block rewrites)."""
    return fam.prepare(model)


def _pruner(model: nn.Module, imgsz: int, spec: PruneSpec, ratio: float, fam, grads_fn=None, ratio_dict=None):
    by_name = dict(model.named_modules())
    rdict = {by_name[n]: min(r, spec.max_layer_ratio) for n, r in (ratio_dict or spec.ratio_dict or {}).items()
             if n in by_name} or None
    p = tp.pruner.MetaPruner(
        model, torch.zeros(1, 3, imgsz, imgsz), importance=_importance(spec.importance), pruning_ratio=ratio,
        pruning_ratio_dict=rdict, global_pruning=spec.global_pruning, isomorphic=spec.isomorphic,
        max_pruning_ratio=spec.max_layer_ratio, ignored_layers=fam.protected_layers(model), round_to=spec.round_to,
        customized_pruners=fam.customized_pruners(), forward_fn=fam.trace)
    if spec.importance == "taylor":
        if grads_fn is None:
            raise UserError("taylor importance needs training batches (gradients); none were given")
        model.zero_grad()
        grads_fn(model)
    return p


def sparsity_regularizer(model: nn.Module, imgsz: int, reg: float, fam, alpha: float = 4):
    """Torch-Pruning's GroupNormPruner over the dependency groups of a rewritten model (the same protections as
    `prune`), for sparsity training: its `regularize(model)`, called between backward and the optimizer step, adds
    a group-wise L2 gradient, `reg` times 1 (most important group) to 2**alpha (least), that drives whole channel
    groups toward zero, so that the later cut removes channels that no longer carry much."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    p = tp.pruner.GroupNormPruner(
        model, torch.zeros(1, 3, imgsz, imgsz, device=device), importance=tp.importance.GroupMagnitudeImportance(p=2),
        reg=reg, alpha=alpha, ignored_layers=fam.protected_layers(model),
        customized_pruners=fam.customized_pruners(), forward_fn=fam.trace)
    model.train(was)
    return p


def dependency_graph(model: nn.Module, imgsz: int, fam) -> tp.DependencyGraph:
    """Torch-Pruning's dependency graph of a prepared (rewritten) model, the attention one node (AttentionPruner),
    traced through the family's `trace` on zeros on the model's device."""
    device = next(model.parameters()).device
    return tp.DependencyGraph().build_dependency(
        model, torch.zeros(1, 3, imgsz, imgsz, device=device), forward_fn=fam.trace,
        customized_pruners=fam.customized_pruners())


def prunable_groups(dg: tp.DependencyGraph, model: nn.Module, fam) -> list:
    """Every prunable group of `dg`, as MetaPruner enumerates them: convs as roots, the protected layers ignored."""
    ignored = [m for layer in fam.protected_layers(model) for m in layer.modules()]
    return list(dg.get_all_groups(ignored_layers=ignored, root_module_types=[nn.Conv2d]))


def fade_targets(prepared: nn.Module, history: list, imgsz: int, fam) -> dict[str, list[int]]:
    """The BatchNorm channels (module name -> indices) whose outputs a saved one-step pruning history removes, found
    through the dependency graph of the unpruned rewritten model (every channel a group cuts ends in a BN here, the
    attention's through its proj BN). With these BNs' weight and bias at zero, the removed channels carry exactly
    zero (SiLU(0) = 0), so applying the history changes no output (a fade phase trains toward that)."""
    was = prepared.training
    prepared.eval()
    dg = dependency_graph(prepared, imgsz, fam)
    prepared.train(was)
    by_name = dict(prepared.named_modules())
    name_of = {id(m): n for n, m in by_name.items()}
    out: dict[str, set] = {}
    for root, is_out, idxs in as_steps(history)[0]:
        if root not in by_name:
            raise UserError(f"the pruning plan names module '{root}', which this model does not have")
        module = by_name[root]
        pruner = dg.get_pruner_of_module(module)
        group = dg.get_pruning_group(module, pruner.prune_out_channels if is_out else pruner.prune_in_channels,
                                     list(idxs))
        for bn, didx in group_bn_channels(group):
            out.setdefault(name_of[id(bn)], set()).update(didx)
    return {n: sorted(v) for n, v in out.items()}


def group_bn_channels(group) -> list[tuple[nn.BatchNorm2d, list[int]]]:
    """The BatchNorm channels a Torch-Pruning group removes (every channel a group cuts ends in one here; the
    attention's output through its proj BN): with their weight and bias at zero they carry exactly zero."""
    out = []
    for dep, didx in group:
        layer = dep.target.module
        if isinstance(layer, nn.BatchNorm2d):
            out.append((layer, [int(i) for i in didx]))
        elif isinstance(layer, DecoupledAttention) and getattr(dep.handler, "__name__", "") == "prune_out_channels":
            out.append((layer.proj.bn, [int(i) for i in didx]))  # the node's outputs are its proj conv's
    return out


def cut(model: DetectionModel, history: list, imgsz: int, fam) -> DetectionModel:
    """Apply a saved one-step pruning history to `model` with its weights (the kept channels keep theirs)."""
    return replay(model, [as_steps(history)[0]], imgsz, fam)


def prune_at_ratio(prepared: DetectionModel, imgsz: int, spec: PruneSpec, ratio: float, fam, grads_fn=None,
                   ratio_dict: dict | None = None):
    """Prune a copy of `prepared` at one channel ratio (per-layer overrides in ratio_dict, by module name).
    Returns (model, history)."""
    m = copy.deepcopy(prepared)
    with fast_index_mapping():
        p = _pruner(m, imgsz, spec, ratio, fam, grads_fn, ratio_dict)
        p.step()
    return m.eval(), p.pruning_history()


def prune(model: DetectionModel, imgsz: int, spec: PruneSpec, fam, grads_fn=None, log=print) -> tuple:
    """Returns (pruned model, history, info). A MACs target is met within spec.tolerance by bisection."""
    if spec.ratio is None and spec.macs_target is None:
        raise UserError("prune needs a ratio or a macs_target")
    for k in ("ratio", "macs_target"):
        v = getattr(spec, k)
        if v is not None and not 0 < v < 1:
            raise UserError(f"prune.{k} must lie strictly between 0 and 1, got {v}")
    with fast_index_mapping():  # one block for the whole search: every attempt's pruner reuses the memo
        return _prune(model, imgsz, spec, fam, grads_fn, log)


def _prune(model: DetectionModel, imgsz: int, spec: PruneSpec, fam, grads_fn, log) -> tuple:
    t0 = time.time()
    prepared = prepare(model, fam)
    base_macs, base_params = macs_params(prepared, imgsz, fam)
    trials = []
    if spec.ratio is not None:
        pruned, hist = prune_at_ratio(prepared, imgsz, spec, spec.ratio, fam, grads_fn)
        ratio = spec.ratio
    elif spec.group_weights:
        pruned, hist, ratio, trials = _search_weighted(prepared, imgsz, spec, base_macs, fam, grads_fn, log)
    else:
        pruned, hist, ratio, trials = _search(prepared, imgsz, spec, base_macs, fam, grads_fn, log)
    macs, params = macs_params(pruned, imgsz, fam)
    info = {"base_macs": base_macs, "base_params": base_params, "macs": macs, "params": params,
            "macs_fraction": macs / base_macs, "params_fraction": params / base_params, "channel_ratio": ratio,
            "trials": trials, "seconds": time.time() - t0}
    if spec.macs_target is not None:  # the tolerance is a report: how far the cut landed from the target
        low, high, band = _band(spec)
        info["target"] = {"macs_fraction": spec.macs_target, "landed": macs / base_macs,
                          "distance": macs / base_macs - spec.macs_target, "tolerance": band,
                          "within_tolerance": bool(low <= macs / base_macs <= high)}
    return pruned, hist, info


def _wide_convs(prepared: nn.Module, fam) -> list[str]:
    """Convs in the widest tier (out channels >= half the widest): where round_to steps are finest."""
    skip = {id(m) for m in fam.protected_layers(prepared)}
    convs = [(n, m) for n, m in prepared.named_modules()
             if isinstance(m, nn.Conv2d) and id(m) not in skip and m.groups == 1]
    widest = max(m.out_channels for _, m in convs)
    return [n for n, m in convs if m.out_channels >= widest // 2]


def _band(spec) -> tuple[float, float, str]:
    """The accepted MACs fractions [low, high] for spec's target, and how to name the band."""
    target, tol = spec.macs_target, spec.tolerance * spec.macs_target
    if spec.at_most:
        return target - tol, target, f"-{spec.tolerance:.0%}..0"
    return target - tol, target + tol, f"±{spec.tolerance:.0%}"


def kept_channels(channels: int, ratio: float, round_to: int | None, cap: float) -> int:
    """The channels a group of `channels` keeps when Torch-Pruning's MetaPruner (local ranking) prunes it at `ratio`:
    int(C * (1 - ratio)) rounded down to round_to; a group that would keep none is left whole (checked against the
    pruner itself in tests/test_prune.py)."""
    k = int(channels * (1 - min(ratio, cap)))
    if k >= channels:
        return channels
    if round_to:
        k -= k % round_to
    return k if k > 0 else channels


class _Trials:
    """A search's pruning attempts, by the channels every dependency group keeps: MACs are a function of those
    counts, and round_to makes many ratios keep the same ones, so an attempt whose counts were already measured
    reuses that measurement instead of pruning again. An attempt that lands in the band always prunes (its model
    is the result). With global or isomorphic ranking the counts are not a per-group rule: every attempt prunes."""

    def __init__(self, prepared, imgsz: int, spec: PruneSpec, base_macs: int, fam, grads_fn=None):
        self.prepared, self.imgsz, self.base_macs, self.grads_fn, self.fam = prepared, imgsz, base_macs, grads_fn, fam
        self.spec, self.seen, self.groups = spec, {}, None
        self.fallback = None  # (model, history, fraction, the search's ratio record): nearest trial it may settle for
        if spec.global_pruning or spec.isomorphic:
            return
        dg = dependency_graph(prepared, imgsz, fam)
        self.groups = []  # (root channels, the names a per-layer ratio is looked up by, in the pruner's order)
        for g in prunable_groups(dg, prepared, fam):
            names = [dg._module2name.get(mod) for dep, _ in g
                     for mod, fn in ((dep.source.module, dep.trigger), (dep.target.module, dep.handler))
                     if dg.is_out_channel_pruning_fn(fn)]
            self.groups.append((int(dg.get_out_channels(g[0].dep.target.module)), names))

    def key(self, ratio: float, ratio_dict: dict | None):
        if self.groups is None:
            return None
        rd = ratio_dict or self.spec.ratio_dict or {}
        return tuple(kept_channels(channels, next((rd[n] for n in names if n in rd), ratio), self.spec.round_to,
                                   self.spec.max_layer_ratio) for channels, names in self.groups)

    def prune(self, ratio: float, ratio_dict: dict | None):
        """(model, history, MACs fraction) of the cut at `ratio` / `ratio_dict`; (None, None, the fraction) when an
        earlier attempt kept the same channels and missed the band."""
        low, high, _ = _band(self.spec)
        key = self.key(ratio, ratio_dict)
        frac = self.seen.get(key)
        if frac is not None and not low <= frac <= high:
            return None, None, frac
        m, h = prune_at_ratio(self.prepared, self.imgsz, self.spec, ratio, self.fam, self.grads_fn, ratio_dict)
        frac = macs_params(m, self.imgsz, self.fam)[0] / self.base_macs
        if key is not None:
            self.seen[key] = frac
        return m, h, frac

    def offer(self, m, h, frac: float, record) -> None:
        """Keep a pruned trial as the fallback when it lies in the spec's settle range nearer the target than the one
        kept."""
        acc = self.spec.settle_range
        if m is None or not acc[0] <= frac <= acc[1]:
            return
        if self.fallback is None or abs(frac - self.spec.macs_target) < abs(self.fallback[2] - self.spec.macs_target):
            self.fallback = (m, h, frac, record)

    def settle_or_raise(self, log, trials: list, error: UnreachableTarget):
        """The fallback as a search result (model, history, ratio record, trials); `error` when there is none."""
        if self.fallback is None:
            raise error
        m, h, frac, record = self.fallback
        lo, hi = self.spec.settle_range
        where = (f"between {lo:.4f} and {hi:.4f}x" if self.spec.accept is not None else
                 "at or below the target (the safe side)")
        log(f"  round_to={self.spec.round_to}'s steps jump over the band: settling for the nearest cut {where}, "
            f"{frac:.4f}x MACs ({frac - self.spec.macs_target:+.4f} from the {self.spec.macs_target:g}x target)")
        trials.append({"settled_for": round(frac, 5)})
        return m, h, record, trials


def _bisect_widest(attempt_wide, wlo: float, whi: float, spec, iters: int):
    """The second bisection of both searches: the widest tier's ratio in [wlo, whi] (on top of ratios that kept MACs
    above the band) until MACs land in it. Returns ((model, history, ratio) or None, the closest MACs fraction)."""
    low, high, _ = _band(spec)
    closest = float("inf")
    for _ in range(iters):
        wm = (wlo + whi) / 2
        m, h, frac = attempt_wide(wm)
        closest = min(closest, frac, key=lambda f: abs(f - spec.macs_target))
        if low <= frac <= high:
            return (m, h, wm), closest
        wlo, whi = (wm, whi) if frac > spec.macs_target else (wlo, wm)
        if whi - wlo < 1e-3:
            break
    return None, closest


def _search(prepared, imgsz, spec, base_macs, fam, grads_fn, log):
    """Bisection over the uniform channel ratio; round_to makes MACs a step function of it, so when a step jumps
    over the tolerance band, a second bisection prunes the widest tier further (finest steps) from the last
    uniform ratio that kept MACs above the target."""
    target = spec.macs_target
    low, high, band = _band(spec)
    trials = []

    known = _Trials(prepared, imgsz, spec, base_macs, fam, grads_fn)

    def attempt(r, rd=None):
        m, h, frac = known.prune(r, rd)
        known.offer(m, h, frac, r)
        trials.append({"ratio": round(r, 5), "wide_ratio": round(max(rd.values()), 5) if rd else None,
                       "macs_fraction": round(frac, 5), **({"same_channels_as_before": True} if m is None else {})})
        log(f"  ratio {r:.4f}" + (f", widest tier {max(rd.values()):.4f}" if rd else "") +
            f" -> {frac:.4f} x MACs (target {target})" + (" (the channels of an earlier trial)" if m is None else ""))
        return m, h, frac

    def unreachable(frac):
        return UnreachableTarget(f"MACs target {target} is unreachable within {band}: the closest is "
                                 f"{frac:.4f} x base MACs, none at or below the target (round_to={spec.round_to}, "
                                 f"max per-layer ratio {spec.max_layer_ratio})")

    # Above ~0.7 Torch-Pruning's per-group rounding makes MACs non-monotonic in the ratio (0.9 keeps more than
    # 0.7 on YOLO11n): the search stays below that.
    top = min(spec.max_layer_ratio, SEARCH_MAX_RATIO)
    m, h, frac = attempt(top)  # the most this spec can remove
    if frac > high:
        return known.settle_or_raise(log, trials, unreachable(frac))
    lo, hi = 0.0, top  # frac(lo) > target > frac(hi)
    best, above = (m, h, frac, top), (0.0, None)
    for _ in range(10):
        mid = (lo + hi) / 2
        m, h, frac = attempt(mid)
        if abs(frac - target) < abs(best[2] - target):
            best = (m, h, frac, mid)
        if low <= frac <= high:
            return m, h, mid, trials
        if frac > target:
            lo, above = mid, (mid, frac)
        else:
            hi = mid
        if hi - lo < 1e-3:
            break
    r0 = above[0]
    wide = _wide_convs(prepared, fam)
    landed, closest = _bisect_widest(lambda wm: attempt(r0, {n: wm for n in wide}), r0, top, spec, 10)
    if landed:
        return landed[0], landed[1], r0, trials
    return known.settle_or_raise(log, trials, unreachable(min(best[2], closest, key=lambda f: abs(f - target))))


def weighted_ratios(weights: dict, alpha: float, cap: float) -> dict:
    top = max(weights.values())
    return {g: min(cap, alpha * w / top) for g, w in weights.items() if w > 0}


def _search_weighted(prepared, imgsz, spec, base_macs, fam, grads_fn, log):
    """Non-uniform ratios ratio_g = min(cap, a * w_g / max w) (global ratio 0), the scale a bisected to the MACs
    target. The bisection is geometric: measured weights can span many decades (a group whose pruning bought ~0 ms
    in latency mode), so a linear one over [0, cap / min w] never reaches the useful scales. round_to makes MACs a
    step function of the scale, and a step can jump over the tolerance band: then, as in the uniform search, a
    second bisection prunes the widest tier further (finest steps) on top of the ratios that kept MACs above it."""
    target = spec.macs_target
    low, high, band = _band(spec)
    cap = min(spec.max_layer_ratio, SEARCH_MAX_RATIO)
    w = spec.group_weights
    wmin = min(v for v in w.values() if v > 0) / max(w.values())
    trials = []

    known = _Trials(prepared, imgsz, spec, base_macs, fam, grads_fn)

    def attempt(a, rd, wide_ratio=None):
        m, h, frac = known.prune(0.0, rd)
        tier = {"widest_tier": wide_ratio} if wide_ratio is not None else {}
        known.offer(m, h, frac, {"scale": a, "ratios": rd, **tier})
        mean = sum(rd.values()) / max(len(rd), 1)
        trials.append({"alpha": round(a, 8), "mean_ratio": round(mean, 5), "macs_fraction": round(frac, 5),
                       **({"wide_ratio": round(wide_ratio, 5)} if wide_ratio is not None else {}),
                       **({"same_channels_as_before": True} if m is None else {})})
        log(f"  scale {a:.6g} (mean group ratio {mean:.3f})" +
            (f", widest tier {wide_ratio:.4f}" if wide_ratio is not None else "") +
            f" -> {frac:.4f} x MACs (target {target})" + (" (the channels of an earlier trial)" if m is None else ""))
        return m, h, frac

    lo, hi = cap * 1e-4, cap / wmin  # at lo every ratio is <= 1e-4 of cap: MACs ~ the base's, above the band
    m, h, frac = attempt(hi, weighted_ratios(w, hi, cap))
    if frac > high:
        return known.settle_or_raise(log, trials, UnreachableTarget(
            f"MACs target {target} is unreachable within {band} with these group weights: every group at its cap "
            f"({cap}) keeps {frac:.4f} x base MACs"))
    best = (abs(frac - target), hi)
    for _ in range(60):
        if hi / lo < 1 + 1e-5:
            break
        mid = (lo * hi) ** 0.5
        rd = weighted_ratios(w, mid, cap)
        m, h, frac = attempt(mid, rd)
        best = min(best, (abs(frac - target), mid))
        if low <= frac <= high:
            return m, h, {"scale": mid, "ratios": rd}, trials
        lo, hi = (mid, hi) if frac > target else (lo, mid)
    above = weighted_ratios(w, lo, cap)  # the last scale that kept MACs above the band
    wide = _wide_convs(prepared, fam)

    def widened(wm):
        return {**above, **{n: max(above.get(n, 0.0), wm) for n in wide}}

    landed, closest = _bisect_widest(lambda wm: attempt(lo, widened(wm), wm), 0.0, cap, spec, 12)
    if landed:
        m, h, wm = landed
        return m, h, {"scale": lo, "ratios": widened(wm), "widest_tier": wm}, trials
    return known.settle_or_raise(log, trials, UnreachableTarget(
        f"MACs target {target} is unreachable within {band} with these group weights: the closest is off by "
        f"{min(best[0], abs(closest - target)):.4f} (round_to={spec.round_to})"))


# --------------------------------------------------------------------------------------------- signatures
def arch_signature(model: nn.Module) -> list:
    """(name, weight shape) of every conv and BN: two models with the same signature have the same architecture."""
    return [[n, list(m.weight.shape)] for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))]


def as_steps(history: list) -> list[list]:
    """A Torch-Pruning history (entries [root name, out?, idxs]) or a list of them, one per iterative step."""
    if not history or (isinstance(history[0], (list, tuple)) and history[0] and isinstance(history[0][0], str)):
        return [list(history)]
    return [list(h) for h in history]


def replay(base_model: DetectionModel, history: list, imgsz: int, fam) -> DetectionModel:
    """Apply a saved Torch-Pruning history (one step, or several in order, each on a freshly built dependency
    graph as the pruner saw it) to the unpruned model: the pruned architecture, without its weights."""
    m = prepare(base_model, fam)
    with fast_index_mapping():
        for step in as_steps(history):
            dependency_graph(m, imgsz, fam).load_pruning_history(step)
    return m.eval()


def base_from_pruned(pruned: DetectionModel) -> DetectionModel:
    """The unpruned model a pruned one came from: its own yaml (the pruned checkpoint keeps the original)."""
    nc = pruned.model[-1].nc
    m = DetectionModel(copy.deepcopy(pruned.yaml), nc=nc, verbose=False)
    m.names = getattr(pruned, "names", None)
    return m.eval()


def verify_history(pruned: DetectionModel, history: list, imgsz: int, fam, where: str | Path) -> None:
    try:
        rebuilt = replay(base_from_pruned(pruned), history, imgsz, fam)
    except (KeyError, IndexError, RuntimeError, ValueError, TypeError, AttributeError) as e:  # a malformed history
        raise UserError(f"pruning history does not replay on the base model ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:120]})", where) from None
    a, b = arch_signature(rebuilt), arch_signature(pruned)
    if a != b:
        diff = next(((x, y) for x, y in zip(a, b) if x != y), (a[len(b):len(b) + 1], b[len(a):len(a) + 1]))
        raise UserError(f"pruning history does not match the checkpoint's weights: replay gives {diff[0]}, "
                        f"the checkpoint has {diff[1]}", where)


def channel_report(model: nn.Module) -> list[dict]:
    return [{"name": n, "in": m.in_channels, "out": m.out_channels, "groups": m.groups}
            for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def save_history(history: list, dest: Path) -> None:
    steps = as_steps(history)
    body = {"history": steps[0]} if len(steps) == 1 else {"steps": steps}
    dest.write_text(json.dumps({"format": "torch-pruning-history", "torch_pruning": tp.__version__, **body}))


def load_history(path: Path) -> list:
    try:
        d = json.loads(Path(path).read_text())
        return d["steps"] if "steps" in d else d["history"]
    except (OSError, ValueError, KeyError, TypeError):  # ValueError: not JSON, or not text
        raise UserError("not a pruning history file", path) from None
