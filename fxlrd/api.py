"""The public verbs: `plan`, `apply`, `transform` (and `save`/`load` in `fxlrd.io`)."""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import math
import warnings
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import fx, nn
from torch.fx.graph_module import _USER_PRESERVED_ATTRIBUTES_KEY

from .capture import CAPTURE_MODES, Args, Captured, capture, check_module, inputs_from_signature, normalize_inputs, widens
from .config import LRDConfig
from .errors import ConfigError, FxlrdWarning, PlanMismatchError
from .experts import factorize_experts, plan_experts
from .factorized import Factorized, module_weight, reference_weight
from .metrics import count_params
from .plan import LayerPlan, Plan
from .planner import make_plan
from .sites import uncompiled

__all__ = ["plan", "apply", "transform"]

Inputs = Any  # a tensor, a tuple of positional inputs, or a dict of keyword inputs


def _check_config(config: LRDConfig | None) -> LRDConfig:
    if config is None:
        return LRDConfig()
    if not isinstance(config, LRDConfig):
        raise ConfigError(f"config must be an fxlrd.LRDConfig, got {type(config).__name__}")
    return config


def _capture(model: nn.Module, config: LRDConfig, inputs: Args | None, mode: str, dynamic_shapes: Any,
             copy_model: bool, training: bool | None = None, widen: bool = True) -> Captured:  # fmt: skip
    if mode not in CAPTURE_MODES:
        raise ConfigError(f"capture must be one of {CAPTURE_MODES}, got {mode!r}")
    return capture(model, inputs=inputs, mode=mode, leaf_modules=config.leaf_modules, dynamic_shapes=dynamic_shapes,
                   attention=config.attention, copy_model=copy_model, training=training, widen=widen)  # fmt: skip


def _capture_inplace(model: nn.Module, config: LRDConfig, inputs: Args | None, mode: str,
                     dynamic_shapes: Any) -> Captured:  # fmt: skip
    """``inplace=True``: capture a copy first, and the model itself only when that copy was
    traced by torch.fx with nothing rewritten (an export capture or an attention swap would
    change the user's model before `_check_inplace` could refuse)."""
    trial = _capture(model, config, inputs, mode, dynamic_shapes, copy_model=True)
    informational = ("the forward never uses", "export fixed", "export bounded", "compute their weight", "training mode",
                     "stacked 3-D weight", "fxlrd does not take as layers")  # fmt: skip
    rewrites = [n for n in trial.notes if not any(k in n for k in informational)]  # what the capture changed
    if trial.mode != "fx" or rewrites:
        why = f"torch.fx cannot trace it, it needs torch.{trial.mode}" if trial.mode != "fx" else "; ".join(rewrites)
        raise ConfigError(
            f"inplace=True needs a model torch.fx traces as it is, with nothing rewritten ({why}); your model is "
            "unchanged: use inplace=False and the returned GraphModule"
        )
    return _capture(model, config, inputs, mode, dynamic_shapes, copy_model=False)


def _calibration_stats(captured: Captured, config: LRDConfig, calibration: Iterable | None, inputs: Args | None):
    if calibration is None:
        return None
    from .calibrate import collect_stats

    if config.rank_rule == "vbmf":
        raise ConfigError(
            "rank_rule='vbmf' estimates ranks from the weight's own noise model and cannot use calibration data; "
            "use 'ratio', 'energy' (of the whitened spectrum), 'fixed', or a global budget (target_params=...)"
        )

    return collect_stats(captured.gm, calibration, example=inputs, sensitivity=config.sensitivity,
                         sensitivity_matrix=config.sensitivity_matrix)


def _narrow(captured: Captured, config: LRDConfig, calibration: Iterable | None, inputs: Args | None,
            recorded: list[dict[str, Any]] | None = None) -> tuple[LRDConfig, list[dict[str, Any]]]:  # fmt: skip
    """Narrow the MLP blocks of the captured graph (``config.mlp == "narrow"``, or the blocks
    a plan records); returns the config with their layers excluded from factorization, and
    the blocks' records."""
    if config.mlp != "narrow" and not recorded:
        return config, []
    if calibration is None:
        raise ConfigError(
            "mlp='narrow' chooses each MLP block's hidden neurons on calibration data: pass calibration=... "
            "(or use mlp='factorize')"
        )
    from .narrow import narrow_mlps
    from .planner import unselected_reason
    from .sites import find_sites

    gm = captured.gm
    sites = find_sites(gm)
    chosen = lambda name: not unselected_reason(name, sites[name], gm, config)  # noqa: E731

    keep = None
    if recorded:
        if any(not b.get("keep") for b in recorded):
            raise PlanMismatchError("the plan narrows MLP blocks but does not record their neurons; make the plan again")
        keep = {b["up"]: b["keep"] for b in recorded}
        _check_recorded_blocks(gm, sites, recorded)
    blocks = narrow_mlps(gm, calibration, ratio=None if keep else config.ratio, keep=keep,
                         quantum=config.rank_quantum,
                         select=lambda b: all(map(chosen, _block_layers(b))),
                         sensitivity=config.sensitivity, sensitivity_matrix=config.sensitivity_matrix,
                         example=inputs, anchored=config.sequential)  # fmt: skip
    if not blocks and not recorded:
        warnings.warn(
            "mlp='narrow' found no MLP block to narrow (linear → elementwise activation → linear, or 1×1 conv → batch "
            "norms, activations, a depthwise conv → 1×1 conv, the "
            "hidden activations used by nothing else, each layer called once with weights of its own: layers shared "
            "across depth as ALBERT's are not such blocks; a gated MLP, act(gate(x)) * up(x), is one): its layers "
            "are factorized like the others", FxlrdWarning, stacklevel=3,
        )  # fmt: skip
    names = tuple(n for b in blocks for n in _block_layers(b))
    return dataclasses.replace(config, exclude=(*config.exclude, *names)), [b.to_dict() for b in blocks]


