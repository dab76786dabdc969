"""`MergePass`: merge a pointwise layer with an adjacent decomposed factor (paper 2.3).

After Tucker-2 of a bottleneck's 3×3 conv, ``conv1 → bn1 → relu → in_proj`` and
``out_proj → bn2 → relu → conv3`` are pairs of pointwise layers around a norm and an
activation. Merging each pair gives the block its original depth with a narrower bottleneck.

- ``mode="exact"``: only pairs with nothing nonlinear between; the norm (eval statistics)
  is folded in and ``B ∘ N ∘ A`` becomes one layer that computes the same function.
- ``mode="approximate"``: pairs across an elementwise activation too. The layers are
  composed as if the activation were not there, and the norm and activation move to the
  narrow side of the merged layer: after it when it narrows (``conv1`` + ``in_proj``),
  before it when it widens (``out_proj`` + ``conv3``). The moved norm is new (its statistics
  must be re-estimated: `fxlrd.recover.reestimate_norms`) and the model needs fine-tuning.
"""

from __future__ import annotations

import copy
from collections import Counter

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from fxlrd.errors import ConfigError
from fxlrd.factorized import Factorized

from fxlrd.fusion import ACTIVATIONS, compose_pointwise, fold_norm, is_pointwise
from fxlrd.sites import Site, find_sites, materialize, materialize_norm, set_submodule

__all__ = ["MergePass", "merges_across"]

aten = torch.ops.aten
_ACT_FUNCTIONS = {
    torch.relu, F.relu, F.relu6, F.gelu, F.silu, F.hardswish, torch.sigmoid, torch.tanh, F.leaky_relu,
    aten.relu.default, aten.gelu.default, aten.silu.default, aten.hardswish.default, aten.sigmoid.default,
    aten.tanh.default, aten.leaky_relu.default, aten.relu6.default, aten.hardtanh.default,
    # in place (an export capture keeps nn.ReLU(inplace=True) so): the graph reads what they return
    aten.relu_.default, aten.silu_.default, aten.hardswish_.default, aten.sigmoid_.default, aten.tanh_.default,
    aten.leaky_relu_.default, aten.hardtanh_.default,
}  # fmt: skip
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
_FUNCTIONAL_NORMS = {aten.batch_norm.default, F.batch_norm}


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def _merge_info(module: nn.Module | None) -> dict:
    """What a merged layer records of its merge (a plain attribute: survives reloads)."""
    return getattr(module, "fxlrd_merge", None) or {}


