"""`FreezePass`: set each factor's trainability by a policy, and record it on its nodes."""

from __future__ import annotations

from torch import fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from fxlrd.freeze import _factor_name, apply_policy, check_policy, factor_nodes
from fxlrd.sites import factor_modules

__all__ = ["FreezePass"]


class FreezePass(PassBase):
    """Freeze factors of decomposed layers by ``policy``: ``"none"``, ``"paper"`` (each method's
    handler says which roles train: SVD trains ``out_proj``, Tucker-2 and CP their ``core``) or a
    mapping from role (``"in_proj"``, ``"core"``, ``"out_proj"``) or glob pattern on the factor's
    name to trainable. Records ``trainable`` in ``node.meta["fxlrd"]``; parameters outside
    factors are not touched. Roles are read from the `Factorized` modules, so this works on a
    model reloaded with ``torch.load`` as well."""

    def __init__(self, policy="paper") -> None:
        super().__init__()
        self.policy = check_policy(policy)

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        before = {name: all(p.requires_grad for p in m.parameters()) for name, _, _, m in factor_modules(graph_module)}
        flags = apply_policy(graph_module, self.policy)
        modified = flags != before
        for node, _ in factor_nodes(graph_module):
            train = flags.get(_factor_name(node.target, flags), True)
            if node.meta["fxlrd"].get("trainable") != train:
                node.meta["fxlrd"]["trainable"] = train
                modified = True
        return PassResult(graph_module, modified)