def _check_recorded_blocks(gm: fx.GraphModule, sites: Mapping[str, Any], recorded: list[dict[str, Any]]) -> None:
    """A plan's narrowed blocks are the model's: the same down layer (and a gated block's partner)."""
    from .narrow import find_mlps

    found = {b.up: b for b in find_mlps(gm, sites)}
    for rec in recorded:
        block = found.get(rec["up"])
        if block is not None and (block.down, block.partner) != (rec["down"], rec.get("partner")):
            recorded_as = repr(rec["down"]) + (f" with {rec['partner']!r}" if rec.get("partner") else "")
            here = repr(block.down) + (f" with {block.partner!r}" if block.partner else "")
            raise PlanMismatchError(f"the plan narrows the block of {rec['up']!r} into {recorded_as}; in this model that "
                                    f"block goes into {here}: apply the plan to the model it was made for")  # fmt: skip


def _block_layers(block: Any) -> tuple[str, ...]:
    """The layers a narrowed block changes: its up and down layers, a gated block's partner,
    its squeeze-and-excitation gates' convs."""
    partner = (block.partner,) if block.partner else ()
    return (block.up, block.down, *partner, *(name for pair in block.squeeze or () for name in pair))


def _fuse(captured: Captured, config: LRDConfig, recorded: list[dict[str, Any]] | None = None
          ) -> tuple[LRDConfig, list[dict[str, Any]]]:  # fmt: skip
    """Fuse sibling linears (``config.siblings == "fuse"``, or the groups a plan records) in the
    captured graph; returns the config that selects the fused layers (their members were
    selected) and the groups' records."""
    if config.siblings == "separate" and not recorded:
        return config, []
    from .methods import get_method
    from .planner import _keep_reason
    from .siblings import find_siblings, fuse_siblings

    gm = captured.gm
    if recorded:
        groups = fuse_siblings(gm, recorded)
    else:
        handler = get_method(config.linear_method)
        patterns = None if config.siblings == "fuse" else config.siblings
        if patterns is not None:
            from .sites import find_sites

            names = [n for n, s in find_sites(gm).items() if s.spec is not None and s.spec.kind == "linear"]
            for p in patterns:  # a typo would fuse nothing, silently
                if not any(fnmatch.fnmatchcase(n, p) for n in names):
                    warnings.warn(f"siblings pattern {p!r} matches no linear layer of the model, so it fuses nothing; "
                                  f"names look like {', '.join(repr(n) for n in names[:4])}", FxlrdWarning, stacklevel=4)  # fmt: skip
        chosen = lambda name, site: not _keep_reason(name, site, gm, handler, config) and (  # noqa: E731
            patterns is None or any(fnmatch.fnmatchcase(name, p) for p in patterns))
        groups = [g for g in find_siblings(gm, chosen) if not any(fnmatch.fnmatchcase(g.name, p) for p in config.exclude)]
        groups = fuse_siblings(gm, groups)
    names = {g.name for g in groups}
    if names and config.include is not None:  # the fused layers in place of their members
        from .sites import find_sites

        members = [m for g in groups for m in g.members]
        left = list(find_sites(gm))
        match = lambda p, among: any(fnmatch.fnmatchcase(n, p) for n in among)  # noqa: E731
        include = [p for p in config.include if match(p, left) or not match(p, members)]
        config = dataclasses.replace(config, include=(*include, *sorted(names)))
    if names and config.filter_fn is not None:
        user = config.filter_fn
        config = dataclasses.replace(config, filter_fn=lambda module, name: name in names or user(module, name))
    return config, [g.to_dict() for g in groups]


