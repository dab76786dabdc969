"""Where ranks are chosen: walk the captured graph's layer sites and plan each one.

For every conv/linear site the planner asks the method's handler (`fxlrd.methods`) whether
it applies, what ranks the rank rule gives and what they cost, then settles the final ranks
one of four ways: the rule's ranks quantized (default), the latency search of paper Alg. 1
(`fxlrd.ranks.search`), a latency target for the whole model (global mode), or a parameter
budget for the whole model (`fxlrd.ranks.allocate`). It never rewrites the graph: the passes
do, from the plan.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import fnmatch
import io
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from .capture import Args, flat_inputs, input_signature
from .config import LRDConfig
from .errors import ConfigError, FxlrdWarning
from .factorized import LayerSpec, make_layer, skeleton
from .methods import Method, get_method
from .metrics import count_params, layer_macs
from .plan import LayerPlan, Plan
from .ranks.allocate import closed_loop, solve_budget
from .ranks.rules import bottleneck
from .sites import Site, find_sites, routes

__all__ = ["make_plan", "input_shapes", "LayerTask"]

_LAYER_TYPE_OF_SPEC = {0: nn.Linear, 1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_TRANSPOSED_TYPE_OF_SPEC = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}


def input_shapes(gm: fx.GraphModule, inputs: Args) -> None:
    """Record every node's output shape in ``node.meta['tensor_meta']`` without computing.

    Runs ShapeProp under a FakeTensorMode: no real compute, and the model's buffers (batch
    norm running statistics) are not touched. Where fake tensors fail, one real forward records
    the shapes instead (in eval mode, `fxlrd.capture.state_kept`: nothing of the model changes):
    code that branches on values (inside a leaf module), an operation whose fake kernel refuses
    what its real one takes.
    Inputs that fail that too raise `fxlrd.capture.inputs_error` with the real failure.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    from .capture import inputs_error, quiet_fake_tensors, state_kept

    values = flat_inputs(gm, inputs)
    try:
        with contextlib.redirect_stderr(io.StringIO()), quiet_fake_tensors():  # ShapeProp prints a traceback before raising
            ShapeProp(gm, fake_mode=FakeTensorMode(allow_non_fake_inputs=True)).propagate(*values)
        return
    except Exception:  # noqa: BLE001  (the inputs do not fit the model, or fake tensors cannot run it)
        pass
    # (outside the handler, so that the real run's error does not chain to the fake one)
    try:
        with contextlib.redirect_stderr(io.StringIO()), state_kept(gm, values):
            gm.eval()
            ShapeProp(gm).propagate(*values)
    except Exception as exc:  # noqa: BLE001  (fails for real too: the inputs' error)
        raise inputs_error(gm, inputs, exc) from exc


def _shape_of(node: fx.Node | None) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(int(d) for d in meta.shape) if meta is not None and hasattr(meta, "shape") else None


@dataclass
class LayerTask:
    """A layer the rank rule decomposes, waiting for its final ranks."""

    lp: LayerPlan
    site: Site
    spec: LayerSpec
    handler: Method
    weight: torch.Tensor
    ranks: tuple[int, ...]
    caps: tuple[int, ...]
    stats: Any = None

    @property
    def calls(self) -> list[tuple[int, ...] | None]:
        return [_shape_of(self.site.input(n)) for n in self.site.nodes]

    def layer(self, gm: nn.Module) -> nn.Module:
        """A standalone copy of the layer (for timing)."""
        return self.site.layer(gm, share=False)


def _equivalent_type(spec: LayerSpec) -> type[nn.Module]:
    return (_TRANSPOSED_TYPE_OF_SPEC if spec.transposed else _LAYER_TYPE_OF_SPEC).get(spec.dims, nn.Module)


def unselected_reason(name: str, site: Site, gm: fx.GraphModule, config: LRDConfig) -> str:
    """Why the user's ``include``, ``exclude`` or ``filter_fn`` leave the layer out ("" when they don't)."""
    if config.include is not None and not any(fnmatch.fnmatchcase(name, p) for p in config.include):
        return "not matched by include"
    if any(fnmatch.fnmatchcase(name, p) for p in config.exclude):
        return "matched by exclude"
    if config.filter_fn is not None and not config.filter_fn(site.layer(gm), name):
        return "filter_fn returned False"
    return ""


