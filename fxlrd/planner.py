"""Where ranks are chosen: walk the captured graph and plan every conv and linear layer."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from .config import LRDConfig
from .decompose import unfold
from .errors import ConfigError
from .factorized import Factorized, LayerSpec, factorized_like, layer_spec
from .metrics import count_params, layer_macs
from .plan import LayerPlan, Plan
from .ranks import energy_rank, quantize_rank, svd_rank_for_ratio, tucker_ranks_for_ratio, vbmf_rank

__all__ = ["make_plan", "candidate_nodes", "input_shapes"]

_SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CANDIDATES = (nn.Linear, nn.modules.conv._ConvNd)


def candidate_nodes(gm: fx.GraphModule) -> dict[str, list[fx.Node]]:
    """``call_module`` nodes of conv and linear layers, by target, in graph order."""
    found: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            if isinstance(module, _CANDIDATES) and not isinstance(module, Factorized):
                found.setdefault(node.target, []).append(node)
    return found


def input_shapes(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor]) -> None:
    """Record every node's output shape in ``node.meta['tensor_meta']`` without computing.

    Runs ShapeProp under a FakeTensorMode: no real compute, and the model's buffers (batch
    norm running statistics) are not touched.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    if not all(isinstance(t, torch.Tensor) for t in example_inputs):
        raise TypeError("example_inputs must be tensors (a tensor or a tuple of tensors)")
    try:
        ShapeProp(gm, fake_mode=FakeTensorMode(allow_non_fake_inputs=True)).propagate(*example_inputs)
    except Exception as exc:  # noqa: BLE001  (any failure here means the inputs do not fit the model)
        shapes = ", ".join(str(tuple(t.shape)) for t in example_inputs)
        root = exc
        while root.__cause__ is not None or root.__context__ is not None:  # the innermost error says why
            root = root.__cause__ or root.__context__
        text = str(root).strip()
        first = text.splitlines()[0] if text else type(root).__name__
        raise ValueError(
            f"example_inputs of shape {shapes} do not run through the model: {first}. "
            "Pass inputs the model accepts, e.g. the shape of one real batch"
        ) from exc