def plan(
    model: nn.Module,
    config: LRDConfig | None = None,
    *,
    example_inputs: Inputs = None,
    capture: str = "auto",
    dynamic_shapes: Any = None,
    calibration: Iterable | None = None,
) -> Plan:
    """Plan the decomposition of ``model`` without changing it.

    Args:
        model: an ``nn.Module`` or a ``GraphModule``.
        config: the settings; ``LRDConfig()`` (α = 2) when None.
        example_inputs: a tensor, a tuple of positional inputs or a dict of keyword inputs
            of one forward pass; with them the plan records each layer's input shape and MACs
            (propagated without computing). Needed for ``capture="export"`` and latency searches.
        capture: ``"auto"`` (torch.fx, then torch.export), ``"fx"`` or ``"export"``.
        dynamic_shapes: passed to ``torch.export.export`` (default: dynamic batch/sequence).
        calibration: an iterable of inputs (each like ``example_inputs``): the layers are then
            planned data-aware (ranks and errors from the output error on this data).

    With ``branches`` or ``merge`` set, the model is also built on a copy, so the plan's ranks
    and sizes are those `transform` returns (branching rounds ranks, merging changes sizes).
    """
    config = _check_config(config)
    model = uncompiled(check_module(model))  # a torch.compile wrapper: its module (run under fake tensors, inductor code crashed)
    inputs = normalize_inputs(example_inputs)
    captured = _capture(model, config, inputs, capture, dynamic_shapes, copy_model=True)
    plan_, stats, _ = _plan_captured(model, captured, config, _reusable(calibration), inputs)
    if int(plan_.settings.get("branches", 1) or 1) > 1 or plan_.settings.get("merge"):
        # branching rounds ranks and merging changes sizes: build on the copy so the plan says what transform builds
        _apply_to_graph(captured.gm, plan_, model, stats=stats)
    return plan_


def _reusable(calibration: Iterable | None) -> Iterable | None:
    """Calibration data is read more than once (statistics, narrowing, sequential fitting): a
    one-shot iterator (a generator) is turned into a list."""
    if calibration is not None:
        from .calibrate import check_calibration

        check_calibration(calibration)
    if calibration is not None and iter(calibration) is calibration:
        return list(calibration)
    return calibration


def _narrowed_row(lp: LayerPlan, block: Mapping[str, Any], up: bool, within: bool = False) -> None:
    """A narrowed block's layer, planned on the narrowed graph: its row shows the layer before
    narrowing (``hidden`` neurons) and after (``width``): parameters and MACs grow linearly with
    the hidden width, except the down layer's bias. ``within``: a layer narrowed with the block
    (a depthwise conv, as an up layer; a squeeze-and-excitation gate's reduce and expand convs,
    as a down and an up layer)."""
    hidden, width = int(block["hidden"]), int(block["width"])
    unit = "channels" if lp.kernel_size else "neurons"  # an inverted residual's 1×1 convs, an MLP's linears
    lp.reason = f"narrowed {'with its ' if within else ''}MLP block ({hidden} -> {width} {unit})"
    lp.params_after, lp.macs_after = lp.params_before, lp.macs_before
    weights = lp.in_channels * lp.out_channels * math.prod(lp.kernel_size or (1,))
    grown = lp.params_before * hidden // width if up else lp.params_before + weights * (hidden - width) // width
    lp.params_before = grown
    if lp.macs_before is not None:
        lp.macs_before = lp.macs_before * hidden // width


def _plan_captured(model: nn.Module, captured: Captured, config: LRDConfig, calibration: Iterable | None,
                   inputs: Args | None, inplace: bool = False):  # fmt: skip
    """Narrow the MLP blocks (``mlp="narrow"``), collect the calibration statistics and plan the
    other layers and the stacked expert weights: ``(plan, stats, experts' stats)``. The plan
    records the narrowed blocks and the parameters of the model before them."""
    # a speed target counts from the model before narrowing
    # (what this copy's time is compared with, the narrowed graph, has its sibling linears fused too, as built)
    before = copy.deepcopy(captured.gm) if config.mlp == "narrow" and config.target_speedup is not None else None
    config, narrowed = _narrow(captured, config, calibration, inputs)
    config, fused = _fuse(captured, config)
    stats = _calibration_stats(captured, config, calibration, inputs)
    # (in place, the stacks are kept: no statistics gathered for them)
    stacked, experts_stats, stack_tasks = plan_experts(model, captured.gm, config, None if inplace else calibration,
                                                       example=inputs)
    if inplace:  # (kept, see _check_inplace: a budget must not count them)
        for task in stack_tasks:
            task.record["reason"] = _INPLACE_STACK
        stack_tasks = []
    plan_ = make_plan(captured.gm, config, inputs, capture=captured.record(), stats=stats, narrowed=narrowed,
                      before_narrowing=before if narrowed else None, stacked=[r["weight"] for r in stacked],
                      stack_tasks=stack_tasks)  # fmt: skip
    _warn_experts_kept(stacked, config)  # (after the plan: the global speed search may keep stacks it cannot time)
    if fused:
        plan_.settings["fused"] = fused
    if stacked:
        plan_.settings["stacked_experts"] = stacked
    if narrowed:
        for block in narrowed:  # kept from factorization because narrowed, not because the user excluded them
            for name in (block["up"], block["down"], block.get("partner")):
                if name in plan_.layers:
                    _narrowed_row(plan_.layers[name], block, up=name != block["down"])
            for name in block.get("depthwise") or ():
                if name in plan_.layers:
                    _narrowed_row(plan_.layers[name], block, up=True, within=True)
            for reduce, expand in block.get("squeeze") or ():  # a gate's convs read and give the hidden channels
                for name, up in ((reduce, False), (expand, True)):
                    if name in plan_.layers:
                        _narrowed_row(plan_.layers[name], block, up=up, within=True)
    return plan_, stats, experts_stats


