"""`DecomposePass`: replace each planned layer site by its factor chain."""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from fxlrd.decompose import thread_map
from fxlrd.errors import PlanMismatchError
from fxlrd.factorized import Factorized, decompose_weight
from fxlrd.methods import get_method
from fxlrd.plan import LayerPlan, Plan
from fxlrd.sites import Site, find_sites, replace_site

__all__ = ["DecomposePass"]

_WORKING_MEMORY = 2 << 30  # bytes of float64 working copies factorized layers may hold at once


def _check_matches(site: Site, lp: LayerPlan) -> None:
    spec = site.spec
    got = None if spec is None else (spec.in_channels, spec.out_channels, spec.kernel_size)
    want = (lp.in_channels, lp.out_channels, tuple(lp.kernel_size))
    if got != want:
        got_text = site.op + ("" if got is None else f" {got[0]}->{got[1]} kernel {got[2]}")
        raise PlanMismatchError(
            f"plan does not match the model at {lp.name!r}: the plan has {lp.layer_type} "
            f"{want[0]}->{want[1]} kernel {want[2]}, the model has {got_text}; "
            "make the plan from this model with fxlrd.plan(model)"
        )
    if lp.decomposed and spec is not None:
        from fxlrd.methods import get_method

        why = get_method(lp.method).applies(spec)
        if why:
            raise PlanMismatchError(f"plan decomposes {lp.name!r} with {lp.method}, which does not apply: {why}")


class DecomposePass(PassBase):
    """Decompose the layer sites a `Plan` marks with a method (``svd``, ``tucker2``, ``cp``...).

    Each site becomes a `Factorized` container at the site's name (the module's qualified
    name, or the path that owned a functional layer's weight) whose children (``in_proj``,
    ``core``, ``out_proj``) are each a ``call_module`` node. All factors are computed before
    the graph is touched, so a failure leaves it unchanged.

    Args:
        plan: the plan.
        stats: calibration statistics by site name (`fxlrd.calibrate`): those layers are
            decomposed data-aware (whitened).
        factors: precomputed `Factorized` modules by site name (sequential calibration).
    """

    def __init__(self, plan: Plan, *, stats: Mapping[str, Any] | None = None,
                 factors: Mapping[str, Factorized] | None = None) -> None:  # fmt: skip
        if not isinstance(plan, Plan):
            raise TypeError(f"DecomposePass needs an fxlrd.Plan, got {type(plan).__name__}; make one with fxlrd.plan(model)")
        super().__init__()
        self.plan = plan
        self.options = {"tucker_iters": int(plan.settings.get("tucker_iters", 0) or 0),
                        "cp_iters": int(plan.settings.get("cp_iters") or 300)}  # fmt: skip
        self.stats = dict(stats or {})
        self.factors = dict(factors or {})
        self.reports: dict[str, dict[str, Any]] = {}

    def _pending(self, gm: fx.GraphModule) -> dict[str, Site]:
        sites = find_sites(gm)
        return {name: site for name, site in sites.items() if name in self.plan.layers and self.plan[name].decomposed}

    def requires(self, graph_module: fx.GraphModule) -> None:
        pending = self._pending(graph_module)
        for lp in self.plan.decomposed:
            if lp.name in pending:
                _check_matches(pending[lp.name], lp)
                continue
            try:
                module = graph_module.get_submodule(lp.name)
            except AttributeError:
                module = None
            if not isinstance(module, Factorized):
                raise PlanMismatchError(
                    f"the plan decomposes {lp.name!r} but the model has no conv/linear layer there; "
                    "was the plan made for another model (or another capture)? Make it with fxlrd.plan(model)"
                )

    def _decompose(self, gm: fx.GraphModule, site: Site) -> Factorized:
        if site.name in self.factors:
            return self.factors[site.name]
        lp = self.plan[site.name]
        stats = self.stats.get(site.name) if lp.data_aware else None
        caps = get_method(lp.method).caps(site.spec)
        if len(lp.ranks) != len(caps) or not all(1 <= r <= c for r, c in zip(lp.ranks, caps)):
            raise PlanMismatchError(
                f"the plan gives {site.name!r} ranks {tuple(lp.ranks)}, outside what its {lp.method} takes "
                f"({len(caps)} rank{'s' if len(caps) > 1 else ''}, "
                f"{' and '.join(f'1 to {c}' for c in caps)} for this {site.spec.in_channels}->{site.spec.out_channels} "
                "layer): edit the ranks, or keep the layer (method 'keep')"
            )
        fact, report = decompose_weight(site.weight(gm), site.bias(gm), site.spec, lp.method, lp.ranks,
                                        stats=stats, options=self.options, source=site.name)  # fmt: skip
        if report:
            self.reports[site.name] = report
        return fact

    @torch.no_grad()
    def call(self, graph_module: fx.GraphModule) -> PassResult:
        gm = graph_module
        pending = self._pending(gm)
        if not pending:
            return PassResult(gm, False)
        # Layers are factorized side by side (`thread_map`): independent, and each is single-threaded.
        # Each worker holds a few float64 copies of its layer's weight: at most ~2 GiB of them at once.
        largest = max(site.weight(gm).numel() for site in pending.values())
        workers = max(1, _WORKING_MEMORY // (largest * 8 * 4))
        replacements = dict(zip(pending, thread_map(lambda site: self._decompose(gm, site), pending.values(), workers)))
        for name, fact in replacements.items():
            replace_site(gm, pending[name], fact)
        gm.graph.lint()
        gm.recompile()
        return PassResult(gm, True)
