"""Tucker-2 of k×k convolutions: ``W ≈ G ×_out U_out ×_in U_in``, three layers for one.

``in_proj`` 1×1 C→r1, ``core`` k×k r1→r2 with the layer's stride, padding, dilation and
padding mode, ``out_proj`` 1×1 r2→S with the bias. A rank equal to its side's size drops that
factor (Tucker-1: the 3-channel stem conv keeps no input factor). Through tensorly (HOSVD
initialisation, optional HOOI iterations). With calibration statistics the input mode is
whitened first, so the truncation weighs each input direction by how much the data uses it.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ..decompose import tucker2_factors, unfold
from ..factorized import LayerSpec, make_layer
from ..ranks.rules import energy_rank, tucker_ranks_for_ratio, vbmf_rank
from .base import (
    Method, Ranks, _every, _scaled, along_ray, data_aware_weight, tail_sums, unweigh_output, unwhiten_input, window,
)


class Tucker2(Method):
    name = "tucker2"
    rank_names = ("r_in", "r_out")
    paper_trainable = {"in_proj": False, "core": True, "out_proj": False}

    def applies(self, spec: LayerSpec) -> str:
        if spec.kind != "conv" or spec.pointwise:
            return "tucker2 needs a convolution with a kernel larger than 1x1"
        if spec.groups != 1:
            kind = "depthwise" if spec.groups == spec.in_channels else "grouped"
            return f"{kind} convolution (groups={spec.groups})"
        return ""

    def caps(self, spec: LayerSpec) -> Ranks:
        return (spec.in_channels, spec.out_channels)

    def _weight(self, weight, stats):
        return data_aware_weight(weight, stats)[0]

    def target_ranks(self, weight, spec, config, stats=None) -> Ranks:
        c, s = spec.in_channels, spec.out_channels
        if config.rank_rule == "ratio":
            return tucker_ranks_for_ratio(c, s, spec.kernel_numel, config.ratio, config.beta)
        if config.rank_rule == "fixed":
            r1, r2 = (config.rank, config.rank) if isinstance(config.rank, int) else (config.rank + config.rank)[:2]
            return min(r1, c), min(r2, s)
        w = self._weight(weight, stats)
        if config.rank_rule == "energy":
            sv = lambda mode: torch.linalg.svdvals(unfold(w, mode))  # noqa: E731
            return energy_rank(sv(1), config.energy), energy_rank(sv(0), config.energy)
        return vbmf_rank(unfold(w, 1)), vbmf_rank(unfold(w, 0))

    def candidates(self, target, caps, window_, quantum) -> list[Ranks]:
        return along_ray(target, caps, lambda r, cap: window(r, window_, quantum, cap), quantum)

    def global_candidates(self, target, caps, quantum, *, every: bool = False) -> list[Ranks]:
        values = _every if every else _scaled
        return along_ray(target, caps, lambda r, cap: values(r, cap, quantum), quantum)

    def error_curve(self, weight, spec, stats=None) -> Callable[[Ranks], float]:
        # The HOSVD bound: the discarded energy of both unfoldings (exact when one side is whole),
        # relative to the layer's (weighted) energy, or absolute when sensitivity-weighted.
        w, _, out_w = data_aware_weight(weight, stats)
        out_tail, in_tail = tail_sums(torch.linalg.svdvals(unfold(w, 0))), tail_sums(torch.linalg.svdvals(unfold(w, 1)))
        scale = 1.0 if out_w is not None else 1.0 / max(float(out_tail[0]), 1e-300)
        return lambda r: scale * float(in_tail[min(r[0], len(in_tail) - 1)] + out_tail[min(r[1], len(out_tail) - 1)])

    def modules(self, spec, ranks, *, device=None, dtype=None) -> "OrderedDict[str, nn.Module]":
        r1, r2 = ranks
        c, s = spec.in_channels, spec.out_channels
        kw = {"device": device, "dtype": dtype}
        out: OrderedDict[str, nn.Module] = OrderedDict()
        if r1 < c:
            out["in_proj"] = make_layer(spec, c, r1, **kw)
        out["core"] = make_layer(spec, r1, r2, spatial=True, **kw)
        if r2 < s:
            out["out_proj"] = make_layer(spec, r2, s, **kw)
        return out

    def factorize(self, weight, spec, ranks, *, stats=None, options: Mapping[str, Any] | None = None,
                  report: dict | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
        w, wh, out_w = data_aware_weight(weight, stats)
        if wh is not None and report is not None:
            report.update(whitening=wh.method, damping=wh.damping, note=wh.note, output_weighted=out_w is not None)
        t = tucker2_factors(w, tuple(ranks), n_iter=int((options or {}).get("tucker_iters", 0)))
        out = {"core.weight": t.core}
        if t.in_factor is not None:
            out["in_proj.weight"] = t.in_factor.T
        if t.out_factor is not None:
            out["out_proj.weight"] = t.out_factor
        if wh is not None:  # the factors at the layer's input and output go back to its coordinates
            first = "in_proj.weight" if "in_proj.weight" in out else "core.weight"
            out[first] = unwhiten_input(out[first], wh)
            last = "out_proj.weight" if "out_proj.weight" in out else "core.weight"
            out[last] = unweigh_output(out[last], out_w)
        return out


__all__ = ["Tucker2"]