def _warn_experts_kept(stacked: list[dict[str, Any]], config: LRDConfig) -> None:
    """A warning when the config's mode keeps stacked experts that could be factorized (the
    bulk of a mixture's parameters): the model then shrinks far less than asked."""
    kept = [r for r in stacked if r["rank"] is None and (r["reason"].startswith("stacked experts ") and "kept whole" in
                                                         r["reason"] or "could not time its product" in r["reason"])]  # fmt: skip
    if kept:
        n = sum(r["params_before"] for r in kept)
        warnings.warn(f"{len(kept)} stacked expert weights ({n} parameters, first {kept[0]['weight']!r}) are kept whole: "
                      f"{kept[0]['reason']}", FxlrdWarning, stacklevel=4)  # fmt: skip


def _factorize_experts(model: nn.Module, captured: Captured, plan_: Plan, stats: Any = None,
                       calibration: Iterable | None = None, config: LRDConfig | None = None) -> None:  # fmt: skip
    """Factorize the stacked expert weights the plan records (before any sequential fitting,
    so the layers after them are fitted to what the factorized experts give); data-aware ones
    from ``stats``, or from ``calibration`` (`fxlrd.apply`)."""
    records = [r for r in plan_.settings.get("stacked_experts") or () if r.get("rank") is not None]
    if not records:
        return
    aware = [r["weight"] for r in records if r.get("data_aware")]
    if aware and stats is None:
        from .experts import expert_stats, find_stacked

        stacks = find_stacked(model, captured.gm)
        sensitivity = (config.sensitivity, config.sensitivity_matrix) if config is not None else (False, "full")
        stats = expert_stats(captured.gm, {p: stacks[p] for p in aware if p in stacks}, calibration,
                             sensitivity=sensitivity[0], sensitivity_matrix=sensitivity[1])  # fmt: skip
        for rec in records:  # this calibration reached none of the stack's experts: data-free, and said so
            if rec["weight"] in aware and rec["weight"] not in stats and isinstance(rec, dict):
                rec.update(data_aware=False, note="data-free: no calibration token reached its experts")
                rec.pop("calibrated_experts", None)
    factorize_experts(model, captured.gm, records, stats=stats)


def _apply_to_graph(gm: fx.GraphModule, plan_: Plan, reference: nn.Module | None = None, *, stats=None,
                    factors=None, sync_sizes: bool = False) -> fx.GraphModule:  # fmt: skip
    """DecomposePass, then the BranchPass and MergePass the plan's settings ask for.
    ``sync_sizes``: the plan may have been edited, its layers take the decomposed sizes."""
    from fxlrd.passes import BranchPass, DecomposePass, MergePass

    gm = DecomposePass(plan_, stats=stats, factors=factors)(gm).graph_module
    if sync_sizes:  # before merging changes what sits at the layers' names
        _sync_sizes(gm, plan_)
    branches = int(plan_.settings.get("branches", 1) or 1)
    if branches > 1:
        aware = {lp.name: stats[lp.name] for lp in plan_.decomposed if lp.data_aware and stats and lp.name in stats}
        gm = BranchPass(branches, plan_.settings.get("branch_init", "btd"), reference=reference,
                        stats=aware)(gm).graph_module  # fmt: skip
        _sync_branched(gm, plan_, reference, stats)
        narrow = [lp.name for lp in plan_.decomposed if lp.method == "tucker2" and min(lp.ranks) < branches]
        if narrow:
            warnings.warn(f"branches={branches}: {len(narrow)} Tucker-2 layers have a rank below {branches} and stay "
                          f"unbranched (first: {narrow[0]!r})", FxlrdWarning, stacklevel=3)  # fmt: skip
    if plan_.settings.get("merge"):
        plan_.settings["merge_rule"] = MergePass.RULE
        # which norms merging saw training (an approximate merge keeps those it would fold): load replays it
        plan_.settings["merge_training_norms"] = [name for name, m in gm.named_modules()
                                                  if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]  # fmt: skip
        before = count_params(gm)
        gm = MergePass(plan_.settings["merge"])(gm).graph_module
        plan_.settings["merge_params_change"] = count_params(gm) - before  # the plan's model size is what was built
    _warn_budget_unspent(gm, plan_, branches)
    return gm