def _keep_reason(name: str, site: Site, gm: fx.GraphModule, handler: Method | None, config: LRDConfig) -> str:
    spec = site.spec
    if site.reason:
        return site.reason
    if spec is None:
        return f"{site.op}: not supported"
    layer_type = type(gm.get_submodule(name)) if site.kind == "module" else _equivalent_type(spec)
    if not issubclass(layer_type, tuple(config.layer_types)):
        return f"{layer_type.__name__} not in layer_types"
    why = unselected_reason(name, site, gm, config)
    if why:
        return why
    if routes(gm, site) and name not in (config.include or ()):
        return ("router (topk of its output picks what runs next: experts, queries, tokens): kept, as a low-rank "
                "router changes the picks; to decompose it, give its exact name in include (a glob does not count), "
                f"beside the others: include=['*', {name!r}]")  # fmt: skip
    if spec.pointwise and not config.decompose_pointwise:
        return "pointwise layer kept (decompose_pointwise=False)"
    why = handler.applies(spec) if handler is not None else "no method"
    return f"{why}: not supported" if why and not why.endswith("not supported") else why


def _macs(spec: LayerSpec, module: nn.Module | None, shapes: list[tuple[int, ...] | None], dtype: torch.dtype) -> int | None:
    if any(s is None for s in shapes):
        return None
    if module is None:
        module = make_layer(spec, spec.in_channels, spec.out_channels, spatial=True, groups=spec.groups,
                            bias=spec.bias, device="meta", dtype=dtype)  # fmt: skip
    return sum(layer_macs(module, s) for s in shapes)


def _fill(task: LayerTask, ranks: tuple[int, ...] | None, config: LRDConfig, reason: str = "") -> None:
    """Set the layer's final ranks (None: keep it, for ``reason``) with params and MACs."""
    lp = task.lp
    lp.method, lp.ranks, lp.reason, lp.params_after, lp.macs_after = "keep", (), "", lp.params_before, lp.macs_before
    lp.data_aware, lp.error = False, None
    if ranks is None:
        lp.reason = reason
        return
    cut = bottleneck(ranks, task.caps)
    if cut is not None and cut < config.min_rank:
        lp.ranks, lp.reason = ranks, f"rank {cut} < min_rank {config.min_rank}"
        return
    meta = skeleton(task.spec, task.handler.name, ranks, device="meta", dtype=task.weight.dtype)
    after = count_params(meta)
    if after >= lp.params_before and not config.allow_larger:
        lp.ranks, lp.reason = ranks, f"would not shrink ({lp.params_before} -> {after} params)"
        return
    lp.method, lp.ranks, lp.params_after = task.handler.name, tuple(ranks), after
    lp.data_aware = task.stats is not None and task.handler.data_aware
    if lp.macs_before is not None:
        lp.macs_after = _macs(task.spec, meta, task.calls, task.weight.dtype)


def _params_of(task: LayerTask, ranks: tuple[int, ...]) -> int:
    return count_params(skeleton(task.spec, task.handler.name, ranks, device="meta", dtype=task.weight.dtype))


def make_plan(gm: fx.GraphModule, config: LRDConfig, inputs: Args | None = None, **kwargs: Any) -> Plan:
    """Plan every conv/linear site of ``gm`` under ``config`` (see `_make_plan`); the rank
    rules and error curves run single-threaded (`fxlrd.decompose.single_threaded`)."""
    from .decompose import single_threaded

    with single_threaded():
        return _make_plan(gm, config, inputs, **kwargs)


