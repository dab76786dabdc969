"""Counting parameters and multiply-accumulates (MACs) with torch's own FLOP counter."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_params", "count_macs", "layer_macs"]


def count_params(module: nn.Module) -> int:
    """Number of parameters (shared parameters once)."""
    return sum(p.numel() for p in module.parameters())


@contextlib.contextmanager
def _countable_attention() -> Iterator[None]:
    """Attention in ops the FLOP counter sees: torch counts neither the fused fast path of
    ``nn.MultiheadAttention`` in eval mode nor the CPU flash kernel of
    ``scaled_dot_product_attention`` (both read as 0 MACs), so count with the fast path off and
    SDPA's math backend (the same arithmetic, in matmuls)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def _grouped_mm_flop(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of ``grouped_mm(a, b, offs)``, which torch's counter does not know: each row of a
    2-D ``a`` times one of the matrices of a 3-D ``b`` (a mixture's experts), a 3-D batch of
    products, or (2-D by 2-D) one product whose inner dimension is split into groups."""
    if len(b_shape) == 3:  # (rows, k) × (G, k, n), or (G, m, k) × (G, k, n)
        rows = a_shape[0] if len(a_shape) == 2 else a_shape[0] * a_shape[1]
        return 2 * rows * a_shape[-1] * b_shape[2]
    if len(a_shape) == 3:  # (G, m, k) × (k, n): the rows of b split over the groups
        return 2 * a_shape[1] * a_shape[2] * b_shape[1]
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]  # (m, K) × (K, n), K split over the groups


def _grouped_ops() -> list[Any]:
    """aten's grouped_mm, and transformers' own loop for it where transformers registered it."""
    ops = [torch.ops.aten._grouped_mm] if hasattr(torch.ops.aten, "_grouped_mm") else []
    try:
        ops.append(torch.ops.transformers.grouped_mm_fallback)
    except (AttributeError, RuntimeError):
        pass
    return ops


@torch.no_grad()
def count_macs(model: nn.Module, example_inputs: Any) -> int:
    """MACs of one forward pass on ``example_inputs`` — a tensor, a tuple of positional inputs
    or a dict of keyword inputs (FLOPs / 2, as FlopCounterMode counts them; attention included,
    see `_countable_attention`; a mixture's ``grouped_mm`` experts too, see `_grouped_mm_flop`). The model
    runs in eval mode (a training batch norm would update its statistics) and is given back in
    the modes it had."""
    from .capture import normalize_inputs
    from .errors import ConfigError
    from .modes import eval_mode

    if example_inputs is None:
        raise ConfigError("count_macs needs example_inputs: one batch the model accepts (a tensor, tuple or dict)")
    args, kwargs = normalize_inputs(example_inputs)
    modes = eval_mode(model) if isinstance(model, nn.Module) else contextlib.nullcontext()  # (a plain function too)
    counted = {op: _grouped_mm_flop for op in _grouped_ops()}
    with modes, _countable_attention(), FlopCounterMode(display=False, custom_mapping=counted) as counter:
        model(*args, **kwargs)
    return counter.get_total_flops() // 2


@torch.no_grad()
def layer_macs(layer: nn.Module, input_shape: Sequence[int]) -> int:
    """MACs of ``layer`` on an input of ``input_shape``, computed on the meta device (no compute).

    The layer's ``forward`` runs without its hooks: a user's forward hook would see meta
    tensors (``.item()`` raises), and a hook-based ``spectral_norm`` would leave a meta
    tensor in the layer's plain ``weight`` attribute."""
    from torch.nn.utils.stateless import _reparametrize_module

    meta = {n: torch.empty_like(t, device="meta") for n, t in layer.state_dict(keep_vars=True).items()}
    dtype = next(iter(meta.values())).dtype if meta else torch.float32
    x = torch.empty(tuple(input_shape), device="meta", dtype=dtype)
    with _reparametrize_module(layer, meta), FlopCounterMode(display=False) as counter:
        layer.forward(x)
    return counter.get_total_flops() // 2