def _warn_budget_unspent(gm: fx.GraphModule, plan_: Plan, branches: int) -> None:
    """``target_params`` is allocated on the layers' sizes before branching and merging, which
    then free parameters the allocation never spends: say so when the model ends well below it."""
    target = plan_.settings.get("target_params")
    if target is None or not (branches > 1 or plan_.settings.get("merge")):
        return
    if plan_.settings.get("narrowed") and not plan_.decomposed:  # (nothing decomposed: nothing branched or merged freed any)
        return
    whole = target * plan_.model_params if isinstance(target, float) and target < 1 else float(target)
    built = count_params(gm)
    if built < 0.9 * whole:
        what = " and ".join(w for w, on in (("branching", branches > 1), ("merging", plan_.settings.get("merge"))) if on)
        warnings.warn(
            f"target_params={target!r}: the model has {built} parameters, {1 - built / whole:.0%} below the budget of "
            f"{whole:.0f}: the ranks were allocated on the sizes before {what}, which freed the rest; to spend it, "
            f"raise target_params (about {whole + (whole - built):.0f} here)",
            FxlrdWarning,
            stacklevel=4,
        )


def _mirror_into(model: nn.Module, gm: fx.GraphModule) -> None:
    """For ``inplace=True``: put the factorized containers into the user's model as well."""
    from .sites import set_submodule

    for name, module in gm.named_modules():
        if isinstance(module, Factorized):
            try:
                old = model.get_submodule(name)
            except AttributeError:
                old = None
            # every name the replaced module has in the model (one module registered twice is one layer)
            aliases = [n for n, m in model.named_modules(remove_duplicate=False) if old is not None and m is old] or [name]
            for alias in aliases:
                set_submodule(model, alias, module)


_INPLACE_STACK = "inplace=True: the model's own forward reads the stacked weight; use inplace=False to factorize it"


def _check_inplace(plan_: Plan) -> None:
    """After `_capture_inplace`: the layers to decompose must be modules the model calls."""
    functional = [lp.name for lp in plan_.decomposed if lp.site != "module"]
    if functional:
        raise ConfigError(
            f"inplace=True cannot decompose functional layers ({functional[0]!r} calls F.linear/F.conv directly): "
            "the model's own forward would still use the dense weight; use inplace=False and the returned GraphModule"
        )
    records = plan_.settings.get("stacked_experts") or ()
    for rec in records:  # the model's own forward reads them: kept, as with layers it computes itself
        if rec.get("rank") is None:
            continue
        for key in ("error", "data_aware", "calibrated_experts", "note", "latency"):
            rec.pop(key, None)
        rec.update(rank=None, params_after=rec["params_before"], reason=_INPLACE_STACK)
    stacked = [r for r in records if r["reason"] == _INPLACE_STACK]
    if stacked:
        warnings.warn(f"inplace=True keeps the {len(stacked)} stacked expert weights whole (first {stacked[0]['weight']!r}): "
                      "the model's own forward reads them; use inplace=False and the returned GraphModule to factorize "
                      "them", FxlrdWarning, stacklevel=3)  # fmt: skip


_HOOK_KINDS = {"_forward_pre_hooks": "forward pre-hook", "_forward_hooks": "forward hook",
               "_backward_pre_hooks": "backward pre-hook", "_backward_hooks": "backward hook"}  # fmt: skip


def _hooked_modules(model: nn.Module) -> dict[str, list[str]]:
    """Module path → the kinds of hooks registered on it (the hook-based weight and spectral
    norms left out: capture folds them into the weight)."""
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    out = {}
    for name, module in model.named_modules():
        kinds = [kind for attr, kind in _HOOK_KINDS.items()
                 if any(not isinstance(h, (WeightNorm, SpectralNorm)) for h in (getattr(module, attr, None) or {}).values())]  # fmt: skip
        if kinds:
            out[name] = kinds
    return out


def _lost_hooks(hooked: Mapping[str, list[str]], gm: fx.GraphModule, captured: Captured, plan_: Plan) -> None:
    """A note, and a warning, naming the modules whose hooks the returned graph does not call:
    a layer fx called as a module and fxlrd decomposed runs as its factors, without its hooks;
    the modules a capture traced into (every module, under torch.export) ran their hooks once,
    while tracing, so a change a hook makes to an output is in the graph and nothing else it
    does happens again."""
    if not hooked:
        return
    called = {node.target for node in gm.graph.nodes if node.op == "call_module"}

    def runs(name: str) -> bool:
        try:
            module = gm.get_submodule(name)
        except AttributeError:
            return False
        return name in called and bool(_hooked_modules(module).get(""))

    lost = {name: kinds for name, kinds in hooked.items() if not runs(name)}
    if not lost:
        return
    decomposed = {lp.name for lp in plan_.decomposed} if captured.mode == "fx" else set()

    def listed(names: list[str]) -> str:
        return "; ".join(f"{n or 'the model'} ({', '.join(lost[n])})" for n in names[:4]) + ("; ..." if len(names) > 4 else "")

    # torch.fx traces the root's forward, not its call: the model's own hooks never ran, nothing of them is in the graph
    root = [n for n in lost if n == "" and captured.mode == "fx"]
    gone = [n for n in lost if n in decomposed]
    traced = [n for n in lost if n not in decomposed and n not in root]
    parts = []
    if root:
        parts.append(f"never run by the torch.fx capture (it traces the model's forward, not its call; a change they "
                     f"make to the output is not in the graph): {listed(root)}")  # fmt: skip
    if gone:
        parts.append(f"decomposed, each runs as its factors without its hooks (a change they make to its output is "
                     f"lost too): {listed(gone)}")  # fmt: skip
    if traced:
        parts.append(f"traced into by the capture, their hooks ran once, while tracing (a change they make to an "
                     f"output is in the graph; nothing else they do happens again): {listed(traced)}")  # fmt: skip
    message = (f"{len(lost)} hooked module{'s' if len(lost) > 1 else ''} of the model, whose hooks the returned graph "
               f"does not call: {'. '.join(parts)}. Register hooks on the returned model instead (a decomposed "
               "layer's input is its first factor's, its output its last factor's)")  # fmt: skip
    captured.notes.append(message)
    warnings.warn(message, FxlrdWarning, stacklevel=3)