def _make_plan(
    gm: fx.GraphModule,
    config: LRDConfig,
    inputs: Args | None = None,
    *,
    capture: Mapping[str, Any] | None = None,
    stats: Mapping[str, Any] | None = None,
    narrowed: Sequence[Mapping[str, Any]] = (),
    before_narrowing: fx.GraphModule | None = None,
    stacked: Sequence[str] = (),
    stack_tasks: Sequence[Any] = (),
) -> Plan:
    """Plan every conv/linear site of ``gm`` under ``config``.

    Args:
        gm: the captured model.
        config: the settings.
        inputs: example inputs as ``(args, kwargs)``: with them each layer's input shape and
            MACs are recorded; latency searches need them.
        capture: how ``gm`` was captured (recorded in the plan).
        stats: calibration statistics by site name: data-aware ranks and errors.
        narrowed: the MLP blocks narrowed in ``gm`` (`fxlrd.narrow.MLPBlock.to_dict` records): the
            plan's model size is the one before narrowing, and a parameter budget counts the
            narrowed blocks at their narrowed size.
        before_narrowing: ``gm`` before its MLP blocks were narrowed: a ``target_speedup``
            counts from its time (what narrowing gained is measured first, and the other
            layers are chosen for the rest).
        stacked: the paths of the stacked expert weights (`fxlrd.experts`), planned apart:
            names ``include`` and ``exclude`` patterns may match too.
        stack_tasks: the stacked weights a parameter budget sizes beside the layers
            (`fxlrd.experts.StackTask`): each is kept or given a rank by the allocation.

    Raises:
        ConfigError: an include pattern matches no layer, or a latency search lacks inputs.
        ValueError: a layer to decompose has NaN or infinite weights.
    """
    if config.latency is not None and inputs is None:
        raise ConfigError(
            "choosing ranks by latency needs example_inputs=... (each layer is timed at its real input "
            "shape), e.g. fxlrd.plan(model, config, example_inputs=torch.randn(1, 3, 224, 224))"
        )
    sites = find_sites(gm)
    if inputs is not None:
        input_shapes(gm, inputs)
    if config.include is not None:
        for pattern in config.include:
            if not any(fnmatch.fnmatchcase(name, pattern) for name in [*sites, *stacked]):
                sample = ", ".join(repr(n) for n in list(sites)[:4])
                raise ConfigError(
                    f"include pattern {pattern!r} matches no conv/linear layer of the model; "
                    f"names look like {sample} (print fxlrd.plan(model) to see them all)"
                )
    for pattern in config.exclude:  # a typo would exclude nothing, silently
        if not any(fnmatch.fnmatchcase(name, pattern) for name in [*sites, *stacked]):
            sample = ", ".join(repr(n) for n in list(sites)[:4])
            warnings.warn(
                f"exclude pattern {pattern!r} matches no conv/linear layer of the model, so it excludes nothing; "
                f"names look like {sample} (a glob: 'b1.conv*' for every layer under b1.conv)",
                FxlrdWarning,
                stacklevel=3,
            )
    settings = config.to_dict()
    if capture is not None:
        settings["capture"] = dict(capture)
    if inputs is not None:
        settings["inputs"] = input_signature(inputs)
    if narrowed:
        settings["narrowed"] = [dict(b) for b in narrowed]
    plan = Plan(settings=settings, model_params=count_params(gm) + _narrowing_saved(settings))
    tasks: list[LayerTask] = []
    for name, site in sites.items():
        spec = site.spec
        handler = get_method(config.method_for(spec)) if spec is not None else None
        reason = _keep_reason(name, site, gm, handler, config)
        weight = site.weight(gm) if spec is not None else None
        if not reason and weight.is_meta:
            raise ConfigError(
                f"layer {name!r} has its weights on the meta device (not loaded): fxlrd decomposes weights, so load "
                "them first; to rebuild a saved fxlrd model, fxlrd.load takes a meta model (it reads the saved values)"
            )
        if not reason and not torch.isfinite(weight).all():
            raise ValueError(
                f"layer {name!r} has NaN or infinite weights; decomposing it would spread them. "
                f"Fix the weights or leave the layer out with LRDConfig(exclude=[{name!r}])"
            )
        shapes = [_shape_of(site.input(n)) for n in site.nodes]
        before = sum(t.numel() for t in site.parameters(gm))
        lp = LayerPlan(
            name=name, layer_type=site.op,
            in_channels=spec.in_channels if spec else 0, out_channels=spec.out_channels if spec else 0,
            kernel_size=spec.kernel_size if spec else (), method="keep", reason=reason,
            params_before=before, params_after=before, input_shape=shapes[0], site=site.kind,
        )  # fmt: skip
        if spec is not None and weight is not None:
            module = gm.get_submodule(name) if site.kind == "module" else None
            lp.macs_before = lp.macs_after = _macs(spec, module, shapes, weight.dtype)
        plan.layers[name] = lp
        if reason:
            continue
        site_stats = (stats or {}).get(name) if handler.data_aware else None
        ranks = handler.target_ranks(weight, spec, config, site_stats)
        caps = handler.caps(spec)
        quantum = 1 if config.latency is not None else config.rank_quantum  # a search applies its own
        ranks = tuple(min(r, c) for r, c in zip(handler.quantize(tuple(ranks), caps, quantum), caps))
        tasks.append(LayerTask(lp, site, spec, handler, weight, ranks, caps, site_stats))

    fill = lambda task, ranks, why="": _fill(task, ranks, config, why)  # noqa: E731
    if config.target_speedup is not None:
        _plan_for_speed(gm, tasks, config, inputs, plan, fill, before_narrowing, stack_tasks)
    elif config.latency is not None:
        _search(gm, tasks, config, fill)
    elif config.target_params is not None or config.allocation == "global":
        _plan_for_size(tasks, config, plan, fill, stack_tasks)
    else:
        for task in tasks:
            fill(task, task.ranks)
    for task in tasks:  # data-aware layers report their output error (data-free ones: allocation modes only)
        if task.lp.decomposed and task.lp.error is None and task.lp.data_aware:
            task.lp.error = _error_curve(task)(task.lp.ranks)
    return plan


