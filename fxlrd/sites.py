"""Layer sites: every use of a linear or convolution weight in a graph, in any form.

A site is where a conv/linear layer runs in a captured graph:

- a ``call_module`` of an ``nn.Linear`` / ``nn.Conv1d/2d/3d`` / ``nn.ConvTranspose1d/2d/3d``
  (fx capture);
- a ``call_function`` of ``F.linear`` / ``F.conv1d/2d/3d`` / ``F.conv_transpose1d/2d/3d``
  whose weight (and bias) are
  ``get_attr`` nodes (a module calling the functional form: EfficientNet's static-same-padding
  convs, the attention rewrite of `fxlrd.attention`);
- in graphs from ``torch.export``: ``aten.linear``, ``aten.conv1d/2d/3d``,
  ``aten.conv_transpose1d/2d/3d``, ``aten.convolution`` (transposed or not),
  and ``aten.addmm`` / ``aten.mm`` with a weight stored transposed (GPT-2's ``Conv1D``) or
  transposed in the graph;
- ``x @ W`` / ``x @ W.T`` (``aten.matmul``, ``torch.matmul``, ``operator.matmul``) with a 2-D
  parameter on the right, stored ``(in, out)`` or transposed in the graph: a layer written as
  a matrix product (Falcon's ``FalconLinear``: ``x @ self.weight.T``, its bias added apart).

The planner and every pass see sites. `replace_site` puts a module in a site's place: a
`Factorized` container at the path that owned the weight, so state-dict keys keep their
prefixes in both capture modes. A weight that something other than its sites also reads
(tied embeddings) is reported, so the planner keeps it.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import fx, nn

from .factorized import ROLES, Factorized, LayerSpec, conv_layout, layer_spec, to_module_layout

__all__ = ["Site", "find_sites", "unseen_layers", "stacked_weights", "routes", "replace_site", "materialize", "set_submodule", "factor_modules", "is_factor_target"]

aten = torch.ops.aten

# Metadata that describes a node's *output value*: wrong for the new inner nodes of a chain.
_VALUE_META = ("tensor_meta", "val", "example_value")

_LINEAR_FUNCTIONS = {F.linear, torch._C._nn.linear, aten.linear.default}
_CONV_FUNCTIONS = {
    torch.conv1d: 1, torch.conv2d: 2, torch.conv3d: 3, F.conv1d: 1, F.conv2d: 2, F.conv3d: 3,
    aten.conv1d.default: 1, aten.conv2d.default: 2, aten.conv3d.default: 3,
    aten.conv1d.padding: 1, aten.conv2d.padding: 2, aten.conv3d.padding: 3,
}  # fmt: skip
_CONV_TRANSPOSE_FUNCTIONS = {
    F.conv_transpose1d: 1, F.conv_transpose2d: 2, F.conv_transpose3d: 3, torch.conv_transpose1d: 1,
    torch.conv_transpose2d: 2, torch.conv_transpose3d: 3, aten.conv_transpose1d.default: 1,
    aten.conv_transpose2d.input: 2, aten.conv_transpose3d.input: 3,
}  # fmt: skip
_MM_FUNCTIONS = {aten.addmm.default: True, aten.mm.default: False, torch.addmm: True, torch.mm: False}
_MATMUL_FUNCTIONS = {aten.matmul.default: "aten.matmul", torch.matmul: "torch.matmul", operator.matmul: "@"}
_TRANSPOSES = {aten.t.default, torch.t, aten.numpy_T.default, aten.mT.default}
_STANDARD_FORWARD = {nn.Linear.forward, nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward,
                     nn.ConvTranspose1d.forward, nn.ConvTranspose2d.forward, nn.ConvTranspose3d.forward}  # fmt: skip


@dataclass
class Site:
    """One conv/linear layer in a graph: the nodes that run it and where its weight lives.

    Attributes:
        name: where the decomposed layer goes, and the plan's key: the module's qualified
            name for a module site; for a functional site the weight's owner module (or a
            child of it, when the owner holds more than this layer).
        nodes: the graph nodes running the layer (several for a module called twice).
        kind: ``"module"`` or ``"function"``.
        op: what runs it, for people: ``"Linear"``, ``"Conv2d"``, ``"F.linear"``, ``"aten.addmm"``...
        spec: the layer's shape and convolution settings.
        weight_path, bias_path: qualified names of the parameters.
        transposed_weight: the weight is stored ``(in, out)`` (``x @ W``).
        replace_owner: the decomposed layer takes the owner module's place.
        reason: why the layer cannot be decomposed here ("" when it can).
    """

    name: str
    nodes: list[fx.Node]
    kind: str
    op: str
    spec: LayerSpec | None
    weight_path: str
    bias_path: str | None = None
    transposed_weight: bool = False
    replace_owner: bool = True
    reason: str = ""
    _weight_nodes: list[fx.Node] = field(default_factory=list, repr=False)

    @property
    def owner(self) -> str:
        return self.weight_path.rpartition(".")[0]

    def input(self, node: fx.Node) -> fx.Node | None:
        """The node whose value is the layer's input at ``node``."""
        if node.op == "call_function" and node.target in _MM_FUNCTIONS:
            arg = node.args[1] if _MM_FUNCTIONS[node.target] else node.args[0]
        else:
            arg = node.args[0] if node.args else node.kwargs.get("input")
        return arg if isinstance(arg, fx.Node) else None

    def weight(self, gm: nn.Module) -> torch.Tensor:
        """The weight in a convolution's layout, ``(out, in, *kernel)`` (a transposed
        convolution's too, from its ``(in, out, *kernel)``: a view without groups)."""
        w = gm.get_parameter(self.weight_path) if _is_param(gm, self.weight_path) else _get_attr(gm, self.weight_path)
        if self.spec is not None and self.spec.transposed:
            return conv_layout(w, self.spec.groups)
        return w.T if self.transposed_weight else w

    def bias(self, gm: nn.Module) -> torch.Tensor | None:
        return None if self.bias_path is None else _get_attr(gm, self.bias_path)

    def parameters(self, gm: nn.Module) -> list[torch.Tensor]:
        out = [_get_attr(gm, self.weight_path)]
        if self.bias_path is not None:
            out.append(_get_attr(gm, self.bias_path))
        return out

    def layer(self, gm: nn.Module, *, share: bool = True) -> nn.Module:
        """An ``nn.Linear``/``nn.ConvNd`` computing the same as this site.

        For a module site, the module itself; otherwise a new module whose parameters are the
        site's own (``share=True``, a weight stored transposed excepted) or copies of them.
        """
        if self.kind == "module":
            return gm.get_submodule(self.name)
        if self.spec.transposed:  # stored as the module holds it, (in, out, *k): shared as it is
            stored = gm.get_parameter(self.weight_path) if _is_param(gm, self.weight_path) else None
            layer = build_layer(self.spec, self.weight(gm), self.bias(gm))
            if share and stored is not None:
                layer.weight = stored
                bias = self.bias(gm)
                if bias is not None:
                    layer.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias.detach())
            return layer
        return build_layer(self.spec, self.weight(gm), self.bias(gm), share=share and not self.transposed_weight)