def _finish(gm: fx.GraphModule, plan_: Plan, captured: Captured) -> fx.GraphModule:
    """Attach the plan and the capture record; they survive deepcopy (preserved attributes)."""
    gm.fxlrd_plan = plan_
    gm.fxlrd_capture = captured.record()
    gm.meta.setdefault(_USER_PRESERVED_ATTRIBUTES_KEY, {}).update(fxlrd_plan=plan_, fxlrd_capture=gm.fxlrd_capture)
    return gm


def apply(
    model: nn.Module,
    plan: Plan,
    *,
    example_inputs: Inputs = None,
    inplace: bool = False,
    leaf_modules: Sequence[type[nn.Module] | str] = (),
    calibration: Iterable | None = None,
    sensitivity: Callable[[Any, Any], Any] | None = None,
    dynamic_shapes: Any = None,
) -> fx.GraphModule:
    """Decompose ``model`` as ``plan`` says and return the ``GraphModule``.

    The model is captured the way the plan records (fx or export); an export capture uses
    ``example_inputs`` or, when they are not given, zeros of the plan's recorded input shapes,
    and the train/eval mode the plan's capture was made in (the graph bakes it in).
    Data-aware layers are fitted as the plan's settings say (``sensitivity``,
    ``sensitivity_matrix``, ``sequential``), so the same calibration data gives the model
    `transform` gave.

    Args:
        model: the model the plan was made for.
        plan: a `Plan`, e.g. from `fxlrd.plan` or `Plan.from_json`.
        example_inputs: as in `plan`.
        inplace: modify ``model`` itself (its layers are replaced too) instead of a copy.
        leaf_modules: as in `LRDConfig`, when the model needs them to be traced.
        calibration: calibration inputs for the plan's data-aware layers.
        sensitivity: the sensitivity function, for a plan made with a callable
            ``LRDConfig(sensitivity=fn)`` (a plan records only its name).
        dynamic_shapes: for a plan of an export capture made with ``dynamic_shapes``: the
            same again (a plan records that they were given, not them).

    Raises:
        PlanMismatchError: the plan names layers the model lacks or has with other shapes.
        ConfigError: the plan is data-aware and ``calibration`` is missing, or it was made with
            a sensitivity function and ``sensitivity`` is not given.
    """
    model = uncompiled(check_module(model))  # a torch.compile wrapper: its module (run under fake tensors, inductor code crashed)
    if not isinstance(plan, Plan):
        raise TypeError(f"plan must be an fxlrd.Plan, got {type(plan).__name__}; use fxlrd.plan(model) or Plan.from_json")
    plan = copy.deepcopy(plan)  # the model's own record (branching and merging write to it); the caller's stays as given
    hooked = _hooked_modules(model)
    if inplace and plan.settings.get("merge"):
        raise ConfigError("inplace=True cannot be combined with a plan that merges layers; use inplace=False")
    recorded = plan.settings.get("capture") or {}
    mode = recorded.get("mode", "fx") if not isinstance(model, fx.GraphModule) else "auto"
    inputs = normalize_inputs(example_inputs)
    if inputs is None and mode == "export" and plan.settings.get("inputs"):
        inputs = inputs_from_signature(plan.settings["inputs"])
    if inplace and plan.settings.get("narrowed"):
        raise ConfigError("inplace=True cannot be combined with a plan that narrows MLP blocks; use inplace=False")
    if inplace and plan.settings.get("fused"):
        raise ConfigError("inplace=True cannot be combined with a plan that fuses sibling layers; use inplace=False")
    if inplace and (plan.settings.get("allocation_result") or {}).get("stacked_experts") and any(
            r.get("rank") is not None for r in plan.settings.get("stacked_experts") or ()):  # fmt: skip
        raise ConfigError(
            "the plan's parameter budget counts its factorized stacked experts, which inplace=True keeps whole (the "
            "model's own forward reads them), so the budget would not be met: apply it with inplace=False, or make the "
            "plan with experts='keep' for the budget to fall on the layers alone"
        )
    calibration = _reusable(calibration)
    config = LRDConfig(leaf_modules=leaf_modules, attention=plan.settings.get("attention", "packed"),
                       sensitivity=_plan_sensitivity(plan, sensitivity),
                       sensitivity_matrix=plan.settings.get("sensitivity_matrix", "full"),
                       sequential=bool(plan.settings.get("sequential", False)))  # fmt: skip
    data_aware = any(lp.data_aware for lp in plan.decomposed) or bool(plan.settings.get("narrowed")) or (
        not inplace and any(r.get("data_aware") and r.get("rank") is not None for r in plan.settings.get("stacked_experts") or ()))
    if data_aware and calibration is None:
        raise ConfigError("the plan decomposes layers data-aware: pass the calibration data (calibration=...) to apply it")
    if not inplace:
        from .capture import warn_dynamic_shapes

        warn_dynamic_shapes(recorded, dynamic_shapes, "fxlrd.apply(model, plan, dynamic_shapes=...)")
    # an export graph bakes in the mode: capture in the plan's (as load does), not a fresh model's training mode
    training = bool(recorded.get("training", False)) if mode == "export" else None
    captured = _capture_inplace(model, config, inputs, mode, None) if inplace else \
        _capture(model, config, inputs, mode, dynamic_shapes, copy_model=True, training=training,
                 widen=widens(recorded))  # fmt: skip
    if inplace:
        _check_inplace(plan)
    if plan.settings.get("narrowed"):
        _narrow(captured, config, calibration, inputs, recorded=plan.settings["narrowed"])
    if plan.settings.get("fused"):
        _fuse(captured, config, recorded=plan.settings["fused"])
    stats = _calibration_stats(captured, config, calibration, inputs)
    _factorize_experts(model, captured, plan, calibration=calibration, config=config)
    factors = None
    if config.sequential and calibration is not None and any(lp.data_aware for lp in plan.decomposed):
        from .calibrate import sequential_factors

        factors = sequential_factors(captured.gm, plan, calibration, example=inputs, stats=stats)
    gm = _apply_to_graph(captured.gm, plan, reference=None if inplace else model, stats=stats, factors=factors,
                         sync_sizes=True)  # fmt: skip
    if inplace and gm is not model:
        _mirror_into(model, gm)
    _lost_hooks(hooked, gm, captured, plan)
    return _finish(gm, plan, captured)


