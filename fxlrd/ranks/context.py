"""Timing a layer in context: the layer with its neighbours, cut out of the model's graph.

A layer timed alone misleads when what surrounds it changes what the backend does with it:
onnxruntime folds the batch norm that follows a conv into it and fuses the ReLU and the
residual add after it, and on x86 it runs convs in a blocked channel layout (NCHWc) whose
reorders only sit at the edges of a chain of convs. A factor chain and the layer it replaces
gain from these differently, so a rank that is fastest alone need not be fastest in the model
(measured on ResNet-50: ranks searched layer by layer gave a smaller model that ran slower
than plain quantized ranks).

A `Window` is the site with the operations that feed it and consume it, up to the nearest
other layers (at most ``depth`` each way, along single-use chains), as a GraphModule of its
own whose inputs are the values flowing in. Candidate ranks are timed by putting their factor
chain in the site's place. Windows are named canonically, so identical blocks (ResNet repeats
its bottlenecks) share one cache entry.
"""

from __future__ import annotations

import copy
import hashlib
import operator
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from ..factorized import Factorized
from ..sites import Site

__all__ = ["Window", "neighbourhood"]

_CALLS = ("call_function", "call_module", "call_method")


@dataclass
class Window:
    """A layer site and its neighbours as a module of their own.

    Attributes:
        graph_module: the window; its ``site`` submodule is the layer (swap it with `with_site`).
        inputs: shape and dtype of each input of the window, in order.
        key: a canonical text of everything in the window but the site (cache key part).
        size: how many operations besides the site the window holds.
        merge: how candidates are merged into the window's pointwise layers (None: not merged).
        through: the window's pointwise layers a candidate merges into, as (submodule name,
            input shape): their time is the site's to spend (`fxlrd.planner` adds it to the
            site's own time when it prices options in context).
    """

    graph_module: fx.GraphModule
    inputs: tuple[tuple[tuple[int, ...], torch.dtype], ...]
    key: str
    size: int
    merge: str | None = None
    through: tuple[tuple[str, tuple[int, ...]], ...] = ()
    taken: tuple[fx.Node, ...] = field(default=(), repr=False, compare=False)  # the model's nodes of `through`, in order

    def with_site(self, layer: nn.Module) -> fx.GraphModule:
        """The window running ``layer`` in the site's place (the window itself is not changed).
        With ``merge``, a `Factorized` layer runs factor by factor and its factors are merged
        into the pointwise layers around it (`fxlrd.passes.MergePass`), as the model will be."""
        if self.merge is not None and isinstance(layer, Factorized):
            return self._merged(layer)
        gm = copy.copy(self.graph_module)  # shares the neighbours' modules and buffers
        gm._modules = dict(self.graph_module._modules)
        gm._modules["site"] = layer
        return gm

    def _merged(self, layer: Factorized) -> fx.GraphModule:
        from fxlrd.passes import MergePass

        gm = copy.deepcopy(self.graph_module)  # (merging replaces neighbours, in their own mode as transform does)
        # (and factors: the caller's layer stays as it is), where the neighbours are: a candidate is made on the CPU
        anchor = next(gm.parameters(), None)
        gm.site = copy.deepcopy(layer) if anchor is None else copy.deepcopy(layer).to(anchor.device)
        (node,) = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == "site"]
        value = node.args[0]
        with gm.graph.inserting_before(node):
            for role in layer.roles():
                value = gm.graph.call_module(f"site.{role}", (value,))
        if "tensor_meta" in node.meta:  # the chain's output is the site's (a linear layer merges across a norm by it)
            value.meta["tensor_meta"] = node.meta["tensor_meta"]
        node.replace_all_uses_with(value)
        gm.graph.erase_node(node)
        gm.recompile()
        return MergePass(self.merge)(gm).graph_module

    def absorbs(self, layer: Factorized) -> tuple[str, ...]:
        """The names in `through` that merging ``layer``'s factors absorbs (`MergePass`
        checks more than the operations between: the layers' kinds, shapes, calls)."""
        if self.merge is None:
            return ()
        merged = {name for m in self._merged(layer).modules()
                  for name in (getattr(m, "fxlrd_merge", None) or {}).get("merged_from", ())}  # fmt: skip
        return tuple(name for name, _ in self.through if name in merged)

    def example(self, seed: int = 0) -> tuple[torch.Tensor, ...]:
        """Random inputs of the window's shapes (latency depends only on shapes)."""
        g = torch.Generator().manual_seed(seed)
        return tuple(torch.randn(shape, generator=g, dtype=dtype) if dtype.is_floating_point
                     else torch.ones(shape, dtype=dtype) if dtype == torch.bool  # attention masks: attend
                     else torch.zeros(shape, dtype=dtype) for shape, dtype in self.inputs)  # fmt: skip


def _tensor_meta(node: fx.Node) -> tuple[tuple[int, ...], torch.dtype] | None:
    meta = node.meta.get("tensor_meta")
    if meta is None or not hasattr(meta, "shape"):
        return None
    try:
        return tuple(int(d) for d in meta.shape), meta.dtype
    except (TypeError, ValueError):  # symbolic sizes
        return None


def _first_input(node: fx.Node) -> fx.Node | None:
    for arg in node.all_input_nodes:
        if arg.op != "get_attr":
            return arg
    return None


def _outside_users(node: fx.Node, members: set[fx.Node]) -> bool:
    return any(user not in members for user in node.users)