def _get_attr(root: nn.Module, path: str) -> torch.Tensor:
    owner, _, leaf = path.rpartition(".")
    return getattr(root.get_submodule(owner) if owner else root, leaf)


def _is_param(root: nn.Module, path: str) -> bool:
    owner, _, leaf = path.rpartition(".")
    module = root.get_submodule(owner) if owner else root
    return leaf in module._parameters


def build_layer(spec: LayerSpec, weight: torch.Tensor, bias: torch.Tensor | None, *, share: bool = False) -> nn.Module:
    """An ``nn.Linear``/``nn.ConvNd``/``nn.ConvTransposeNd`` of ``spec`` holding ``weight``
    (in convolution layout, `Site.weight`'s) and ``bias``; ``share`` only for a weight in the
    module's own layout (not a transposed convolution's)."""
    from .factorized import make_layer

    layer = make_layer(spec, spec.in_channels, spec.out_channels, spatial=True, groups=spec.groups,
                       bias=bias is not None, device="meta", dtype=weight.dtype)  # fmt: skip
    layer = layer.to_empty(device=weight.device)
    with torch.no_grad():
        if share and isinstance(weight, nn.Parameter):
            layer.weight = weight
            if bias is not None:
                layer.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias.detach())
        else:
            layer.weight.copy_(to_module_layout(weight, layer))
            if bias is not None:
                layer.bias.copy_(bias)
    return layer


# -- reading a node as a layer -------------------------------------------------------------------
def _tuple(value: Any, n: int) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n
    value = tuple(int(v) for v in value)
    return value * n if len(value) == 1 and n > 1 else value


def _static(*values: Any) -> bool:
    """Whether convolution settings are plain values (ints, lists of ints, a padding string),
    not computed in the graph (an output padding from the input's shape is an ``fx.Node``)."""
    for v in values:
        items = v if isinstance(v, (list, tuple)) else (v,)
        if not all(isinstance(i, (int, str)) and not isinstance(i, bool) for i in items):
            return False
    return True


_COMPUTED_SETTINGS = ("settings computed in the graph (from a tensor's shape): not supported; capture='export' fixes "
                      "them where the shapes they come from are static")  # fmt: skip


def _param_path(node: Any) -> str | None:
    return node.target if isinstance(node, fx.Node) and node.op == "get_attr" else None


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


@dataclass
class _Use:
    """How one node reads a weight as a layer (before grouping nodes by weight)."""

    node: fx.Node
    op: str
    spec: LayerSpec | None
    weight_path: str
    bias_path: str | None
    transposed: bool
    weight_node: fx.Node
    reason: str = ""


