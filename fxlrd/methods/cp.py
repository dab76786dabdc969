"""CP decomposition of k×k convolutions (Lebedev et al., 2015), through tensorly's ``parafac``.

``W ≈ Σ_r a_r ⊗ b_r ⊗ h_r ⊗ w_r`` becomes four layers: ``in_proj`` 1×1 C→R (the b_r),
``core`` a depthwise k×1 conv then a depthwise 1×k conv on the R channels (the h_r and w_r,
carrying the stride, padding and dilation of their axis), and ``out_proj`` 1×1 R→S (the a_r,
with the bias). A Conv1d's core is one depthwise conv. Far fewer parameters than Tucker at the
same rank; the ALS fit is slower and less stable, so it is not the default
(``LRDConfig(conv_method="cp")`` asks for it).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from functools import lru_cache
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ..decompose import cp_factors
from ..factorized import LayerSpec, make_layer
from .base import Method, Ranks, data_aware_weight, unweigh_output, unwhiten_input


def _axis_args(spec: LayerSpec, axis: int) -> dict[str, Any]:
    """Stride, padding and dilation of one spatial axis, for a depthwise conv along it."""
    one = [1] * spec.dims
    zero = [0] * spec.dims

    def only(values, fill):
        out = list(fill)
        out[axis] = values[axis]
        return tuple(out)

    padding = spec.padding if isinstance(spec.padding, str) else only(spec.padding, zero)
    return {"stride": only(spec.stride, one), "padding": padding, "dilation": only(spec.dilation, one),
            "padding_mode": spec.padding_mode}  # fmt: skip


class CP(Method):
    name = "cp"
    rank_names = ("rank",)
    paper_trainable = {"in_proj": False, "core": True, "out_proj": False}
    rank_rules = ("ratio", "fixed")

    def applies(self, spec: LayerSpec) -> str:
        if spec.kind != "conv" or spec.pointwise:
            return "cp needs a convolution with a kernel larger than 1x1"
        if spec.dims not in (1, 2):
            return f"cp supports Conv1d and Conv2d, not a {spec.dims}-d convolution"
        if spec.transposed:
            return "cp does not decompose a transposed convolution (use tucker2)"
        if spec.groups != 1:
            kind = "depthwise" if spec.groups == spec.in_channels else "grouped"
            return f"{kind} convolution (groups={spec.groups})"
        if isinstance(spec.padding, str) and spec.padding == "same" and any(s != 1 for s in spec.stride):
            return "padding='same' with a stride"
        return ""

    def caps(self, spec: LayerSpec) -> Ranks:
        modes = [spec.out_channels, spec.in_channels, *spec.kernel_size]
        total = math.prod(modes)
        return (min(total // m for m in modes),)  # the generic bound on the CP rank

    def target_ranks(self, weight, spec, config, stats=None) -> Ranks:
        if config.rank_rule == "ratio":
            per_rank = spec.in_channels + spec.out_channels + sum(spec.kernel_size)
            rank = math.floor(spec.in_channels * spec.out_channels * spec.kernel_numel / (config.ratio * per_rank) + 1e-9)
        else:
            rank = config.rank if isinstance(config.rank, int) else config.rank[0]
        return (max(0, min(rank, self.caps(spec)[0])),)

    def global_candidates(self, target: Ranks, caps: Ranks, quantum: int, *, every: bool = False) -> list[Ranks]:
        """A dozen ranks from R/4 to 2R even for a parameter budget: each candidate's error is an
        ALS fit, so every multiple of the quantum up to the cap took minutes per layer."""
        return super().global_candidates(target, caps, quantum, every=False)

    def error_curve(self, weight, spec, stats=None) -> Callable[[Ranks], float]:
        # No closed form: each asked-for rank is fitted (a short ALS) and its error measured.
        w, _, out_w = data_aware_weight(weight, stats)
        total = 1.0 if out_w is not None else (float((w**2).sum()) or 1.0)

        @lru_cache(maxsize=None)
        def error(ranks: Ranks) -> float:
            f = cp_factors(w, ranks[0], n_iter=25)
            approx = torch.einsum("sr,cr,hr...->sch...", f.out_factor, f.in_factor, _kernel_outer(f.kernel_factors))
            return float(((w - approx) ** 2).sum()) / total

        return lambda r: error(tuple(r))

    def modules(self, spec, ranks, *, device=None, dtype=None) -> "OrderedDict[str, nn.Module]":
        (r,) = ranks
        kw = {"device": device, "dtype": dtype}
        if spec.dims == 1:
            core: nn.Module = make_layer(spec, r, r, spatial=True, groups=r, **kw)
        else:
            kh, kwid = spec.kernel_size
            core = nn.Sequential(
                make_layer(spec, r, r, kernel_size=(kh, 1), groups=r, **_axis_args(spec, 0), **kw),
                make_layer(spec, r, r, kernel_size=(1, kwid), groups=r, **_axis_args(spec, 1), **kw),
            )
        return OrderedDict(in_proj=make_layer(spec, spec.in_channels, r, **kw), core=core,
                           out_proj=make_layer(spec, r, spec.out_channels, **kw))  # fmt: skip

    def factorize(self, weight, spec, ranks, *, stats=None, options: Mapping[str, Any] | None = None,
                  report: dict | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
        (r,) = ranks
        w, wh, out_w = data_aware_weight(weight, stats)
        if wh is not None and report is not None:
            report.update(whitening=wh.method, damping=wh.damping, note=wh.note, output_weighted=out_w is not None)
        f = cp_factors(w, r, n_iter=int((options or {}).get("cp_iters", 100)))
        in_proj = f.in_factor.T  # (R, C)
        if wh is not None:
            in_proj = unwhiten_input(in_proj, wh)
        out = {"in_proj.weight": in_proj, "out_proj.weight": unweigh_output(f.out_factor, out_w)}
        if spec.dims == 1:
            out["core.weight"] = f.kernel_factors[0].T
        else:
            out["core.0.weight"] = f.kernel_factors[0].T
            out["core.1.weight"] = f.kernel_factors[1].T
        if report is not None:
            approx = torch.einsum("sr,cr,hr...->sch...", f.out_factor, f.in_factor, _kernel_outer(f.kernel_factors))
            report["fit_error"] = float(torch.linalg.norm(w - approx) / torch.linalg.norm(w).clamp_min(1e-300))
        return out


def _kernel_outer(kernel_factors: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """``(k_1, R) × (k_2, R) → (k_1, R, k_2)`` ordered for the einsum above: (h, r, w...)."""
    if len(kernel_factors) == 1:
        return kernel_factors[0]
    h, w = kernel_factors
    return torch.einsum("hr,wr->hrw", h, w)


__all__ = ["CP"]
