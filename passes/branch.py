"""`BranchPass`: turn Tucker-2 cores into grouped convs with N branches (paper 2.4)."""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from fxlrd.branch import BlockTerms, fit_btd, truncate_blocks
from fxlrd.factorized import Factorized, module_weight, reference_weight, to_module_layout
from fxlrd.methods.base import data_aware_weight, unweigh_output, unwhiten_input, weigh_output, whiten_input

from fxlrd.sites import set_submodule

__all__ = ["BranchPass"]


class BranchPass(PassBase):
    """Make every Tucker-2 layer (with both ``in_proj`` and ``out_proj``) N-branched.

    Ranks are rounded down to multiples of ``branches``; the core becomes a conv with
    ``groups=branches``. ``init="truncate"`` keeps the core's diagonal blocks;
    ``init="btd"`` fits the blocks by block-term ALS (`fxlrd.branch.fit_btd`) to the
    original layer's weight when ``reference`` (the model before decomposition) is given,
    else to the current Tucker weight. Tucker-1 layers are left alone.
    """

    def __init__(self, branches: int = 2, init: str = "btd", reference: nn.Module | None = None, sweeps: int = 5,
                 stats: Mapping[str, Any] | None = None):  # fmt: skip
        if not isinstance(branches, int) or branches < 2:
            raise ValueError(f"branches must be an int >= 2, got {branches!r}")
        if init not in ("btd", "truncate"):
            raise ValueError(f"init must be 'btd' or 'truncate', got {init!r}")
        super().__init__()
        self.branches, self.init, self.reference, self.sweeps = branches, init, reference, sweeps
        self.stats = dict(stats or {})

    def _targets(self, gm: fx.GraphModule) -> list[str]:
        names = []
        for name, m in gm.named_modules():
            if isinstance(m, Factorized):  # a Tucker-2 structure: 1x1 in, one k x k core conv, 1x1 out
                kids = dict(m.named_children())
                core = kids.get("core")
                if {"in_proj", "core", "out_proj"} <= kids.keys() and isinstance(core, nn.modules.conv._ConvNd) \
                        and core.groups == 1:
                    if min(kids["core"].in_channels, kids["core"].out_channels) >= self.branches:
                        names.append(name)
        return names

    @torch.no_grad()
    def _branch(self, name: str, fact: Factorized) -> dict[str, nn.Module]:
        n = self.branches
        inp, core, out = fact.in_proj, fact.core, fact.out_proj
        v = inp.weight.reshape(inp.out_channels, -1).T.double()  # C × r1
        u = out.weight.reshape(out.out_channels, -1).double()  # S × r2
        g = module_weight(core).double()  # (r2, r1, *k), a transposed core's too
        blocks = truncate_blocks(v, g, u, n)
        if self.init == "btd":
            target = None
            if self.reference is not None:
                try:
                    target = reference_weight(self.reference.get_submodule(name), core)
                except AttributeError:
                    target = None
            if target is None or tuple(target.shape) != (u.shape[0], v.shape[0], *g.shape[2:]):
                target = torch.einsum("rq...,sr,cq->sc...", g, u, v)
            stats = self.stats.get(name)
            if stats is None:
                blocks = fit_btd(target.cpu(), blocks, sweeps=self.sweeps)
            else:  # data-aware: fit in the coordinates where weight error is output error on the calibration data
                blocks = self._fit_on_data(target.cpu(), v.cpu(), g.cpu(), u.cpu(), stats)
        r1, r2 = blocks.cores[0].shape[1], blocks.cores[0].shape[0]
        kw = {"device": core.weight.device, "dtype": core.weight.dtype}
        conv = type(inp) if type(inp) in (nn.Conv1d, nn.Conv2d, nn.Conv3d) else nn.Conv2d
        new_in = conv(inp.in_channels, n * r1, 1, bias=False, **kw)
        if core.transposed:
            new_core = type(core)(n * r1, n * r2, core.kernel_size, stride=core.stride, padding=core.padding,
                                  output_padding=core.output_padding, dilation=core.dilation, groups=n, bias=False, **kw)  # fmt: skip
        else:
            new_core = conv(n * r1, n * r2, core.kernel_size, stride=core.stride, padding=core.padding,
                            dilation=core.dilation, groups=n, padding_mode=core.padding_mode, bias=False, **kw)  # fmt: skip
        new_out = conv(n * r2, out.out_channels, 1, bias=out.bias is not None, **kw)
        new_in.weight.copy_(torch.cat(blocks.in_factors, 1).T.reshape(new_in.weight.shape))
        new_core.weight.copy_(to_module_layout(torch.cat(blocks.cores, 0), new_core))
        new_out.weight.copy_(torch.cat(blocks.out_factors, 1).reshape(new_out.weight.shape))
        if out.bias is not None:
            new_out.bias.copy_(out.bias)
        new = {"in_proj": new_in, "core": new_core, "out_proj": new_out}
        for role, module in new.items():  # a frozen factor's replacement stays frozen
            for pname, param in module.named_parameters():
                param.requires_grad_(getattr(fact.get_submodule(role), pname).requires_grad)
        return new

    def _fit_on_data(self, target: torch.Tensor, v: torch.Tensor, g: torch.Tensor, u: torch.Tensor, stats: Any) -> BlockTerms:
        """The block-term fit of ``target`` minimising the layer's output error on the
        calibration data (``stats``: its `SiteStats`): the whitened SVD's coordinates, input
        mode whitened and output mode weighed by the model's sensitivity, then mapped back."""
        target_t, white, out_w = data_aware_weight(target, stats)
        v_t = whiten_input(v.T, white).T  # C × r1: the factor that reads the input, in whitened coordinates
        u_t = weigh_output(u, out_w)  # S × r2
        blocks = fit_btd(target_t, truncate_blocks(v_t, g, u_t, self.branches), sweeps=self.sweeps)
        return BlockTerms(in_factors=[unwhiten_input(f.T, white).T for f in blocks.in_factors], cores=blocks.cores,
                          out_factors=[unweigh_output(f, out_w) for f in blocks.out_factors])  # fmt: skip

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        gm = graph_module
        targets = self._targets(gm)
        if not targets:
            return PassResult(gm, False)
        replacements = {name: self._branch(name, gm.get_submodule(name)) for name in targets}
        for name, modules in replacements.items():
            fact = gm.get_submodule(name)
            for role, module in modules.items():
                set_submodule(gm, f"{name}.{role}", module.train(fact.training))
            fact.ranks = (modules["core"].in_channels, modules["core"].out_channels)
            for node in gm.graph.nodes:
                info = node.meta.get("fxlrd", {})
                if node.op == "call_module" and info.get("source") == name and "role" in info:
                    info["ranks"], info["branches"] = fact.ranks, self.branches
        gm.graph.lint()
        gm.recompile()
        return PassResult(gm, True)