def _function_use(gm: fx.GraphModule, node: fx.Node) -> _Use | None:
    target = node.target
    if target in _LINEAR_FUNCTIONS:
        w, b = _arg(node, 1, "weight"), _arg(node, 2, "bias")
        wp, bp = _param_path(w), _param_path(b)
        if wp is None or (b is not None and bp is None):
            return None
        weight = _get_attr(gm, wp)
        if weight.dim() != 2:
            return None
        op = "aten.linear" if target is aten.linear.default else "F.linear"
        spec = LayerSpec("linear", weight.shape[1], weight.shape[0], (), 1, b is not None)
        return _Use(node, op, spec, wp, bp, False, w)
    if target in _CONV_FUNCTIONS:
        dims = _CONV_FUNCTIONS[target]
        w, b = _arg(node, 1, "weight"), _arg(node, 2, "bias")
        wp, bp = _param_path(w), _param_path(b)
        if wp is None or (b is not None and bp is None):
            return None
        weight = _get_attr(gm, wp)
        padding = _arg(node, 4, "padding", 0)
        op = ("aten." if str(target).startswith("aten") else "F.") + f"conv{dims}d"
        if not _static(padding, *(_arg(node, i, n, 1) for i, n in ((3, "stride"), (5, "dilation"), (6, "groups")))):
            return _Use(node, op, None, wp, bp, False, w, _COMPUTED_SETTINGS)
        padding = padding if isinstance(padding, str) else _tuple(padding, dims)
        groups = int(_arg(node, 6, "groups", 1))
        spec = LayerSpec(
            "conv", weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]), groups, b is not None,
            _tuple(_arg(node, 3, "stride", 1), dims), padding, _tuple(_arg(node, 5, "dilation", 1), dims),
        )  # fmt: skip
        return _Use(node, op, spec, wp, bp, False, w)
    if target in _CONV_TRANSPOSE_FUNCTIONS:
        dims = _CONV_TRANSPOSE_FUNCTIONS[target]
        w, b = _arg(node, 1, "weight"), _arg(node, 2, "bias")
        wp, bp = _param_path(w), _param_path(b)
        if wp is None or (b is not None and bp is None):
            return None
        weight = _get_attr(gm, wp)
        op = ("aten." if str(target).startswith("aten") else "F.") + f"conv_transpose{dims}d"
        settings = [_arg(node, i, n, d) for i, n, d in ((3, "stride", 1), (4, "padding", 0), (5, "output_padding", 0),
                                                        (6, "groups", 1), (7, "dilation", 1))]  # fmt: skip
        if not _static(*settings):
            return _Use(node, op, None, wp, bp, False, w, _COMPUTED_SETTINGS)
        stride, padding, output_padding, groups, dilation = settings
        spec = _transposed_spec(weight, groups, b is not None, stride, padding, dilation, output_padding)
        return _Use(node, op, spec, wp, bp, False, w)
    if target is aten.convolution.default:
        x, w, b, stride, padding, dilation, transposed, output_padding, groups = node.args[:9]
        wp, bp = _param_path(w), _param_path(b)
        if wp is None or (b is not None and bp is None):
            return None
        weight = _get_attr(gm, wp)
        dims = weight.dim() - 2
        if not _static(stride, padding, dilation, output_padding, groups):
            return _Use(node, "aten.convolution", None, wp, bp, False, w, _COMPUTED_SETTINGS)
        if transposed:
            spec = _transposed_spec(weight, groups, b is not None, stride, padding, dilation, output_padding)
            return _Use(node, "aten.convolution", spec, wp, bp, False, w)
        spec = LayerSpec("conv", weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]), groups,
                         b is not None, _tuple(stride, dims), _tuple(padding, dims), _tuple(dilation, dims))  # fmt: skip
        return _Use(node, "aten.convolution", spec, wp, bp, False, w)
    if target in _MM_FUNCTIONS:
        has_bias = _MM_FUNCTIONS[target]
        if has_bias and (len(node.args) > 3 or node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1):
            return None
        mat2 = node.args[2] if has_bias else node.args[1]
        b = node.args[0] if has_bias else None
        bp = _param_path(b)
        if b is not None and bp is None:
            return None
        transposed, wnode = True, mat2  # x @ W with W stored (in, out)
        if isinstance(mat2, fx.Node) and _is_transpose(mat2):
            transposed, wnode = False, mat2.args[0]
        wp = _param_path(wnode)
        if wp is None:
            return None
        weight = _get_attr(gm, wp)
        if weight.dim() != 2:
            return None
        out_f, in_f = (weight.shape[1], weight.shape[0]) if transposed else tuple(weight.shape)
        if bp is not None and _get_attr(gm, bp).shape != (out_f,):
            return None  # a bias that broadcasts differently: not a linear layer's
        name = str(target).replace("aten.", "aten.").split(".default")[0]
        op = name if name.startswith("aten") else f"torch.{target.__name__}"
        spec = LayerSpec("linear", in_f, out_f, (), 1, b is not None)
        return _Use(node, op, spec, wp, bp, transposed, wnode)
    if target in _MATMUL_FUNCTIONS:  # x @ W (W stored (in, out)) or x @ W.T; a parameter on the left is no layer
        if len(node.args) != 2 or node.kwargs:
            return None
        mat2 = node.args[1]
        transposed, wnode = True, mat2
        if isinstance(mat2, fx.Node) and _is_transpose(mat2):
            transposed, wnode = False, mat2.args[0]
        wp = _param_path(wnode)
        if wp is None or not _is_param(gm, wp):  # a buffer or constant (a fixed Hadamard, a filterbank) is no layer
            return None
        weight = _get_attr(gm, wp)
        if weight.dim() != 2 or not isinstance(node.args[0], fx.Node):
            return None
        out_f, in_f = (weight.shape[1], weight.shape[0]) if transposed else tuple(weight.shape)
        spec = LayerSpec("linear", in_f, out_f, (), 1, False)
        return _Use(node, _MATMUL_FUNCTIONS[target], spec, wp, None, transposed, wnode)
    return None


def _weight_operand(node: fx.Node) -> Any:
    """The operand of a matrix-product site that holds its weight (``mat2``); None for others."""
    if node.op != "call_function":
        return None
    if node.target in _MM_FUNCTIONS:
        return node.args[2] if _MM_FUNCTIONS[node.target] else node.args[1]
    if node.target in _MATMUL_FUNCTIONS:
        return node.args[1] if len(node.args) > 1 else None
    return None