def _windows(gm: fx.GraphModule, config: LRDConfig, tasks: Sequence[LayerTask]) -> Callable[[LayerTask], Any]:
    """Each task's timing window (`fxlrd.ranks.context`) when the search times layers in
    context, else None. With ``config.merge``, a window takes in the pointwise layers next to
    its layer that are not searched and that merging absorbs its factors into (checked by
    merging a candidate in the window), and times candidates merged (a layer called more than
    once is not merged, as `fxlrd.passes.MergePass` leaves it). A pointwise layer between two
    searched layers joins the first one's window only: `MergePass` merges it with that one."""
    from .fusion import is_pointwise
    from .ranks.context import neighbourhood

    if config.latency.context != "neighbours":
        return lambda task: None
    sites = find_sites(gm)
    site_nodes = {n for site in sites.values() for n in site.nodes}
    through: frozenset[fx.Node] = frozenset()
    if config.merge is not None:
        searched = {task.site.name for task in tasks}
        through = frozenset(site.nodes[0] for name, site in sites.items() if name not in searched and not site.reason
                            and site.kind == "module" and len(site.nodes) == 1 and is_pointwise(site.layer(gm)))  # fmt: skip

    windows: dict[int, Any] = {}
    claimed: set[fx.Node] = set()  # a pointwise layer between two searched layers is the first's (MergePass's order)
    for task in tasks:
        merge = config.merge if len(task.site.nodes) == 1 else None
        window = neighbourhood(gm, task.site, site_nodes, config.latency.depth, merge=merge, through=through - claimed)
        if window is not None and window.taken:  # only what merging a candidate's factors really absorbs
            absorbed = set(window.absorbs(_probe(task)))
            if absorbed != {name for name, _ in window.through}:
                kept = frozenset(n for (name, _), n in zip(window.through, window.taken) if name in absorbed)
                window = neighbourhood(gm, task.site, site_nodes, config.latency.depth, merge=merge, through=kept)
            claimed.update(window.taken if window is not None else ())
        windows[id(task)] = window
    return lambda task: windows[id(task)]


def _probe(task: LayerTask) -> nn.Module:
    """A candidate of ``task``'s method at its rule's ranks (random values: for its structure)."""
    from .ranks.search import _random_skeleton

    return _random_skeleton(task.spec, task.handler.name, tuple(task.ranks), task.weight.dtype)


def _search(gm: fx.GraphModule, tasks: list[LayerTask], config: LRDConfig, fill: Callable) -> None:
    from .ranks.search import RankSearcher

    searcher = RankSearcher(config.latency)
    searcher.progress(len(tasks))
    window_of = _windows(gm, config, tasks)
    try:
        for task in tasks:
            window = window_of(task)
            result = searcher.search(task.layer(gm), task.handler.name, task.ranks, task.caps, task.lp.input_shape,
                                     task.spec, window=window, min_rank=config.min_rank)  # fmt: skip
            task.lp.latency = result.record(config.latency.backend)
            fill(task, result.ranks, result.note)
            searcher.cache.flush()
    finally:
        searcher.close()


UNREACHED = "the sensitivity target does not depend on this layer's output: its error costs nothing there"


def _error_curve(task: LayerTask) -> Callable[[tuple[int, ...]], float]:
    """The layer's error at each choice of ranks, in the allocation's units; zero for a layer
    the sensitivity target does not reach (its plain-whitening error is in the layer's own
    units, which would be weighed against model-output errors)."""
    if task.stats is not None and getattr(task.stats, "unreached", False):
        task.lp.notes = UNREACHED
        return lambda ranks: 0.0
    return task.handler.error_curve(task.weight, task.spec, task.stats)


