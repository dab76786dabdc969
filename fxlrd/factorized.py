"""Factorized layers: the modules that replace a decomposed Linear or ConvNd.

`Factorized` is an ``nn.Sequential`` whose children are named by role (``in_proj``, ``core``,
``out_proj``), so a decomposed ``layer1.0.conv2`` keeps its name as a container and its
state-dict keys keep their prefix (``layer1.0.conv2.core.weight``).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from .decompose import svd_factors, tucker2_factors

__all__ = ["Factorized", "LayerSpec", "layer_spec", "factorized_like", "decompose_layer", "ROLES"]

ROLES = ("in_proj", "core", "out_proj")
_CONV_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class Factorized(nn.Sequential):
    """A layer replaced by its factors, applied in order: ``in_proj``, ``core``, ``out_proj``.

    Only the factors that exist are children: a mode kept whole has no factor.
    """

    def __init__(self, factors: "OrderedDict[str, nn.Module]", *, method: str, ranks: tuple[int, ...]):
        super().__init__(factors)
        self.method = method
        self.ranks = tuple(ranks)

    def extra_repr(self) -> str:
        return f"method={self.method!r}, ranks={self.ranks}"


@dataclass(frozen=True)
class LayerSpec:
    """What the decomposition needs to know of a Linear or ConvNd layer."""

    kind: str  # "linear" or "conv"
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]  # () for linear
    groups: int = 1
    bias: bool = True

    @property
    def kernel_numel(self) -> int:
        n = 1
        for k in self.kernel_size:
            n *= k
        return n

    @property
    def pointwise(self) -> bool:
        """Linear or 1×1 conv: decomposed by SVD."""
        return self.kernel_numel == 1


def layer_spec(layer: nn.Module) -> LayerSpec:
    """The `LayerSpec` of a Linear or Conv1d/2d/3d (subclasses included)."""
    if isinstance(layer, nn.Linear):
        return LayerSpec("linear", layer.in_features, layer.out_features, (), 1, layer.bias is not None)
    if isinstance(layer, _CONV_TYPES):
        return LayerSpec(
            "conv", layer.in_channels, layer.out_channels, tuple(layer.kernel_size), layer.groups, layer.bias is not None
        )
    raise TypeError(f"{type(layer).__name__} is neither nn.Linear nor nn.Conv1d/2d/3d")


def _conv_class(layer: nn.Module) -> type[nn.Module]:
    return next(t for t in _CONV_TYPES if isinstance(layer, t))


def _factor_chain(layer: nn.Module, method: str, ranks: tuple[int, ...]) -> list[tuple[str, int, int, bool]]:
    """The factors as (role, in, out, spatial) where ``spatial`` marks the one carrying the
    layer's kernel, stride, padding and dilation. A rank equal to its side's size drops that factor."""
    spec = layer_spec(layer)
    c, s = spec.in_channels, spec.out_channels
    if method == "svd":
        (r,) = ranks
        if r < c and r < s:
            return [("in_proj", c, r, True), ("out_proj", r, s, False)]
        return [("out_proj", c, s, True)]  # a full-rank side: the product is one C→S layer
    if method == "tucker2":
        r1, r2 = ranks
        chain = [("in_proj", c, r1, False)] if r1 < c else []
        chain.append(("core", r1, r2, True))
        chain += [("out_proj", r2, s, False)] if r2 < s else []
        return chain
    raise ValueError(f"unknown method {method!r}; expected 'svd' or 'tucker2'")


def factorized_like(
    layer: nn.Module, method: str, ranks: tuple[int, ...], *, device: torch.device | str | None = None
) -> Factorized:
    """Factor modules of the right shapes for ``layer`` at ``ranks``, weights uninitialised.

    With ``device="meta"`` this costs nothing: the planner uses it to count parameters and MACs.
    """
    weight = layer.weight
    device = weight.device if device is None else device
    kw = {"device": device, "dtype": weight.dtype}
    chain = _factor_chain(layer, method, ranks)
    spec = layer_spec(layer)
    modules: OrderedDict[str, nn.Module] = OrderedDict()
    for i, (role, cin, cout, spatial) in enumerate(chain):
        bias = spec.bias and i == len(chain) - 1
        if spec.kind == "linear":
            modules[role] = nn.Linear(cin, cout, bias=bias, **kw)
        elif spatial:
            modules[role] = _conv_class(layer)(
                cin, cout, layer.kernel_size, stride=layer.stride, padding=layer.padding,
                dilation=layer.dilation, padding_mode=layer.padding_mode, bias=bias, **kw,
            )  # fmt: skip
        else:
            modules[role] = _conv_class(layer)(cin, cout, 1, bias=bias, **kw)
    return Factorized(modules, method=method, ranks=ranks)


def _matrices(layer: nn.Module, method: str, ranks: tuple[int, ...], tucker_iters: int) -> dict[str, torch.Tensor]:
    """Each factor's weight as computed by the math, keyed by role (kernel dims folded in later)."""
    w = layer.weight.detach()
    s, c = w.shape[:2]
    if method == "svd":
        (r,) = ranks
        f = svd_factors(w.reshape(s, c), r)
        if r < c and r < s:
            return {"in_proj": f.in_factor, "out_proj": f.out_factor}
        return {"out_proj": f.out_factor @ f.in_factor}
    t = tucker2_factors(w, ranks, n_iter=tucker_iters)
    out = {"core": t.core}
    if t.in_factor is not None:
        out["in_proj"] = t.in_factor.T
    if t.out_factor is not None:
        out["out_proj"] = t.out_factor
    return out


@torch.no_grad()
def decompose_layer(layer: nn.Module, method: str, ranks: tuple[int, ...], *, tucker_iters: int = 0) -> Factorized:
    """Decompose ``layer`` (Linear or ConvNd) into a `Factorized` at ``ranks``.

    ``method="svd"``: ``ranks=(r,)``, the √Σ split, stride and padding on the first factor.
    ``method="tucker2"``: ``ranks=(r1, r2)`` (input side, output side); kernel, stride,
    padding, dilation and padding mode on ``core``. The bias always goes on the last factor.
    """
    # Built on meta then materialised: no time spent initialising weights about to be overwritten.
    fact = factorized_like(layer, method, ranks, device="meta").to_empty(device=layer.weight.device)
    weights = _matrices(layer, method, ranks, tucker_iters)
    for role, module in fact.named_children():
        module.weight.copy_(weights[role].reshape(module.weight.shape))  # copy_ casts to the layer's dtype
        if module.bias is not None:
            module.bias.copy_(layer.bias)
    return fact