def _is_transpose(node: fx.Node) -> bool:
    """Whether ``node`` transposes a matrix (its first argument, a 2-D weight where it matters):
    ``aten.t``/``aten.numpy_T``/``aten.permute``/``aten.transpose`` in export graphs; in fx graphs
    ``torch.t``/``torch.transpose``, the methods ``.t()``/``.transpose(0, 1)``/``.permute(1, 0)``
    and the attribute ``.T``."""
    if node.op == "call_method":
        name, args = node.target, node.args[1:]
        if name == "t" and not args:
            return True
        if name == "transpose" and len(args) == 2 and all(isinstance(d, int) for d in args):
            return sorted(d % 2 for d in args) == [0, 1]
        if name == "permute":
            dims = list(args[0]) if len(args) == 1 and isinstance(args[0], (list, tuple)) else list(args)
            return dims in ([1, 0], [-1, -2])
        return False
    if node.op != "call_function":
        return False
    if node.target in _TRANSPOSES:
        return True
    if node.target is getattr and len(node.args) == 2 and node.args[1] in ("T", "mT"):
        return True
    if node.target in (aten.permute.default,) and list(node.args[1]) in ([1, 0], [-1, -2]):
        return True
    if node.target in (aten.transpose.int, torch.transpose) and sorted(int(d) % 2 for d in node.args[1:3]) == [0, 1]:
        return True
    return False


def _module_use(gm: fx.GraphModule, node: fx.Node) -> _Use | None:
    module = gm.get_submodule(node.target)
    if not isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) or is_factor_target(gm, node.target):
        return None
    spec, reason = None, ""
    try:
        spec = layer_spec(module)
    except TypeError:
        reason = f"{type(module).__name__}: not supported"
    if not reason and type(module).forward not in _STANDARD_FORWARD:
        reason = f"{type(module).__name__} has its own forward: trace into it (not a leaf) to decompose its layer"
    if not reason and (len(node.args) != 1 or node.kwargs):
        reason = "called with other than one positional input"
    bias = f"{node.target}.bias" if getattr(module, "bias", None) is not None else None
    return _Use(node, type(module).__name__, spec, f"{node.target}.weight", bias, False, node, reason)


def _transposed_spec(weight: torch.Tensor, groups: Any, bias: bool, stride: Any, padding: Any, dilation: Any,
                     output_padding: Any) -> LayerSpec:  # fmt: skip
    """The `LayerSpec` of a transposed convolution of ``weight`` ``(in, out/groups, *k)``."""
    dims, groups = weight.dim() - 2, int(groups)
    return LayerSpec("conv", weight.shape[0], weight.shape[1] * groups, tuple(weight.shape[2:]), groups, bias,
                     _tuple(stride, dims), _tuple(padding, dims), _tuple(dilation, dims), "zeros", True,
                     _tuple(output_padding, dims))  # fmt: skip


def is_factor_target(gm: nn.Module, target: str) -> bool:
    """Whether the module at ``target`` is (inside) a factor of a `Factorized` container."""
    parts = target.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            if isinstance(gm.get_submodule(".".join(parts[:i])), Factorized):
                return True
        except AttributeError:
            return False
    return False


def _lost_factorized(module: nn.Module) -> bool:
    """A plain ``nn.Module`` holding only factor roles, two or more, each a conv or linear:
    what a torch.fx re-trace leaves of a `Factorized` (fx rebuilds every container of a graph
    as a plain module, so the type alone says nothing; a user's attention, with its q, k, v
    beside an ``out_proj``, is not one)."""
    if type(module) is not nn.Module:
        return False
    children = dict(module.named_children())
    return len(children) >= 2 and set(children) <= set(ROLES) and all(
        isinstance(c, (nn.Linear, nn.modules.conv._ConvNd)) for c in children.values())  # fmt: skip


def uncompiled(module: nn.Module) -> nn.Module:
    """The module ``torch.compile`` wrapped (its names carry no ``_orig_mod.`` prefix), or
    ``module`` itself."""
    inner = getattr(module, "_orig_mod", None) if type(module).__name__ == "OptimizedModule" else None
    return inner if isinstance(inner, nn.Module) else module


def factor_modules(gm: nn.Module) -> Iterator[tuple[str, str, Factorized, nn.Module]]:
    """Every factor of every `Factorized` in ``gm``: ``(qualified name, role, container, module)``.

    Roles come from the containers, so they survive deepcopy, pickling and ``torch.save``.
    A re-trace by ``torch.fx.symbolic_trace`` (or a pass that calls it, such as
    ``torch.fx.experimental.optimization.fuse``) rebuilds the containers as plain modules and
    loses them: that raises `ConfigError` instead of finding no factors.
    """
    found = False
    for name, fact in uncompiled(gm).named_modules():  # a compiled model's factors under their own names
        if isinstance(fact, Factorized):
            for role, module in fact.named_children():
                found = True
                yield (f"{name}.{role}" if name else role), role, fact, module
    if not found:
        lost = [name for name, m in gm.named_modules() if _lost_factorized(m)]
        if lost:
            from .errors import ConfigError

            raise ConfigError(
                f"the factors of this model ({lost[0]}, ...) sit in plain nn.Module containers: it was re-traced by "
                "torch.fx (fx.symbolic_trace, or a pass that calls it such as fuse), which drops fxlrd's Factorized "
                "containers and with them the factor roles. Freeze (or build the SequentialFreezer) before re-tracing: "
                "requires_grad survives it"
            )


# -- finding sites --------------------------------------------------------------------------------
def _owner_buffers(gm: nn.Module, path: str) -> set[str]:
    """The buffer names of the module owning ``path``."""
    owner = path.rpartition(".")[0]
    try:
        return set((gm.get_submodule(owner) if owner else gm)._buffers)
    except AttributeError:
        return set()


