"""Freezing factors for faster fine-tuning (paper 2.2) and sequential freezing (from "Training
Acceleration of Low-Rank Decomposed Networks using Sequential Freezing and Rank Quantization").

Frozen factors need no weight gradients, so backward gets cheaper. Policies say which factor
roles stay trainable; `SequentialFreezer` alternates them on a schedule so every factor is
trained while each step computes weight gradients for only part of them.

Which module is which factor is read from the `Factorized` containers (their children are
named by role and they record their method), not from graph metadata: it survives deepcopy
and ``torch.save``/``torch.load``. A re-trace by ``torch.fx.symbolic_trace`` (or a pass that
calls it, like ``fuse``) rebuilds the containers as plain modules: freeze before it (the
``requires_grad`` flags survive), since afterwards the roles are gone and freezing raises
`ConfigError` (`param_groups` still works, grouping the factors by their flags). What the
paper's policy trains per method is
declared by each method's handler (`fxlrd.methods`).
"""

from __future__ import annotations

import fnmatch
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import fx, nn

from .errors import ConfigError
from .factorized import Factorized
from .methods import all_roles, get_method, methods
from .sites import factor_modules, uncompiled

__all__ = ["factor_nodes", "factors", "is_trainable", "check_policy", "freeze", "param_groups", "SequentialFreezer"]

Policy = str | Mapping[str, bool]


def factors(model: nn.Module) -> Iterator[tuple[str, str, Factorized, nn.Module]]:
    """Every factor of the model: ``(qualified name, role, container, module)``."""
    yield from factor_modules(model)


def factor_nodes(gm: fx.GraphModule) -> Iterator[tuple[fx.Node, nn.Module]]:
    """``call_module`` nodes that run a factor (or part of one), with the factor's module,
    once per factor; the node's ``meta["fxlrd"]`` is filled in from the container."""
    by_target = {name: (role, fact, module) for name, role, fact, module in factor_modules(gm)}
    seen = set()
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        name = next((n for n in by_target if node.target == n or node.target.startswith(n + ".")), None)
        if name is None or name in seen:
            continue
        seen.add(name)
        role, fact, module = by_target[name]
        info = node.meta.setdefault("fxlrd", {})
        info.update({"source": name.rpartition(".")[0], "method": fact.method, "role": role, "ranks": fact.ranks})
        yield node, module


def is_trainable(policy: Policy, name: str, role: str, method: str, n_factors: int, merged: bool = False) -> bool:
    """Whether the factor ``name`` (with ``role`` in a ``method`` layer) trains under ``policy``.

    A layer left as a single factor (a full-rank side dropped) always trains: freezing it
    would freeze the whole layer. So does a ``merged`` one under ``"paper"``: `MergePass`
    put a neighbouring layer (and its norm) into that factor's slot, so it is no longer a
    factor the paper freezes, and an approximate merge is what fine-tuning has to repair.
    In a mapping, glob patterns on the factor's qualified name win over role names;
    unmatched factors train.
    """
    if n_factors <= 1 or policy == "none":
        return True
    if policy == "paper":
        return merged or get_method(method).paper_trainable.get(role, True)
    roles = set(all_roles())
    for pattern, trainable in policy.items():
        if pattern not in roles and fnmatch.fnmatchcase(name, pattern):
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


def _check_patterns(policy: Policy, names: Sequence[str]) -> None:
    """A mapping's keys that are not roles must match a factor name (a typo would otherwise
    freeze nothing, silently)."""
    if isinstance(policy, str):
        return
    roles = set(all_roles())
    for key in policy:
        if key not in roles and not any(fnmatch.fnmatchcase(n, key) for n in names):
            example = f" (e.g. {names[0]!r}: a layer's factors are '<layer>.<role>')" if names else ""
            raise ConfigError(
                f"freeze policy key {key!r} is neither a role ({', '.join(sorted(roles))}) nor a glob pattern "
                f"matching a factor's name{example}; fix the key, or use a pattern like 'layer4.*'"
            )