def neighbourhood(gm: fx.GraphModule, site: Site, site_nodes: set[fx.Node], depth: int = 3, *,
                  merge: str | None = None, through: frozenset[fx.Node] = frozenset()) -> Window | None:  # fmt: skip
    """The window around ``site``'s first call: ``depth`` operations at most before it (its
    input's single-use producers) and after it (its output's single-use consumers), stopping
    at other layers (``site_nodes``), graph inputs and branches.

    ``merge``: the model's factors will be merged (``"exact"``/``"approximate"``): a layer in
    ``through`` (a kept pointwise module layer) is taken into the window, as its last
    operation on that side, where `MergePass` merges across what lies between (a norm, then
    an activation if approximate: `fxlrd.passes.merge.merges_across`), and candidates are
    timed merged into it (`Window.with_site`).

    Returns None when a value flowing into the window has no recorded static shape (the plan
    propagates shapes from the example inputs; without them there is no window).
    """
    node = site.nodes[0]
    x = site.input(node)
    if x is None:
        return None
    through = frozenset(n for n in through if n.op == "call_module" and n.args and isinstance(n.args[0], fx.Node)
                        and _tensor_meta(n.args[0]) is not None) if merge is not None else frozenset()  # fmt: skip

    def takes(layer: fx.Node, between: list[fx.Node]) -> bool:
        """A pointwise layer the site's factors merge into, across ``between`` (graph order)."""
        from fxlrd.passes.merge import merges_across

        return layer in through and merges_across(gm, between, merge)

    before: list[fx.Node] = []
    cur: fx.Node | None = x
    while len(before) < depth and cur is not None and cur.op in _CALLS and len(cur.users) == 1:
        if cur in site_nodes:
            if takes(cur, before[::-1]):
                before.append(cur)
            break
        before.append(cur)
        cur = _first_input(cur)
    after: list[fx.Node] = []
    cur = node
    while len(after) < depth and len(cur.users) == 1:
        (user,) = cur.users
        if user.op not in _CALLS:
            break
        if user in site_nodes:
            if takes(user, after):
                after.append(user)
            break
        after.append(user)
        cur = user
    members = [*reversed(before), node, *after]
    member_set = set(members)

    root, graph = nn.Module(), fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    inputs: list[tuple[tuple[int, ...], torch.dtype]] = []
    parts: list[str] = []
    attrs = 0

    def outer(arg: fx.Node) -> fx.Node | int:
        nonlocal attrs
        if arg in env:
            return env[arg]
        if arg.op == "call_function" and arg.target is torch.ops.aten.sym_size.int:
            # A size read off a tensor (export graphs with dynamic shapes): the window runs at
            # the example's static shapes, so it becomes that constant.
            spec = _tensor_meta(arg.args[0])
            if spec is None:
                raise _NoWindow
            return spec[0][arg.args[1]]
        if arg.op == "get_attr":
            value = operator.attrgetter(str(arg.target))(gm)
            if not isinstance(value, torch.Tensor):
                raise _NoWindow
            name, attrs = f"p{attrs}", attrs + 1
            root.register_buffer(name, value.detach().clone())
            parts.append(f"{name}:{tuple(value.shape)}:{value.dtype}")
            env[arg] = graph.get_attr(name)
            return env[arg]
        spec = _tensor_meta(arg)
        if spec is None:
            raise _NoWindow
        env[arg] = graph.placeholder(f"x{len(inputs)}")
        inputs.append(spec)
        parts.append(f"x:{spec[0]}:{spec[1]}")
        return env[arg]

    try:
        for i, member in enumerate(members):
            if member is node:
                env[member] = graph.call_module("site", (outer(x),))
            elif member.op == "call_module":
                name = f"m{i}"
                module = copy.deepcopy(gm.get_submodule(str(member.target)))
                root.add_module(name, module)
                parts.append(f"{name}:{' '.join(repr(module).split())}")
                env[member] = graph.create_node("call_module", name, fx.map_arg(member.args, outer),
                                                fx.map_arg(member.kwargs, outer))  # fmt: skip
            else:  # fresh node names: the window's code must not name the block it came from
                env[member] = graph.create_node(member.op, member.target, fx.map_arg(member.args, outer),
                                                fx.map_arg(member.kwargs, outer))  # fmt: skip
            if "tensor_meta" in member.meta:  # (merging reads shapes: a norm folds into a linear layer on 2-D inputs)
                env[member].meta["tensor_meta"] = member.meta["tensor_meta"]
    except _NoWindow:
        return None
    outputs = [env[m] for m in members if _outside_users(m, member_set) or m is members[-1]]
    graph.output(outputs[0] if len(outputs) == 1 else tuple(outputs))
    root.add_module("site", nn.Identity())  # a placeholder until `with_site`
    window = fx.GraphModule(root, graph, class_name="Window")
    taken = tuple(m for m in members if m in through)
    if taken:
        from fxlrd.passes import MergePass

        parts.append(f"merge={merge} rule={MergePass.RULE}")
        # what merging builds depends on the norms' mode (a training-mode norm with nothing between is kept)
        parts.extend(f"{name}:training={module.training}" for name, module in root.named_children())
    text = window.code + "\n" + "\n".join(parts)
    key = hashlib.sha1(text.encode()).hexdigest()[:16]
    return Window(window, tuple(inputs), key, len(members) - 1, merge if taken else None,
                  tuple((f"m{members.index(m)}", _tensor_meta(m.args[0])[0]) for m in taken), taken)  # fmt: skip


class _NoWindow(Exception):
    """A value the window needs cannot be made (no static shape, not a tensor)."""

