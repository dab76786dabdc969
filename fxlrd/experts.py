"""Stacked expert weights: a mixture of experts' ``(E, m, n)`` parameter, factorized per expert.

transformers 5 stores a mixture's experts as one 3-D parameter per projection
(``experts.gate_up_proj``, ``experts.down_proj``: one ``m × n`` matrix per expert) and runs
them by selecting each token's expert matrix and multiplying, ``torch.bmm(P[ids], x)``
(``experts_implementation="batched_mm"``). Each expert's matrix is factorized by a truncated
SVD at one rank ``r`` for the stack, ``P[e] ≈ L[e] @ R[e]`` with ``L: (E, m, r)`` and
``R: (E, r, n)`` (√Σ on each side), and the graph selects and multiplies the factors instead::

    bmm(P[ids], x)  ->  bmm(L[ids], bmm(R[ids], x))        bmm(x, P[ids])  ->  bmm(bmm(x, L[ids]), R[ids])

so a token gathers and multiplies ``r·(m + n)`` numbers where it gathered ``m·n``: the
factors' saving is the speed-up, as for a linear layer. ``P[ids].mT`` (a weight stored
``(in, out)``) is read as the product ``R[ids].mT @ L[ids].mT``.

transformers' default experts (``grouped_mm``) sort the tokens by expert and multiply each
group by its expert's matrix in one call, ``grouped_mm(x, P, offs)`` (or ``P.mT``; ``offs``: where
each expert's rows end). The factors take the same groups in turn::

    grouped_mm(x, P, offs)  ->  grouped_mm(grouped_mm(x, L, offs), R, offs)

(``P.mT`` as ``R.mT`` then ``L.mT``). grouped_mm wants each matrix's rows at multiples of 16
bytes, so there the rank is rounded up to a multiple of 8 in bfloat16 (4 in float32).

A stacked weight is factorized only where every read of it is such a selection feeding a
batched product (``bmm``) as one operand, or the stack itself as ``grouped_mm``'s second
operand, directly or through a transpose of its last two dimensions; any other read (an
``einsum``, a slice) keeps it whole, with the reason. The ranks follow the per-layer rules
(``ratio``, ``fixed``, ``energy``) or, under a parameter budget (``target_params``,
``allocation="global"``), the global allocation, where each stack is one more choice beside
the layers (`StackTask`, its error in a layer's units: `error_curve`), or, under ``latency``,
the latency search: a stack's product is timed alone (`_StackProbe`), dense and at each
candidate rank, as a layer is, its rows routed as the example routed them (`example_routing`).
Under ``target_speedup`` each stack is one more choice of the global speed search, priced by
the same timings (`StackTask.speed_options`), every trial built with its stacks factorized
(`trial_stacks`) and timed whole.

With calibration data the factors are data-aware: each expert's inputs (the tokens routed to
it) are gathered into its own Gram matrix, and its matrix is factorized by whitened SVD
(SVD-LLM's truncation-aware whitening, as for a linear layer), so at rank ``r`` it keeps the
least output error on the tokens it sees; with the model's output sensitivity (the config's
``sensitivity``) its output channels are weighed by what they cost the model's output, as a
layer's are. An expert no calibration token reached keeps its data-free SVD. Memory: one
``d × d`` float64 matrix per expert of each stack (``d`` its input size), and with a full
sensitivity matrix one ``d_out × d_out``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import math
import operator
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.fx as fx
from torch import nn

from .config import LRDConfig
from .errors import PlanMismatchError
from .ranks.rules import energy_rank, quantize_rank, svd_rank_for_ratio
from .sites import _drop_param, _get_attr, _op_name, set_submodule, stacked_weights, tensor_index

__all__ = ["ExpertFactors", "StackedWeight", "StackTask", "find_stacked", "expert_stats", "plan_experts", "factorize_experts",
           "error_curve"]

aten = torch.ops.aten

_BMM = {aten.bmm.default, torch.bmm}


class ExpertFactors(nn.Module):
    """A stack of ``E`` factorized matrices: ``weight()[e] = left[e] @ right[e]``.

    ``left`` is ``(E, m, r)``, ``right`` ``(E, r, n)``; the graph multiplies by them in turn.
    """

    def __init__(self, left: torch.Tensor, right: torch.Tensor) -> None:
        super().__init__()
        if left.dim() != 3 or right.dim() != 3 or left.shape[0] != right.shape[0] or left.shape[2] != right.shape[1]:
            raise ValueError(f"ExpertFactors needs left (E, m, r) and right (E, r, n), got {tuple(left.shape)} and {tuple(right.shape)}")
        self.left = nn.Parameter(left)
        self.right = nn.Parameter(right)

    @property
    def rank(self) -> int:
        return self.left.shape[2]

    def weight(self) -> torch.Tensor:
        """The ``(E, m, n)`` stack the factors stand for."""
        return self.left @ self.right

    def extra_repr(self) -> str:
        e, m, r = self.left.shape
        return f"experts={e}, {m}×{self.right.shape[2]}, rank={r}"


@dataclass
class StackedWeight:
    """A 3-D parameter the graph computes with as stacked matrices, and how it is read.

    Attributes:
        path: the parameter's qualified name.
        shape: ``(E, m, n)``.
        reads: the selection nodes (``P[ids]``), when every read fits (else empty).
        reason: why it cannot be factorized here ("" when it can).
    """

    path: str
    shape: tuple[int, int, int]
    reads: list[fx.Node] = field(default_factory=list)
    reason: str = ""


def _is_selection(node: fx.Node, param: fx.Node) -> bool:
    """``P[ids]``: ``aten.index.Tensor(P, [ids])`` or ``operator.getitem(P, ids)`` with one index tensor."""
    return tensor_index(node) is not None and node.args[0] is param


def _is_last_transpose(node: fx.Node, source: fx.Node) -> bool:
    """Whether ``node`` swaps the last two dimensions of the 3-D ``source`` (and does nothing else)."""
    if not node.args or node.args[0] is not source or node.kwargs:
        return False
    name, args = _op_name(node), node.args[1:]
    if node.target is getattr:
        return name == "mT"
    if name == "mT":  # aten.mT in an export graph
        return not args
    if name == "transpose" and len(args) == 2 and all(isinstance(d, int) for d in args):
        return sorted(d % 3 for d in args) == [1, 2]
    if name == "permute":
        dims = list(args[0]) if len(args) == 1 and isinstance(args[0], (list, tuple)) else list(args)
        return [d % 3 for d in dims] == [0, 2, 1]
    return False


def _is_bmm(node: fx.Node) -> bool:
    """``torch.bmm(a, b)``, ``aten.bmm`` or ``a.bmm(b)``: a product of two 3-D batches."""
    if node.kwargs or len(node.args) != 2:
        return False
    return (node.op == "call_function" and node.target in _BMM) or (node.op == "call_method" and node.target == "bmm")


@dataclass
class _Use:
    """One batched product of a selected stack: ``product`` multiplies ``operand`` (the
    selection, or its transpose when ``transposed``) as its left (``side`` 0) or right factor."""

    product: fx.Node
    operand: fx.Node
    transposed: bool
    side: int
    offs: fx.Node | None = None  # grouped_mm's group ends (None: a bmm)


_GROUPED = ("_grouped_mm", "grouped_mm", "grouped_mm_fallback")  # (the last: transformers' own loop)


def _grouped_operands(node: fx.Node) -> tuple[Any, Any, Any] | None:
    """``(x, w, offs)`` of ``grouped_mm(x, w, offs=offs)`` (aten, ``torch._grouped_mm`` or
    ``F.grouped_mm``) with a 2-D ``x`` grouped by ``offs`` and no bias or output dtype, else None."""
    if node.op != "call_function" or _op_name(node) not in _GROUPED:
        return None
    names = ("x", "w", "offs", "bias", "out_dtype")
    given = dict(zip(names, node.args))
    for key, value in node.kwargs.items():
        given[{"self": "x", "mat_a": "x", "input": "x", "mat2": "w", "mat_b": "w", "weight": "w"}.get(key, key)] = value
    if set(given) - set(names) or given.get("bias") is not None or given.get("out_dtype") is not None:
        return None
    x, w, offs = given.get("x"), given.get("w"), given.get("offs")
    if not all(isinstance(v, fx.Node) for v in (x, w, offs)) or len(_shape(x) or (0, 0)) != 2:
        return None
    return x, w, offs


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("val", node.meta.get("tensor_meta"))
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _grouped_uses(user: fx.Node, param: fx.Node) -> tuple[list[_Use], str]:
    """The grouped products reading the stack ``param`` through ``user`` (the product itself,
    or a transpose of the stack's last two dimensions feeding products), and why they cannot be
    rewritten ("" when they can): each must take it as ``grouped_mm``'s second operand, beside
    a 2-D first operand that is no stack."""
    transposed = _is_last_transpose(user, param)
    products = list(user.users) if transposed else [user]
    operand = user if transposed else param
    uses = []
    for product in products:
        parts = _grouped_operands(product)
        if parts is None or parts[1] is not operand:
            what = f"{_op_name(product) or product.op} ({product.name})"
            return [], f"read by {what}, not as grouped_mm's grouped matrices beside 2-D tokens"
        if _selects_a_stack(parts[0]) or parts[0] is operand or parts[0] is param:
            return [], f"{product.name} multiplies the stack by another stack"
        uses.append(_Use(product, operand, transposed, 1, offs=parts[2]))
    return uses, ""


def _uses(sel: fx.Node) -> tuple[list[_Use], str]:
    """The products of a selection ``P[ids]``, directly or through a transpose of its last two
    dimensions, and why they cannot be rewritten ("" when they can): each must be a ``bmm``
    taking the stack once, beside an operand of its own."""
    uses = []
    flips = {u for u in sel.users if _is_last_transpose(u, sel) and u.users}
    for user in sel.users:
        operands = [(user, True, p) for p in user.users] if user in flips else [(sel, False, user)]
        for operand, transposed, product in operands:
            if not _is_bmm(product):
                what = f"{_op_name(product) or product.op} ({product.name})"
                return [], f"P[ids] used by {what}, not as an operand of torch.bmm"
            mine = [i for i, a in enumerate(product.args) if a is sel or a in flips]
            if len(mine) != 1:
                return [], f"{product.name} multiplies the selected stack by itself"
            other = product.args[1 - mine[0]]
            if _selects_a_stack(other):
                return [], f"{product.name} multiplies two selected stacks"
            uses.append(_Use(product, operand, transposed, mine[0]))
    return uses, ""


def _selects_a_stack(node: Any) -> bool:
    """Whether ``node`` is (a transpose of) a selection from a parameter: another stack."""
    if isinstance(node, fx.Node) and node.args and isinstance(node.args[0], fx.Node) and _is_last_transpose(node, node.args[0]):
        node = node.args[0]
    return (isinstance(node, fx.Node) and node.op == "call_function" and node.target in (aten.index.Tensor, operator.getitem)
            and bool(node.args) and isinstance(node.args[0], fx.Node) and node.args[0].op == "get_attr")  # fmt: skip


def _is_grouped_read(node: fx.Node, param: fx.Node) -> bool:
    """Whether ``node`` reads the stack ``param`` for grouped products: one itself, or a
    transpose of the stack's last two dimensions."""
    if _is_last_transpose(node, param):
        return bool(node.users) and all(_grouped_operands(u) is not None for u in node.users)
    return _grouped_operands(node) is not None


def _read_uses(node: fx.Node, param: fx.Node) -> tuple[list[_Use], str]:
    """The products one read of the stack ``param`` (a user of its ``get_attr``) feeds, and why
    the factors cannot replace them ("" when they can)."""
    if _is_selection(node, param):
        return _uses(node)
    if _is_grouped_read(node, param):
        return _grouped_uses(node, param)
    return [], f"read by {_op_name(node) or node.op} ({node.name}), neither selected as P[ids] nor grouped_mm's operand"


def _why_not(node: fx.Node, param: fx.Node) -> str:
    """Why a read of a stacked weight is not one the factors can replace ("" when it is)."""
    return _read_uses(node, param)[1]


def find_stacked(model: nn.Module, gm: fx.GraphModule) -> dict[str, StackedWeight]:
    """The stacked 3-D weights of ``gm`` (`fxlrd.sites.stacked_weights`) by path, each with its
    reads when the factors can replace them all and the reason when not."""
    out: dict[str, StackedWeight] = {}
    for path, shape in stacked_weights(model, gm):
        nodes = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target == path]
        reads = [u for n in nodes for u in n.users]
        reason = next((why for n in nodes for u in n.users if (why := _why_not(u, n))), "")
        out[path] = StackedWeight(path, tuple(shape), [] if reason else reads, reason)
    return out


