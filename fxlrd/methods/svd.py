"""SVD of Linear and 1×1 conv layers: ``W ≈ (U_r √Σ_r)(√Σ_r V_rᵀ)``, two layers for one.

``in_proj = √Σ_r V_rᵀ`` (C→r, carries the stride and padding), ``out_proj = U_r √Σ_r`` (r→S,
carries the bias). Of a 1×1 transposed convolution, ``out_proj`` is the transposed one, with
its stride, padding and output padding: ``in_proj`` runs at the input's resolution, not at the
(strided, larger) output's. With calibration statistics the SVD is of the whitened weight ``W S``
(SVD-LLM): at rank r it minimises the output error ``‖(W − W′)X‖_F`` on the calibration
inputs instead of the weight error.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ..decompose import leading_svd, svd_factors
from ..factorized import LayerSpec, make_layer
from ..ranks.rules import energy_rank, svd_rank_for_ratio, vbmf_rank
from .base import Method, Ranks, data_aware_weight, error_from_tail, tail_sums, unweigh_output, unwhiten_input


def _matrix(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().reshape(weight.shape[0], weight.shape[1]).double().cpu()


class SVD(Method):
    name = "svd"
    rank_names = ("rank",)
    paper_trainable = {"in_proj": False, "out_proj": True}

    def applies(self, spec: LayerSpec) -> str:
        if not spec.pointwise:
            return f"svd needs a Linear or 1x1 conv, not a {'x'.join(map(str, spec.kernel_size))} kernel"
        if spec.groups != 1:
            return f"grouped convolution (groups={spec.groups})"
        return ""

    def caps(self, spec: LayerSpec) -> Ranks:
        return (min(spec.in_channels, spec.out_channels),)

    def target_ranks(self, weight, spec, config, stats=None) -> Ranks:
        c, s = spec.in_channels, spec.out_channels
        if config.rank_rule == "ratio":
            rank = svd_rank_for_ratio(c, s, config.ratio)
        elif config.rank_rule == "fixed":
            rank = config.rank if isinstance(config.rank, int) else config.rank[0]
        else:
            m = data_aware_weight(_matrix(weight), stats)[0]
            rank = energy_rank(torch.linalg.svdvals(m), config.energy) if config.rank_rule == "energy" else vbmf_rank(m)
        return (min(rank, c, s),)

    def error_curve(self, weight, spec, stats=None) -> Callable[[Ranks], float]:
        m, _, out_w = data_aware_weight(_matrix(weight), stats)
        tail = tail_sums(torch.linalg.svdvals(m))
        curve = error_from_tail(tail, float(tail[0]), absolute=out_w is not None)
        return lambda r: curve(r[0])

    def modules(self, spec, ranks, *, device=None, dtype=None) -> "OrderedDict[str, nn.Module]":
        (r,) = ranks
        c, s = spec.in_channels, spec.out_channels
        kw = {"device": device, "dtype": dtype}
        if r < c and r < s and spec.transposed:  # the stride on the last factor, which widens the output
            return OrderedDict(in_proj=make_layer(spec, c, r, **kw), out_proj=make_layer(spec, r, s, spatial=True, **kw))
        if r < c and r < s:
            return OrderedDict(in_proj=make_layer(spec, c, r, spatial=True, **kw), out_proj=make_layer(spec, r, s, **kw))
        return OrderedDict(out_proj=make_layer(spec, c, s, spatial=True, **kw))  # a full-rank side: one C→S layer

    def factorize(self, weight, spec, ranks, *, stats=None, options: Mapping[str, Any] | None = None,
                  report: dict | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
        (r,) = ranks
        m, w, out_w = data_aware_weight(_matrix(weight), stats)
        if w is not None and report is not None:
            report.update(whitening=w.method, damping=w.damping, note=w.note, output_weighted=out_w is not None)
        f = svd_factors(m, r)
        in_f, out_f = f.in_factor, unweigh_output(f.out_factor, out_w)
        if w is not None:
            in_f = unwhiten_input(in_f, w)
        if r < spec.in_channels and r < spec.out_channels:
            return {"in_proj.weight": in_f, "out_proj.weight": out_f}
        return {"out_proj.weight": out_f @ in_f}


__all__ = ["SVD", "leading_svd"]
