"""`DecomposePass`: replace each planned conv/linear ``call_module`` by its factor chain."""

from __future__ import annotations

import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from fxlrd.errors import PlanMismatchError
from fxlrd.factorized import Factorized, decompose_layer, layer_spec
from fxlrd.plan import LayerPlan, Plan

from ._graph import replace_with_chain, set_submodule

__all__ = ["DecomposePass"]


def _check_matches(name: str, module: torch.nn.Module, lp: LayerPlan) -> None:
    try:
        spec = layer_spec(module)
    except TypeError:
        spec = None
    got = None if spec is None else (spec.in_channels, spec.out_channels, spec.kernel_size)
    want = (lp.in_channels, lp.out_channels, lp.kernel_size)
    if got != want:
        got_text = type(module).__name__ + ("" if got is None else f" {got[0]}->{got[1]} kernel {got[2]}")
        raise PlanMismatchError(
            f"plan does not match the model at {name!r}: the plan has {lp.layer_type} "
            f"{want[0]}->{want[1]} kernel {want[2]}, the model has {got_text}; "
            "make the plan from this model with fxlrd.plan(model)"
        )


class DecomposePass(PassBase):
    """Decompose the layers a `Plan` marks ``svd`` or ``tucker2``.

    ``layer1.0.conv2`` becomes a `Factorized` container at the same qualified name whose
    children (``in_proj``, ``core``, ``out_proj``) are each a ``call_module`` node. All
    factors are computed before the graph is touched, so a failure leaves it unchanged.
    """

    def __init__(self, plan: Plan) -> None:
        if not isinstance(plan, Plan):
            raise TypeError(f"DecomposePass needs an fxlrd.Plan, got {type(plan).__name__}; make one with fxlrd.plan(model)")
        super().__init__()
        self.plan = plan
        self.tucker_iters = int(plan.settings.get("tucker_iters", 0))

    def _pending(self, gm: fx.GraphModule) -> dict[str, list[fx.Node]]:
        nodes: dict[str, list[fx.Node]] = {}
        for node in gm.graph.nodes:
            if node.op == "call_module" and node.target in self.plan.layers and self.plan[node.target].decomposed:
                nodes.setdefault(node.target, []).append(node)
        return nodes

    def requires(self, graph_module: fx.GraphModule) -> None:
        pending = self._pending(graph_module)
        for lp in self.plan.decomposed:
            try:
                module = graph_module.get_submodule(lp.name)
            except AttributeError:
                module = None
            if module is None or (lp.name not in pending and not isinstance(module, Factorized)):
                raise PlanMismatchError(
                    f"the plan decomposes {lp.name!r} but the model has no conv/linear layer called there; "
                    "was the plan made for another model? Make it with fxlrd.plan(model)"
                )
            if lp.name in pending:
                _check_matches(lp.name, module, lp)

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        gm = graph_module
        pending = self._pending(gm)
        if not pending:
            return PassResult(gm, False)
        replacements = {
            name: decompose_layer(gm.get_submodule(name), self.plan[name].method, self.plan[name].ranks,
                                  tucker_iters=self.tucker_iters)
            for name in pending
        }  # fmt: skip
        for name, fact in replacements.items():
            set_submodule(gm, name, fact)
            roles = [role for role, _ in fact.named_children()]
            meta = [{"source": name, "method": fact.method, "role": role, "ranks": fact.ranks} for role in roles]
            for node in pending[name]:
                replace_with_chain(gm, node, [f"{name}.{role}" for role in roles], meta)
        gm.graph.lint()
        gm.recompile()
        return PassResult(gm, True)