def _options(task: LayerTask, quantum: int, cost: Callable[[tuple[int, ...] | None], float], error, *,
             every: bool = False, min_rank: int = 1) -> dict:  # fmt: skip
    """Keep, or each global candidate that compresses (no rank below ``min_rank``: the layer
    would be kept instead), as choice -> (cost, error)."""
    opts: dict = {None: (cost(None), 0.0)}
    for ranks in task.handler.global_candidates(task.ranks, task.caps, quantum, every=every):
        if ranks in opts or (bottleneck(ranks, task.caps) or min_rank) < min_rank \
                or _params_of(task, ranks) >= task.lp.params_before:
            continue  # not a compression, or not one the plan would keep
        opts[ranks] = (cost(ranks), error(ranks))
    return opts


def _narrowing_saved(settings: Mapping[str, Any]) -> int:
    """The parameters the narrowed MLP blocks of a plan's settings gave up."""
    return sum(b["params_before"] - b["params_after"] for b in settings.get("narrowed") or ())


def _sized(tasks: Sequence[LayerTask], stacks: Sequence[Any] = ()) -> int:
    """The parameters a budget sizes: the decomposable layers' and the stacked weights' (`fxlrd.experts.StackTask`)."""
    return sum(t.lp.params_before for t in tasks) + sum(s.record["params_before"] for s in stacks)


def _layer_budget(tasks: list[LayerTask], config: LRDConfig, plan: Plan, stacks: Sequence[Any] = ()) -> tuple[float, str]:
    """Parameters the decomposable layers (and the stacked weights the budget sizes, ``stacks``)
    may keep, from ``target_params`` (the whole model, narrowed MLP blocks at their narrowed
    size) or a global ``ratio``."""
    layers = _sized(tasks, stacks)
    if config.target_params is not None:
        target = config.target_params
        whole = target * plan.model_params if isinstance(target, float) and target < 1 else float(target)
        if whole >= plan.model_params and config.target_speedup is None:  # (with a speed target: a cap that does not bind)
            what = "it sizes the whole model, narrowed MLP blocks included" if plan.settings.get("narrowed") else \
                "so nothing would be compressed"  # fmt: skip
            raise ConfigError(
                f"target_params={target!r} is not below the model's {plan.model_params} parameters ({what}): ask for "
                f"fewer, as a count (e.g. {plan.model_params // 2}) or a fraction below 1 (0.5)"
            )
        fixed = plan.model_params - _narrowing_saved(plan.settings) - layers  # (narrowed blocks: as they are now)
        return whole - fixed, f"model params <= {whole:.0f}"
    what = "decomposable layers' and stacked experts'" if stacks else "decomposable layers'"
    return layers / config.ratio, f"{what} params <= 1/{config.ratio:g} of {layers}"


def _plan_for_size(tasks: list[LayerTask], config: LRDConfig, plan: Plan, fill: Callable,
                   stacks: Sequence[Any] = ()) -> None:  # fmt: skip
    """Global allocation under a parameter budget with the least total (data-aware) error,
    over the layers and the stacked expert weights ``stacks`` (`fxlrd.experts.StackTask`)."""
    quantum = config.rank_quantum
    budget, what = _layer_budget(tasks, config, plan, stacks)
    layers = _sized(tasks, stacks)
    if config.target_params is not None and plan.settings.get("narrowed") and budget >= layers:
        warnings.warn(
            f"target_params={config.target_params!r}: narrowing the MLP blocks at ratio={config.ratio:g} alone leaves "
            f"{plan.params_after_model()} parameters, within the budget ({what}), so the other layers are kept: "
            "narrow less (a lower ratio) to spend the budget", FxlrdWarning, stacklevel=6,
        )  # fmt: skip
    _centre_on_budget(tasks, config, plan, stacks)  # (methods offering ranks around their target: CP)
    options = []
    for task in tasks:
        curve = _error_curve(task)
        options.append(_options(task, quantum, lambda r, t=task: t.lp.params_before if r is None else _params_of(t, r), curve,
                                every=True, min_rank=config.min_rank))  # fmt: skip
    options += [stack.options(quantum, config.min_rank) for stack in stacks]
    choices, met = solve_budget(options, budget)
    for task, opts, choice in zip(tasks, options, choices):
        fill(task, choice, "" if choice is not None else "global allocation: kept (least error for the budget)")
        if choice is not None:
            task.lp.error = opts[choice][1]
    for stack, choice in zip(stacks, choices[len(tasks):]):
        stack.fill(choice)
    used = sum(opts[c][0] for opts, c in zip(options, choices))
    aware = any(t.stats is not None for t in tasks) or any(s.stats is not None for s in stacks)
    plan.settings["allocation_result"] = {
        "budget": what, "layer_params_budget": budget, "layer_params_chosen": used, "met": met,
        "objective": "output error on calibration data" if aware else "weight error",
    }  # fmt: skip
    if stacks:
        plan.settings["allocation_result"]["stacked_experts"] = len(stacks)
    if not met:
        raise _budget_error(what, used, budget, tasks, plan, config.min_rank, stacks)