def _owner_holds_only(gm: fx.GraphModule, owner: str, paths: set[str]) -> bool:
    """Whether the module ``owner`` holds nothing but ``paths`` (its weight and bias) that the
    graph or the state dict would miss if it were replaced."""
    if not owner:
        return False
    module = gm.get_submodule(owner)
    own = {f"{owner}.{n}" for n in list(module._parameters) + list(module._buffers)}
    if own - paths or any(True for _ in module.children()):
        return False
    prefix = owner + "."
    for node in gm.graph.nodes:
        if node.op in ("get_attr", "call_module") and isinstance(node.target, str):
            if (node.target == owner or node.target.startswith(prefix)) and node.target not in paths:
                return False
    return True


def _child_name(gm: fx.GraphModule, weight_path: str) -> str:
    owner, _, leaf = weight_path.rpartition(".")
    stem = leaf[: -len("_weight")] if leaf.endswith("_weight") and leaf != "_weight" else f"{leaf}_lrd"
    module = gm.get_submodule(owner) if owner else gm
    while hasattr(module, stem):
        stem += "_lrd"
    return f"{owner}.{stem}" if owner else stem


def computed_weight_layers(gm: fx.GraphModule) -> int:
    """Linear and conv operations whose weight the graph computes (a parametrization such as
    ``parametrizations.weight_norm`` under torch.export): no parameter to factorize, so they
    are not sites, nor listed in the plan."""
    count = 0
    for node in gm.graph.nodes:
        if node.op != "call_function" or not (node.target in _LINEAR_FUNCTIONS or node.target in _CONV_FUNCTIONS
                                              or node.target in _CONV_TRANSPOSE_FUNCTIONS
                                              or node.target is aten.convolution.default):  # fmt: skip
            continue
        weight = _arg(node, 1, "weight")
        count += isinstance(weight, fx.Node) and _param_path(weight) is None
    return count


def unseen_layers(model: nn.Module, gm: fx.GraphModule) -> list[tuple[str, str]]:
    """The ``nn.Linear``/conv modules of ``model`` whose weight ``gm`` reads, at its top level,
    other than as a layer site: ``(weight path, the operation reading it)``. A subclass whose
    forward computes with its weight in a form fxlrd does not read as a layer (an
    ``einsum``, a ``bmm``) would otherwise be kept whole without a word."""
    read_as_layer = {site.weight_path for site in find_sites(gm).values()}
    reads = {node.target: node for node in gm.graph.nodes if node.op == "get_attr"}
    out = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) or "weight" not in module._parameters:
            continue
        path = f"{name}.weight" if name else "weight"
        node = reads.get(path)
        if node is None or path in read_as_layer:
            continue
        users = [u for u in node.users if not isinstance(u.target, torch._ops.HigherOrderOperator)]  # regions: noted apart
        users = [v for u in users for v in (u.users if _is_transpose(u) else [u])]
        users = [u for u in users if u.target is not getattr]  # its dtype, shape or device read: no computation
        if users:
            target = users[0].target
            op = str(target) if isinstance(target, (str, torch._ops.OpOverload)) else getattr(target, "__name__", str(target))
            out.append((path, op))
    return out


_TOPK = (torch.topk, aten.topk.default)
_SHAPE_READS = (aten.sym_size.int, aten.sym_numel.default, aten.sym_stride.int, aten.dim.default)
_SHAPE_ATTRIBUTES = {"shape", "dtype", "device", "ndim", "is_cuda", "requires_grad", "layout"}
# what a stacked weight passes through on its way to a product (selecting an expert, a view, a cast) ...
_SELECTS = {"index", "index_select", "select", "getitem", "view", "reshape", "_unsafe_view", "transpose", "permute",
            "t", "numpy_T", "T", "mT", "H", "mH", "expand", "_to_copy", "to", "contiguous", "clone", "unsqueeze",
            "squeeze", "slice", "float", "half", "bfloat16", "type_as", "alias", "chunk", "split", "split_with_sizes",
            "narrow", "unbind"}  # fmt: skip
# ... and the products that compute with it (a router's output passes through none of them)
_PRODUCTS = {"bmm", "baddbmm", "matmul", "mm", "addmm", "linear", "einsum", "_grouped_mm", "grouped_mm",
             "grouped_mm_fallback", "conv1d", "conv2d", "conv3d", "convolution", "conv_transpose1d", "conv_transpose2d",
             "conv_transpose3d"}  # fmt: skip


def tensor_index(node: fx.Node) -> fx.Node | None:
    """The index of ``source[index]`` by one index tensor (``aten.index.Tensor(source, [index])``
    or ``operator.getitem(source, index)``, ``source`` a node), else None."""
    if node.op != "call_function" or node.kwargs or len(node.args) != 2 or not isinstance(node.args[0], fx.Node):
        return None
    index = node.args[1]
    if node.target is torch.ops.aten.index.Tensor:
        return index[0] if isinstance(index, (list, tuple)) and len(index) == 1 and isinstance(index[0], fx.Node) else None
    return index if node.target is operator.getitem and isinstance(index, fx.Node) else None


def _op_name(node: fx.Node) -> str:
    """The operation's bare name: ``"bmm"`` for ``torch.bmm``, ``aten.bmm.default`` and
    ``x.bmm``; the attribute for an attribute read (``"mT"`` for ``x.mT`` under fx); "" for a
    module call."""
    target = node.target
    if node.op == "call_module":
        return ""
    if target is getattr and len(node.args) > 1 and isinstance(node.args[1], str):
        return node.args[1]
    if isinstance(target, str):
        return target
    if isinstance(target, torch._ops.OpOverload):
        return target._opname
    return getattr(target, "__name__", str(target))