def apply_policy(model: nn.Module, policy: Policy) -> dict[str, bool]:
    """Set ``requires_grad`` of every factor by ``policy``; returns factor name → trainable.
    A factor that becomes frozen loses its ``.grad``. A mapping key that is neither a role nor
    a pattern matching some factor's name is refused (`ConfigError`), before anything changes."""
    found = list(factor_modules(model))
    _check_patterns(policy, [name for name, *_ in found])
    out = {}
    for name, role, fact, module in found:
        train = is_trainable(policy, name, role, fact.method, len(fact.roles()), merged=hasattr(module, "fxlrd_merge"))
        out[name] = train
        for p in module.parameters():
            if p.requires_grad and not train:
                p.grad = None
            p.requires_grad_(train)
    return out


def freeze(gm: nn.Module, policy: Policy = "paper") -> nn.Module:
    """Apply a freeze policy to the factors of a decomposed model (in place) and return it."""
    from fxlrd.passes import FreezePass

    inner = uncompiled(gm)  # a compiled model: its own module is frozen in place, the wrapper returned
    if not isinstance(inner, fx.GraphModule) and getattr(inner, "fxlrd_plan", None) is None \
            and not any(isinstance(m, Factorized) for m in inner.modules()):  # fmt: skip
        raise ConfigError(f"freeze: this {type(inner).__name__} has no decomposed factors to freeze; freeze the model "
                          "fxlrd.transform returns")  # fmt: skip
    if isinstance(inner, fx.GraphModule):
        out = FreezePass(policy)(inner).graph_module
        return gm if inner is not gm else out
    apply_policy(gm, check_policy(policy))
    return gm


