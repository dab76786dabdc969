"""The public entry points: `plan`, `apply`, `transform`."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import fx, nn

from .capture import capture, check_module
from .config import LRDConfig
from .errors import ConfigError
from .factorized import Factorized
from .plan import Plan
from .planner import make_plan

__all__ = ["plan", "apply", "transform"]

Inputs = torch.Tensor | Sequence[torch.Tensor] | None


def _as_tuple(example_inputs: Inputs) -> tuple[torch.Tensor, ...] | None:
    if example_inputs is None:
        return None
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise TypeError(f"example_inputs must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}")


def _check_config(config: LRDConfig | None) -> LRDConfig:
    if config is None:
        return LRDConfig()
    if not isinstance(config, LRDConfig):
        raise ConfigError(f"config must be an fxlrd.LRDConfig, got {type(config).__name__}")
    return config


def plan(model: nn.Module, config: LRDConfig | None = None, *, example_inputs: Inputs = None) -> Plan:
    """Plan the decomposition of ``model`` without changing it.

    Args:
        model: an ``nn.Module`` (traced with torch.fx) or a ``GraphModule``.
        config: the settings; ``LRDConfig()`` (α = 2) when None.
        example_inputs: inputs of a forward pass; with them the plan records each layer's
            input shape and MACs (shapes are propagated without computing).
    """
    config = _check_config(config)
    gm = capture(model, leaf_modules=config.leaf_modules, copy_model=False)
    return make_plan(gm, config, _as_tuple(example_inputs))


def _apply_to_graph(gm: fx.GraphModule, plan_: Plan, reference: nn.Module | None = None) -> fx.GraphModule:
    """DecomposePass, then the BranchPass and MergePass the plan's settings ask for."""
    from fxlrd.passes import BranchPass, DecomposePass, MergePass

    gm = DecomposePass(plan_)(gm).graph_module
    branches = int(plan_.settings.get("branches", 1) or 1)
    if branches > 1:
        gm = BranchPass(branches, plan_.settings.get("branch_init", "btd"), reference=reference)(gm).graph_module
    if plan_.settings.get("merge"):
        gm = MergePass(plan_.settings["merge"])(gm).graph_module
    return gm


def _mirror_into(model: nn.Module, gm: fx.GraphModule) -> None:
    """For ``inplace=True``: put the factorized containers into the user's model as well."""
    from fxlrd.passes._graph import set_submodule

    for name, module in gm.named_modules():
        if isinstance(module, Factorized):
            set_submodule(model, name, module)


def apply(
    model: nn.Module, plan: Plan, *, inplace: bool = False, leaf_modules: Sequence[type[nn.Module] | str] = ()
) -> fx.GraphModule:
    """Decompose ``model`` as ``plan`` says and return the ``GraphModule``.

    Args:
        model: the model the plan was made for.
        plan: a `Plan`, e.g. from `fxlrd.plan` or `Plan.from_json`.
        inplace: modify ``model`` itself (its layers are replaced too) instead of a copy.
        leaf_modules: as in `LRDConfig`, when the model needs them to be traced.

    Raises:
        PlanMismatchError: the plan names layers the model lacks or has with other shapes.
    """
    check_module(model)
    if not isinstance(plan, Plan):
        raise TypeError(f"plan must be an fxlrd.Plan, got {type(plan).__name__}; use fxlrd.plan(model) or Plan.from_json")
    if inplace and plan.settings.get("merge"):
        raise ConfigError("inplace=True cannot be combined with a plan that merges layers; use inplace=False")
    gm = capture(model, leaf_modules=leaf_modules, copy_model=not inplace)
    gm = _apply_to_graph(gm, plan, reference=None if inplace else model)
    if inplace and gm is not model:
        _mirror_into(model, gm)
    return gm


def transform(
    model: nn.Module,
    config: LRDConfig | None = None,
    *,
    example_inputs: Inputs = None,
    inplace: bool = False,
) -> fx.GraphModule:
    """Plan and apply in one call: capture ``model``, decompose its conv/linear layers.

    The returned ``GraphModule`` carries the plan as ``gm.fxlrd_plan``. ``model`` is left
    untouched unless ``inplace=True``.
    """
    config = _check_config(config)
    check_module(model)
    if inplace and config.merge is not None:
        raise ConfigError(
            "inplace=True cannot be combined with merge: merging rewrites the graph beyond swapping modules, "
            "so the model object could not follow; use inplace=False and the returned GraphModule"
        )
    gm = capture(model, leaf_modules=config.leaf_modules, copy_model=not inplace)
    plan_ = make_plan(gm, config, _as_tuple(example_inputs))
    gm = _apply_to_graph(gm, plan_, reference=None if inplace else model)
    if inplace and gm is not model:
        _mirror_into(model, gm)
    gm.fxlrd_plan = plan_
    return gm