def _node_input_shape(node: fx.Node) -> tuple[int, ...] | None:
    arg = node.args[0] if node.args else None
    meta = getattr(arg, "meta", {}).get("tensor_meta") if isinstance(arg, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _keep_reason(name: str, module: nn.Module, spec: LayerSpec | None, config: LRDConfig) -> str:
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return "transposed convolution: not supported"
    if not isinstance(module, tuple(config.layer_types)):
        return f"{type(module).__name__} not in layer_types"
    if not isinstance(module, _SUPPORTED):
        return f"{type(module).__name__}: not supported"
    if spec is not None and spec.groups > 1:
        kind = "depthwise" if spec.groups == spec.in_channels else "grouped"
        return f"{kind} convolution (groups={spec.groups}): not supported"
    if config.include is not None and not any(fnmatch.fnmatchcase(name, p) for p in config.include):
        return "not matched by include"
    if any(fnmatch.fnmatchcase(name, p) for p in config.exclude):
        return "matched by exclude"
    if config.filter_fn is not None and not config.filter_fn(module, name):
        return "filter_fn returned False"
    if spec is not None and spec.pointwise and not config.decompose_pointwise:
        return "pointwise layer kept (decompose_pointwise=False)"
    return ""


def _tied_targets(gm: fx.GraphModule) -> set[str]:
    """Modules whose parameters the graph also reads directly (``get_attr``), e.g. tied weights."""
    return {n.target.rpartition(".")[0] for n in gm.graph.nodes if n.op == "get_attr"}


def _svd_rank(weight: torch.Tensor, spec: LayerSpec, config: LRDConfig) -> int:
    c, s = spec.in_channels, spec.out_channels
    if config.rank_rule == "ratio":
        return svd_rank_for_ratio(c, s, config.ratio)
    if config.rank_rule == "fixed":
        rank = config.rank if isinstance(config.rank, int) else config.rank[0]
        return min(rank, c, s)
    matrix = weight.detach().float().reshape(s, c)
    if config.rank_rule == "energy":
        return energy_rank(torch.linalg.svdvals(matrix), config.energy)
    return vbmf_rank(matrix)


def _tucker_ranks(weight: torch.Tensor, spec: LayerSpec, config: LRDConfig) -> tuple[int, int]:
    c, s = spec.in_channels, spec.out_channels
    if config.rank_rule == "ratio":
        return tucker_ranks_for_ratio(c, s, spec.kernel_numel, config.ratio, config.beta)
    if config.rank_rule == "fixed":
        r1, r2 = (config.rank, config.rank) if isinstance(config.rank, int) else (config.rank + config.rank)[:2]
        return min(r1, c), min(r2, s)
    w = weight.detach().float()
    if config.rank_rule == "energy":
        sv = lambda mode: torch.linalg.svdvals(unfold(w, mode))  # noqa: E731
        return energy_rank(sv(1), config.energy), energy_rank(sv(0), config.energy)
    return vbmf_rank(unfold(w, 1)), vbmf_rank(unfold(w, 0))


def _target_ranks(module: nn.Module, spec: LayerSpec, config: LRDConfig) -> tuple[str, tuple[int, ...], tuple[int, ...]]:
    """(method, ranks from the rank rule, the most each rank may be)."""
    full = (spec.in_channels, spec.out_channels)
    if spec.pointwise:
        method, ranks, caps = "svd", (_svd_rank(module.weight, spec, config),), (min(full),)
    else:
        method, ranks, caps = "tucker2", _tucker_ranks(module.weight, spec, config), full
    # A latency search applies its own quantum to its candidates.
    quantum = 1 if config.latency is not None else config.rank_quantum
    ranks = tuple(r if r >= cap else quantize_rank(r, quantum) for r, cap in zip(ranks, caps))
    return method, tuple(min(r, cap) for r, cap in zip(ranks, caps)), caps


@dataclass
class _Todo:
    """A layer the rank rule decomposes, waiting for its final ranks."""

    lp: LayerPlan
    module: nn.Module
    method: str
    ranks: tuple[int, ...]
    caps: tuple[int, ...]
    call_sites: list[fx.Node]


def _fill(todo: _Todo, ranks: tuple[int, ...] | None, config: LRDConfig, reason: str = "") -> None:
    """Set the layer's final ranks (None: keep it, for ``reason``) with params and MACs."""
    lp = todo.lp
    lp.method, lp.ranks, lp.reason, lp.params_after, lp.macs_after = "keep", (), "", lp.params_before, lp.macs_before
    if ranks is None:
        lp.reason = reason
        return
    if min(ranks) < config.min_rank:
        lp.ranks, lp.reason = ranks, f"rank {min(ranks)} < min_rank {config.min_rank}"
        return
    skeleton = factorized_like(todo.module, todo.method, ranks, device="meta")
    after = count_params(skeleton)
    if after >= lp.params_before and not config.allow_larger:
        lp.ranks, lp.reason = ranks, f"would not shrink ({lp.params_before} -> {after} params)"
        return
    lp.method, lp.ranks, lp.params_after = todo.method, ranks, after
    if lp.input_shape is not None:
        lp.macs_after = sum(layer_macs(skeleton, _node_input_shape(n)) for n in todo.call_sites)


def make_plan(
    gm: fx.GraphModule, config: LRDConfig, example_inputs: Sequence[torch.Tensor] | None = None
) -> Plan:
    """Plan every conv/linear ``call_module`` of ``gm`` under ``config``.

    Raises:
        ConfigError: an include pattern matches no layer, or a latency search lacks inputs.
        ValueError: a layer to decompose has NaN or infinite weights.
    """
    if config.latency is not None and example_inputs is None:
        raise ConfigError(
            "choosing ranks by latency needs example_inputs=... (each layer is timed at its real input "
            "shape), e.g. fxlrd.plan(model, config, example_inputs=torch.randn(1, 3, 224, 224))"
        )
    nodes = candidate_nodes(gm)
    if example_inputs is not None:
        input_shapes(gm, example_inputs)
    if config.include is not None:
        for pattern in config.include:
            if not any(fnmatch.fnmatchcase(name, pattern) for name in nodes):
                sample = ", ".join(repr(n) for n in list(nodes)[:4])
                raise ConfigError(
                    f"include pattern {pattern!r} matches no conv/linear layer of the model; "
                    f"names look like {sample} (print fxlrd.plan(model) to see them all)"
                )
    tied = _tied_targets(gm)
    plan = Plan(settings=config.to_dict(), model_params=count_params(gm))
    todos: list[_Todo] = []
    for name, call_sites in nodes.items():
        module = gm.get_submodule(name)
        spec = layer_spec(module) if isinstance(module, _SUPPORTED) else None
        reason = _keep_reason(name, module, spec, config)
        if not reason and name in tied:
            reason = "its parameters are also read outside the layer (tied weights)"
        if not reason and any(len(n.args) != 1 or n.kwargs for n in call_sites):
            reason = "called with other than one positional input"
        if not reason and not torch.isfinite(module.weight).all():
            raise ValueError(
                f"layer {name!r} has NaN or infinite weights; decomposing it would spread them. "
                f"Fix the weights or leave the layer out with LRDConfig(exclude=[{name!r}])"
            )
        shape = _node_input_shape(call_sites[0])
        before = count_params(module)
        lp = LayerPlan(
            name=name, layer_type=type(module).__name__,
            in_channels=getattr(module, "in_features", getattr(module, "in_channels", 0)),
            out_channels=getattr(module, "out_features", getattr(module, "out_channels", 0)),
            kernel_size=tuple(getattr(module, "kernel_size", ())), method="keep", reason=reason,
            params_before=before, params_after=before, input_shape=shape,
        )  # fmt: skip
        if shape is not None:
            lp.macs_before = lp.macs_after = sum(layer_macs(module, _node_input_shape(n)) for n in call_sites)
        plan.layers[name] = lp
        if not reason:
            todos.append(_Todo(lp, module, *_target_ranks(module, spec, config), call_sites))
    if config.target_speedup is not None:
        from .global_search import plan_globally

        plan_globally(gm, todos, config, example_inputs, plan, lambda todo, ranks, why: _fill(todo, ranks, config, why))
    elif config.latency is not None:
        _search(todos, config)
    else:
        for todo in todos:
            _fill(todo, todo.ranks, config)
    return plan


def _search(todos: list[_Todo], config: LRDConfig) -> None:
    from .rank_search import RankSearcher

    searcher = RankSearcher(config.latency)
    searcher.progress(len(todos))
    try:
        for todo in todos:
            result = searcher.search(todo.module, todo.method, todo.ranks, todo.caps, todo.lp.input_shape)
            todo.lp.latency = result.record(config.latency.backend)
            _fill(todo, result.ranks, config, result.note)
            searcher.cache.flush()
    finally:
        searcher.close()