def _sync_sizes(gm: fx.GraphModule, plan_: Plan) -> None:
    """A plan edited by hand (other ranks) records the sizes of the ranks it was made with:
    give each decomposed layer the parameters and MACs of what was built."""
    from .metrics import layer_macs

    for lp in plan_.decomposed:
        try:
            fact = gm.get_submodule(lp.name)
        except AttributeError:
            continue
        if isinstance(fact, Factorized) and tuple(fact.ranks) == tuple(lp.ranks):
            params = count_params(fact)
            if params != lp.params_after:
                lp.params_after = params
                if lp.macs_after is not None and lp.input_shape is not None:
                    lp.macs_after = layer_macs(fact, lp.input_shape)


def _plan_sensitivity(plan: Plan, given: Callable[[Any, Any], Any] | None) -> bool | str | Callable[[Any, Any], Any]:
    """The sensitivity setting a plan was made with: True, False or ``"kl"`` as recorded; a
    callable's recorded name needs the callable itself (``given``)."""
    if given is not None:
        if not callable(given):
            raise ConfigError(f"sensitivity must be a callable(outputs, inputs) (the plan's own function), got {given!r}")
        return given
    recorded = plan.settings.get("sensitivity", True)
    if isinstance(recorded, bool) or recorded == "kl":
        return recorded
    stacks = any(r.get("data_aware") and r.get("rank") is not None for r in plan.settings.get("stacked_experts") or ())
    if any(lp.data_aware for lp in plan.decomposed) or plan.settings.get("narrowed") or stacks:
        raise ConfigError(
            f"the plan was made with a sensitivity function ({recorded!r}), which a plan records only by name: "
            "pass it again, fxlrd.apply(model, plan, calibration=..., sensitivity=fn)"
        )
    return True


def _sync_branched(gm: fx.GraphModule, plan_: Plan, reference: nn.Module | None = None, stats=None) -> None:
    """Branching rounds a layer's ranks down to multiples of the branch count and groups its
    core: the plan is updated to say what the model holds (ranks, parameters, MACs, and the
    error, measured as the plan measures it, against ``reference``'s weight; None without it)."""
    from .metrics import layer_macs

    for lp in plan_.decomposed:
        try:
            fact = gm.get_submodule(lp.name)
        except AttributeError:
            continue
        if not isinstance(fact, Factorized) or not isinstance(getattr(fact, "core", None), nn.modules.conv._ConvNd):
            continue
        if fact.core.groups == 1:
            continue
        lp.ranks, lp.params_after = tuple(fact.ranks), count_params(fact)
        if lp.macs_after is not None and lp.input_shape is not None:
            lp.macs_after = layer_macs(fact, lp.input_shape)
        if lp.error is None:  # (data-free layers report none outside the allocation modes)
            continue
        try:
            weight = reference_weight(reference.get_submodule(lp.name), fact.core) if reference is not None else None
        except AttributeError:
            weight = None
        shape = (fact.out_proj.out_channels, fact.in_proj.in_channels, *fact.core.kernel_size)
        if weight is not None and tuple(weight.shape) != shape:  # not the layer's weight after all
            weight = None
        site_stats = (stats or {}).get(lp.name) if lp.data_aware else None
        lp.error = _branched_error(fact, weight, site_stats) if weight is not None else None