@dataclass
class _Read:
    """One batched product reading a stack: the expert ids, the other operand ``x`` and how."""

    product: fx.Node
    selection: fx.Node  # P[ids] (a bmm), or the read of P (a grouped_mm)
    ids: fx.Node | None  # (a bmm: the experts picked)
    x: fx.Node
    x_left: bool  # x is the product's left operand (x @ P[ids] or x @ P[ids].mT)
    rows: bool  # the stack's input mode is its rows, m (x @ P, Pᵀ @ x), else its columns, n
    offs: fx.Node | None = None  # (a grouped_mm: where each expert's rows of x end)


def _reads(s: StackedWeight) -> list[_Read]:
    out = []
    for read in s.reads:
        param = _param_of(read)
        if _is_selection(read, param):
            ids = tensor_index(read)
            uses = _uses(read)[0]
        else:
            ids, uses = None, _grouped_uses(read, param)[0]
        for use in uses:
            x_left = use.side == 1
            x = _grouped_operands(use.product)[0] if use.offs is not None else use.product.args[1 - use.side]
            out.append(_Read(use.product, read, ids, x, x_left, rows=x_left != use.transposed, offs=use.offs))
    return out


def _param_of(read: fx.Node) -> fx.Node:
    """The stack's ``get_attr`` node a read reads (a selection's or transpose's input, a grouped product's matrices)."""
    grouped = _grouped_operands(read)
    return grouped[1] if grouped is not None else read.args[0]


