"""Fuse sibling linear layers: layers that read the same input become one layer.

Attention's query, key and value projections read the same hidden states (so do a gated
MLP's gate and up projections). Decomposed one by one, each gets its own input factor: three
``x → r`` projections and three ``r → out`` ones, six GEMMs. Fused first into one layer
``W = [W_q; W_k; W_v]`` (outputs stacked, then split), the decomposition shares one input
factor ``B``: ``x → R → [q; k; v]``, two GEMMs, and at equal parameters ``R = 1.5 r``
for three square siblings. At the same ratio for every layer, the shared factor is also the
more accurate one with data-aware (whitened) decomposition on trained weights: the whitened
spectrum is dominated by the input's own principal directions, which the siblings share
(all-MiniLM-L6-v2, q/k/v of every layer at α = 1.5 and nothing else compressed: mean relative
whitened error 0.023 shared against 0.036 separate, held-out embedding cosine 0.984 against
0.977). Under a global allocation it is not: the allocator can no longer give each member its
own rank (it keeps MiniLM's values nearly whole and cuts queries and keys), and MiniLM lost
0.003–0.005 of cosine fused (AMD EPYC scratch runs, 2026-12-06; README).

`fuse_siblings` rewrites a captured graph: the fused ``nn.Linear`` takes the place of its
members (named after them, beside them: ``…self.query_key_value``), its output is split
along the last dimension, and every user of a member reads its part. Kept whole, the fused
layer computes exactly what the members did; everything else (planning, calibration,
sequential fitting, saving) sees one ordinary linear site. The plan records the groups, and
a load or a plan applied again fuses the same layers.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import fx, nn

from .errors import PlanMismatchError
from .sites import _VALUE_META, Site, _drop_param, _erase_dead_reads, find_sites, set_submodule

__all__ = ["SiblingGroup", "find_siblings", "fuse_siblings"]


@dataclass
class SiblingGroup:
    """Linear sites reading one input, fused into ``name`` (``sizes``: each member's outputs,
    in the order they are stacked)."""

    name: str
    members: list[str]
    sizes: list[int]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "members": list(self.members), "sizes": list(self.sizes)}


def _fusable(site: Site) -> bool:
    return (not site.reason and site.spec is not None and site.spec.kind == "linear" and len(site.nodes) == 1
            and site.input(site.nodes[0]) is not None)  # fmt: skip


def _fused_name(gm: nn.Module, members: Sequence[str], taken: set[str]) -> str:
    """Beside the members, after them: ``a.b.query`` + ``a.b.key`` → ``a.b.query_key``."""
    parts = [m.split(".") for m in members]
    common = 0
    while all(len(p) > common + 1 and p[common] == parts[0][common] for p in parts):
        common += 1
    prefix = ".".join(parts[0][:common])
    leaf = "_".join("_".join(p[common:]) for p in parts)
    name = f"{prefix}.{leaf}" if prefix else leaf
    base, i = name, 1
    while name in taken or _exists(gm, name):
        i += 1
        name = f"{base}_{i}"
    return name


def _exists(gm: nn.Module, path: str) -> bool:
    owner, _, leaf = path.rpartition(".")
    try:
        module = gm.get_submodule(owner) if owner else gm
    except AttributeError:
        return False
    return hasattr(module, leaf)


def _key(gm: nn.Module, site: Site) -> tuple:
    """What siblings share: the input node, input features, bias or none, dtype, device."""
    w = site.weight(gm)
    return (site.input(site.nodes[0]), site.spec.in_channels, site.bias_path is not None, w.dtype, w.device)


def _input_changed_between(gm: fx.GraphModule, x: fx.Node, nodes: Sequence[fx.Node]) -> bool:
    """Whether something writes ``x`` in place, or a view of it, between the first and the last
    of ``nodes`` (``h.relu_()`` or ``h[:, :8].zero_()`` between two of them in an fx graph: the
    fused layer, run first, would read ``h`` as it was before)."""
    from .calibrate import _aliases, _writes_in_place

    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    first, last = min(order[n] for n in nodes), max(order[n] for n in nodes)
    return any(first < order[u] < last and _writes_in_place(gm, u, a) for a in _aliases(gm, x) for u in a.users)


def find_siblings(gm: fx.GraphModule, selected: Callable[[str, Site], bool] | None = None,
                  sites: Mapping[str, Site] | None = None) -> list[SiblingGroup]:  # fmt: skip
    """Groups of two or more linear sites of one parent module (a T5 decoder's cross-attention
    keys and values of every layer read the encoder's output, but are one group per layer)
    that read the same input node, each called once, with the same input features, dtype and
    device, all with a bias or none, and nothing writing that input in place between them
    (``selected``: which sites may join), in graph order."""
    sites = find_sites(gm) if sites is None else sites
    by_input: dict[tuple, list[str]] = {}
    for name, site in sites.items():
        if not _fusable(site) or (selected is not None and not selected(name, site)):
            continue
        by_input.setdefault((name.rpartition(".")[0], *_key(gm, site)), []).append(name)
    taken: set[str] = set()
    groups = []
    for key, names in by_input.items():
        if len(names) < 2 or _input_changed_between(gm, key[1], [sites[n].nodes[0] for n in names]):
            continue
        name = _fused_name(gm, names, taken)
        taken.add(name)
        groups.append(SiblingGroup(name, names, [sites[n].spec.out_channels for n in names]))
    return groups


def _remove_member(gm: fx.GraphModule, site: Site) -> None:
    """The member's parameters leave the model, and its module when that holds nothing else."""
    if site.kind == "function":
        _erase_dead_reads(gm, site)
        for path in filter(None, (site.weight_path, site.bias_path)):
            _drop_param(gm, path)
    path = site.name if site.kind == "module" else site.owner
    if not path:
        return
    module = gm.get_submodule(path)
    if site.kind == "function" and (module._parameters or module._buffers or module._modules):
        return
    parent, _, leaf = path.rpartition(".")
    del (gm.get_submodule(parent) if parent else gm)._modules[leaf]


def _split_meta(node: fx.Node, total: int) -> dict[str, Any]:
    meta = {k: v for k, v in node.meta.items() if k not in _VALUE_META}
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):  # the fused output: the member's, with every member's features
        try:
            meta["val"] = val.new_empty((*val.shape[:-1], total))
        except Exception:  # noqa: BLE001  (a fake tensor outside its mode: the shape stays unknown)
            pass
    return meta