def _branched_error(fact: Factorized, weight: torch.Tensor, stats: Any) -> float:
    """The relative squared error of a branched Tucker-2 layer (its core grouped), of the
    weight or, with ``stats``, of the output on the calibration inputs (as `error_curve`)."""
    from .branch import BlockTerms, reconstruct
    from .methods.base import data_aware_weight

    n = fact.core.groups
    v = fact.in_proj.weight.detach().double().cpu().reshape(fact.in_proj.out_channels, -1)  # (n·r1, C)
    g = module_weight(fact.core).detach().double().cpu()  # (n·r2, r1, *k), a transposed core's too
    u = fact.out_proj.weight.detach().double().cpu().reshape(fact.out_proj.out_channels, -1)  # (S, n·r2)
    r1, r2 = v.shape[0] // n, g.shape[0] // n
    blocks = BlockTerms(in_factors=[v[i * r1 : (i + 1) * r1].T for i in range(n)],
                        cores=[g[i * r2 : (i + 1) * r2] for i in range(n)],
                        out_factors=[u[:, i * r2 : (i + 1) * r2] for i in range(n)])  # fmt: skip
    dense = reconstruct(blocks)
    w, _, out_w = data_aware_weight(weight, stats)
    approx, _, _ = data_aware_weight(dense.reshape(weight.shape), stats)
    total = 1.0 if out_w is not None else max(float((w**2).sum()), 1e-300)
    return float(((w - approx) ** 2).sum()) / total


def transform(
    model: nn.Module,
    config: LRDConfig | None = None,
    *,
    example_inputs: Inputs = None,
    inplace: bool = False,
    capture: str = "auto",
    dynamic_shapes: Any = None,
    calibration: Iterable | None = None,
) -> fx.GraphModule:
    """Plan and apply in one call: capture ``model``, decompose its conv/linear layers.

    Args:
        model: the model (left untouched unless ``inplace=True``).
        config: the settings; ``LRDConfig()`` (α = 2) when None.
        example_inputs: a tensor, a tuple of positional inputs or a dict of keyword inputs.
        inplace: also swap the decomposed layers into ``model`` (fx capture, module layers only).
        capture: ``"auto"`` (torch.fx, then torch.export), ``"fx"`` or ``"export"``.
        dynamic_shapes: passed to ``torch.export.export``.
        calibration: an iterable of inputs (each like ``example_inputs``): decompose
            data-aware (each layer fitted to its output on this data).

    Returns:
        The ``GraphModule``, called like ``model``; it carries the plan as ``gm.fxlrd_plan``
        and how it was captured as ``gm.fxlrd_capture``.
    """
    config = _check_config(config)
    model = uncompiled(check_module(model))  # a torch.compile wrapper: its module (run under fake tensors, inductor code crashed)
    hooked = _hooked_modules(model)
    if inplace and config.merge is not None:
        raise ConfigError(
            "inplace=True cannot be combined with merge: merging rewrites the graph beyond swapping modules, "
            "so the model object could not follow; use inplace=False and the returned GraphModule"
        )
    if inplace and config.siblings != "separate":
        raise ConfigError(f"inplace=True cannot be combined with siblings={config.siblings!r} (the layers are replaced "
                          "by fused ones); use inplace=False")  # fmt: skip
    if inplace and config.mlp == "narrow":
        raise ConfigError("inplace=True cannot be combined with mlp='narrow' (the layers change shape); use inplace=False")
    if config.sequential and calibration is None:  # before any capture, calibration or latency search
        raise ConfigError("sequential=True needs calibration data: transform(..., calibration=batches)")
    inputs = normalize_inputs(example_inputs)
    captured = _capture_inplace(model, config, inputs, capture, dynamic_shapes) if inplace else \
        _capture(model, config, inputs, capture, dynamic_shapes, copy_model=True)  # fmt: skip
    calibration = _reusable(calibration)
    plan_, stats, experts_stats = _plan_captured(model, captured, config, calibration, inputs, inplace=inplace)
    if inplace:
        _check_inplace(plan_)
    _factorize_experts(model, captured, plan_, experts_stats)
    factors = None
    if config.sequential:
        from .calibrate import sequential_factors

        factors = sequential_factors(captured.gm, plan_, calibration, example=inputs, stats=stats)
    gm = _apply_to_graph(captured.gm, plan_, reference=None if inplace else model, stats=stats, factors=factors)
    if inplace and gm is not model:
        _mirror_into(model, gm)
    _lost_hooks(hooked, gm, captured, plan_)
    return _finish(gm, plan_, captured)
