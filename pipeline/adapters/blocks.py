"""Exact rewrites of the YOLO11 blocks that dependency-graph pruning cannot see through.

- C2f / C3k2 split their first conv with `chunk(2, 1)` and C2PSA with `split`: Torch-Pruning's DepGraph cannot
  follow a channel slice of one conv into two consumers. Each becomes two convs (`cv0` = first half, `cv1` =
  second half of the original weights and BN statistics): the same arithmetic, so the outputs are identical.
- C2PSA's `Attention` reshapes with the channel count of its *input* (`view(B, C, H, W)`); once the residual
  stream around it is pruned that no longer equals its inner width. `DecoupledAttention` takes the inner width
  from its own weights instead: identical before pruning, correct after.

The rewritten modules are plain nn.Modules in this importable package, so a pruned checkpoint pickles them and
`YOLO(path)` loads it wherever yolo-edge is installed. Nothing in ultralytics is patched.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from ultralytics.nn.modules.block import C2PSA, Attention, C2f
from ultralytics.nn.modules.conv import Conv

TOP_LEVEL_ATTRS = ("f", "i", "type", "np")  # what ultralytics' parse_model puts on each layer of model.model


def _half_conv(conv: Conv, sl: slice) -> Conv:
    """A Conv (conv + BN + act) holding output channels `sl` of `conv`."""
    new = copy.deepcopy(conv)
    c = conv.conv
    w = c.weight.data[sl].clone()
    new.conv = nn.Conv2d(c.in_channels, w.shape[0], c.kernel_size, c.stride, c.padding, c.dilation, c.groups,
                         bias=c.bias is not None)
    new.conv.weight.data.copy_(w)
    if c.bias is not None:
        new.conv.bias.data.copy_(c.bias.data[sl])
    if hasattr(conv, "bn") and isinstance(conv.bn, nn.BatchNorm2d):
        bn = conv.bn
        new.bn = nn.BatchNorm2d(w.shape[0], eps=bn.eps, momentum=bn.momentum)
        new.bn.weight.data.copy_(bn.weight.data[sl])
        new.bn.bias.data.copy_(bn.bias.data[sl])
        new.bn.running_mean.copy_(bn.running_mean[sl])
        new.bn.running_var.copy_(bn.running_var[sl])
        new.bn.num_batches_tracked.copy_(bn.num_batches_tracked)
    return new


def _copy_top_attrs(src: nn.Module, dst: nn.Module) -> None:
    for a in TOP_LEVEL_ATTRS:
        if hasattr(src, a):
            setattr(dst, a, getattr(src, a))


class _SplitFirstConv(nn.Module):
    """A block whose first conv is sliced in two by its forward: here as two convs, cv0 and cv1."""

    def __init__(self, block: nn.Module):
        super().__init__()
        c = block.c
        self.c = c
        self.cv0 = _half_conv(block.cv1, slice(0, c))
        self.cv1 = _half_conv(block.cv1, slice(c, 2 * c))
        self.cv2 = block.cv2
        self.m = block.m
        self.source_type = type(block).__name__
        _copy_top_attrs(block, self)


class C2fSplit(_SplitFirstConv):
    """C2f / C3k2 with the chunked first conv split into cv0 and cv1."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = [self.cv0(x), self.cv1(x)]
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class C2PSASplit(_SplitFirstConv):
    """C2PSA with its split first conv as cv0 (passed through) and cv1 (through the PSA blocks)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv2(torch.cat((self.cv0(x), self.m(self.cv1(x))), 1))


class DecoupledAttention(nn.Module):
    """ultralytics' Attention with its inner width read from its weights, not from the input tensor."""

    def __init__(self, attn: Attention):
        super().__init__()
        self.num_heads = attn.num_heads
        self.head_dim = attn.head_dim
        self.key_dim = attn.key_dim
        self.scale = attn.scale
        self.qkv, self.proj, self.pe = attn.qkv, attn.proj, attn.pe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        N = H * W
        C = self.num_heads * self.head_dim  # inner width: fixed by the weights
        q, k, v = self.qkv(x).view(B, self.num_heads, self.key_dim * 2 + self.head_dim, N).split(
            [self.key_dim, self.key_dim, self.head_dim], dim=2)
        attn = ((q * self.scale).transpose(-2, -1) @ k).softmax(dim=-1)
        x = (v @ attn.transpose(-2, -1)).view(B, C, H, W) + self.pe(v.reshape(B, C, H, W))
        return self.proj(x)


