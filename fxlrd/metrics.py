"""Counting parameters and multiply-accumulates (MACs) with torch's own FLOP counter."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_params", "count_macs", "layer_macs"]


def count_params(module: nn.Module) -> int:
    """Number of parameters (shared parameters once)."""
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def count_macs(model: nn.Module, example_inputs: Any) -> int:
    """MACs of one forward pass on ``example_inputs`` — a tensor, a tuple of positional inputs
    or a dict of keyword inputs (FLOPs / 2, as FlopCounterMode counts them)."""
    from .capture import normalize_inputs

    args, kwargs = normalize_inputs(example_inputs)
    with FlopCounterMode(display=False) as counter:
        model(*args, **kwargs)
    return counter.get_total_flops() // 2


@torch.no_grad()
def layer_macs(layer: nn.Module, input_shape: Sequence[int]) -> int:
    """MACs of ``layer`` on an input of ``input_shape``, computed on the meta device (no compute)."""
    meta = {n: torch.empty_like(t, device="meta") for n, t in layer.state_dict(keep_vars=True).items()}
    dtype = next(iter(meta.values())).dtype if meta else torch.float32
    x = torch.empty(tuple(input_shape), device="meta", dtype=dtype)
    with FlopCounterMode(display=False) as counter:
        functional_call(layer, meta, (x,))
    return counter.get_total_flops() // 2