def _shape_read(node: fx.Node) -> bool:
    """Whether ``node`` reads only its input's size, dtype or device (no values)."""
    if node.target is getattr:
        return _op_name(node) in _SHAPE_ATTRIBUTES
    return node.target in _SHAPE_READS or (node.op == "call_method" and node.target in ("size", "dim", "numel"))


def _runs_layer(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node`` runs a layer: a module that is or holds a linear or convolution (not
    an ``nn.Softmax`` or ``nn.LayerNorm``, looked through alike in both captures), or a linear,
    convolution or matrix product."""
    if node.op == "call_module":
        try:
            module = gm.get_submodule(node.target)
        except AttributeError:
            return True
        return any(isinstance(m, (nn.Linear, nn.modules.conv._ConvNd, Factorized)) for m in module.modules())
    return node.op in ("call_function", "call_method") and (
        _op_name(node) in _PRODUCTS or node.target in _LINEAR_FUNCTIONS or node.target in _CONV_FUNCTIONS
        or node.target in _MM_FUNCTIONS or node.target in _MATMUL_FUNCTIONS)  # fmt: skip


def _selects_inside(topk: fx.Node) -> bool:
    """Whether what ``topk`` picked is computed with inside the graph, not only returned."""
    for user in topk.users:
        if user.target in (operator.getitem, getattr):  # the values or the indices
            if any(v.op != "output" for v in user.users):
                return True
        elif user.op != "output":
            return True
    return False


def routes(gm: fx.GraphModule, site: Site, depth: int = 6) -> str:
    """``"topk"`` when the layer is a router, else "": a linear layer with at most half as
    many outputs as inputs whose output ``topk`` ranks at most ``depth`` operations downstream
    (through no other layer), the picks then computed with inside the graph — a mixture of
    experts' router (softmax or sigmoid, then top-k), or a head choosing queries or tokens for
    what follows. A low-rank router changes which experts run, for a saving of almost nothing
    (it has one row per expert). A head whose top-k the model only returns is no router."""
    spec = site.spec
    if spec is None or spec.kind != "linear" or 2 * spec.out_channels > spec.in_channels:
        return ""
    frontier, seen = list(site.nodes), set(site.nodes)
    for _ in range(depth):
        following = []
        for node in frontier:
            for user in node.users:
                if user in seen or _shape_read(user):
                    continue
                seen.add(user)
                if user.target in _TOPK or (user.op == "call_method" and user.target == "topk"):
                    ranked = user.args[0] if user.args else user.kwargs.get("input", user.kwargs.get("self"))
                    if ranked is node and _selects_inside(user):
                        return "topk"
                elif not _runs_layer(gm, user):
                    following.append(user)
        frontier = following
    return ""


def _feeds_product(node: fx.Node, depth: int = 4) -> bool:
    """Whether ``node``'s value reaches a matrix product through selections, views and casts only."""
    frontier = [node]
    for _ in range(depth):
        following = []
        for n in frontier:
            for user in n.users:
                name = _op_name(user)
                if name in _PRODUCTS:
                    return True
                if name in _SELECTS:
                    following.append(user)
        frontier = following
    return False


def stacked_weights(model: nn.Module, gm: fx.GraphModule) -> list[tuple[str, tuple[int, ...]]]:
    """The stacked weights ``gm`` computes with: ``(path, shape)`` of each 3-D parameter (every
    dimension above 1) that reaches a matrix product (``bmm``, ``grouped_mm``, ``einsum``, an
    ``F.linear`` of one slice...) through selections, views and casts, and is no layer's weight.
    A mixture of experts stores its experts so (``experts.gate_up_proj``, one ``out × in``
    matrix per expert; `fxlrd.experts` factorizes those read as ``bmm(P[ids], x)``); the
    factors of a stack already factorized (`fxlrd.experts.ExpertFactors`) are not listed. Conv1d weights (3-D too), a ViT's class
    token and position embeddings (added, not multiplied) are not listed."""
    from .experts import ExpertFactors

    layer_weights = {site.weight_path for site in find_sites(gm).values()}
    layer_weights |= {f"{name}.{part}" for root in (gm, model) for name, module in root.named_modules()
                      if isinstance(module, ExpertFactors) for part in ("left", "right")}  # already factorized stacks  # fmt: skip
    layer_weights |= {f"{name}.weight" if name else "weight" for name, module in model.named_modules()
                      if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd))}  # fmt: skip
    out: dict[str, tuple[int, ...]] = {}
    for node in gm.graph.nodes:
        if node.op != "get_attr" or node.target in layer_weights or node.target in out:
            continue
        try:
            value = _get_attr(gm, node.target)
        except AttributeError:
            continue
        if isinstance(value, nn.Parameter) and value.dim() == 3 and min(value.shape) > 1 and _feeds_product(node):
            out[node.target] = tuple(value.shape)
    return list(out.items())