def _budget_error(what: str, used: float, budget: float, tasks: list[LayerTask], plan: Plan,
                  min_rank: int = 1, stacks: Sequence[Any] = ()) -> ConfigError:  # fmt: skip
    """The error for a parameter budget no choice of ranks meets."""
    if budget <= 0:
        fixed = plan.model_params - _narrowing_saved(plan.settings) - _sized(tasks, stacks)
        narrowed = ", narrowed MLP blocks at their narrowed size" if plan.settings.get("narrowed") else ""
        merged = ""
        if plan.settings.get("merge") and not plan.settings.get("decompose_pointwise"):
            merged = ("; with merge the pointwise layers are not decomposed, and count whole here although merging "
                      "shrinks them later (the budget is allocated before merging): size a merged model by "
                      "target_speedup or ratio instead, or set decompose_pointwise=True")  # fmt: skip
        return ConfigError(
            f"the parameter budget ({what}) is below the {fixed:.0f} parameters outside the decomposable layers "
            f"(embeddings, norms, layers left out{narrowed}), which decomposition does not touch: ask for a larger "
            f"target_params or decompose more layers{merged}"
        )
    smallest = f"min_rank={min_rank}" if min_rank > 1 else "the smallest ranks tried"
    fix = "lower min_rank (the smallest ranks allowed), ask for fewer savings" if min_rank > 1 else "ask for fewer savings"
    return ConfigError(
        f"the parameter budget ({what}) cannot be met even by {smallest} "
        f"({used:.0f} > {budget:.0f} parameters in the decomposable layers); {fix} or decompose more layers"
    )


def _centre_on_budget(tasks: list[LayerTask], config: LRDConfig, plan: Plan, stacks: Sequence[Any] = ()) -> float:
    """The speed search (and CP under any budget) offers ranks around each layer's target (R/4
    to 2R): with a size budget that asks for more than ``ratio``, centre them on the budget's
    ratio instead, or budgets that other ranks meet had no candidate small enough. With
    narrowed MLP blocks, ``ratio`` is the blocks': centre on any budget that compresses.
    Returns the ratio the targets are centred on."""
    if config.target_params is None:
        return config.ratio
    budget, _ = _layer_budget(tasks, config, plan, stacks)
    layers = _sized(tasks, stacks)
    most = layers if plan.settings.get("narrowed") else layers / config.ratio
    if not 0 < budget < most:
        return config.ratio
    centred = dataclasses.replace(config, ratio=layers / budget)
    for task in tasks:
        ranks = task.handler.target_ranks(task.weight, task.spec, centred, task.stats)
        ranks = task.handler.quantize(tuple(ranks), task.caps, 1)
        task.ranks = tuple(max(1, min(r, c)) for r, c in zip(ranks, task.caps))
    return layers / budget


def _as_built(trial: fx.GraphModule, config: LRDConfig) -> fx.GraphModule:
    """A global-mode trial in the form the model is built in: branched and merged as ``config``
    asks, so the closed loop times what `transform` returns. Only the structure matters for
    its time: branches start as the cores' diagonal blocks (no block-term fit), and the trial
    is merged in its own mode, as `transform` merges."""
    from fxlrd.passes import BranchPass, MergePass

    if config.branches > 1:
        trial = BranchPass(config.branches, "truncate")(trial).graph_module
    if config.merge is not None:
        trial = MergePass(config.merge)(trial).graph_module
    return trial


