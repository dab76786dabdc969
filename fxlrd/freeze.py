"""Freezing factors for faster fine-tuning (paper 2.2) and sequential freezing (paper 000).

Frozen factors need no weight gradients, so backward gets cheaper. Policies say which factor
roles stay trainable; `SequentialFreezer` alternates them on a schedule so every factor is
trained while each step computes weight gradients for only part of them.
"""

from __future__ import annotations

import fnmatch
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import fx, nn

__all__ = ["PAPER_POLICY", "factor_nodes", "is_trainable", "freeze", "param_groups", "SequentialFreezer", "DEFAULT_ORDER"]

# Paper 2.2: train out_proj of SVD pairs and the core of Tucker triples, freeze the rest.
PAPER_POLICY: Mapping[str, Mapping[str, bool]] = {
    "svd": {"in_proj": False, "out_proj": True},
    "tucker2": {"in_proj": False, "core": True, "out_proj": False},
}

# Sequential freezing: the roles trainable in each phase, per method. Phase 0 is the paper's
# freezing; phase 1 trains the factors phase 0 froze.
DEFAULT_ORDER: Sequence[Mapping[str, Sequence[str]]] = (
    {"svd": ("out_proj",), "tucker2": ("core",)},
    {"svd": ("in_proj",), "tucker2": ("in_proj", "out_proj")},
)

Policy = str | Mapping[str, bool]


def factor_nodes(gm: fx.GraphModule) -> Iterator[tuple[fx.Node, nn.Module]]:
    """``call_module`` nodes that are factors of a decomposed layer, with their modules (once each)."""
    seen = set()
    for node in gm.graph.nodes:
        info = node.meta.get("fxlrd")
        if node.op == "call_module" and info and "role" in info and node.target not in seen:
            seen.add(node.target)
            yield node, gm.get_submodule(node.target)


def _sibling_count(gm: fx.GraphModule, source: str) -> int:
    return len(list(gm.get_submodule(source).children()))


def is_trainable(policy: Policy, name: str, role: str, method: str, n_factors: int) -> bool:
    """Whether the factor ``name`` (with ``role`` in a ``method`` layer) trains under ``policy``.

    A layer left as a single factor (a full-rank side dropped) always trains: freezing it
    would freeze the whole layer. In a mapping, glob patterns on the factor's qualified name
    win over role names; unmatched factors train.
    """
    if n_factors <= 1 or policy == "none":
        return True
    if policy == "paper":
        return PAPER_POLICY.get(method, {}).get(role, True)
    for pattern, trainable in policy.items():
        if pattern not in ("in_proj", "core", "out_proj") and fnmatch.fnmatchcase(name, pattern):
            return bool(trainable)
    return bool(policy.get(role, True))


def check_policy(policy: Any) -> Policy:
    if isinstance(policy, str):
        if policy not in ("none", "paper"):
            raise ValueError(f"freeze policy must be 'none', 'paper' or a mapping of role/pattern -> trainable, got {policy!r}")
        return policy
    if isinstance(policy, Mapping) and all(isinstance(k, str) and isinstance(v, bool) for k, v in policy.items()):
        return policy
    raise ValueError(
        f"freeze policy must be 'none', 'paper' or a mapping like {{'core': True, 'in_proj': False}}, got {policy!r}"
    )


def freeze(gm: fx.GraphModule, policy: Policy = "paper") -> fx.GraphModule:
    """Apply a freeze policy to the factors of a decomposed ``gm`` (in place) and return it."""
    from fxlrd.passes import FreezePass

    return FreezePass(policy)(gm).graph_module


def param_groups(gm: nn.Module, **options: Any) -> list[dict[str, Any]]:
    """Optimizer parameter groups: trainable factors, frozen factors, all other parameters.

    Frozen factors are included (their ``.grad`` stays None, so optimizers skip them) so a
    `SequentialFreezer` can unfreeze them later without a new optimizer. ``options`` (e.g.
    ``lr``) are added to every group; empty groups are left out. Each group has a ``name``.
    """
    factors: list[nn.Parameter] = []
    if isinstance(gm, fx.GraphModule):
        factors = [p for _, m in factor_nodes(gm) for p in m.parameters()]
    ids = {id(p) for p in factors}
    groups = [
        ("factors_trainable", [p for p in factors if p.requires_grad]),
        ("factors_frozen", [p for p in factors if not p.requires_grad]),
        ("other", [p for p in gm.parameters() if id(p) not in ids]),
    ]
    return [{"params": params, "name": name, **options} for name, params in groups if params]


class SequentialFreezer:
    """Alternate which factors of each decomposed layer train, every ``period`` steps.

    Call `step()` once per epoch or per optimizer step (your choice of unit); it returns True
    when the phase changed. At a switch, newly frozen parameters lose their ``.grad`` (and,
    with ``optimizer``, their optimizer state), so nothing stale acts on them.

    Args:
        gm: a decomposed GraphModule.
        period: steps per phase (>= 1).
        order: phases, each a mapping method -> trainable roles; default `DEFAULT_ORDER`.
        optimizer: if given, state of parameters frozen at a switch is dropped.

    With DistributedDataParallel, re-wrap the model when `step()` returns True: DDP registers
    gradient hooks only for parameters that require grad when it is built.
    """

    def __init__(self, gm: fx.GraphModule, period: int = 1, order: Sequence[Mapping[str, Sequence[str]]] | None = None,
                 optimizer: torch.optim.Optimizer | None = None):  # fmt: skip
        if not isinstance(period, int) or period < 1:
            raise ValueError(f"period must be an int >= 1 (steps per phase), got {period!r}")
        self.gm, self.period, self.optimizer = gm, period, optimizer
        self.order = tuple(order if order is not None else DEFAULT_ORDER)
        if not self.order:
            raise ValueError("order must list at least one phase")
        self.factors = list(factor_nodes(gm))
        if not self.factors:
            raise ValueError("the model has no decomposed factors; run fxlrd.transform first")
        self.steps = 0
        self._apply(self.phase)

    @property
    def phase(self) -> int:
        return (self.steps // self.period) % len(self.order)

    def trainable(self, phase: int) -> dict[str, bool]:
        """Factor name -> trainable in ``phase``."""
        roles = self.order[phase]
        out = {}
        for node, _ in self.factors:
            info = node.meta["fxlrd"]
            policy = {r: r in roles.get(info["method"], ()) for r in ("in_proj", "core", "out_proj")}
            out[node.target] = is_trainable(policy, node.target, info["role"], info["method"],
                                            _sibling_count(self.gm, info["source"]))  # fmt: skip
        return out

    def _apply(self, phase: int) -> None:
        flags = self.trainable(phase)
        for node, module in self.factors:
            train = flags[node.target]
            node.meta["fxlrd"]["trainable"] = train
            for p in module.parameters():
                if p.requires_grad and not train:
                    p.grad = None
                    if self.optimizer is not None:
                        self.optimizer.state.pop(p, None)
                p.requires_grad_(train)

    def step(self) -> bool:
        """Advance one step; True when this switched the phase."""
        before = self.phase
        self.steps += 1
        if self.phase != before:
            self._apply(self.phase)
            return True
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "period": self.period, "phases": len(self.order)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("period") != self.period or state.get("phases") != len(self.order):
            raise ValueError(
                f"freezer state is for period {state.get('period')} with {state.get('phases')} phases; "
                f"this freezer has period {self.period} with {len(self.order)} phases"
            )
        self.steps = int(state["steps"])
        self._apply(self.phase)