def _is_activation(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(_module(gm, node), ACTIVATIONS)
    if node.op == "call_function":
        return node.target in _ACT_FUNCTIONS
    return node.op == "call_method" and node.target in ("relu", "relu_", "sigmoid", "tanh")


_OUT_OF_PLACE = {
    aten.relu_.default: aten.relu.default, aten.silu_.default: aten.silu.default,
    aten.hardswish_.default: aten.hardswish.default, aten.sigmoid_.default: aten.sigmoid.default,
    aten.tanh_.default: aten.tanh.default, aten.leaky_relu_.default: aten.leaky_relu.default,
    aten.hardtanh_.default: aten.hardtanh.default,
}  # fmt: skip


def _out_of_place(gm: fx.GraphModule, node: fx.Node) -> None:
    """Make the activation ``node`` write a new tensor rather than its input."""
    if node.op == "call_function":
        node.target = _OUT_OF_PLACE.get(node.target, node.target)
        if node.kwargs.get("inplace"):
            node.kwargs = {**node.kwargs, "inplace": False}
    elif node.op == "call_method" and node.target == "relu_":
        node.target = "relu"
    elif node.op == "call_module" and getattr(_module(gm, node), "inplace", False):
        module = copy.copy(_module(gm, node))  # (the module may run elsewhere in place: leave those calls be)
        module.inplace = False
        name = f"{node.target}_out_of_place"
        set_submodule(gm, name, module)
        node.target = name


def _single_input(node: fx.Node) -> fx.Node | None:
    arg = node.args[0] if node.args else None
    return arg if isinstance(arg, fx.Node) else None


def _is_foldable_norm(m: nn.Module | None) -> bool:
    """A batch norm with running statistics (folding needs them)."""
    return isinstance(m, _NORMS) and m.track_running_stats and m.running_mean is not None


def _sources(gm: fx.GraphModule, node: fx.Node, rule: int = 2) -> set[str]:
    """The decomposed layers whose factors a node is or has absorbed (read from the modules):
    its own layer when it sits in a factor slot, and every layer a merge put into it (a merged
    layer may sit in a factor slot too). ``rule=1`` replays saves made before that second
    part (a merged layer in a factor slot counted as its slot's layer only)."""
    if node.op != "call_module":
        return set()
    out = set(_merge_info(gm.get_submodule(node.target)).get("sources", ()))
    parent = node.target.rpartition(".")[0]
    try:
        if isinstance(gm.get_submodule(parent), Factorized):
            if rule == 1:
                return {parent}
            out.add(parent)
    except AttributeError:
        pass
    return out


def _is_factor(gm: fx.GraphModule, node: fx.Node) -> bool:
    parent = node.target.rpartition(".")[0] if node.op == "call_module" else ""
    try:
        return bool(parent) and isinstance(gm.get_submodule(parent), Factorized)
    except AttributeError:
        return False


def _same_family(a: nn.Module, b: nn.Module) -> bool:
    if isinstance(a, nn.Linear) or isinstance(b, nn.Linear):
        return isinstance(a, nn.Linear) and isinstance(b, nn.Linear)
    return isinstance(a, nn.Conv2d) == isinstance(b, nn.Conv2d)


def _is_norm(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return _is_foldable_norm(_module(gm, node))
    return node.op == "call_function" and node.target in _FUNCTIONAL_NORMS


def merges_across(gm: fx.GraphModule, between: list[fx.Node], mode: str) -> bool:
    """Whether `MergePass` merges two layers with ``between`` (in graph order, ``nn.Identity``
    left out) between them: an optional norm, then an optional activation (``"approximate"``
    only). What a merge-aware timing window (`fxlrd.ranks.context`) takes in."""
    chain = [n for n in between if not isinstance(_module(gm, n), nn.Identity)]
    if chain and _is_activation(gm, chain[-1]):
        if mode != "approximate":
            return False
        chain = chain[:-1]
    if chain and _is_norm(gm, chain[-1]):
        chain = chain[:-1]
    return not chain


class MergePass(PassBase):
    """Merge pointwise layers with adjacent decomposed factors; see the module docstring."""

    RULE = 2  # plans record it: 1 (before 2026-12-06) let a merged layer in a factor slot merge again

    def __init__(self, mode: str = "exact", *, rule: int = RULE) -> None:
        if mode not in ("exact", "approximate"):
            raise ValueError(f"merge mode must be 'exact' or 'approximate', got {mode!r}")
        if rule not in (1, 2):
            raise ValueError(f"merge rule must be 1 or 2, got {rule!r}")
        super().__init__()
        self.mode, self.rule = mode, rule

    @staticmethod
    def _skip_identity(gm: fx.GraphModule, node: fx.Node | None) -> fx.Node | None:
        """Step over ``nn.Identity`` nodes (removing them: they compute nothing)."""
        while node is not None and isinstance(_module(gm, node), nn.Identity) and len(node.users) == 1:
            prev = _single_input(node)
            if prev is None:
                return node
            node.replace_all_uses_with(prev)
            gm.graph.erase_node(node)
            node = prev
        return node

    def _layer(self, gm: fx.GraphModule, node: fx.Node | None, sites: dict[fx.Node, Site]) -> nn.Module | None:
        """The pointwise layer a node runs: its module, or a functional site's equivalent."""
        if node is None:
            return None
        if node.op == "call_module":
            m = _module(gm, node)
            return m if is_pointwise(m) else None
        site = sites.get(node)
        if site is None:
            return None
        layer = site.layer(gm)
        return layer if is_pointwise(layer) else None


    @staticmethod
    def _called_once(node: fx.Node, calls: Counter, sites: dict[fx.Node, Site]) -> bool:
        """Whether ``node``'s module (or functional weight) runs nowhere else in the graph:
        a merge replaces the module, which would change its other calls too."""
        if node.op == "call_module":
            return calls[node.target] == 1
        return node not in sites or len(sites[node].nodes) == 1

    @staticmethod
    def _aligned(ma: nn.Module, norm: fx.Node) -> bool:
        """Whether the norm's channels are the layers' features: a linear layer's are the last
        dimension, a batch norm's dimension 1, the same only for 2-D inputs (a norm over the
        tokens of (N, L, C) is not foldable)."""
        if not isinstance(ma, nn.Linear):
            return True
        x = _single_input(norm)
        meta = None if x is None else x.meta.get("val")
        if meta is None and x is not None:  # (never `or`: a fake tensor's truth value is an error)
            meta = x.meta.get("tensor_meta")
        shape = getattr(meta, "shape", None)
        return shape is not None and len(shape) == 2

    def _match(self, gm: fx.GraphModule, b: fx.Node, sites: dict[fx.Node, Site], calls: Counter):
        """``(a, norm, act, b)`` if ``b`` ends a mergeable chain, else None."""
        mb = self._layer(gm, b, sites)
        if mb is None or (b.op == "call_module" and (len(b.args) != 1 or b.kwargs)):
            return None
        cur, act, norm = self._skip_identity(gm, sites[b].input(b) if b in sites else _single_input(b)), None, None
        if cur is not None and _is_activation(gm, cur) and len(cur.users) == 1:
            act, cur = cur, self._skip_identity(gm, _single_input(cur))
        if cur is not None and _is_norm(gm, cur) and len(cur.users) == 1:
            norm, cur = cur, self._skip_identity(gm, _single_input(cur))
        if cur is None or len(cur.users) != 1:
            return None
        ma = self._layer(gm, cur, sites)
        if ma is None or (cur.op == "call_module" and (len(cur.args) != 1 or cur.kwargs)):
            return None
        if not _same_family(ma, mb) or ma.weight.shape[0] != mb.weight.shape[1]:
            return None
        if not _is_factor(gm, cur) and not _is_factor(gm, b):
            return None  # neither is a decomposed factor
        if _sources(gm, cur, self.rule) & _sources(gm, b, self.rule):
            return None  # factors of one layer: merging would undo the decomposition
        if act is not None and self.mode != "approximate":
            return None
        if not all(self._called_once(n, calls, sites) for n in (cur, norm, b) if n is not None):
            return None  # a module that also runs elsewhere (a layer called twice, a shared norm)
        if norm is not None and not self._aligned(ma, norm):
            return None
        folds_training_norm = act is None and norm is not None and norm.op == "call_module" and gm.get_submodule(norm.target).training
        if folds_training_norm and self.mode == "approximate":
            return None  # with nothing between to move it past, the norm would be folded: keep it for fine-tuning
        if folds_training_norm:
            raise ConfigError(
                f"merge='exact' folds batch norm {norm.target!r} into the layers with its running statistics, which is "
                "what it computes in eval mode only, and it is in training mode: call model.eval() before merging "
                "(merge the model you deploy), or leave merge off to fine-tune with the norms"
            )
        return cur, norm, act, b

    def _materialize(self, gm: fx.GraphModule, match, sites: dict[fx.Node, Site]) -> bool:
        """Functional layers and norms of a match become modules; True if any did."""
        a, norm, _, b = match
        changed = False
        for node in (a, b):
            if node.op != "call_module":
                materialize(gm, sites[node])
                changed = True
        if norm is not None and norm.op != "call_module":
            if materialize_norm(gm, norm) is None:
                return changed
            changed = True
        return changed

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        gm, modified = graph_module, False
        refused: set[fx.Node] = set()
        while True:
            sites = {node: site for site in find_sites(gm).values() if not site.reason and site.kind == "function"
                     for node in site.nodes}  # fmt: skip
            candidates = [n for n in gm.graph.nodes if (n.op == "call_module" or n in sites) and n not in refused]
            calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
            match = next((m for n in candidates if (m := self._match(gm, n, sites, calls))), None)
            if match is None:
                break
            if any(n.op != "call_module" for n in (match[0], match[3])) or (match[1] is not None and match[1].op != "call_module"):
                if not self._materialize(gm, match, sites):
                    refused.add(match[3])
                modified = True
                continue
            self._merge(gm, *match)
            modified = True
        if modified:
            gm.delete_all_unused_submodules()
            gm.graph.lint()
            gm.recompile()
        return PassResult(gm, modified)

    def _merge(self, gm: fx.GraphModule, a: fx.Node, norm: fx.Node | None, act: fx.Node | None, b: fx.Node) -> None:
        ma, mb = _module(gm, a), _module(gm, b)
        first = fold_norm(ma, _module(gm, norm)) if norm is not None else ma
        merged = compose_pointwise(first, mb).train(ma.training)
        trainable = any(p.requires_grad for m in (ma, mb) for p in m.parameters())  # frozen when both were
        merged.requires_grad_(trainable)
        sources = sorted(_sources(gm, a, self.rule) | _sources(gm, b, self.rule))
        info = {"merged_from": [a.target, b.target], "exact": act is None, "sources": sources}
        merged.fxlrd_merge = info
        if act is None:  # exact: A → [N] → B is one layer
            set_submodule(gm, a.target, merged)
            b.replace_all_uses_with(a)
            gm.graph.erase_node(b)
            if norm is not None:
                norm.replace_all_uses_with(a)
                gm.graph.erase_node(norm)
            a.meta["fxlrd"] = dict(info)  # a copy: freezing writes its own keys there
            return
        out_ch, in_ch = merged.weight.shape[:2]
        after = out_ch <= in_ch  # the norm and activation go on the narrow side
        info["placement"] = "after" if after else "before"
        new_norm = None
        if norm is not None:
            old = _module(gm, norm)
            new_norm = type(old)(out_ch if after else in_ch, eps=old.eps, momentum=old.momentum, affine=old.affine,
                                 device=merged.weight.device, dtype=merged.weight.dtype).train(old.training)  # fmt: skip
            new_norm.requires_grad_(any(p.requires_grad for p in old.parameters()))
            set_submodule(gm, norm.target, new_norm)
            norm.meta["fxlrd"] = {"moved_norm": True, "merge": a.target if after else b.target}
            new_norm.fxlrd_moved = True
            info["norm"] = norm.target
        if after:  # A → N → F → B  becomes  M → N' → F
            set_submodule(gm, a.target, merged)
            b.replace_all_uses_with(act)
            gm.graph.erase_node(b)
            a.meta["fxlrd"] = dict(info)  # a copy: freezing writes its own keys there
        else:  # A → N → F → B  becomes  N' → F → M
            if act is not None:  # F now reads A's input, which others may read too (a residual): never in place
                _out_of_place(gm, act)
            head = norm if norm is not None else act
            head.args = (a.args[0], *head.args[1:])
            set_submodule(gm, b.target, merged)
            gm.graph.erase_node(a)
            b.meta["fxlrd"] = dict(info)  # a copy: freezing writes its own keys there
        for node in (norm, act):
            if node is not None:
                for key in ("tensor_meta", "val"):
                    node.meta.pop(key, None)