def find_sites(gm: fx.GraphModule) -> dict[str, Site]:
    """Every conv/linear site of ``gm`` by name, in graph order (factors of already
    decomposed layers excluded). A site that cannot be decomposed carries its ``reason``."""
    uses: list[_Use] = []
    for node in gm.graph.nodes:
        use = None
        if node.op == "call_module":
            use = _module_use(gm, node)
        elif node.op == "call_function":
            use = _function_use(gm, node)
        if use is not None:
            uses.append(use)

    # Which parameters are the same tensor under several names (tied weights).
    aliases: dict[int, set[str]] = {}
    for name, p in gm.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), set()).add(name)
    # Which weights the graph reads other than as a layer's weight (a get_attr elsewhere, or a
    # call of a module holding them: an nn.Embedding whose weight a functional layer reuses).
    site_nodes = {u.node for u in uses}
    other_reads: set[str] = set()
    called = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    for use in uses:
        if use.node.op == "call_module":
            continue
        for path in filter(None, (use.weight_path, use.bias_path)):
            if any(path.startswith(t + ".") for t in called):
                other_reads.add(path)
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            readers = set(node.users)
            as_weight = {u.node for u in uses if u.weight_node is node}
            through_t = {u.node for u in uses if isinstance(u.weight_node, fx.Node) and u.weight_node is not node
                         and _param_path(u.weight_node) == node.target}  # fmt: skip
            transposes = {r for r in readers if _is_transpose(r) and r.users
                          and all(u in site_nodes and _weight_operand(u) is r for u in r.users)}  # fmt: skip
            if readers - as_weight - through_t - transposes - {u.node for u in uses if u.bias_path == node.target}:
                other_reads.add(node.target)

    by_weight: dict[str, list[_Use]] = {}
    for use in uses:
        by_weight.setdefault(use.weight_path, []).append(use)
    sites: dict[str, Site] = {}
    for weight_path, group in by_weight.items():
        first = group[0]
        kind = "module" if first.node.op == "call_module" else "function"
        reason = first.reason or next((u.reason for u in group if u.reason), "")
        if not reason and any((u.spec, u.bias_path, u.transposed, u.op) != (first.spec, first.bias_path, first.transposed, first.op)
                              for u in group[1:]):  # fmt: skip
            reason = "the weight is used by layers of different settings"
        if kind == "module" and len({u.node.target for u in group}) > 1:
            reason = reason or "the weight is shared by several modules (tied weights)"
        param = _get_attr(gm, weight_path)
        if not reason and isinstance(param, torch.Tensor) and not isinstance(param, nn.Parameter) \
                and weight_path.rpartition(".")[2] in _owner_buffers(gm, weight_path):  # fmt: skip
            reason = ("the weight is a buffer, not a parameter (the model does not train it; its factors would be "
                      "trained): kept; register it as an nn.Parameter to decompose it")  # fmt: skip
        names = aliases.get(id(param), {weight_path})
        if not reason and (weight_path in other_reads or len(names) > 1):
            others = sorted(names - {weight_path})
            reason = "tied weights: the weight is also read outside the layer" + (f" (as {others[0]})" if others else "")
        if not reason and first.bias_path is not None and first.bias_path in other_reads:
            reason = "tied weights: the bias is also read outside the layer"
        if kind == "module":
            name, replace_owner = first.node.target, True
        else:
            paths = {weight_path} | ({first.bias_path} if first.bias_path else set())
            owner = weight_path.rpartition(".")[0]
            same_owner = first.bias_path is None or first.bias_path.rpartition(".")[0] == owner
            replace_owner = same_owner and weight_path.endswith(".weight") and _owner_holds_only(gm, owner, paths)
            name = owner if replace_owner else _child_name(gm, weight_path)
        sites[name] = Site(name, [u.node for u in group], kind, first.op, first.spec, weight_path, first.bias_path,
                           first.transposed, replace_owner, reason, [u.weight_node for u in group])  # fmt: skip
    return sites


# -- rewriting ------------------------------------------------------------------------------------
def set_submodule(root: nn.Module, qualified_name: str, module: nn.Module) -> None:
    """Put ``module`` at ``qualified_name`` (on its parent, so the name is kept), creating
    empty parents as needed."""
    parent_name, _, leaf = qualified_name.rpartition(".")
    parent = root
    for part in parent_name.split(".") if parent_name else ():
        child = getattr(parent, part, None)
        if child is None:
            child = nn.Module()
            setattr(parent, part, child)
        parent = child
    if leaf in parent._parameters:
        del parent._parameters[leaf]
    if leaf in parent._buffers:
        del parent._buffers[leaf]
    setattr(parent, leaf, module)


def _drop_param(root: nn.Module, path: str) -> None:
    owner, _, leaf = path.rpartition(".")
    module = root.get_submodule(owner) if owner else root
    module._parameters.pop(leaf, None)
    module._buffers.pop(leaf, None)