@torch.no_grad()
def fuse_siblings(gm: fx.GraphModule, groups: Sequence[SiblingGroup | Mapping[str, Any]]) -> list[SiblingGroup]:
    """Fuse each group of ``gm`` (in place): one ``nn.Linear`` at the group's name holding the
    members' weights stacked, its output split among the members' users. Groups may be
    records (``SiblingGroup.to_dict``, e.g. from a plan); members that are missing or changed
    raise a `PlanMismatchError`. Returns the groups fused."""
    done = []
    for group in groups:
        group = group if isinstance(group, SiblingGroup) else SiblingGroup(str(group["name"]), list(group["members"]),
                                                                           [int(s) for s in group["sizes"]])  # fmt: skip
        sites = find_sites(gm)
        missing = [m for m in group.members if m not in sites or not _fusable(sites[m])]
        if missing:
            raise PlanMismatchError(f"the plan fuses {group.members} into {group.name!r}, but {missing[0]!r} is not a "
                                    "linear layer of this model called once: apply it to the model it was made for")  # fmt: skip
        members = [sites[m] for m in group.members]
        sizes = [s.spec.out_channels for s in members]
        if len({_key(gm, s) for s in members}) != 1 or sizes != group.sizes:
            raise PlanMismatchError(f"the plan fuses {group.members} into {group.name!r}, but in this model they do not "
                                    f"read one input with {group.sizes} outputs, all with a bias or none, of one dtype "
                                    "and device: apply it to the model it was made for")  # fmt: skip
        x = members[0].input(members[0].nodes[0])
        if _input_changed_between(gm, x, [s.nodes[0] for s in members]):
            raise PlanMismatchError(f"the plan fuses {group.members} into {group.name!r}, but this model changes their "
                                    "input in place between them: apply it to the model it was made for")  # fmt: skip
        # frozen when every member was (the stored tensors: a transpose under no_grad carries no flag)
        trainable = any(s.parameters(gm)[0].requires_grad for s in members)
        bias_trainable = any(s.bias_path is not None and s.parameters(gm)[-1].requires_grad for s in members)
        weights = [s.weight(gm).detach() for s in members]
        biases = [s.bias(gm) for s in members]
        fused = nn.Linear(weights[0].shape[1], sum(sizes), bias=biases[0] is not None, device="meta", dtype=weights[0].dtype)
        fused = fused.to_empty(device=weights[0].device)
        fused.weight.copy_(torch.cat(weights))
        if fused.bias is not None:
            fused.bias.copy_(torch.cat([b.detach() for b in biases]))
            fused.bias.requires_grad_(bias_trainable)
        fused.weight.requires_grad_(trainable)
        try:  # it runs in its members' mode
            fused.train(gm.get_submodule(members[0].name).training)
        except AttributeError:
            fused.train(gm.training)
        nodes = [s.nodes[0] for s in members]
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        first = min(nodes, key=order.__getitem__)
        set_submodule(gm, group.name, fused)
        with gm.graph.inserting_before(first):
            out = gm.graph.call_module(group.name, (x,))
            out.meta = _split_meta(first, sum(sizes))
            parts = gm.graph.call_function(torch.split, (out, sizes), {"dim": -1})
            parts.meta = {k: v for k, v in first.meta.items() if k not in _VALUE_META}
            for i, node in enumerate(nodes):
                view = gm.graph.call_function(operator.getitem, (parts, i))
                view.meta = dict(node.meta)
                # each member's output a tensor of its own, as before: a view of the fused output
                # would be strided (a later .view() fails) and one storage (an in-place op on it
                # fails under autograd)
                part = gm.graph.call_method("clone", (view,), {"memory_format": torch.contiguous_format})
                part.meta = dict(node.meta)
                node.replace_all_uses_with(part)
        for site, node in zip(members, nodes):
            gm.graph.erase_node(node)
            _remove_member(gm, site)
        gm.graph.lint()
        gm.recompile()
        done.append(group)
    return done
