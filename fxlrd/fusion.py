"""Module arithmetic for merging: fold a norm into a layer, compose two pointwise layers.

Pure functions on modules; knows nothing of FX. Uses torch's own batch-norm folding.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

__all__ = ["is_pointwise", "fold_norm", "compose_pointwise", "ACTIVATIONS"]

ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.LeakyReLU, nn.Hardswish, nn.Tanh, nn.Sigmoid, nn.ELU, nn.Mish,
)  # fmt: skip


def is_pointwise(m: nn.Module) -> bool:
    """A Linear, or a 1×1 Conv1d/2d with no grouping, padding or non-zero padding mode."""
    if isinstance(m, nn.Linear):
        return True
    if isinstance(m, (nn.Conv1d, nn.Conv2d)) and not isinstance(m, nn.modules.conv._ConvTransposeNd):
        no_pad = m.padding in ("valid", 0) or all(p == 0 for p in (m.padding if isinstance(m.padding, tuple) else ()))
        return all(k == 1 for k in m.kernel_size) and m.groups == 1 and no_pad and m.padding_mode == "zeros"
    return False


def fold_norm(layer: nn.Module, norm: nn.Module) -> nn.Module:
    """``norm(layer(x))`` as one layer, with the norm's running statistics (eval semantics)."""
    layer, norm = copy.deepcopy(layer).eval(), copy.deepcopy(norm).eval()
    if norm.weight is None:  # affine=False: scale 1, shift 0 (torch's fusers read both)
        norm.weight = nn.Parameter(torch.ones_like(norm.running_var))
        norm.bias = nn.Parameter(torch.zeros_like(norm.running_var))
    if isinstance(layer, nn.Linear):
        return fuse_linear_bn_eval(layer, norm)
    return fuse_conv_bn_eval(layer, norm)


def _matrix(m: nn.Module) -> torch.Tensor:
    return m.weight.detach().reshape(m.weight.shape[0], -1)


@torch.no_grad()
def compose_pointwise(first: nn.Module, second: nn.Module) -> nn.Module:
    """``second(first(x))`` as one pointwise layer: ``W = W2 W1``, ``b = W2 b1 + b2``.

    Strides of 1×1 convs multiply (subsampling twice). Computed in float64, cast back.
    """
    w1, w2 = _matrix(first).double(), _matrix(second).double()
    weight = w2 @ w1
    bias = None
    if first.bias is not None or second.bias is not None:
        bias = torch.zeros(weight.shape[0], dtype=torch.float64, device=weight.device)
        if first.bias is not None:
            bias += w2 @ first.bias.double()
        if second.bias is not None:
            bias += second.bias.double()
    kw = {"device": first.weight.device, "dtype": first.weight.dtype}
    if isinstance(first, nn.Linear):
        out = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, **kw)
    else:
        stride = tuple(a * b for a, b in zip(first.stride, second.stride))
        conv = nn.Conv2d if isinstance(first, nn.Conv2d) else nn.Conv1d
        out = conv(weight.shape[1], weight.shape[0], 1, stride=stride, bias=bias is not None, **kw)
    out.weight.copy_(weight.reshape(out.weight.shape))
    if bias is not None:
        out.bias.copy_(bias)
    return out
