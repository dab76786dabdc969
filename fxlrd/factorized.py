"""Factorized layers: the modules that replace a decomposed Linear or ConvNd.

`Factorized` is an ``nn.Sequential`` whose children are named by role (``in_proj``, ``core``,
``out_proj``), so a decomposed ``layer1.0.conv2`` keeps its name as a container and its
state-dict keys keep their prefix (``layer1.0.conv2.core.weight``). The container records
its method, ranks and source layer as plain attributes: they survive ``copy.deepcopy``,
pickling and ``torch.save`` (not a re-trace by ``torch.fx.symbolic_trace``, which rebuilds
containers as plain modules), and are where factor roles are read from.

Which factors a method makes, and their weights, come from the method's handler
(`fxlrd.methods`); this module only builds and fills the modules.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

__all__ = [
    "Factorized",
    "LayerSpec",
    "layer_spec",
    "make_layer",
    "factorized_like",
    "decompose_layer",
    "skeleton",
    "fill",
    "balance",
    "ROLES",
    "conv_layout",
    "to_module_layout",
    "module_weight",
    "reference_weight",
]

ROLES = ("in_proj", "core", "out_proj")
_CONV_BY_DIMS: dict[int, type[nn.Module]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_CONV_TRANSPOSE_BY_DIMS: dict[int, type[nn.Module]] = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}


class Factorized(nn.Sequential):
    """A layer replaced by its factors, applied in order: ``in_proj``, ``core``, ``out_proj``.

    Only the factors that exist are children: a mode kept whole has no factor. ``method``,
    ``ranks`` and ``source`` (the qualified name of the layer it replaced) are plain
    attributes, so they survive deepcopy and ``torch.save``.
    """

    def __init__(self, factors: "OrderedDict[str, nn.Module]", *, method: str, ranks: tuple[int, ...], source: str = ""):
        super().__init__(factors)
        self.method = method
        self.ranks = tuple(ranks)
        self.source = source

    def roles(self) -> list[str]:
        """The roles of the factors present, in order."""
        return [name for name, _ in self.named_children()]

    def extra_repr(self) -> str:
        return f"method={self.method!r}, ranks={self.ranks}"


@dataclass(frozen=True)
class LayerSpec:
    """What the decomposition needs to know of a linear or convolution layer.

    Built from an ``nn.Linear``/``nn.ConvNd``/``nn.ConvTransposeNd`` module, or from the
    arguments of a functional call (``F.linear``, ``aten.convolution``...), so module and
    functional layers are one thing.

    A transposed convolution (``transposed=True``) is described, and its weight read and
    written by fxlrd, in the layout of an ordinary convolution, ``(out, in, *kernel)``, as
    every other layer: its channel modes decompose the same way, and only the factor that
    carries the kernel (`make_layer` with ``spatial=True``) is a transposed convolution, with
    the layer's stride, padding, output padding and dilation (`to_module_layout` turns a
    weight into the module's own ``(in, out, *kernel)``).
    """

    kind: str  # "linear" or "conv"
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...] = ()  # () for linear
    groups: int = 1
    bias: bool = True
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] | str = ()
    dilation: tuple[int, ...] = ()
    padding_mode: str = "zeros"
    transposed: bool = False  # a transposed convolution
    output_padding: tuple[int, ...] = ()  # a transposed convolution's (its spatial factor carries it)

    @property
    def kernel_numel(self) -> int:
        n = 1
        for k in self.kernel_size:
            n *= k
        return n

    @property
    def dims(self) -> int:
        """Spatial dimensions: 0 for linear, 1–3 for convolutions."""
        return len(self.kernel_size)

    @property
    def pointwise(self) -> bool:
        """Linear or 1×1 conv."""
        return self.kernel_numel == 1

    def with_channels(self, in_channels: int, out_channels: int, **changes: Any) -> "LayerSpec":
        return replace(self, in_channels=in_channels, out_channels=out_channels, **changes)


def _as_tuple(value: Any, n: int) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n
    return tuple(int(v) for v in value)


def layer_spec(layer: nn.Module) -> LayerSpec:
    """The `LayerSpec` of an ``nn.Linear``, ``nn.Conv1d/2d/3d`` or ``nn.ConvTranspose1d/2d/3d``
    (subclasses included)."""
    if isinstance(layer, nn.Linear):
        return LayerSpec("linear", layer.in_features, layer.out_features, (), 1, layer.bias is not None)
    if isinstance(layer, nn.modules.conv._ConvNd):
        dims = len(layer.kernel_size)
        padding = layer.padding if isinstance(layer.padding, str) else _as_tuple(layer.padding, dims)
        return LayerSpec(
            "conv", layer.in_channels, layer.out_channels, tuple(layer.kernel_size), layer.groups,
            layer.bias is not None, _as_tuple(layer.stride, dims), padding, _as_tuple(layer.dilation, dims),
            layer.padding_mode, bool(layer.transposed),
            _as_tuple(layer.output_padding, dims) if layer.transposed else (),
        )  # fmt: skip
    raise TypeError(f"{type(layer).__name__} is neither nn.Linear nor nn.Conv1d/2d/3d nor nn.ConvTranspose1d/2d/3d")


def conv_layout(weight: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """A transposed convolution's weight ``(in, out/groups, *k)`` in the layout of the
    convolution it equals channel-wise, ``(out, in/groups, *k)``, group by group (a view
    without groups, a copy with them)."""
    c, s_g = weight.shape[:2]
    w = weight.reshape(groups, c // groups, s_g, *weight.shape[2:]).transpose(1, 2)
    return w.reshape(groups * s_g, c // groups, *weight.shape[2:])


def to_module_layout(weight: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """``weight`` given in convolution layout ``(out, in/groups, *k)`` (or flattened), in
    ``module``'s own layout: the same for a Linear or convolution, ``(in, out/groups, *k)``
    for a transposed convolution."""
    shape = module.weight.shape
    if not getattr(module, "transposed", False):
        return weight.reshape(shape)
    g = module.groups  # the per-group transpose is its own inverse
    return conv_layout(weight.reshape(shape[1] * g, shape[0] // g, *shape[2:]), g)


def module_weight(module: nn.Module) -> torch.Tensor:
    """A Linear's, convolution's or transposed convolution's weight in convolution layout
    ``(out, in/groups, *k)`` (for a transposed one, a view without groups, else a copy)."""
    w = module.weight
    return conv_layout(w, module.groups) if getattr(module, "transposed", False) else w


def reference_weight(layer: nn.Module, core: nn.Module) -> torch.Tensor | None:
    """The original ``layer``'s weight in convolution layout, float64, for a decomposed layer
    whose core is ``core``: a convolution module's (None if it is not of the core's kind,
    transposed or not), or the ``weight`` of a module calling ``F.conv*``/``F.conv_transpose*``
    on it (read as a transposed one's when the core is transposed); None when there is none
    with the core's number of dimensions."""
    transposed = bool(getattr(core, "transposed", False))
    if isinstance(layer, nn.modules.conv._ConvNd):
        return module_weight(layer).detach().double() if bool(layer.transposed) == transposed else None
    w = getattr(layer, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != core.weight.dim():
        return None
    return (conv_layout(w) if transposed else w).detach().double()


def make_layer(
    spec: LayerSpec,
    in_channels: int,
    out_channels: int,
    *,
    kernel_size: tuple[int, ...] | None = None,
    spatial: bool = False,
    groups: int = 1,
    bias: bool = False,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    **conv: Any,
) -> nn.Module:
    """One factor module for a layer of ``spec``'s kind.

    ``spatial=True`` carries the layer's kernel, stride, padding, dilation and padding mode
    (of a transposed convolution: a transposed convolution with its kernel, stride, padding,
    output padding and dilation); otherwise a conv factor is an ordinary 1×1 convolution
    (unless ``kernel_size`` and ``conv`` keywords say more).
    """
    kw = {"device": device, "dtype": dtype}
    if spec.kind == "linear":
        return nn.Linear(in_channels, out_channels, bias=bias, **kw)
    conv_cls = _CONV_BY_DIMS[spec.dims]
    if spatial and spec.transposed:
        args = {"stride": spec.stride, "padding": spec.padding, "output_padding": spec.output_padding or 0,
                "dilation": spec.dilation}  # fmt: skip
        args.update(conv)
        return _CONV_TRANSPOSE_BY_DIMS[spec.dims](in_channels, out_channels, kernel_size or spec.kernel_size,
                                                  groups=groups, bias=bias, **args, **kw)  # fmt: skip
    if spatial:
        args = {"stride": spec.stride, "padding": spec.padding, "dilation": spec.dilation, "padding_mode": spec.padding_mode}
        kernel = spec.kernel_size
    else:
        args = {}
        kernel = (1,) * spec.dims
    if kernel_size is not None:
        kernel = kernel_size
    args.update(conv)
    return conv_cls(in_channels, out_channels, kernel, groups=groups, bias=bias, **args, **kw)


def skeleton(
    spec: LayerSpec, method: str, ranks: tuple[int, ...], *, device: torch.device | str | None = None,
    dtype: torch.dtype | None = None, source: str = "",
) -> Factorized:
    """Factor modules of the right shapes for a layer of ``spec`` at ``ranks``, weights
    uninitialised. With ``device="meta"`` this costs nothing (parameter and MAC counts)."""
    from .methods import get_method

    handler = get_method(method)
    modules = handler.modules(spec, tuple(ranks), device=device, dtype=dtype)
    last = next(reversed(modules))
    if spec.bias:  # the bias always goes on the last factor
        _add_bias(modules[last], device=device, dtype=dtype)
    return Factorized(modules, method=method, ranks=tuple(ranks), source=source)


def _add_bias(module: nn.Module, *, device, dtype) -> None:
    target = module
    if isinstance(module, nn.Sequential):
        target = module[-1]
    if getattr(target, "bias", None) is None:
        out = getattr(target, "out_channels", None) or target.weight.shape[0]  # a transposed conv's weight is (in, out)
        target.bias = nn.Parameter(torch.empty(out, device=device if device is not None else target.weight.device,
                                               dtype=dtype or target.weight.dtype))  # fmt: skip


@torch.no_grad()
def fill(fact: Factorized, weights: dict[str, torch.Tensor], bias: torch.Tensor | None) -> Factorized:
    """Copy ``weights`` (parameter name in ``fact`` → tensor) and ``bias`` into ``fact``.

    ``copy_`` casts to the factor's dtype, so the math may run in float64.
    """
    params = dict(fact.named_parameters())
    for name, value in weights.items():
        if name not in params:
            raise KeyError(f"the method produced a weight {name!r} that its factors do not have: {sorted(params)}")
        owner = fact.get_submodule(name.rpartition(".")[0]) if name.endswith(".weight") else None
        params[name].copy_(to_module_layout(value, owner) if owner is not None else value.reshape(params[name].shape))
    if bias is not None:
        last = list(fact.children())[-1]
        last = last[-1] if isinstance(last, nn.Sequential) else last
        last.bias.copy_(bias)
    return fact


def _weight_and_spec(layer: nn.Module) -> tuple[torch.Tensor, LayerSpec]:
    return module_weight(layer).detach(), layer_spec(layer)


def factorized_like(
    layer: nn.Module | LayerSpec, method: str, ranks: tuple[int, ...], *, device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Factorized:
    """`skeleton` for an ``nn.Linear``/``nn.ConvNd`` module (or a `LayerSpec`)."""
    if isinstance(layer, LayerSpec):
        return skeleton(layer, method, ranks, device=device, dtype=dtype)
    weight, spec = _weight_and_spec(layer)
    return skeleton(spec, method, ranks, device=weight.device if device is None else device, dtype=dtype or weight.dtype)


def _dense(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) and getattr(module, "groups", 1) == 1


@torch.no_grad()
def balance(fact: Factorized) -> Factorized:
    """Give consecutive factors equal norms channel by channel, the product unchanged.

    Between factors A → B, channel i carries ``‖A[i]‖`` on one side and ``‖B[:, i]‖`` on the
    other; both become their geometric mean (A's row scaled by d, B's column by 1/d: exact,
    as nothing non-linear sits between factors). Data-aware factors need it: unwhitening and
    output weighting put the whole scale of some channels in one factor (weights of 40 next
    to 0.1), which a batch norm re-estimation tolerates but SGD fine-tuning does not (it
    diverged on the digits benchmark). Boundaries at grouped (depthwise) factors are left
    alone. A middle factor (Tucker's core) has a boundary on each side: sweeps repeat until
    no channel moves by more than 0.1 % (a few sweeps; at most 50).
    """
    chain = list(fact.children())
    for _ in range(50):
        moved = 0.0
        for a, b in zip(chain, chain[1:]):
            if not (_dense(a) and _dense(b)):
                continue
            wa, wb = module_weight(a).double(), module_weight(b).double()  # (out, in, *k), transposed ones too
            if wa.shape[0] != wb.shape[1]:
                continue
            na = wa.reshape(wa.shape[0], -1).norm(dim=1)
            nb = wb.transpose(0, 1).reshape(wb.shape[1], -1).norm(dim=1)
            ok = (na > 0) & (nb > 0)
            d = torch.where(ok, (nb / na.where(ok, torch.ones_like(na))).sqrt(), torch.ones_like(na))
            a.weight.copy_(to_module_layout(wa * d.reshape(-1, *([1] * (wa.dim() - 1))), a))
            if a.bias is not None:
                a.bias.copy_(a.bias.double() * d)
            b.weight.copy_(to_module_layout(wb / d.reshape(1, -1, *([1] * (wb.dim() - 2))), b))
            moved = max(moved, float((d - 1).abs().max()))
        if moved < 1e-3:
            break
    return fact


@torch.no_grad()
def decompose_weight(
    weight: torch.Tensor, bias: torch.Tensor | None, spec: LayerSpec, method: str, ranks: tuple[int, ...], *,
    stats: Any = None, options: dict[str, Any] | None = None, source: str = "",
) -> tuple[Factorized, dict[str, Any]]:
    """Decompose one layer given its weight ``(S, C, *kernel)`` and bias.

    Returns the filled `Factorized` (on the weight's device and dtype) and the method's
    report (e.g. what whitening did). The math runs in float64 on the CPU.
    """
    from .decompose import single_threaded
    from .methods import get_method

    handler = get_method(method)
    report: dict[str, Any] = {}
    with single_threaded():
        weights = handler.factorize(weight.detach(), spec, tuple(ranks), stats=stats, options=options or {}, report=report)
    fact = skeleton(spec, method, ranks, device="meta", dtype=weight.dtype, source=source)
    fact = fact.to_empty(device=weight.device)
    fact = fill(fact, weights, None if bias is None else bias.detach())
    if stats is not None:  # data-free factors are balanced by construction (√Σ split, orthonormal Tucker factors)
        balance(fact)
    return fact, report


def decompose_layer(
    layer: nn.Module, method: str, ranks: tuple[int, ...], *, tucker_iters: int = 0, stats: Any = None, source: str = ""
) -> Factorized:
    """Decompose ``layer`` (Linear or ConvNd) into a `Factorized` at ``ranks``.

    ``method="svd"``: ``ranks=(r,)``, the √Σ split, stride and padding on the first factor (on
    the last for a transposed convolution).
    ``method="tucker2"``: ``ranks=(r1, r2)`` (input side, output side); kernel, stride,
    padding, dilation and padding mode on ``core``. ``method="cp"``: ``ranks=(r,)``. The bias
    always goes on the last factor.
    """
    weight, spec = _weight_and_spec(layer)
    fact, _ = decompose_weight(weight, layer.bias, spec, method, ranks, stats=stats,
                               options={"tucker_iters": tucker_iters}, source=source)  # fmt: skip
    return fact