def replace_site(gm: fx.GraphModule, site: Site, module: nn.Module, meta: dict[str, Any] | None = None) -> list[fx.Node]:
    """Run ``module`` in the place of ``site``: register it at ``site.name`` and replace each
    of the site's nodes by ``call_module`` nodes.

    A `Factorized` is called factor by factor (one node per role, each with
    ``meta["fxlrd"] = {source, method, role, ranks}`` plus ``meta``), any other module as one
    node. The dense weight and bias leave the model (the owner module goes when the module
    takes its place); a `Factorized`'s weights take the dense weight's ``requires_grad`` and
    its bias the dense bias's, so a frozen layer stays frozen. Returns the new last node of
    each site node.
    """
    if isinstance(module, Factorized):  # a frozen layer's factors stay frozen
        flags = [bool(t.requires_grad) for t in site.parameters(gm)]  # as stored (a transpose under no_grad has none)
        for pname, param in module.named_parameters():
            param.requires_grad_(flags[-1] if pname.endswith("bias") else flags[0])
    if site.kind == "function" and not site.replace_owner:
        for path in filter(None, (site.weight_path, site.bias_path)):
            _drop_param(gm, path)
    try:  # the new module runs in the mode of the one it replaces
        module.train(gm.get_submodule(site.name).training)
    except AttributeError:
        module.train(gm.training)
    set_submodule(gm, site.name, module)
    if isinstance(module, Factorized):
        steps = [(f"{site.name}.{role}", role) for role in module.roles()]
    else:
        steps = [(site.name, None)]
    lasts = []
    for node in site.nodes:
        value = site.input(node)
        last = node
        with gm.graph.inserting_before(node):
            for i, (target, role) in enumerate(steps):
                last = gm.graph.call_module(target, (value,))
                last.meta = {k: v for k, v in node.meta.items() if k not in _VALUE_META or i == len(steps) - 1}
                if role is not None:  # each factor is its own module for tools that read the stack (PT2E)
                    last.meta["nn_module_stack"] = _with_module(node.meta.get("nn_module_stack"), target,
                                                                type(gm.get_submodule(target)))  # fmt: skip
                    last.meta["fxlrd"] = {"source": site.name, "method": module.method, "role": role,
                                          "ranks": module.ranks, **(meta or {})}  # fmt: skip
                value = last
        node.replace_all_uses_with(last)
        gm.graph.erase_node(node)
        lasts.append(last)
    _erase_dead_reads(gm, site)
    return lasts


def _with_module(stack: Any, path: str, cls: type) -> Any:
    """``nn_module_stack`` with the factor's own module appended, in the stack's own format."""
    if not isinstance(stack, dict):
        return stack
    out = dict(stack)
    last = next(reversed(out.values()), None)
    kind = f"{cls.__module__}.{cls.__qualname__}" if isinstance(last, tuple) and last and isinstance(last[-1], str) else cls
    out[path] = (path, kind)
    return out


def _erase_dead_reads(gm: fx.GraphModule, site: Site) -> None:
    """Erase the ``get_attr`` (and transpose) nodes of the site's parameters once unused."""
    paths = {site.weight_path, site.bias_path} - {None}
    for node in reversed(list(gm.graph.nodes)):
        if not node.users and (
            (node.op == "get_attr" and node.target in paths)
            or (_is_transpose(node) and _param_path(node.args[0]) in paths)
        ):
            gm.graph.erase_node(node)


def materialize(gm: fx.GraphModule, site: Site) -> list[fx.Node]:
    """Turn a functional site into ``call_module`` nodes of an equivalent ``nn.Linear`` /
    ``nn.ConvNd`` holding the same parameters (passes that rewrite modules then apply)."""
    if site.kind == "module":
        return list(site.nodes)
    layer = site.layer(gm, share=True)
    nodes = replace_site(gm, site, layer)
    site.kind, site.nodes = "module", nodes
    if not site.replace_owner:
        site.weight_path = f"{site.name}.weight"
        site.bias_path = f"{site.name}.bias" if layer.bias is not None else None
    site.transposed_weight = False
    return nodes


_BATCH_NORMS = {aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default, F.batch_norm}


def materialize_norm(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """Turn a functional batch norm with ``get_attr`` parameters and running statistics into
    a ``call_module`` of an ``nn.BatchNorm1d/2d`` holding them; None when it is not one."""
    if node.op != "call_function" or node.target not in _BATCH_NORMS:
        return None
    if node.target is F.batch_norm:
        x, mean, var = node.args[:3]
        weight, bias = _arg(node, 3, "weight"), _arg(node, 4, "bias")
        training, momentum, eps = _arg(node, 5, "training", False), _arg(node, 6, "momentum", 0.1), _arg(node, 7, "eps", 1e-5)
    elif node.target is aten.batch_norm.default:
        x, weight, bias, mean, var, training, momentum, eps = node.args[:8]
    else:
        x, weight, bias, mean, var, momentum, eps = node.args[:7]
        training = False
        if any(u.target is not operator.getitem or u.args[1] != 0 for u in node.users):
            return None
    paths = [_param_path(a) for a in (weight, bias, mean, var)]
    if any(p is None for p in paths) or training:
        return None
    w, b, m, v = (_get_attr(gm, p) for p in paths)
    value = x.meta.get("val") if isinstance(x, fx.Node) else None
    dims = value.dim() if value is not None else 4
    norm_cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}.get(dims, nn.BatchNorm2d)
    owner = paths[0].rpartition(".")[0]
    if not owner or any(p.rpartition(".")[0] != owner for p in paths):
        return None
    bn = norm_cls(w.shape[0], eps=float(eps), momentum=momentum, device=w.device, dtype=w.dtype).eval()
    bn.weight, bn.bias = (t if isinstance(t, nn.Parameter) else nn.Parameter(t.detach()) for t in (w, b))
    bn.running_mean, bn.running_var = m, v
    holder = gm.get_submodule(owner)
    if any(True for _ in holder.children()):
        return None
    tracked = getattr(holder, "num_batches_tracked", None)
    if tracked is not None:
        bn.num_batches_tracked = tracked
    set_submodule(gm, owner, bn)
    with gm.graph.inserting_before(node):
        new = gm.graph.call_module(owner, (x,))
    new.meta = dict(node.meta)
    if node.target is aten._native_batch_norm_legit_no_training.default:
        for user in list(node.users):
            user.replace_all_uses_with(new)
            gm.graph.erase_node(user)
    else:
        node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    for n in reversed(list(gm.graph.nodes)):
        if n.op == "get_attr" and not n.users and n.target.rpartition(".")[0] == owner:
            gm.graph.erase_node(n)
    return new
