"""`FreezePass`: mark each factor's role and trainability, and set ``requires_grad``."""

from __future__ import annotations

from torch import fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from fxlrd.freeze import check_policy, factor_nodes, is_trainable

__all__ = ["FreezePass"]


class FreezePass(PassBase):
    """Freeze factors of decomposed layers by ``policy``: ``"none"``, ``"paper"`` (freeze
    ``in_proj`` of SVD pairs, ``in_proj`` and ``out_proj`` of Tucker triples) or a mapping from
    role (``"in_proj"``, ``"core"``, ``"out_proj"``) or glob pattern on the factor's name to
    trainable. Records ``trainable`` in ``node.meta["fxlrd"]``; parameters outside factors are
    not touched."""

    def __init__(self, policy="paper") -> None:
        super().__init__()
        self.policy = check_policy(policy)

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        modified = False
        for node, module in factor_nodes(graph_module):
            info = node.meta["fxlrd"]
            siblings = len(list(graph_module.get_submodule(info["source"]).children()))
            train = is_trainable(self.policy, node.target, info["role"], info["method"], siblings)
            if info.get("trainable") != train:
                info["trainable"] = train
                modified = True
            for p in module.parameters():
                if p.requires_grad != train:
                    if not train:
                        p.grad = None
                    p.requires_grad_(train)
                    modified = True
        return PassResult(graph_module, modified)
