"""The block rewrites' former module name: pruned checkpoints written by earlier versions pickle their rewritten
blocks (C2fSplit, C2PSASplit, DecoupledAttention) under it, and still load. The classes live in blocks.py."""

from pipeline.adapters.blocks import C2fSplit, C2PSASplit, DecoupledAttention, DFLLastAxis  # noqa: F401