def _plan_for_speed(gm: fx.GraphModule, tasks: list[LayerTask], config: LRDConfig, inputs: Args, plan: Plan,
                    fill: Callable, before_narrowing: fx.GraphModule | None = None, stacks: Sequence[Any] = ()) -> None:  # fmt: skip
    """Global mode: every layer's ranks (or keep) for ``config.target_speedup``, least total
    error, closed loop on the measured whole-model speed-up. ``before_narrowing``: the model
    before its MLP blocks were narrowed; the speed-up counts from it, and the layers are
    chosen for what narrowing left of the target. ``stacks``: stacked expert weights
    (`fxlrd.experts.StackTask`) chosen beside the layers, each timed by its products alone."""
    from fxlrd.passes import DecomposePass

    from .experts import trial_stacks
    from .ranks.search import RankSearcher

    stack_ratio = _centre_on_budget(tasks, config, plan, stacks)
    if config.target_params is not None:  # a size budget below the fixed parameters: before any timing
        budget, what = _layer_budget(tasks, config, plan, stacks)
        if budget <= 0:
            raise _budget_error(what, 0.0, budget, tasks, plan, config.min_rank, stacks)
    searcher = RankSearcher(config.latency)
    searcher.progress(len(tasks) + len(stacks))
    window_of = _windows(gm, config, tasks)
    narrowing = 1.0
    try:
        if before_narrowing is not None:  # (a private copy: timed as it is)
            narrowing = searcher.timer.speedup_model(before_narrowing, copy.deepcopy(gm), inputs)
            if narrowing >= config.target_speedup:  # fast enough: the other layers are kept, or searched for the size
                sized = config.target_params is not None or config.allocation == "global"
                then = "chosen for the parameter budget alone" if sized else "kept"
                warnings.warn(
                    f"target_speedup={config.target_speedup:g}: narrowing the MLP blocks at ratio={config.ratio:g} alone "
                    f"measured {narrowing:.2f}x, so the other layers are {then}: narrow less (a lower ratio) for a model "
                    "closer to the target, with less error", FxlrdWarning, stacklevel=6,
                )  # fmt: skip
                if not sized:  # (with a size budget, the closed loop below finds the least-error model of that size)
                    for task in tasks:
                        fill(task, None, f"global: kept (narrowing alone measured {narrowing:.2f}x)")
                    for stack in stacks:
                        stack.fill(None, f"global: kept (narrowing alone measured {narrowing:.2f}x)")
                    plan.settings["global_search"] = {
                        "target_speedup": config.target_speedup, "narrowing_speedup": narrowing,
                        "measured_speedup": narrowing, "met": True, "rounds": []}  # fmt: skip
                    return
        model_s = searcher.timer.time_model(copy.deepcopy(gm), inputs)
        options = []
        priced: dict[fx.Node, LayerTask] = {}  # pointwise layers a merge absorbs: whose time each is
        for task in tasks:
            layer = task.layer(gm)
            calls = len(task.site.nodes)
            t0 = searcher.time_layer(layer, task.lp.input_shape) * calls
            curve = _error_curve(task)
            window = window_of(task)
            if window is None:
                cost = lambda r, t=task, lay=layer, t0=t0: t0 if r is None else \
                    searcher.time_ranks(lay, t.handler.name, r, t.lp.input_shape, t.spec) * calls  # noqa: E731
            else:
                # The layer's own time, changed by what each option changes in its window: the
                # costs stay additive over layers (windows overlap; their differences do not).
                # Pointwise layers the factors merge into are the layer's to spend: their time
                # joins its own (it would otherwise count as fixed, and merging save nothing).
                # (One between two searched layers is taken into the first's window only.)
                for (name, shape), node in zip(window.through, window.taken):
                    priced[node] = task
                    t0 += searcher.time_layer(window.graph_module.get_submodule(name), shape)
                w0 = searcher.time_in_window(window, layer)
                cost = lambda r, t=task, lay=layer, t0=t0, w=window, w0=w0: t0 if r is None else max(
                    t0 + (searcher.time_in_window(w, lay, t.handler.name, r, t.spec) - w0) * calls, 0.05 * t0)  # noqa: E731
            options.append(_options(task, config.latency.quantum, cost, curve, min_rank=config.min_rank))
            searcher.cache.flush()
            searcher._tick()
        for stack in stacks:
            options.append(stack.speed_options(stack_ratio, config.latency.quantum, searcher, config.min_rank))
            searcher.cache.flush()
            searcher._tick()
    finally:
        searcher.close()
    budget_params = None
    if config.target_params is not None or config.allocation == "global":  # the global ratio is a size budget too
        budget_params, budget_what = _layer_budget(tasks, config, plan, stacks)

    kept_why = "global: kept (least error for the target)"

    def apply_choices(choices) -> None:
        for task, choice in zip(tasks, choices):
            fill(task, choice, "" if choice is not None else kept_why)

    def measure(choices) -> float:
        apply_choices(choices)
        trial = DecomposePass(plan, stats={t.lp.name: t.stats for t in tasks if t.stats is not None})(copy.deepcopy(gm))
        trial_stacks(trial.graph_module, stacks, choices[len(tasks):])
        return searcher.timer.speedup_model(copy.deepcopy(gm), _as_built(trial.graph_module, config), inputs)

    params = [{c: (t.lp.params_before if c is None else _params_of(t, c)) for c in opts} for t, opts in zip(tasks, options)]
    params += [{c: stack.params(c) for c in opts} for stack, opts in zip(stacks, options[len(tasks):])]
    try:
        choices, record = closed_loop(options, config.target_speedup / narrowing, model_s, measure, params=params,
                                      param_budget=budget_params)  # fmt: skip
    finally:
        for stack in stacks:  # (the trials' SVDs: as large as the stacks)
            stack._svd = None
    if before_narrowing is not None:  # the rounds' speed-ups count from the narrowed model; the record's, from the original
        record.update(target_speedup=config.target_speedup, narrowing_speedup=narrowing,
                      measured_speedup=record["measured_speedup"] * narrowing, rounds_from="the narrowed model",
                      narrowed_model_ms=record.pop("model_original_ms"))  # (the product of the two measured ratios)
    if budget_params is not None:
        record["layer_params_budget"] = budget_params
        record["layer_params_chosen"] = sum(p[c] for p, c in zip(params, choices))
        if record["layer_params_chosen"] > budget_params * (1 + 1e-12):
            raise _budget_error(budget_what, record["layer_params_chosen"], budget_params, tasks, plan, config.min_rank,
                                stacks)  # fmt: skip
    baseline = "the narrowed model" if before_narrowing is not None else "the original"
    if record.get("kept_all"):
        kept_why = f"global: kept (every model tried measured slower than {baseline})"
    apply_choices(choices)
    for stack, choice in zip(stacks, choices[len(tasks):]):
        stack.fill(choice, kept_why)
    aware = any(t.stats is not None for t in tasks) or any(s.stats is not None for s in stacks)
    record["objective"] = "output error on calibration data" if aware else "weight error"
    built = [w for w, on in ((f"branched ({config.branches})", config.branches > 1), (f"merged ({config.merge})", config.merge))
             if on]  # fmt: skip
    if built:
        record["trials_timed"] = " and ".join(built)
    if stacks:
        record["stacked_experts"] = len(stacks)
    plan.settings["global_search"] = record
    if not record["met"]:
        kept = f" every layer is kept: each model tried was slower than {baseline}," if record.get("kept_all") else ""
        other = record.get("other_fraction")
        ceiling = (f" The layers took {1 - other:.0%} of the model's time, so no ranks give more than "
                   f"{narrowing / other:.2f}x." if other and 0 < other < 1 else "")  # fmt: skip
        warnings.warn(
            f"target_speedup={config.target_speedup:g} was not reached:{kept} the model chosen measured "
            f"{record['measured_speedup']:.2f}x (plan.settings['global_search'] has every round).{ceiling} Lower the target, "
            "allow more error, or time layers where the model runs (LatencyConfig(backend=..., context='neighbours'))",
            FxlrdWarning,
            stacklevel=3,
        )
    for task, opts, choice in zip(tasks, options, choices):  # (zip: the layers', the stacks' follow)
        task.lp.latency = {
            "backend": config.latency.backend, "original_ms": opts[None][0] * 1e3,
            "candidates_ms": [[list(r), t * 1e3, e] for r, (t, e) in opts.items() if r is not None],
            "chosen": None if choice is None else list(choice), "note": "" if choice is not None else "global: kept",
        }  # fmt: skip
        merged_into = [str(node.target) for node, owner in priced.items() if owner is task]
        if merged_into:  # (their time is in original_ms and every candidate's: the layer's to spend)
            task.lp.latency["merged_into"] = merged_into
        if choice is not None:
            task.lp.error = opts[choice][1]