def rewrite(model: nn.Module) -> dict:
    """Rewrite every C2f/C3k2, C2PSA and Attention in place. Returns counts by kind."""
    counts = {"C2f/C3k2": 0, "C2PSA": 0, "Attention": 0}

    def visit(parent: nn.Module) -> None:
        for name, child in list(parent.named_children()):
            visit(child)
            if isinstance(child, C2f) and type(child).__name__ in ("C2f", "C3k2"):
                setattr(parent, name, C2fSplit(child))
                counts["C2f/C3k2"] += 1
            elif isinstance(child, C2PSA):
                setattr(parent, name, C2PSASplit(child))
                counts["C2PSA"] += 1
            elif type(child) is Attention:
                setattr(parent, name, DecoupledAttention(child))
                counts["Attention"] += 1

    visit(model)
    return counts


def folded_state_dict(rewritten: nn.Module) -> dict:
    """The state dict of the stock model that `rewritten` was made from: each split block's cv0/cv1 concatenated
    back into one cv1 (weights, bias, BN statistics), every other tensor under its own name. The inverse of
    `rewrite` for a model whose split blocks were not pruned (cv0 and cv1 still c channels each), e.g. one trained
    in rewritten form (sparsity training)."""
    sd = rewritten.state_dict()
    out = {}
    split = {name for name, m in rewritten.named_modules() if isinstance(m, _SplitFirstConv)}
    for name in split:
        m = rewritten.get_submodule(name)
        if m.cv0.conv.out_channels != m.c or m.cv1.conv.out_channels != m.c:
            raise ValueError(f"{name}: a pruned split block cannot be folded back into the stock one")
    for k, v in sd.items():
        owner, _, rest = k.partition(".cv0.") if ".cv0." in k else (None, None, None)
        if owner in split:
            other = sd[f"{owner}.cv1.{rest}"]
            out[f"{owner}.cv1.{rest}"] = v if rest.endswith("num_batches_tracked") else torch.cat((v, other), 0)
        elif ".cv1." in k and k.partition(".cv1.")[0] in split:
            continue  # merged above
        else:
            out[k] = v
    return out


def fold_into(stock: nn.Module, rewritten: nn.Module) -> nn.Module:
    """Load `rewritten`'s weights into `stock` (same architecture before rewriting), strictly. Returns stock."""
    stock.load_state_dict(folded_state_dict(rewritten), strict=True)
    return stock


def is_rewritten(model: nn.Module) -> bool:
    return any(isinstance(m, (C2fSplit, C2PSASplit)) for m in model.modules())


class DFLLastAxis(nn.Module):
    """ultralytics' DFL with the softmax over the last, contiguous axis and the expectation as a MatMul:
    the same function (|diff| <= 5e-5 in FP32), without the transpose that makes the stock one a strided softmax
    plus a 1x1 conv in ONNX. An export-time rewrite (`export.dfl_last_axis`), recorded in the export record."""

    def __init__(self, dfl: nn.Module):
        super().__init__()
        self.c1 = dfl.c1
        self.register_buffer("bins", dfl.conv.weight.data.view(-1).clone().view(self.c1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, a = x.shape
        p = x.view(b, 4, self.c1, a).transpose(2, 3).softmax(-1)  # (b, 4, a, c1)
        return (p @ self.bins).view(b, 4, a)


def rewrite_dfl(model: nn.Module) -> int:
    """Replace the Detect head's DFL by DFLLastAxis; returns how many were replaced."""
    from ultralytics.nn.modules.block import DFL

    n = 0
    for m in model.modules():
        if isinstance(getattr(m, "dfl", None), DFL):
            m.dfl = DFLLastAxis(m.dfl)
            n += 1
    return n
