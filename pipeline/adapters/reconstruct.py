"""Layer-wise feature reconstruction of a pruned model (He et al., "Channel Pruning for Accelerating Very Deep
Neural Networks", 2017; ThiNet): after the channels are cut, every conv is refit by ridge least squares so that
its output on the pruned model's own inputs matches the unpruned model's output on the unpruned inputs.

- Targets are the reference (unpruned) model's pre-activation outputs (the Conv's BN output, or a plain conv's
  output) at the kept output channels. Which channels were kept is read exactly from Torch-Pruning: the saved
  history is replayed on a copy of the reference whose BN running means (plain convs: biases) hold the channel
  indices, so no matching by value and no hand-written dependency tracking.
- Convs are refit in execution order, each on the inputs produced by the already refit layers before it, so
  errors do not accumulate. Each fit is the closed-form ridge solution regularised toward the pruned weights
  (objective + lambda * ||theta - theta_pruned||^2, lambda = alpha x the mean input energy), so a layer's
  reconstruction error can only go down. alpha 0.1 (the default) keeps the refit weights within ~1.7x the pruned
  ones' norm on YOLO11n; 1e-3 fits the calibration features a little closer but let deep low-resolution convs
  (few sampled positions) grow ~8x, and a fine-tune from there collapsed for an epoch.
- A conv followed by BN is fitted as one affine map; the result is written back as conv weights plus a BN whose
  running statistics are the fitted conv output's own mean/variance on the calibration data, so the model
  computes the same in eval mode and stays consistent when a fine-tune puts BN back in training mode.
- Grouped (depthwise) convs and the fixed DFL conv are left as they are; the conv after them absorbs the error.
- The architecture is untouched: the pruning history still replays onto the same shapes.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


def conv_units(model: nn.Module) -> list[tuple[str, nn.Conv2d, nn.BatchNorm2d | None]]:
    """Every conv with the BN that follows it (ultralytics' Conv: conv -> bn -> act), or None for a plain conv."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            bn = getattr(parent, "bn", None) if name.endswith(".conv") else None
            out.append((name, m, bn if isinstance(bn, nn.BatchNorm2d) else None))
    return out


def _skipped(model: nn.Module, name: str, conv: nn.Conv2d) -> str | None:
    if conv.groups != 1:
        return "grouped"
    parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    if type(parent).__name__ in ("DFL", "DFLLastAxis"):
        return "DFL (fixed)"
    if conv.bias is None and not isinstance(getattr(parent, "bn", None), nn.BatchNorm2d):
        return "no bias or BN to carry the fitted offset"
    return None


def kept_channels(reference: nn.Module, history: list, imgsz: int, fam) -> dict[str, torch.Tensor]:
    """conv name -> indices of the reference's output channels that the pruned model keeps (in order), read by
    replaying the Torch-Pruning history on a copy of the reference tagged with channel indices."""
    import copy

    from pipeline.adapters.pruning import dependency_graph

    tagged = copy.deepcopy(reference).float().eval()
    units = conv_units(tagged)
    with torch.no_grad():
        for _, conv, bn in units:
            if bn is not None:
                bn.running_mean.copy_(torch.arange(bn.num_features, dtype=torch.float32))
            elif conv.bias is not None:
                conv.bias.copy_(torch.arange(conv.out_channels, dtype=torch.float32))
    for p in tagged.parameters():
        p.requires_grad_(True)
    dependency_graph(tagged, imgsz, fam).load_pruning_history(history)
    kept = {}
    for name, conv, bn in conv_units(tagged):
        if bn is not None:
            kept[name] = bn.running_mean.detach().round().long()
        elif conv.bias is not None:
            kept[name] = conv.bias.detach().round().long()
        else:
            ref_conv = reference.get_submodule(name)
            if conv.out_channels == ref_conv.out_channels:
                kept[name] = torch.arange(conv.out_channels)
    return kept


class _Stop(Exception):
    pass


def _run_until(model: nn.Module, name: str, x: torch.Tensor, batch: int, fn: Callable) -> None:
    """Forward the batches of x until the module `name` has run on each; fn(input, output) sees every batch."""
    mod = model.get_submodule(name)

    def hook(m, inp, out):
        fn(inp[0].detach(), out.detach())
        raise _Stop

    h = mod.register_forward_hook(hook)
    try:
        for i in range(0, len(x), batch):
            try:
                with torch.no_grad():
                    model(x[i:i + batch])
            except _Stop:
                pass
    finally:
        h.remove()


def _inputs(model: nn.Module, name: str, conv: nn.Conv2d, images: torch.Tensor, batch: int,
            sel: torch.Tensor) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    _run_until(model, name, images, batch, lambda inp, o: out.append(_patches(inp, conv, sel)))
    return out


class _Stepper:
    """The pruned model's forward (ultralytics' `_predict_once`: each top-level layer reads the previous output or
    the saved outputs it names), one top-level layer at a time, with every batch's state kept between layers.
    Refitting the convs inside layer j then re-runs layer j alone instead of the whole model up to it: the partial
    forwards fall from O(layers^2) to O(layers) (YOLO11n, 32 images: the whole refit 81 s -> 23 s). Same ops, same
    order, so the same inputs as the whole-model path (bit-identical weights, tested)."""

    def __init__(self, model: nn.Module, images: torch.Tensor, batch: int):
        self.layers, self.save = list(model.model), set(model.save)
        self.states = [(images[i:i + batch], []) for i in range(0, len(images), batch)]  # (x, y) per batch
        self.done = 0

    @staticmethod
    def supports(model: nn.Module, x: torch.Tensor) -> bool:
        """Whether stepping reproduces model(x) exactly (any other forward falls back to the whole-model path)."""
        if not isinstance(getattr(model, "model", None), nn.Sequential) or not hasattr(model, "save") or \
                not all(hasattr(m, "f") and hasattr(m, "i") for m in model.model):
            return False
        with torch.no_grad():
            s = _Stepper(model, x, len(x))
            for _ in s.layers:
                s.advance()
            want, got = model(x), s.states[0][0]
        want = want[0] if isinstance(want, (tuple, list)) else want
        got = got[0] if isinstance(got, (tuple, list)) else got
        return isinstance(got, torch.Tensor) and got.shape == want.shape and torch.equal(got, want)

    def _layer_input(self, x, y):
        m = self.layers[self.done]
        if m.f != -1:
            x = y[m.f] if isinstance(m.f, int) else [x if j == -1 else y[j] for j in m.f]
        return x

    def inputs(self, name: str, conv: nn.Conv2d, sel: torch.Tensor) -> list[torch.Tensor]:
        """The patches the conv `name` (inside the current top-level layer) sees on every batch."""
        out: list[torch.Tensor] = []

        def hook(m, inp, o):
            out.append(_patches(inp[0].detach(), conv, sel))
            raise _Stop

        layer = self.layers[self.done]
        h = layer.get_submodule(name.split(".", 2)[2]).register_forward_hook(hook)
        try:
            for x, y in self.states:
                try:
                    with torch.no_grad():
                        layer(self._layer_input(x, y))
                except _Stop:
                    pass
        finally:
            h.remove()
        return out

    def advance(self) -> None:
        """Run the current top-level layer (as refit so far) on every batch and move on to the next."""
        m = self.layers[self.done]
        states = []
        for x, y in self.states:
            with torch.no_grad():
                x = m(self._layer_input(x, y))
            states.append((x, [*y, x if m.i in self.save else None]))
        self.states = states
        self.done += 1


def _top_layer(name: str) -> int | None:
    """The top-level layer index of a module named 'model.<i>.…' (ultralytics' DetectionModel), else None."""
    parts = name.split(".")
    return int(parts[1]) if len(parts) > 2 and parts[0] == "model" and parts[1].isdigit() else None


def execution_order(model: nn.Module, x: torch.Tensor) -> list[str]:
    order: list[str] = []
    hooks = [m.register_forward_hook(lambda mod, i, o, n=name: order.append(n)) for name, m, _ in conv_units(model)]
    try:
        with torch.no_grad():
            model(x[:1])
    finally:
        for h in hooks:
            h.remove()
    return list(dict.fromkeys(order))


def _patches(x: torch.Tensor, conv: nn.Conv2d, sel: torch.Tensor) -> torch.Tensor:
    """(N*len(sel), Cin*kh*kw): the conv's input patches at the sampled output positions."""
    cols = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
    return cols[:, :, sel].permute(0, 2, 1).reshape(-1, cols.shape[1])


def reconstruct(reference: nn.Module, pruned: nn.Module, history: list, images: torch.Tensor, imgsz: int, fam, *,
                positions: int = 256, alpha: float = 0.1, batch: int = 16, seed: int = 0,
                progress: Callable[[int, int], None] | None = None, stepped: bool = True) -> dict:
    """Refit `pruned` in place (see the module docstring). `reference` is the model `history` was taken on (the
    rewritten, unpruned model); images are NCHW float32 in [0, 1]. Returns per-layer errors and totals.
    stepped=False forces the whole-model forward per conv (the reference path the stepped one is tested against)."""
    reference, pruned = reference.eval(), pruned.eval()
    t0 = time.time()
    kept = kept_channels(reference, history, imgsz, fam)
    ref_units = {n: (c, b) for n, c, b in conv_units(reference)}
    units = {n: (c, b) for n, c, b in conv_units(pruned)}
    order = [n for n in execution_order(pruned, images) if n in ref_units]
    todo = [n for n in order if _skipped(pruned, n, units[n][0]) is None and n in kept]
    sels: dict[str, torch.Tensor] = {}
    targets: dict[str, list] = {n: [] for n in todo}
    hooks = []
    for name in todo:  # one pass of the reference collects every layer's targets at its sampled positions
        target_mod = name.rsplit(".", 1)[0] + ".bn" if units[name][1] is not None else name

        def take(mod, inp, out, name=name, idx=kept[name]):
            flat = out.detach().flatten(2)
            if name not in sels:
                g = torch.Generator().manual_seed(seed + zlib.crc32(name.encode()))
                sels[name] = torch.randperm(flat.shape[-1], generator=g)[:min(flat.shape[-1], positions)]
            targets[name].append(flat[:, idx][:, :, sels[name]].permute(0, 2, 1).reshape(-1, len(idx)))

        hooks.append(reference.get_submodule(target_mod).register_forward_hook(take))
    try:
        with torch.no_grad():
            for i in range(0, len(images), batch):
                reference(images[i:i + batch])
    finally:
        for h in hooks:
            h.remove()
    layers = []
    tops = [_top_layer(n) for n in todo]
    stepper = None
    if stepped and all(t is not None for t in tops) and tops == sorted(tops) and \
            _Stepper.supports(pruned, images[:1]):
        stepper = _Stepper(pruned, images, batch)
    for k, name in enumerate(todo):
        conv, bn = units[name]
        ref_conv = ref_units[name][0]
        if stepper is not None:
            while stepper.done < tops[k]:
                stepper.advance()
            A = torch.cat(stepper.inputs(name, conv, sels[name])).double()
        else:
            A = torch.cat(_inputs(pruned, name, conv, images, batch, sels[name])).double()
        T = torch.cat(targets.pop(name)).double()
        A1 = torch.cat([A, torch.ones(len(A), 1, dtype=A.dtype)], 1)
        W0 = conv.weight.detach().reshape(conv.out_channels, -1).double()
        if bn is not None:
            scale = (bn.weight / (bn.running_var + bn.eps).sqrt()).detach().double()
            shift = (bn.bias - bn.running_mean * scale).detach().double()
            theta0 = torch.cat([W0 * scale[:, None], shift[:, None]], 1).T
        else:
            b0 = conv.bias.detach().double() if conv.bias is not None else torch.zeros(conv.out_channels,
                                                                                     dtype=torch.float64)
            theta0 = torch.cat([W0, b0[:, None]], 1).T
        G = A1.T @ A1
        lam = alpha * G.diagonal().mean().clamp_min(1e-12)
        theta = torch.linalg.solve(G + lam * torch.eye(len(G), dtype=G.dtype), A1.T @ T + lam * theta0)
        before = ((A1 @ theta0 - T) ** 2).mean().item()
        after = ((A1 @ theta - T) ** 2).mean().item()
        w_eff, b_eff = theta[:-1].T, theta[-1]
        with torch.no_grad():
            if bn is not None:
                live = scale.abs() > 1e-8
                safe = torch.where(live, scale, torch.ones_like(scale))
                w = torch.where(live[:, None], w_eff / safe[:, None], W0)
                z = A @ w.T  # the new conv's output at the sampled positions
                mu, var = z.mean(0), z.var(0, unbiased=False)
                gamma = scale * (var + bn.eps).sqrt()  # BN(z) = scale * z + b_eff, with BN's stats = z's own
                beta = b_eff + scale * mu
                conv.weight.copy_(w.reshape(conv.weight.shape).float())
                for p, new in ((bn.weight, gamma), (bn.bias, beta), (bn.running_mean, mu), (bn.running_var, var)):
                    p.copy_(torch.where(live, new, p.double()).float())
            else:
                conv.weight.copy_(w_eff.reshape(conv.weight.shape).float())
                if conv.bias is not None:
                    conv.bias.copy_(b_eff.float())
        layers.append({"name": name, "samples": len(A), "features": A.shape[1], "mse_before": before,
                       "mse_after": after, "ref_out": ref_conv.out_channels, "out": conv.out_channels})
        if progress:
            progress(k + 1, len(todo))
    skipped = [{"name": n, "why": _skipped(pruned, n, units[n][0]) or "output channels unknown"}
               for n in order if n not in todo]
    return {"layers": layers, "skipped": skipped, "images": len(images), "positions": positions, "alpha": alpha,
            "stepped": stepper is not None,
            "seconds": time.time() - t0,
            "mse_before": sum(x["mse_before"] for x in layers) / max(len(layers), 1),
            "mse_after": sum(x["mse_after"] for x in layers) / max(len(layers), 1)}