def param_groups(gm: nn.Module, **options: Any) -> list[dict[str, Any]]:
    """Optimizer parameter groups: trainable factors, frozen factors, all other parameters.

    Which factor goes where is decided by its role under the paper's policy (what
    ``freeze(gm, "paper")`` and a `SequentialFreezer`'s first phase train), not by the current
    ``requires_grad`` flags: the same model gives the same groups, in the same order, in any
    phase. An optimizer's ``state_dict`` saved in one phase therefore loads into an optimizer
    built from ``param_groups`` in another (``fxlrd.load`` restores the flags of the phase the
    model was saved in). Under ``"paper"`` (or the freezer's first phase) ``factors_trainable``
    is exactly the trainable factors.

    Frozen factors are included (their ``.grad`` stays None, so optimizers skip them) so a
    `SequentialFreezer` can unfreeze them later without a new optimizer. ``options`` (e.g.
    ``lr``) are added to every group; empty groups are left out. Each group has a ``name``.

    A model re-traced by ``torch.fx`` after freezing has lost the factor containers (and their
    roles): its factors are then grouped by their current ``requires_grad`` flags.
    """
    seen: set[int] = set()

    def new(params: Iterator[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
        out = []
        for p in params:
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
        return out

    found = _factors_or_lost(gm)
    trainable: list[torch.nn.Parameter] = []
    frozen: list[torch.nn.Parameter] = []
    if found is not None:
        for name, role, fact, module in found:
            merged = hasattr(module, "fxlrd_merge")
            paper = is_trainable("paper", name, role, fact.method, len(fact.roles()), merged=merged)
            (trainable if paper else frozen).extend(new(module.parameters()))
    else:  # re-traced: the roles are gone, the flags (set before the re-trace) are what is left
        for module in _lost_containers(gm):
            for p in new(module.parameters()):
                (trainable if p.requires_grad else frozen).append(p)
    groups = [
        ("factors_trainable", trainable),
        ("factors_frozen", frozen),
        ("other", new(gm.parameters())),
    ]
    return [{"params": params, "name": name, **options} for name, params in groups if params]


def _factors_or_lost(gm: nn.Module) -> list[tuple[str, str, Factorized, nn.Module]] | None:
    """`factor_modules` as a list, or None when a ``torch.fx`` re-trace lost the containers."""
    try:
        return list(factor_modules(gm))
    except ConfigError:
        if _lost_containers(gm):
            return None
        raise


def _lost_containers(gm: nn.Module) -> list[nn.Module]:
    """What a ``torch.fx`` re-trace left of the model's `Factorized` containers (plain modules)."""
    from .sites import _lost_factorized

    return [m for _, m in uncompiled(gm).named_modules() if _lost_factorized(m)]


def _default_order() -> tuple[dict[str, tuple[str, ...]], ...]:
    """Phase 0: each method's paper freezing; phase 1: the factors phase 0 froze."""
    phases = {m: get_method(m).phases() for m in methods()}
    return tuple({m: tuple(sorted(p[i])) for m, p in phases.items()} for i in (0, 1))


class SequentialFreezer:
    """Alternate which factors of each decomposed layer train, every ``period`` steps.

    Call `step()` once per epoch or per optimizer step (your choice of unit); it returns True
    when the phase changed. At a switch, newly frozen parameters lose their ``.grad`` (and,
    with ``optimizer``, their optimizer state), so nothing stale acts on them.

    Args:
        gm: a decomposed model.
        period: steps per phase (>= 1).
        order: phases, each a mapping method -> trainable roles; default: each method's
            paper freezing, then the factors it froze.
        optimizer: if given, state of parameters frozen at a switch is dropped.

    With DistributedDataParallel, re-wrap the model when `step()` returns True: DDP registers
    gradient hooks only for parameters that require grad when it is built.
    """

    def __init__(self, gm: nn.Module, period: int = 1, order: Sequence[Mapping[str, Sequence[str]]] | None = None,
                 optimizer: torch.optim.Optimizer | None = None):  # fmt: skip
        if not isinstance(period, int) or period < 1:
            raise ValueError(f"period must be an int >= 1 (steps per phase), got {period!r}")
        self.gm, self.period, self.optimizer = gm, period, optimizer
        self.order = tuple(order if order is not None else _default_order())
        if not self.order:
            raise ValueError("order must list at least one phase")
        known, roles = set(methods()), set(all_roles())
        for i, phase in enumerate(self.order):
            if not isinstance(phase, Mapping):
                raise ConfigError(f"order[{i}] must be a mapping method -> trainable roles, like {{'svd': ['out_proj']}}")
            for method, trainable in phase.items():
                if method not in known:
                    raise ConfigError(f"order[{i}] names method {method!r}; the methods are {', '.join(sorted(known))}")
                if isinstance(trainable, str) or not all(r in roles for r in trainable):
                    raise ConfigError(f"order[{i}][{method!r}] must be a list of roles among {', '.join(sorted(roles))}, "
                                      f"got {trainable!r}")  # fmt: skip
        self.factors = list(factor_modules(gm))
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
        for name, role, fact, module in self.factors:
            policy = {r: r in roles.get(fact.method, ()) for r in all_roles()}
            # a merged layer holds a neighbouring layer too: it trains in every phase, as under "paper"
            out[name] = hasattr(module, "fxlrd_merge") or is_trainable(policy, name, role, fact.method, len(fact.roles()))
        return out

    def _apply(self, phase: int) -> None:
        flags = self.trainable(phase)
        for name, _, _, module in self.factors:
            train = flags[name]
            for p in module.parameters():
                if p.requires_grad and not train:
                    p.grad = None
                    if self.optimizer is not None:
                        self.optimizer.state.pop(p, None)
                p.requires_grad_(train)
        if isinstance(self.gm, fx.GraphModule):
            for node, _ in factor_nodes(self.gm):
                node.meta["fxlrd"]["trainable"] = flags.get(_factor_name(node.target, flags), True)

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


def _factor_name(target: str, names: Mapping[str, Any]) -> str:
    return next((n for n in names if target == n or target.startswith(n + ".")), target)