def alignment(s: StackedWeight, dtype: torch.dtype) -> int:
    """The multiple a stack's rank must be: 16 bytes of ``dtype`` when grouped_mm reads it
    (its kernels want each matrix's rows at multiples of 16 bytes), else 1."""
    grouped = any(not _is_selection(r, _param_of(r)) for r in s.reads)
    return max(1, 16 // torch.empty((), dtype=dtype).element_size()) if grouped else 1


def _input_size(s: StackedWeight, rows: bool) -> int:
    return s.shape[1] if rows else s.shape[2]


def expert_stats(gm: fx.GraphModule, stacks: Mapping[str, StackedWeight], calibration: Iterable, *,
                 progress: bool = True, distributed: bool | None = None, group: Any = None,
                 notes: dict[str, str] | None = None, sensitivity: Any = False,
                 sensitivity_matrix: str = "full", seed: int = 0) -> dict[str, list[Any]]:  # fmt: skip
    """Per stack, one `fxlrd.calibrate.SiteStats` per expert (None where no calibration token
    was routed to it): the Gram matrix of the inputs each expert multiplies, over its input
    mode, and with ``sensitivity`` (as `fxlrd.calibrate.collect_stats` takes it: one backward
    pass per batch) how much the model's outputs care about each of its output channels, in
    the units a linear layer's are (relative squared model-output error). Tokens an
    ``attention_mask`` marks as padding are left out (an encoder-decoder's decoder tokens by
    their own mask, as `fxlrd.calibrate.TokenMasks` tells them; the selections taken as token-major,
    ``tokens × top_k``, as transformers orders them), and from a grouped_mm's rows, sorted by
    expert, where they were gathered from the tokens by an index (``hidden_states[perm //
    top_k]``, as transformers does); where that cannot be told, they are all counted (``notes``,
    when given, says so for the stack). A
    stack whose reads disagree on that mode, or that no token reached, is left out (its
    factors stay data-free). The graph runs in eval mode; its mode is left as it was. Under
    ``torch.distributed`` (default: when a process group is initialised) the statistics are
    summed over the processes, so each can see its own shard of the data."""
    from .calibrate import (EvalInterpreter, InputStats, SiteStats, TokenMasks, _as_args, _batches, _overwritten,
                            all_reduce_sum, finish_pass, inputs_error, kl_outputs, output_streams, process_seed,
                            sensitivity_grads)  # fmt: skip
    from .capture import flat_inputs
    from .config import check_sensitivity
    from .modes import saved_modes

    check_sensitivity(sensitivity, sensitivity_matrix)
    if isinstance(sensitivity, str):  # "kl"
        sensitivity = kl_outputs
    watched: dict[fx.Node, tuple[str, _Read]] = {}
    grams: dict[str, list[Any]] = {}
    full: set[str] = set()  # the stacks whose experts keep a full output-sensitivity matrix
    for path, s in stacks.items():
        reads = _reads(s)
        if reads and len({r.rows for r in reads}) == 1:
            watched.update({r.product: (path, r) for r in reads})
            d = _input_size(s, reads[0].rows)
            grams[path] = [InputStats(torch.zeros(d, d, dtype=torch.float64)) for _ in range(s.shape[0])]
            out = s.shape[1] + s.shape[2] - d
            if sensitivity and sensitivity_matrix == "full" and s.shape[0] * out * out <= _FULL_SENSITIVITY:
                full.add(path)
            elif sensitivity and sensitivity_matrix == "full" and notes is not None:
                gb = s.shape[0] * out * out * 8 / 2**30
                notes[path] = f"output sensitivity as its diagonal (the full matrices would take {gb:.1f} GiB)"
    selections = {r.selection: r.ids for _, r in watched.values() if r.ids is not None}
    picked: dict[fx.Node, torch.Tensor] = {}  # (the ids, kept here: the interpreter frees values after their last use)
    # a grouped product's rows gathered from the tokens (transformers: ``hidden_states[perm // top_k]``): that gather's
    # token index, and the rows it gathers from, tell which sorted rows are padding
    # (every grouped product's, calibrated or not: one whose stack is kept may be the one gathering a layer's rows)
    offs_gathers: dict[fx.Node, fx.Node] = {}
    for operands in (_grouped_operands(node) for node in gm.graph.nodes):
        gather = _row_gather(operands[0]) if operands is not None else None
        if gather is not None:
            offs_gathers.setdefault(operands[2], gather)
    row_gathers = {g: tensor_index(g) for g in offs_gathers.values()}
    gathered: dict[fx.Node, tuple[torch.Tensor, int]] = {}  # row gather → (token index, rows gathered from)
    real_rows: dict[fx.Node, torch.Tensor | None] = {}  # a grouped product's offs → which of its sorted rows are real
    padded: set[str] = set()  # grouped stacks whose calibration had padding that could not be told apart (counted)
    masks: list[Any] = [None]  # (this batch's TokenMasks)
    outputs: list[tuple[str, _Read, torch.Tensor, Any]] = []  # (the products' outputs, for their sensitivity)
    sens: dict[tuple[str, int], torch.Tensor] = {}

    class Recorder(EvalInterpreter):
        def run_node(self, node: fx.Node) -> Any:
            if node in selections:
                picked[node] = self.env[selections[node]]
            if node in row_gathers:
                source = self.env[node.args[0]]
                gathered[node] = (self.env[row_gathers[node]], source.shape[0] if isinstance(source, torch.Tensor) else -1)
            if node not in watched:
                return super().run_node(node)
            path, read = watched[node]
            x = self.env[read.x]
            if read.offs is not None:  # grouped: rows sorted by expert, offs their ends
                ends = self.env[read.offs].tolist()
                groups = [(e, slice(start, end)) for e, (start, end) in enumerate(zip([0, *ends[:-1]], ends)) if end > start]
                real = None
                mask = masks[0].for_node(read.x)
                if mask is not None and not bool(mask.all()):
                    if read.offs not in real_rows:  # (the products of one layer share its offs and its row order)
                        real_rows[read.offs] = _real_rows(gathered.get(offs_gathers.get(read.offs)), mask)
                    real = real_rows[read.offs]
                    if real is not None and real.numel() != x.shape[0]:  # (rows not in the gathered order)
                        real = None
                    if real is None:
                        padded.add(path)  # (which rows are padding, the sorting hides: they are counted)
                    else:
                        groups = [(e, g) for e, g in groups if bool(real[g].any())]
                rows = lambda t: [(e, t[g] if real is None else t[g][real[g]]) for e, g in groups]  # noqa: E731
            else:
                ids = picked[read.selection].reshape(-1)
                x = x if read.x_left else x.mT  # (S, samples, d)
                keep = None
                real = masks[0].for_node(read.x)  # (an encoder-decoder's decoder rows: its own mask, or none)
                if real is not None and ids.numel() % real.numel() == 0:
                    keep = real.reshape(-1).repeat_interleave(ids.numel() // real.numel()).to(ids.device)
                    ids = ids[keep]
                experts = ids.unique().tolist() if x.shape[0] == (ids.numel() if keep is None else keep.numel()) else []
                rows = lambda t: [(e, (t if keep is None else t[keep])[ids == e]) for e in experts]  # noqa: E731
            for e, xe in rows(x):
                grams[path][e].add(xe.reshape(-1, xe.shape[-1]))
            out = super().run_node(node)
            if sensitivity and isinstance(out, torch.Tensor) and out.requires_grad:
                outputs.append((path, read, out, rows))
                if node in overwritten:  # the gradient is taken at ``out``: the graph changes a copy (a bias added in place)
                    out = out.clone()
            return out

    overwritten = {node for node in watched if sensitivity and _overwritten(gm, node)}
    restore = saved_modes(gm)
    gm.eval()
    recorder, n = Recorder(gm), 0
    streams = output_streams(gm, [r.x for _, r in watched.values()])
    generator = torch.Generator().manual_seed(process_seed(seed, distributed, group))
    energy = 0.0
    try:
        for index, item in enumerate(_batches(calibration, progress, "expert calibration")):
            inputs = _as_args(item, index)
            masks[0] = TokenMasks(inputs, streams)
            flat = flat_inputs(gm, inputs, f"calibration batch {index}")
            outputs.clear()
            gathered.clear()
            real_rows.clear()
            try:
                with torch.set_grad_enabled(bool(sensitivity)):
                    result = recorder.run(*flat)
            except Exception as exc:  # noqa: BLE001  (the item does not fit the model)
                raise inputs_error(gm, inputs, exc, "calibration item").with_traceback(None) from exc
            if outputs:
                grads, batch_energy = sensitivity_grads(gm, result, inputs, sensitivity, [o[2] for o in outputs],
                                                        masks[0], streams, generator)  # fmt: skip
                for (path, read, _, rows), g in zip(outputs, grads):
                    if g is None:
                        continue
                    g = g.detach().double() if read.offs is not None or read.x_left else g.detach().double().mT
                    for e, ge in rows(g):  # (channels last)
                        ge = ge.reshape(-1, ge.shape[-1])
                        moment = (ge.T @ ge if path in full else ge.pow(2).sum(0)).cpu()  # (beside the input statistics)
                        sens[path, e] = sens[path, e] + moment if (path, e) in sens else moment
                energy += batch_energy
            outputs.clear()
            n += 1
    finally:
        restore()
    paths = sorted(grams)
    if finish_pass(n, [st for path in paths for st in grams[path]], distributed, group) and sensitivity:
        for path in paths:  # (every expert's, in one order on every process: zeros where no token came)
            size = stacks[path].shape[2 if _stack_rows(stacks[path]) else 1]
            for e in range(len(grams[path])):
                moment = sens.get((path, e), torch.zeros((size, size) if path in full else (size,), dtype=torch.float64))
                all_reduce_sum(moment, group)
                sens[path, e] = moment
        total = torch.tensor([energy], dtype=torch.float64)
        all_reduce_sum(total, group)
        energy = float(total.item())
    measured = bool(sensitivity) and energy > 0

    def site(path: str, e: int, st: Any) -> Any:
        moment = sens.get((path, e))
        return SiteStats(st, moment, energy, unreached=measured and (moment is None or not bool(moment.any())))

    out = {path: [site(path, e, st) if st.count else None for e, st in enumerate(stats)] for path, stats in grams.items()}
    if notes is not None:
        for path in padded:
            notes[path] = "; ".join(filter(None, [notes.get(path), "padding tokens counted (grouped_mm sorts the tokens by expert)"]))
    return {path: stats for path, stats in out.items() if any(st is not None for st in stats)}


_SAME_ROWS = {"to", "_to_copy", "alias", "contiguous", "clone", "type", "float", "bfloat16", "half"}


def _row_gather(x: fx.Node) -> fx.Node | None:
    """The node gathering ``x``'s rows by one index tensor (``h[tok]``), through casts and copies."""
    while x.op in ("call_function", "call_method") and x.args and isinstance(x.args[0], fx.Node) and _op_name(x) in _SAME_ROWS:
        x = x.args[0]
    return x if tensor_index(x) is not None else None


def _real_rows(gathered: tuple[torch.Tensor, int] | None, mask: torch.Tensor) -> torch.Tensor | None:
    """Which rows of a grouped product are real tokens: the token index its rows were gathered
    by, read in the flattened (token-major) mask; None where that cannot be told."""
    if gathered is None:
        return None
    index, source_rows = gathered
    if not (isinstance(index, torch.Tensor) and index.dim() == 1 and not index.is_floating_point()
            and index.dtype != torch.bool and source_rows == mask.numel()):  # fmt: skip
        return None
    return mask.reshape(-1).to(index.device)[index]


def _stack_rows(s: StackedWeight) -> bool:
    return _reads(s)[0].rows


def _selected(path: str, config: LRDConfig, model: nn.Module, gm: fx.GraphModule) -> str:
    if config.include is not None and not any(fnmatch.fnmatchcase(path, p) for p in config.include):
        return "not matched by include"
    if any(fnmatch.fnmatchcase(path, p) for p in config.exclude):
        return "matched by exclude"
    if not issubclass(nn.Linear, tuple(config.layer_types)):
        return "Linear not in layer_types (a stack of experts is one linear layer per expert)"
    if config.filter_fn is not None:
        owner = path.rpartition(".")[0]
        module = None
        for root in (model, gm):  # the user's own module where it has one (an export graph's are plain modules)
            try:
                module = root.get_submodule(owner) if owner else root
                break
            except AttributeError:
                continue
        if not config.filter_fn(module, path):
            return "filter_fn returned False"
    return ""


def _global_reason(config: LRDConfig, s: StackedWeight | None = None) -> str:
    """Why a speed mode (``latency``, ``target_speedup``) keeps the stack ``s`` ("" for the
    other modes, and for a stack the search can time: `_probe_size`)."""
    given = next((k for k in ("target_speedup", "latency") if getattr(config, k) is not None), None)
    if given is None or s is None or _probe_size(s) is not None:
        return ""
    search = "global speed search (target_speedup)" if given == "target_speedup" else "latency search"
    return (f"stacked experts read in more than one form, or at sizes the example does not tell, are not timed by the "
            f"{search}: kept whole; for them to shrink, use a per-layer rank rule (ratio, fixed, energy) or a parameter "
            "budget (target_params), or experts='keep' to leave them")  # fmt: skip


def _concrete_shape(node: fx.Node) -> tuple[int, ...] | None:
    """``node``'s shape as the example ran it: `fxlrd.planner.input_shapes`' record, else the
    capture's (a symbolic size by its hint, where export recorded one)."""
    meta = node.meta.get("tensor_meta")
    if meta is not None and hasattr(meta, "shape"):
        return tuple(int(d) for d in meta.shape)
    shape = _shape(node)
    if shape is None:
        return None
    sizes = [d if isinstance(d, int) else getattr(getattr(d, "node", None), "hint", None) for d in shape]
    return None if any(d is None for d in sizes) else tuple(int(d) for d in sizes)


def _probe_size(s: StackedWeight) -> tuple[int, int, int, bool, bool, bool] | None:
    """``(rows, d_in, d_out, x_left, transposed, grouped)`` of the stack's product as the
    example ran it, when the latency search can time it (`_StackProbe`: every read one form,
    at one size: a gather per row, ``bmm``, of one vector per row, or a ``grouped_mm``), else
    None."""
    reads = _reads(s)
    forms = set()
    for r in reads:
        shape = _concrete_shape(r.x)
        grouped = r.offs is not None
        if shape is None or len(shape) != (2 if grouped else 3) or shape[0] < 1:
            return None
        if not grouped and shape[1 if r.x_left else 2] != 1:
            return None
        forms.add((shape[0], r.rows, r.x_left, r.x_left != r.rows, grouped))
    if len(forms) != 1:
        return None
    ((rows, input_rows, x_left, transposed, grouped),) = forms
    d_in = _input_size(s, input_rows)
    return rows, d_in, s.shape[1] + s.shape[2] - d_in, x_left, transposed, grouped


class _StackProbe(nn.Module):
    """A stack's product as a mixture runs it, for the latency search: ``x`` (rows, d_in) by the
    stack ``(E, m, n)`` read as the model reads it (``x_left``, ``transposed``), dense or as its
    two factors at ``rank``, as `factorize_experts` rewrites it: gathered per row by ``index``
    (``batched_mm``), or by expert groups ending at ``index`` (``grouped_mm``). The index is a
    forward input, so that no backend folds the gather away; the values are random (the time
    depends on the shapes, and on the routing: ``routing`` names the index it is timed with, for
    the cache key)."""

    def __init__(self, experts: int, m: int, n: int, rank: int | None, x_left: bool, transposed: bool,
                 dtype: torch.dtype, device: str = "cpu", grouped: bool = False, routing: str = "even"):  # fmt: skip
        super().__init__()
        self.form = (experts, m, n, rank, x_left, transposed, grouped)
        self.routing = routing
        dims = [m, n] if rank is None else [m, rank, n]
        g = torch.Generator().manual_seed(0)
        make = ((lambda a, b: torch.empty(experts, a, b, dtype=dtype, device=device)) if device == "meta" else
                (lambda a, b: (torch.randn(experts, a, b, generator=g) / a**0.5).to(dtype)))  # fmt: skip
        self.mats = nn.ParameterList(nn.Parameter(make(a, b)) for a, b in zip(dims, dims[1:]))

    def forward(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        grouped = self.form[6]
        mats = list(self.mats) if grouped else [mat[index] for mat in self.mats]
        if self.form[5]:  # (P.mT = Rᵀ Lᵀ)
            mats = [mat.transpose(1, 2) for mat in reversed(mats)]
        if grouped:  # (x @ P, each expert's rows)
            for mat in mats:
                x = torch.nn.functional.grouped_mm(x, mat, offs=index)
            return x
        if self.form[4]:  # x @ P
            h = x.unsqueeze(1)
            for mat in mats:
                h = torch.bmm(h, mat)
            return h.squeeze(1)
        h = x.unsqueeze(-1)  # P @ x
        for mat in reversed(mats):
            h = torch.bmm(mat, h)
        return h.squeeze(-1)

    def extra_repr(self) -> str:
        e, m, n, rank, x_left, transposed, grouped = self.form
        stack = "P.mT" if transposed else "P"
        read = (f"grouped_mm(x, {stack}, offs)" if grouped else
                ("x @ " if x_left else "") + f"{stack}[ids]" + ("" if x_left else " @ x"))  # fmt: skip
        return f"experts={e}, {m}x{n}, rank={rank}, {read}, its index an input, routed {self.routing}"

    @staticmethod
    def index(rows: int, experts: int, grouped: bool) -> torch.Tensor:
        """The rows spread evenly over the experts: each row's expert, or where each expert's rows end."""
        if not grouped:
            return torch.arange(rows) % experts
        sizes = torch.full((experts,), rows // experts) + (torch.arange(experts) < rows % experts)
        return torch.cumsum(sizes, 0).to(torch.int32)


def _probe_timer(s: StackedWeight, weight: torch.Tensor, searcher: Any, routing: torch.Tensor | None = None) -> tuple[Any, str]:
    """``rank -> seconds`` of one product of the stack ``s`` (None: dense) timed alone on the
    search's backend (`_StackProbe`, cached) at the example's rows, routed as the example routed
    them (``routing``, `example_routing`) or else spread evenly over the experts; and what was
    timed, for the record."""
    rows, d_in, d_out, x_left, transposed, grouped = _probe_size(s)
    e, m, n = s.shape
    index, experts, how = _probe_index(routing, rows, e, grouped)

    probe = functools.partial(_StackProbe, experts, m, n, x_left=x_left, transposed=transposed, dtype=weight.dtype,
                              grouped=grouped, routing=how)  # fmt: skip

    def timed(r: int | None) -> float:
        inputs = (torch.randn(rows, d_in).to(weight.dtype), index)
        return searcher.cache.timed(searcher._key(probe(r, device="meta"), (rows, d_in)),
                                    lambda: searcher.timer.time_inputs(probe(r), inputs))  # fmt: skip

    spread = "spread evenly" if how == "even" else f"as the example routed them, {how.split(' #')[0]}"
    return timed, f"its product timed alone ({rows} rows over {experts} experts, {spread}, {d_in}->{d_out})"


def _probe_index(routing: torch.Tensor | None, rows: int, e: int, grouped: bool) -> tuple[torch.Tensor, int, str]:
    """The probe's index, its number of experts and how it routes: the example's ``routing``
    (each row's expert, or where each expert's rows end) over the experts it reached, renumbered
    (the experts no row reached are not read: the time is the same without them), else the rows
    spread evenly over ``min(e, rows)`` experts."""
    if routing is not None:
        if grouped:
            sizes = torch.diff(routing.long(), prepend=routing.new_zeros(1).long())
            sizes = sizes[sizes > 0]
            if len(sizes) and int(sizes.sum()) <= rows:
                index, counts = torch.cumsum(sizes, 0).to(torch.int32), sizes
                return index, len(sizes), _routing_name(counts, index)
        elif routing.numel() == rows:  # (a negative id picks from the end, as P[ids] reads it)
            used, index = torch.unique(routing.flatten() % e, return_inverse=True)
            return index, len(used), _routing_name(torch.bincount(index), index)
    experts = min(e, rows)
    return _StackProbe.index(rows, experts, grouped), experts, "even"


def _routing_name(counts: torch.Tensor, index: torch.Tensor) -> str:
    """``"1-19 rows each #<hash>"``: the spread for the record, the hash of the exact index for the cache key."""
    import hashlib

    digest = hashlib.sha1(index.to(torch.int64).numpy().tobytes()).hexdigest()[:12]
    return f"{int(counts.min())}-{int(counts.max())} rows each #{digest}"


def example_routing(gm: fx.GraphModule, stacks: Iterable[StackedWeight], inputs: Any) -> dict[str, torch.Tensor]:
    """Per stack, how the example routed the rows of its (first) product: each row's expert
    (``batched_mm``), or where each expert's rows end (``grouped_mm``), from one real forward
    in eval mode without gradients (`fxlrd.capture.state_kept`: nothing of the model changes).
    Empty where that forward fails: the searches then spread the rows evenly."""
    from .calibrate import EvalInterpreter
    from .capture import flat_inputs, state_kept

    wanted: dict[fx.Node, list[str]] = {}  # (stacks may share their index: a layer's up and down)
    for s in stacks:
        reads = _reads(s)
        if reads:
            wanted.setdefault(reads[0].offs if reads[0].offs is not None else reads[0].ids, []).append(s.path)
    wanted.pop(None, None)
    seen: dict[str, torch.Tensor] = {}

    class Recorder(EvalInterpreter):  # (an export graph captured in training mode: no dropout noise)
        def run_node(self, node: fx.Node) -> Any:
            out = super().run_node(node)
            if node in wanted and isinstance(out, torch.Tensor):
                for path in wanted[node]:
                    seen.setdefault(path, out.detach().flatten().cpu().clone())
            return out

    if not wanted:
        return {}
    try:
        values = flat_inputs(gm, inputs)
        with state_kept(gm, values):
            gm.eval()
            Recorder(gm).run(*values)
    except Exception:  # noqa: BLE001  (the example does not run for real here: even routing, as before)
        return {}
    return seen


def _untimed(exc: Exception, backend: str, search: str = "latency search") -> str:
    return f"the {search} could not time its product on {backend} ({type(exc).__name__}: {exc}): kept"


def _searched_rank(s: StackedWeight, weight: torch.Tensor, rank: int, config: LRDConfig, searcher: Any,
                   routing: torch.Tensor | None = None) -> tuple[int | None, dict]:  # fmt: skip
    """Algorithm 1 for a stack (`fxlrd.ranks.search`): its product and each candidate rank in
    ``[ceil((1 - window)·rank), rank]`` (multiples of the search's quantum, and ``rank``, at
    least ``min_rank``, aligned for grouped_mm) timed alone at the example's rows, routed as the
    example routed them (`_probe_timer`); the largest as fast as the fastest, or None where the dense stack is
    faster, or where the backend cannot run the product (torch.onnx cannot export grouped_mm).
    Past the search's time budget, ``rank`` quantized. Also the search's record."""
    from .ranks.search import SearchResult, select_ranks

    cfg = config.latency
    e, m, n = s.shape
    align = alignment(s, weight.dtype)
    if searcher.over_budget:
        quantized = _aligned(max(1, quantize_rank(rank, cfg.quantum)), align, min(m, n))
        note = f"time budget of {cfg.time_budget_s:g} s spent: data-free quantized rank"
        return quantized, SearchResult((quantized,), None, note=note).record(cfg.backend)
    low = max(1, config.min_rank, math.ceil((1 - cfg.window) * rank))
    candidates = sorted({_aligned(r, align, min(m, n)) for r in range(low, rank + 1) if r % cfg.quantum == 0} | {rank})
    timed, what = _probe_timer(s, weight, searcher, routing)
    try:
        original = timed(None)
        timings = {(r,): timed(r) for r in candidates}
    except Exception as exc:  # noqa: BLE001  (the backend cannot run the product: kept, and said why)
        return None, SearchResult(None, None, note=_untimed(exc, cfg.backend)).record(cfg.backend)
    chosen = select_ranks(original, timings, cfg.tolerance)
    note = what + ("" if chosen is not None else f"; the dense stack is faster ({original * 1e3:.3f} ms vs "
                   f"{min(timings.values()) * 1e3:.3f} ms): kept")  # fmt: skip
    return (None if chosen is None else chosen[0]), SearchResult(chosen, original, timings, note).record(cfg.backend)


def _aligned(rank: int, align: int, cap: int) -> int:
    """``rank`` rounded up to a multiple of ``align``, at most ``cap`` (full rank)."""
    return min(cap, -(-rank // align) * align)


def _rank(weight: torch.Tensor, config: LRDConfig, align: int = 1) -> tuple[int | None, str]:
    """The stack's rank by the config's per-layer rule (a multiple of ``align`` below full
    rank, `alignment`), or None and why it is kept."""
    e, m, n = weight.shape
    if config.rank_rule == "ratio":
        rank = svd_rank_for_ratio(n, m, config.ratio)
    elif config.rank_rule == "fixed":
        rank = config.rank if isinstance(config.rank, int) else config.rank[0]
    elif config.rank_rule == "energy":  # one rank for the stack: the energy of its weights kept over all experts together
        values = torch.linalg.svdvals(weight.detach().double()).T.reshape(-1, e)  # rank-major, expert-minor
        rank = energy_rank(values.pow(2).sum(1).sqrt(), config.energy)
    else:
        return None, f"rank_rule={config.rank_rule!r} does not apply to stacked experts (use ratio, fixed or energy): kept"
    cap = min(m, n)
    rank = min(rank, cap)
    if rank < cap:
        rank = _aligned(quantize_rank(rank, config.rank_quantum), align, cap)
    if rank < config.min_rank:
        return None, f"rank {rank} below min_rank={config.min_rank}: kept"
    if rank * (m + n) >= m * n and not config.allow_larger:
        return None, f"rank {rank} factors would hold at least the weight's {m * n} parameters per expert: kept"
    return rank, ""


def _check_finite(weight: torch.Tensor, path: str) -> None:
    if not torch.isfinite(weight).all():
        raise ValueError(f"stacked weight {path!r} has NaN or infinite values; decomposing it would spread them. "
                         f"Fix the weights or leave it out with LRDConfig(exclude=[{path!r}])")  # fmt: skip


def _allocated(config: LRDConfig) -> bool:
    """Whether the config sizes the stacks beside the layers (`StackTask`): by a parameter
    budget alone (``target_params`` or ``allocation="global"``, no latency search), or in the
    global speed mode (``target_speedup``), which times them too."""
    sized = config.target_params is not None or config.allocation == "global"
    return config.target_speedup is not None or (sized and config.latency is None)


@dataclass
class StackTask:
    """A stacked weight the global allocation sizes beside the layers (`fxlrd.planner`): keep
    it, or factorize it at a rank, each option with its parameters and its error in the units
    the allocation weighs a layer's (`error_curve`); under a speed target, with its time too
    (`speed_options`)."""

    record: dict[str, Any]
    weight: torch.Tensor
    stats: list[Any] | None
    rows: bool
    align: int
    stack: StackedWeight | None = None  # (the speed search times its product)
    routing: torch.Tensor | None = None  # (routed so: `example_routing`)
    _svd: tuple[torch.Tensor, ...] | None = field(default=None, repr=False, compare=False)

    def options(self, quantum: int, min_rank: int = 1) -> dict[int | None, tuple[float, float]]:
        """Keep (``None``), or each rank (the ranks below ``quantum`` and its multiples, rounded
        up to `alignment`) that shrinks the stack and is at least ``min_rank``: ``(params, error)``."""
        m, n = self.record["shape"]
        cap, curve = min(m, n), error_curve(self.weight, self.stats, self.rows)
        ranks = self._ranks(sorted({*range(1, min(quantum, cap + 1)), *range(quantum, cap + 1, quantum)}), min_rank)
        return {None: (float(self.params(None)), 0.0), **{r: (float(self.params(r)), curve(r)) for r in ranks}}

    def _ranks(self, ranks: Iterable[int], min_rank: int) -> list[int]:
        """``ranks`` rounded up to `alignment`, those that shrink the stack and are at least ``min_rank``."""
        m, n = self.record["shape"]
        aligned = dict.fromkeys(_aligned(r, self.align, min(m, n)) for r in ranks)
        return [r for r in aligned if r >= min_rank and r * (m + n) < m * n]

    def speed_options(self, ratio: float, quantum: int, searcher: Any, min_rank: int = 1) -> dict[int | None, tuple[float, float]]:
        """For the global speed search: keep (``None``), or each of a dozen ranks around the
        rank ``ratio`` gives (R/4 to 2R, as a layer's, rounded up to `alignment`) that shrinks
        the stack and is at least ``min_rank``: ``(seconds, error)``, the seconds those of its
        products timed alone (`_probe_timer`). Where the backend cannot run them, keep alone
        (its time unknown, counted as 0), the reason in the record."""
        from .methods.base import _scaled

        m, n = self.record["shape"]
        cap, calls = min(m, n), len(_reads(self.stack))
        timed, what = _probe_timer(self.stack, self.weight, searcher, self.routing)
        ranks = self._ranks(_scaled(min(cap, svd_rank_for_ratio(n, m, ratio)), cap, quantum), min_rank)
        try:
            times = {r: timed(r) * calls for r in [None, *ranks]}
        except Exception as exc:  # noqa: BLE001  (the backend cannot run the product: kept, and said why)
            self.record["reason"] = _untimed(exc, searcher.timer.backend, "global speed search")
            return {None: (0.0, 0.0)}
        curve = error_curve(self.weight, self.stats, self.rows)
        opts = {r: (t, 0.0 if r is None else curve(r)) for r, t in times.items()}
        self.record["latency"] = {"backend": searcher.timer.backend, "original_ms": times[None] / calls * 1e3,  # (one call's)
                                  "candidates_ms": [[[r], t / calls * 1e3, err] for r, (t, err) in opts.items() if r is not None],
                                  "note": f"{what}{f', {calls} calls' if calls > 1 else ''}"}  # fmt: skip
        return opts

    def params(self, rank: int | None) -> int:
        e, (m, n) = self.record["experts"], self.record["shape"]
        return e * m * n if rank is None else e * rank * (m + n)

    def trial_factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Data-free factors at ``rank`` for a trial of the speed search (one SVD per stack, each
        rank a slice of it): the trial's routers then route about as the model's will."""
        if self._svd is None:  # (freed by the search when it is done: `trial_stacks` callers)
            self._svd = torch.linalg.svd(self.weight.detach().to(torch.promote_types(self.weight.dtype, torch.float32)),
                                         full_matrices=False)  # fmt: skip
        u, s, vh = self._svd
        root = s[:, :rank].sqrt()
        return (u[:, :, :rank] * root[:, None, :]).to(self.weight.dtype), (root[:, :, None] * vh[:, :rank]).to(self.weight.dtype)

    def fill(self, rank: int | None, why: str = "global allocation: kept (least error for the budget)") -> None:
        """Record the allocation's choice (None: kept, for ``why``)."""
        if "latency" in self.record:
            self.record["latency"]["chosen"] = None if rank is None else [rank]
        if rank is None:
            self.record["reason"] = self.record["reason"] or why
            return
        _record_rank(self.record, self.weight, rank, self.stats, self.rows)


def trial_stacks(gm: fx.GraphModule, tasks: Sequence[StackTask], ranks: Sequence[int | None]) -> None:
    """Factorize ``gm``'s stacks of ``tasks`` at ``ranks`` (None: kept), in place, data-free
    (`StackTask.trial_factors`): a trial of the global speed search, timed and thrown away. Not
    zeros: the time depends on the routing too, which the experts' outputs steer."""
    chosen = [(t, r) for t, r in zip(tasks, ranks) if r is not None]
    if chosen:  # (gm as the model: no user module is needed to find them)
        factorize_experts(gm, gm, [{**t.record, "rank": r} for t, r in chosen],
                          factors={t.record["weight"]: t.trial_factors(r) for t, r in chosen})  # fmt: skip


def _record_rank(rec: dict[str, Any], weight: torch.Tensor, rank: int, stats: list[Any] | None, rows: bool) -> None:
    e, (m, n) = rec["experts"], rec["shape"]
    *_, error = _factors(weight, rank, stats, rows)
    rec.update(rank=rank, params_after=e * rank * (m + n), data_aware=stats is not None, error=error)
    if stats is not None:
        rec["calibrated_experts"] = sum(x is not None for x in stats)


def plan_experts(model: nn.Module, gm: fx.GraphModule, config: LRDConfig, calibration: Iterable | None = None, *,
                 progress: bool = True, example: Any = None) -> tuple[list[dict[str, Any]], dict[str, list[Any]], list[StackTask]]:  # fmt: skip
    """One record per stacked weight: ``weight`` (path), ``experts``, ``shape`` ``[m, n]``,
    ``rank`` (None when kept), ``reason``, ``params_before``/``params_after`` and, when
    factorized, ``data_aware``, ``error`` (the relative error of the stack's truncation: of its
    outputs on the calibration inputs when data-aware, weighed by the model's output
    sensitivity where known, else of its weights), ``note`` (why a
    stack stays data-free despite calibration) and, data-aware, ``calibrated_experts`` (how
    many experts calibration tokens reached). Also the experts' statistics (`expert_stats`,
    with the config's output sensitivity) of the stacks to factorize, when ``calibration`` is
    given, and, under a parameter budget or a speed target (`_allocated`), the `StackTask` of
    each stack the allocation sizes (its record's rank is then set by `StackTask.fill`)."""
    stacks = find_stacked(model, gm)
    allocate = _allocated(config)
    out, ranks, chosen = [], {}, []
    searcher = None  # (the latency search's, made for the first stack it times)
    searched = config.latency is not None and not allocate and config.experts != "keep"
    timed = searched or (config.target_speedup is not None and config.experts != "keep")
    routing: dict[str, torch.Tensor] = {}
    if timed and example is not None and any(not s.reason for s in stacks.values()):
        from .planner import input_shapes

        input_shapes(gm, example)  # (each product's rows, for the latency search: no compute)
        routing = example_routing(gm, [s for s in stacks.values() if not s.reason and _probe_size(s)], example)
    for s in stacks.values():
        e, m, n = s.shape
        rec: dict[str, Any] = dict(weight=s.path, experts=e, shape=[m, n], rank=None, params_before=e * m * n,
                                   params_after=e * m * n, reason=s.reason)  # fmt: skip
        out.append(rec)
        if not rec["reason"] and config.experts == "keep":
            rec["reason"] = "experts='keep'"
        if rec["reason"]:
            continue
        weight = _get_attr(gm, s.path)
        why = _selected(s.path, config, model, gm) or _global_reason(config, s)
        if not why and weight.is_meta:
            why = "weights on the meta device (not loaded): kept"
        if not why and (allocate or config.rank_rule == "energy"):  # (its rank reads the spectrum)
            _check_finite(weight, s.path)
        if allocate and not why:
            chosen.append(rec)
            continue
        if not why and searched:  # (`_global_reason` let it through: the search's target, unquantized as a layer's)
            from .ranks.search import RankSearcher

            rank, why = _rank(weight, dataclasses.replace(config, rank_quantum=1), alignment(s, weight.dtype))
            if rank is not None:
                searcher = searcher or RankSearcher(config.latency)
                rank, rec["latency"] = _searched_rank(s, weight, rank, config, searcher, routing.get(s.path))
                searcher.cache.flush()
                why = "" if rank is not None else rec["latency"]["note"]
        elif not why:
            rank, why = _rank(weight, config, alignment(s, weight.dtype))
        else:
            rank = None
        if rank is not None:
            _check_finite(weight, s.path)
        if rank is None:
            rec["reason"] = why
        else:
            ranks[s.path] = rank
    stats, notes = {}, {}
    wanted = [*ranks, *(r["weight"] for r in chosen)]
    if calibration is not None and wanted:
        stats = expert_stats(gm, {p: stacks[p] for p in wanted}, calibration, progress=progress, notes=notes,
                             sensitivity=config.sensitivity, sensitivity_matrix=config.sensitivity_matrix)  # fmt: skip
    tasks = []
    for rec in out:
        path = rec["weight"]
        if path not in wanted:
            continue
        st, rows = stats.get(path), path in stats and _stack_rows(stacks[path])
        weight = _get_attr(gm, path)
        if path in ranks:
            _record_rank(rec, weight, ranks[path], st, rows)
        else:
            tasks.append(StackTask(rec, weight, st, rows, alignment(stacks[path], weight.dtype), stacks[path],
                                   routing.get(path)))  # fmt: skip
        if st is not None and all(x is None or x.unreached for x in st):
            rec["note"] = "the sensitivity target does not depend on its output: its error costs nothing there"
        elif st is not None and path in notes:
            rec["note"] = notes[path]
        elif st is None and calibration is not None:
            reads = _reads(stacks[path])
            rec["note"] = ("data-free: its products take their inputs on different modes of the stack"
                           if len({r.rows for r in reads}) > 1 else "data-free: no calibration token reached its experts")  # fmt: skip
    return out, stats, tasks


def _expert_matrix(weight: torch.Tensor, e: int, st: Any, rows: bool) -> tuple[torch.Tensor, Any, Any]:
    """Expert ``e``'s matrix as a layer, ``(out, in)`` in float64 (``rows``: the stack's rows are
    its input mode), as data-aware methods decompose it with its statistics ``st`` (None: as it
    is): ``(matrix, whitening, output weights)`` (`fxlrd.methods.base.data_aware_weight`)."""
    from .methods.base import data_aware_weight

    w = weight[e].detach().double().cpu()  # (the statistics live on the CPU)
    return data_aware_weight(w.T if rows else w, st if st is not None and st.count else None)


def _weighted(stats: Sequence[Any] | None) -> bool:
    """Whether the experts' errors are in the units of the model's output (sensitivity measured:
    known, or found to be nothing where the model's outputs do not depend on an expert)."""
    from .methods.base import output_weights

    return stats is not None and any(st is not None and st.count and (output_weights(st) is not None or st.unreached)
                                     for st in stats)  # fmt: skip


def _scale(st: Any, weighted: bool, out_w: Any) -> float:
    """An expert's tail energies, as they sum over the stack: in the model's output units when
    ``weighted`` (an expert the model's outputs do not reach costs nothing), else per sample,
    times its samples."""
    if weighted:
        return 1.0 if out_w is not None else 0.0
    return float(st.count)


def _factors(weight: torch.Tensor, rank: int, stats: Sequence[Any] | None = None,
             rows: bool = False) -> tuple[torch.Tensor, torch.Tensor, float]:  # fmt: skip
    """Each expert's factors at ``rank``, √Σ on each side: ``(E, m, r)``, ``(E, r, n)``, and the
    stack's relative error: of the weights (truncated SVD), or with ``stats`` (one per expert,
    None for an expert without calibration inputs) of the outputs on the calibration inputs
    (whitened SVD over the input mode: ``rows``, the stack's rows, else its columns; output
    channels weighed by the model's sensitivity where known), each expert's error weighed by
    its share of the samples (or, with sensitivity, by what it costs the model's output)."""
    from .decompose import svd_factors
    from .methods.base import tail_sums, unweigh_output, unwhiten_input

    if stats is None:
        u, s, vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)
        root = s[:, :rank].sqrt()
        left = u[:, :, :rank] * root[:, None, :]
        right = root[:, :, None] * vh[:, :rank, :]
        total = s.pow(2).sum()
        error = float((1 - s[:, :rank].pow(2).sum() / total.clamp_min(1e-300)).clamp_min(0).sqrt())
        return left.to(weight.dtype), right.to(weight.dtype), error
    lefts, rights, lost, whole = [], [], [0.0, 0.0], [0.0, 0.0]  # (in the allocation's units, and per sample)
    weighted = _weighted(stats)
    for e in range(weight.shape[0]):
        st = stats[e]
        m, white, out_w = _expert_matrix(weight, e, st, rows)
        f = svd_factors(m, rank)
        out_f, in_f = unweigh_output(f.out_factor, out_w), f.in_factor
        if white is not None:
            in_f = unwhiten_input(in_f, white)
            tail = tail_sums(torch.linalg.svdvals(m))
            for i, scale in enumerate((_scale(st, weighted, out_w), float(st.count))):
                lost[i], whole[i] = lost[i] + scale * float(tail[rank]), whole[i] + scale * float(tail[0])
        left, right = (in_f.T, out_f.T) if rows else (out_f, in_f)
        lefts.append(left)
        rights.append(right)
    i = 0 if whole[0] > 0 else 1  # (no expert the model's outputs depend on: the whitened error, per sample)
    error = (lost[i] / whole[i]) ** 0.5 if whole[i] > 0 else float("nan")
    return torch.stack(lefts).to(weight.dtype), torch.stack(rights).to(weight.dtype), error


def error_curve(weight: torch.Tensor, stats: Sequence[Any] | None = None, rows: bool = False) -> Any:
    """``rank -> squared error`` of the stack factorized at that rank, in the units the global
    allocation weighs a linear layer's (`fxlrd.methods.base.Method.error_curve`): relative to
    the stack's weights (data-free) or its outputs on the calibration inputs (data-aware), or,
    with the model's output sensitivity, in units of its relative squared output error."""
    from .methods.base import tail_sums

    if stats is None:
        tails = torch.stack([tail_sums(v) for v in torch.linalg.svdvals(weight.detach().double())]).sum(0)
        total = float(tails[0]) or 1.0
        return lambda r: float(tails[min(r, len(tails) - 1)]) / total
    weighted = _weighted(stats)
    tails, total = None, 0.0
    for e, st in enumerate(stats):
        if st is None or not st.count:
            continue  # (no calibration output: nothing to lose on the calibration data)
        m, _, out_w = _expert_matrix(weight, e, st, rows)
        t = tail_sums(torch.linalg.svdvals(m)) * _scale(st, weighted, out_w)
        tails = t if tails is None else tails + t
    if tails is None or (weighted and not float(tails[0])):  # (nothing calibrated, or nothing the outputs depend on)
        return lambda r: 0.0
    total = 1.0 if weighted else (float(tails[0]) or 1.0)
    return lambda r: float(tails[min(r, len(tails) - 1)]) / total


_FULL_SENSITIVITY = 2**26  # numbers (512 MiB in float64): a stack's full output-sensitivity matrices beyond it are diagonal
_NO_VALUE = ("val", "tensor_meta", "example_value")  # meta describing a node's value: not the new inner nodes'


def _product(graph: fx.Graph, like: fx.Node, a: fx.Node, b: fx.Node) -> fx.Node:
    """``bmm(a, b)`` in the form of ``like`` (an aten, torch or method call)."""
    if like.op == "call_method":
        return graph.call_method("bmm", (a, b))
    return graph.call_function(like.target, (a, b))


def _replace_product(graph: fx.Graph, product: fx.Node, inner: fx.Node, new: fx.Node) -> None:
    """``product`` replaced by ``new`` (which multiplies by ``inner``): ``new`` takes its meta,
    ``inner`` all of it but what describes the value."""
    inner.meta = {k: v for k, v in product.meta.items() if k not in _NO_VALUE}
    new.meta = dict(product.meta)
    product.replace_all_uses_with(new)
    graph.erase_node(product)


def _rewrite(gm: fx.GraphModule, path: str, reads: list[fx.Node]) -> None:
    """Replace each product of ``P[ids]`` (or of its transpose) by the two products of the
    selected factors: ``P[ids] = L[ids] @ R[ids]`` and ``P[ids]ᵀ = R[ids]ᵀ @ L[ids]ᵀ``."""
    graph = gm.graph
    for sel in reads:
        if not _is_selection(sel, _param_of(sel)):
            _rewrite_grouped(gm, path, sel)
            continue
        uses, _ = _uses(sel)
        export = isinstance(sel.target, torch._ops.OpOverload)
        with graph.inserting_before(sel):
            picks = []
            for part in ("left", "right"):
                pick = graph.call_function(sel.target, (graph.get_attr(f"{path}.{part}"), *sel.args[1:]))
                pick.meta = {k: v for k, v in sel.meta.items() if k not in _NO_VALUE}
                picks.append(pick)
        flipped: dict[fx.Node, tuple[fx.Node, fx.Node]] = {}
        for use in uses:
            if use.transposed and use.operand not in flipped:
                with graph.inserting_before(use.operand):
                    flipped[use.operand] = tuple(
                        graph.call_function(aten.transpose.int if export else torch.transpose, (p, -2, -1))
                        for p in (picks[1], picks[0])
                    )  # fmt: skip
            first, second = flipped[use.operand] if use.transposed else picks  # first @ second is the operand
            product = use.product
            other = product.args[1 - use.side]
            with graph.inserting_before(product):
                if use.side == 0:
                    inner = _product(graph, product, second, other)
                    new = _product(graph, product, first, inner)
                else:
                    inner = _product(graph, product, other, first)
                    new = _product(graph, product, inner, second)
            _replace_product(graph, product, inner, new)
        for t in flipped:  # the transposes of the dense selection, now unused
            graph.erase_node(t)
        graph.erase_node(sel)
    for node in [n for n in graph.nodes if n.op == "get_attr" and n.target == path]:
        graph.erase_node(node)


def _rewrite_grouped(gm: fx.GraphModule, path: str, read: fx.Node) -> None:
    """Replace each ``grouped_mm(x, P, offs)`` a read of the stack feeds (``read``: the product,
    or a transpose of P) by ``grouped_mm(grouped_mm(x, L, offs), R, offs)``, and ``P.mT`` by
    ``R.mT`` then ``L.mT``."""
    graph = gm.graph
    param = _param_of(read)
    uses, _ = _grouped_uses(read, param)
    flipped = _is_last_transpose(read, param)  # (read: a transpose of P, erased after its products)
    for use in uses:
        product = use.product
        x, _, offs = _grouped_operands(product)
        export = isinstance(product.target, torch._ops.OpOverload)
        with graph.inserting_before(product):
            left, right = graph.get_attr(f"{path}.left"), graph.get_attr(f"{path}.right")
            if use.transposed:
                flip = aten.transpose.int if export else torch.transpose
                first, second = graph.call_function(flip, (right, -2, -1)), graph.call_function(flip, (left, -2, -1))
            else:
                first, second = left, right
            call = (lambda a, b: graph.call_function(product.target, (a, b, offs))) if export else \
                (lambda a, b: graph.call_function(product.target, (a, b), {"offs": offs}))  # noqa: E731
            inner = call(x, first)
            new = call(inner, second)
        _replace_product(graph, product, inner, new)
    if flipped:
        graph.erase_node(read)


def factorize_experts(model: nn.Module, gm: fx.GraphModule, records: Sequence[Mapping[str, Any]], *,
                      stats: Mapping[str, Sequence[Any]] | None = None, skeleton: bool = False,
                      factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> None:  # fmt: skip
    """Factorize ``gm``'s stacked weights as ``records`` (`plan_experts`) say, in place:
    data-aware where ``stats`` (`expert_stats`) has the stack's experts. ``skeleton``: zeros of
    the recorded ranks (`fxlrd.load` then reads the saved values); ``factors``: these, by path."""
    found = find_stacked(model, gm)
    for rec in records:
        if rec.get("rank") is None:
            continue
        path = rec["weight"]
        s = found.get(path)
        if s is None or list(s.shape) != [rec["experts"], *rec["shape"]] or s.reason:
            here = "not here" if s is None else (s.reason or f"of shape {tuple(s.shape)}")
            raise PlanMismatchError(f"the plan factorizes the stacked weight {path!r} ({rec['experts']}×"
                                    f"{'×'.join(map(str, rec['shape']))}); in this model it is {here}: apply the plan "
                                    "to the model it was made for")  # fmt: skip
        weight = _get_attr(gm, path)
        # (a plan edited by hand: at most full rank, and aligned for grouped_mm)
        rank = _aligned(min(int(rec["rank"]), *weight.shape[1:]), alignment(s, weight.dtype), min(weight.shape[1:]))
        if rank != rec["rank"] and isinstance(rec, dict):  # the record says what was built
            why = (f"the plan's rank {rec['rank']} built as {rank} ("
                   + ("above full rank" if int(rec["rank"]) > min(weight.shape[1:]) else
                      f"grouped_mm wants rows of 16 bytes: ranks in multiples of {alignment(s, weight.dtype)} "
                      f"in {str(weight.dtype).replace('torch.', '')}") + ")")  # fmt: skip
            rec.update(rank=rank, params_after=rec["experts"] * rank * sum(rec["shape"]),
                       note="; ".join(filter(None, [rec.get("note"), why])))  # fmt: skip
        if factors is not None and path in factors:
            left, right = factors[path]
            e, m, n = weight.shape
            if tuple(left.shape) != (e, m, rank) or tuple(right.shape) != (e, rank, n):
                raise ValueError(f"factors for {path!r} of shapes {tuple(left.shape)} and {tuple(right.shape)} do not "
                                 f"match its rank {rank} ({e}x{m}x{rank} and {e}x{rank}x{n}): pass factors at that rank")  # fmt: skip
            left, right = left.to(weight.dtype), right.to(weight.dtype)
        elif skeleton:
            e, m, n = weight.shape
            left = torch.zeros(e, m, rank, dtype=weight.dtype, device=weight.device)
            right = torch.zeros(e, rank, n, dtype=weight.dtype, device=weight.device)
        else:
            st = (stats or {}).get(path)
            left, right, _ = _factors(weight, rank, st, st is not None and _stack_rows(s))
            left, right = left.to(weight.device), right.to(weight.device)
        module = ExpertFactors(left, right).requires_grad_(weight.requires_grad)
        _drop_param(gm, path)
        set_submodule(gm, path, module)
        _rewrite(gm, path, s.reads)
    gm.graph.lint()
    gm.recompile()
