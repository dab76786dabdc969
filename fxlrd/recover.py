"""Recovery: re-estimate moved norms and refit merged weights after approximate merges, and
distil a compressed model to its original.

An approximate merge drops an activation from between two layers and moves a norm to the
narrow side; the moved norm has no statistics yet. Two tools, both on calibration batches:

- `reestimate_norms`: reset the running statistics of the moved norms (or all norms) and
  recompute them as a plain average over the batches;
- `refit_merged`: refit each merged layer by least squares so that, on the batches, it maps
  its actual input to what the unmerged model computed at that point (the output of the
  second layer of the pair), in graph order so each refit sees the earlier ones.

`reconstruct_mlps` trains each narrowed MLP block (`fxlrd.narrow`) alone, all its layers, to
reproduce the original block's output on the compressed model's own block inputs: local
gradient steps, no backward pass through the model. `distill` then trains the compressed
model toward the original's outputs (and optionally its decomposed layers' outputs) for a
few hundred steps, with any freezing policy.
"""

from __future__ import annotations

import itertools
import math
import numbers
import warnings
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn

from .errors import ConfigError
from .modes import eval_mode, saved_modes

if TYPE_CHECKING:
    from .freeze import SequentialFreezer

__all__ = ["reestimate_norms", "refit_merged", "merged_nodes", "distill", "DistillCurve", "output_loss", "reconstruct_mlps"]

_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


def merged_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """Nodes of layers made by `MergePass`, in graph order (read from the modules' records)."""
    return [n for n in gm.graph.nodes if n.op == "call_module" and getattr(gm.get_submodule(n.target), "fxlrd_merge", None)]


def _batches(batches: Iterable) -> list[tuple[tuple, dict]]:
    """Each batch as ``(args, kwargs)``, in the forms the rest of the API takes (a tensor, a
    tuple or list of positional inputs, as a DataLoader yields them, or a dict of keyword inputs)."""
    from .capture import normalize_inputs
    from .errors import ConfigError

    if isinstance(batches, (torch.Tensor, Mapping)):
        raise ConfigError("batches must be an iterable of inputs (a list of batches); wrap a single batch in a list")
    out = [normalize_inputs(b) for b in batches]
    if not out:
        raise ValueError("calibration needs at least one batch of inputs")
    return out


@torch.no_grad()
def reestimate_norms(gm: fx.GraphModule, batches: Iterable, which: str = "moved") -> list[str]:
    """Recompute running statistics of batch norms on ``batches`` (a cumulative average).

    Args:
        which: ``"moved"`` (norms moved by approximate merges) or ``"all"``.

    Returns the names of the norms re-estimated. The model's train/eval modes are restored.
    """
    if which not in ("moved", "all"):
        raise ValueError(f"which must be 'moved' or 'all', got {which!r}")
    names = [
        n.target for n in gm.graph.nodes
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target), _NORMS)
        and (which == "all" or getattr(gm.get_submodule(n.target), "fxlrd_moved", False))
    ]  # fmt: skip
    _reestimate(gm, names, _batches(batches))
    return names


def _reestimate(gm: nn.Module, names: Sequence[str], batches: Sequence[tuple[tuple, dict]]) -> None:
    """Reset and recompute the running statistics of the norms ``names``; the rest of the
    model runs in eval mode, and every module's mode and momentum are restored. A call that
    fails leaves the norms' statistics as they were."""
    restore_modes = saved_modes(gm)
    momenta, stats = {}, {}
    gm.eval()
    try:
        for name in dict.fromkeys(names):  # a norm called twice is listed twice: saved and reset once
            bn = gm.get_submodule(name)
            momenta[name] = bn.momentum
            stats[name] = {k: None if b is None else b.detach().clone() for k, b in bn._buffers.items()}
            bn.reset_running_stats()
            bn.momentum = None  # cumulative moving average: every batch counts the same
            bn.train()
        for args, kwargs in batches:
            gm(*args, **kwargs)
    except BaseException:
        with torch.no_grad():
            for name, saved in stats.items():
                bn = gm.get_submodule(name)
                for k, value in saved.items():
                    current = bn._buffers.get(k)
                    if value is None or current is None or current.shape != value.shape:
                        bn._buffers[k] = value
                    else:
                        current.copy_(value)
        raise
    finally:
        restore_modes()
        for name, momentum in momenta.items():
            gm.get_submodule(name).momentum = momentum


def _flatten_channels(t: torch.Tensor, conv: bool) -> torch.Tensor:
    """Conv activations (N, C, *spatial) or linear ones (..., C) → (C, samples)."""
    if conv:
        return t.transpose(0, 1).reshape(t.shape[1], -1)
    return t.reshape(-1, t.shape[-1]).T


@torch.no_grad()
def refit_merged(
    gm: fx.GraphModule, reference: nn.Module, batches: Sequence, ridge: float = 1e-4
) -> dict[str, dict[str, float]]:
    """Refit every merged layer of ``gm`` by ridge least squares against ``reference``.

    ``reference`` is the decomposed model before merging (same weights otherwise). For each
    merged layer M made from the pair (A, B), on the batches: X = M's input in ``gm``,
    T = B's output in ``reference``; ``M ← argmin ‖T − M X‖² + ridge·‖M‖²`` (with bias).
    A norm moved after M is then re-estimated and set to pass M's output through unchanged.

    Returns per merged layer the relative error ``‖T − M X‖ / ‖T‖`` before and after.

    Raises:
        ConfigError: ``reference`` is not the decomposed model before merging (it lacks a
            merged layer's second half as a module of its own, or that module never runs).
            Nothing in ``gm`` is changed then, nor when a batch fails.
    """
    batches = _batches(batches)
    pairs = []
    for node in merged_nodes(gm):
        layer = gm.get_submodule(node.target)
        info = layer.fxlrd_merge
        if info.get("exact"):
            continue
        try:
            source = reference.get_submodule(info["merged_from"][1])
        except AttributeError:
            source = None
        if source is None or any(True for _ in source.children()):
            raise ConfigError(
                f"refit_merged: the reference has no layer {info['merged_from'][1]!r} (the second of the pair merged "
                f"into {node.target!r}) as a module of its own; pass the decomposed model before merging: "
                "fxlrd.transform(model, LRDConfig(<the same settings>, merge=None, decompose_pointwise=False))"
            )
        pairs.append((node.target, layer, info, source))
    report = {}
    # what a refit changes: the merged layers, and the norms moved beside them (copies on the CPU)
    changed = [layer for _, layer, _, _ in pairs]
    changed += [gm.get_submodule(info["norm"]) for _, _, info, _ in pairs if info.get("norm")]
    saved = [({k: v.detach().to("cpu", copy=True) for k, v in m.state_dict().items()}, getattr(m, "bias", None))
             for m in changed]  # fmt: skip
    try:
        with eval_mode(gm, reference):
            for name, layer, info, source in pairs:
                report[name] = _refit_one(gm, reference, layer, info, source, batches, ridge)
    except BaseException:
        with torch.no_grad():  # a failed call leaves gm as it was
            for m, (state, bias) in zip(changed, saved):
                if "bias" in m._parameters:
                    m.bias = bias
                m.load_state_dict(state)
        raise
    return report


def _positions_read(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input positions a strided 1×1 conv reads (a merged layer taking a strided conv's
    place reads its input at full resolution, and writes every s-th position)."""
    stride = getattr(layer, "stride", (1,))
    if not isinstance(layer, nn.modules.conv._ConvNd) or all(s == 1 for s in stride):
        return x
    padding = layer.padding if isinstance(layer.padding, tuple) else (0,) * len(stride)
    if any(padding):
        mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
        x = F.pad(x, [p for p in reversed(padding) for _ in range(2)], mode=mode)
    return x[(slice(None), slice(None), *(slice(None, None, s) for s in stride))]


def _refit_one(gm: fx.GraphModule, reference: nn.Module, layer: nn.Module, info: dict, source: nn.Module,
               batches: Sequence, ridge: float) -> dict[str, float]:  # fmt: skip
    """`refit_merged` of one merged layer: its errors before and after."""
    conv = not isinstance(layer, nn.Linear)
    xs, ts = [], []
    h1 = layer.register_forward_hook(lambda m, i, o: xs.append(_flatten_channels(_positions_read(m, i[0]), conv).double()))
    h2 = source.register_forward_hook(lambda m, i, o: ts.append(_flatten_channels(o, conv).double()))
    try:
        for args, kwargs in batches:
            gm(*args, **kwargs)
            reference(*args, **kwargs)
    finally:
        h1.remove(), h2.remove()
    if not xs or not ts or sum(x.shape[1] for x in xs) != sum(t.shape[1] for t in ts):
        raise ConfigError(
            f"refit_merged: {info['merged_from'][1]!r} of the reference ran on {sum(t.shape[1] for t in ts)} "
            f"positions where the merged layer ran on {sum(x.shape[1] for x in xs)}; pass the decomposed "
            "model before merging: fxlrd.transform(model, LRDConfig(<the same settings>, merge=None, "
            "decompose_pointwise=False))"
        )
    x, t = torch.cat(xs, 1), torch.cat(ts, 1)
    xa = torch.cat([x, torch.ones(1, x.shape[1], dtype=x.dtype)], 0)  # bias row
    w_old = torch.cat([layer.weight.reshape(layer.weight.shape[0], -1).double(),
                       (layer.bias.double() if layer.bias is not None else torch.zeros(layer.weight.shape[0], dtype=x.dtype))[:, None]], 1)  # fmt: skip
    gram = xa @ xa.T
    gram += ridge * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
    w_new = torch.linalg.solve(gram, xa @ t.T).T
    err = lambda w: (torch.linalg.norm(t - w @ xa) / torch.linalg.norm(t)).item()  # noqa: E731
    before, after = err(w_old), err(w_new)
    if after >= before:
        return {"before": before, "after": after}
    layer.weight.copy_(w_new[:, :-1].reshape(layer.weight.shape))
    if layer.bias is None:
        layer.bias = nn.Parameter(torch.zeros(layer.weight.shape[0], dtype=layer.weight.dtype, device=layer.weight.device))
    layer.bias.copy_(w_new[:, -1])
    norm_name = info.get("norm")
    if info.get("placement") == "after" and norm_name and gm.get_submodule(norm_name).affine:
        bn = gm.get_submodule(norm_name)
        _reestimate(gm, [norm_name], batches)
        bn.weight.copy_(torch.sqrt(bn.running_var + bn.eps))
        bn.bias.copy_(bn.running_mean)
    return {"before": before, "after": after}


# -- distillation -----------------------------------------------------------------------------------
def _runner(model: nn.Module, train_mode: bool) -> Callable[..., Any]:
    """How distillation calls ``model``: itself, or, for a graph torch.export captured in
    training mode (its dropout and batch norms run as in training whatever ``model.eval()``
    says) outside ``train_mode``, an `EvalInterpreter` over it (no dropout noise, running
    statistics left alone; slower: node by node)."""
    from .capture import flat_inputs, training_ops

    if train_mode or not isinstance(model, fx.GraphModule) or not training_ops(model):
        return model
    from .calibrate import EvalInterpreter, _unflatten_outputs

    interpreter = EvalInterpreter(model)

    def run(*args: Any, **kwargs: Any) -> Any:
        return _unflatten_outputs(model, interpreter.run(*flat_inputs(model, (args, kwargs), "batch")))

    return run


def _leaves(out) -> list[torch.Tensor]:
    from torch.utils import _pytree as pytree

    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _masked(x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """``x``'s positions where ``keep`` (batch × sequence, bool) is set, when ``x`` has more
    dimensions than ``keep`` and its leading shape is ``keep``'s; ``x`` otherwise."""
    if keep is not None and x.dim() > keep.dim() and x.shape[: keep.dim()] == keep.shape:
        return x[keep]
    return x


def _out_channels(module: nn.Module) -> int | None:
    """A layer module's output channels (``nn.Linear``, a conv, Hugging Face's ``Conv1D``)."""
    for attr in ("out_features", "out_channels", "nf"):
        value = getattr(module, attr, None)
        if isinstance(value, int):
            return value
    weight = getattr(module, "weight", None)
    return int(weight.shape[0]) if isinstance(weight, torch.Tensor) and weight.dim() >= 2 else None


def _feature_pairs(gm: nn.Module, teacher: nn.Module) -> list[tuple[nn.Module, list[nn.Module], str]]:
    """``(student module, teacher layers, name)`` for ``features``: each decomposed layer whose
    container still computes the layer's output (no factor merged with a neighbour) beside the
    teacher's layer module of the same name (a compiled model's ``_orig_mod.`` prefix aside)
    when that is a linear or conv module, whose output is the layer's (a custom module calling
    ``F.linear`` may compute more). A `Factorized` container is never called itself (its factors
    are graph nodes of their own): its output is its last factor's. A fused sibling layer
    (``siblings=``, named in ``gm.fxlrd_plan``) is matched to its members in the teacher, whose
    outputs, concatenated in the fused order, are its target. A `ConfigError` when none is
    found."""
    from .errors import ConfigError
    from .factorized import Factorized

    def plain(name: str) -> str:
        return name.removeprefix("_orig_mod.")

    def is_layer(module: nn.Module | None) -> bool:
        return isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) or type(module).__name__ == "Conv1D"

    named = {plain(n): m for n, m in teacher.named_modules()}
    plan = getattr(gm, "fxlrd_plan", None)
    fused = {g["name"]: g["members"] for g in (plan.settings.get("fused") or [])} if plan is not None else {}
    pairs = []
    for name, container in gm.named_modules():
        if not isinstance(container, Factorized) or not len(container):
            continue
        layers = [named.get(m) for m in fused.get(plain(name), [plain(name)])]
        if not all(is_layer(layer) for layer in layers):
            continue
        children = list(container.children())
        if any(hasattr(c, "fxlrd_merge") for c in children) or _out_channels(children[-1]) != sum(map(_out_channels, layers)):
            continue
        pairs.append((children[-1], layers, plain(name)))
    if not pairs:
        raise ConfigError(
            "features=... matched no decomposed layer to a linear or conv module of the teacher by name (merged "
            "layers, and custom modules calling F.linear, have no layer output to match): distil without features"
        )
    return pairs


def _feature_loss(s_out: torch.Tensor, t_out: torch.Tensor, keep: torch.Tensor | None, name: str) -> torch.Tensor:
    """Relative MSE of a decomposed layer's output against the original layer's, on the same
    positions: the layouts are made one first (an export graph's addmm gives (B·S, C) where
    the original's Conv1D gives (B, S, C)), then padding is left out."""
    from .errors import ConfigError

    if s_out.shape != t_out.shape and s_out.numel() == t_out.numel() and s_out.shape[-1] == t_out.shape[-1]:
        s_out = s_out.reshape(t_out.shape)
    if s_out.shape != t_out.shape:
        raise ConfigError(
            f"features: {name!r} gives {tuple(s_out.shape)} where the teacher's layer gives {tuple(t_out.shape)}; "
            "distil without features"
        )
    s_out, t_out = _masked(s_out, keep), _masked(t_out, keep)
    return F.mse_loss(s_out, t_out) / t_out.pow(2).mean().clamp_min(1e-12)


def output_loss(student_out, teacher_out, kind: str = "auto", temperature: float = 1.0,
                mask: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """The distillation loss between two outputs (any structure of tensors, e.g. a ModelOutput).

    ``kind="kl"``: KL(teacher ‖ student) of the softmax over the last dimension, ×T² (classifier
    logits); ``"mse"``: mean squared error relative to the teacher's mean square (hidden states,
    embeddings); ``"auto"``: both for 2-D outputs (batch × features: a classifier's logits, for
    which the KL counts, or an embedding, a regression or a pooled output, whose errors the
    softmax cannot see — it ignores a shift of the whole row), MSE for the others.

    ``mask`` (e.g. a text model's ``attention_mask``, batch × sequence): outputs with more
    dimensions than the mask whose leading shape is the mask's are compared only where it is
    non-zero (padding tokens' outputs are unused, so they should not take the student's
    capacity); other outputs, and an all-zero mask, are compared whole. A 0/1 (or boolean)
    mask, as Hugging Face tokenizers give; an additive mask (0 / −inf) is not one. The shapes
    decide, so an output whose leading shape equals the mask's by chance is masked too.
    """
    s_leaves, t_leaves = _leaves(student_out), _leaves(teacher_out)
    if len(s_leaves) != len(t_leaves) or not s_leaves:
        raise ValueError(f"student and teacher outputs differ in structure ({len(s_leaves)} vs {len(t_leaves)} tensors)")
    keep = None if mask is None else mask.to(torch.bool)
    if keep is not None and not keep.any():
        keep = None
    total = s_leaves[0].new_zeros(())
    for s, t in zip(s_leaves, t_leaves):
        if kind not in ("auto", "kl", "mse"):
            raise ValueError(f"loss kind must be 'auto', 'kl' or 'mse', got {kind!r}")
        kinds = (("kl", "mse") if s.dim() == 2 and s.shape[-1] > 1 else ("mse",)) if kind == "auto" else (kind,)
        batch = s.shape[0] if s.dim() else 1
        if t.shape == s.shape:
            s, t = _masked(s, keep), _masked(t, keep)
        if "kl" in kinds:  # summed over the rest, divided by the batch: the same scale with or without a mask
            log_p = F.log_softmax(s / temperature, -1)
            log_q = F.log_softmax(t / temperature, -1)
            total = total + F.kl_div(log_p, log_q, log_target=True, reduction="sum") / batch * temperature**2
        if "mse" in kinds:
            total = total + F.mse_loss(s, t) / t.pow(2).mean().clamp_min(1e-12)
    return total


class DistillCurve(list):
    """`distill`'s training loss at every step (a list), with the held-out checks when it had
    ``validation`` batches: ``validation`` [(step, loss), ...] (step 0 is the start) and
    ``best_step``, the step whose parameters the model kept."""

    validation: list[tuple[int, float]]
    best_step: int | None

    def __init__(self) -> None:
        super().__init__()
        self.validation, self.best_step = [], None


def _count(name: str, value: Any, minimum: int = 1) -> int:
    """``value`` as an int ``>= minimum`` (any integral type but bool), or a `ConfigError`."""
    from .errors import ConfigError

    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ConfigError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _number(name: str, value: Any, minimum: float = 0.0, *, strict: bool = True) -> float:
    """``value`` as a finite float ``> minimum`` (``>=`` unless ``strict``), or a `ConfigError`."""
    from .errors import ConfigError

    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (value <= minimum if strict else value < minimum):
        raise ConfigError(f"{name} must be a number {'>' if strict else '>='} {minimum:g} (finite), got {value!r}")
    return float(value)


def _fits(model: nn.Module, args: tuple, kwargs: dict, what: str) -> None:
    """Refuse a batch that cannot be bound to ``model``'s forward, naming it (before any step)."""
    import inspect

    from .errors import ConfigError

    if "labels" in kwargs:  # a Hugging Face model takes them, and its loss would enter the distillation loss
        raise ConfigError(f"{what} holds labels: distillation takes the inputs only (the teacher gives the targets); "
                          "drop the 'labels' entry")  # fmt: skip
    try:
        signature = inspect.signature(model.forward)
    except (TypeError, ValueError):  # a forward without a readable signature: the call will tell
        return
    try:
        signature.bind(*args, **kwargs)
    except TypeError as exc:
        hint = ""
        if "too many positional arguments" in str(exc) or "were given" in str(exc) or "labels" in kwargs:
            hint = "; labels? distillation takes the inputs only (e.g. [x for x, _ in loader])"
        raise ConfigError(f"{what} does not fit the model's forward{signature}: {exc}{hint}") from None


def _batch_stream(batches: Iterable, steps: int, what: str) -> Iterator[tuple[int, Any]]:
    """``(index, batch)`` for ``steps`` steps, taken lazily: a re-iterable (a list, a
    DataLoader) is iterated again when it ends; a one-shot iterator is read once (its batches
    are not kept), and ends the stream early if it runs out."""
    from .errors import ConfigError

    one_shot = iter(batches) is batches
    taken = 0
    while taken < steps:
        before = taken
        for b in batches:
            yield taken, b
            taken += 1
            if taken == steps:
                return
        if taken == before:
            if taken == 0:
                raise ConfigError(f"distill needs at least one batch of inputs in {what}")
            return
        if one_shot:
            return


def _cosine_schedule(optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning rate from its initial value down to 0 over ``steps`` on a half cosine."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps)))


def distill(
    gm: nn.Module,
    teacher: nn.Module,
    batches: Iterable,
    *,
    steps: int = 100,
    lr: float = 1e-4,
    freeze: "str | Mapping[str, bool] | SequentialFreezer | None" = None,
    loss: "str | Callable[[Any, Any, Any], torch.Tensor]" = "auto",
    temperature: float = 1.0,
    features: bool | float = False,
    weight_decay: float = 0.0,
    schedule: str = "constant",
    train_mode: bool = False,
    skip_padding: bool = True,
    validation: Iterable | None = None,
    check_every: int | None = None,
    progress: bool = True,
) -> DistillCurve:
    """A short knowledge distillation of the compressed model ``gm`` to the original ``teacher``.

    Cycles over ``batches`` (inputs in the form of ``example_inputs``: tensor, tuple or dict)
    for ``steps`` Adam steps. The loss is `output_loss` between the two models' outputs
    (softmax KL and relative MSE for 2-D outputs such as classifier logits and embeddings,
    relative MSE for hidden states), plus,
    with ``features``, the relative MSE between each decomposed layer's output and the original
    layer's output (weighted by ``features`` when a number). Layers are matched by name, and
    only where both sides compute the layer's output: a teacher's ``nn.Linear``, conv or
    Hugging Face ``Conv1D`` module beside a decomposed layer none of whose factors was merged
    with a neighbour (a fused sibling layer's target: its members' outputs, concatenated); a
    `ConfigError` when no layer matches.

    Every argument, and every batch of a list, is checked before anything changes (a batch
    that does not fit the model's forward is named; labels in a batch are refused). A call that
    fails later, at step ``k``, leaves the parameters of step ``k`` and says so in the error.

    Args:
        gm: the compressed model (trained in place).
        teacher: the original model (not changed; run under ``no_grad`` in eval mode). It
            must not share parameters with ``gm`` (a ``transform(..., inplace=True)``):
            pass a copy of the original.
        batches: an iterable of inputs, read lazily: a list or a DataLoader is iterated
            again when it ends (a shuffling loader reshuffles); a one-shot iterator is read
            once, and a run it ends early warns (`fxlrd.FxlrdWarning`).
        steps: optimizer steps.
        lr: Adam's learning rate.
        freeze: a freezing policy for the factors (``"paper"``, ``"none"``, a mapping, see
            `fxlrd.freeze`) or a `fxlrd.SequentialFreezer` (stepped after every step; it drops
            the state of newly frozen parameters from distill's optimizer during the run and
            gets its own optimizer back after it). The policy stays applied afterwards.
        loss: ``"auto"``, ``"kl"``, ``"mse"`` (see `output_loss`), or a callable
            ``loss(student_outputs, teacher_outputs, (args, kwargs)) -> scalar`` (e.g. on
            mean-pooled sentence embeddings).
        temperature: softmax temperature for ``"kl"``.
        features: add per-layer feature matching.
        weight_decay: Adam's weight decay.
        schedule: the learning rate over the steps: ``"constant"``, or ``"cosine"`` (from
            ``lr`` down to 0 on a half cosine: large steps first, small ones to settle).
        train_mode: run the student in train mode (dropout, batch-norm statistics updating);
            default False: statistics stay as calibrated, gradients flow all the same. A
            step refused after its forward (a non-finite loss) leaves the buffers as they
            were before it.
        skip_padding: with the built-in losses and in the ``features`` term, compare
            per-token outputs only where the inputs' ``attention_mask`` (a keyword input, 0/1)
            is non-zero (see `output_loss`); a ``loss`` callable gets the inputs and does its
            own masking.
        validation: batches held out of training (early stopping): the output loss on them
            is checked at the start, every ``check_every`` steps and at the end, and the model
            keeps the parameters of the best check — on little data distillation overfits,
            and with this it never ends worse on them than it started. All ``steps`` run (the
            learning-rate schedule is the same); a `SequentialFreezer` is left at the last
            step's phase. Keeps one copy of the model's state.
        check_every: steps between checks (default: 5 % of ``steps``).
        progress: a progress bar with the loss.

    Returns:
        The loss at every step (a `DistillCurve`: with ``validation``, also its checks and
        the step kept).
    """
    import sys

    from tqdm.auto import tqdm

    from .capture import normalize_inputs
    from .errors import ConfigError, FxlrdWarning
    from .freeze import SequentialFreezer, _factors_or_lost
    from .freeze import freeze as apply_freeze
    from .freeze import param_groups

    def decomposed(model: nn.Module) -> bool:  # a torch.fx re-trace loses the containers, not the factors
        found = _factors_or_lost(model)
        return found is None or bool(found)

    steps = _count("steps", steps)
    lr = _number("lr", lr)
    temperature = _number("temperature", temperature)
    weight_decay = _number("weight_decay", weight_decay, strict=False)
    if not callable(loss) and loss not in ("auto", "kl", "mse"):
        raise ConfigError(f"loss must be 'auto', 'kl', 'mse' or a callable loss(student, teacher, inputs), got {loss!r}")
    if not isinstance(features, bool):
        _number("features", features, strict=False)
    for name, flag in (("train_mode", train_mode), ("skip_padding", skip_padding)):
        if not isinstance(flag, bool):
            raise ConfigError(f"{name} must be True or False, got {flag!r}")
    if schedule not in ("constant", "cosine"):
        raise ConfigError(f"schedule must be 'constant' or 'cosine', got {schedule!r}")
    if teacher is gm:
        raise ConfigError("teacher is the model being distilled: pass the original model (before fxlrd.transform)")
    if {id(p) for p in teacher.parameters()} & {id(p) for p in gm.parameters()}:
        raise ConfigError(
            "teacher shares parameters with the model being distilled (made with transform(..., inplace=True)?), so "
            "training would change it too: pass a copy of the original as the teacher (copy.deepcopy before transform)"
        )
    if not decomposed(gm) and decomposed(teacher):
        raise ConfigError(
            "the teacher has decomposed layers and the model being distilled has none: the arguments look swapped; "
            "call distill(compressed, original, batches)"
        )
    for what, value in (("batches", batches), ("validation", validation)):
        if isinstance(value, (torch.Tensor, Mapping)):
            raise ConfigError(f"{what} must be an iterable of inputs (a list of batches); wrap a single batch in a list")
    held = None if validation is None else [normalize_inputs(b) for b in validation]
    if held is not None and not held:
        raise ConfigError("validation is empty: pass at least one held-out batch, or validation=None")
    for i, (a, k) in enumerate(held or []):
        _fits(gm, a, k, f"validation batch {i}")
    if isinstance(batches, Sequence):  # every batch checked before anything changes
        if not batches:
            raise ConfigError("distill needs at least one batch of inputs")
        for i, b in enumerate(batches):
            _fits(gm, *normalize_inputs(b), f"batch {i}")
    if check_every is None:
        check_every = max(steps // 20, 1)
    check_every = _count("check_every", check_every)
    freezer = freeze if isinstance(freeze, SequentialFreezer) else None
    pairs = _feature_pairs(gm, teacher) if features else []
    feature_weight = float(features) if not isinstance(features, bool) else 1.0
    stream = _batch_stream(batches, steps, "batches")
    first = next(stream)  # an empty iterable is refused before anything changes
    first_inputs = normalize_inputs(first[1])
    _fits(gm, *first_inputs, "batch 0")

    flags = {p: p.requires_grad for p in gm.parameters()}
    if freeze is not None and freezer is None:  # after every check: a refused call leaves the model as it was
        apply_freeze(gm, freeze)
    groups = param_groups(gm, lr=lr, weight_decay=weight_decay)
    optimizer = torch.optim.Adam(groups)
    scheduler = None
    if schedule == "cosine":
        scheduler = _cosine_schedule(optimizer, steps)
    freezer_optimizer = freezer.optimizer if freezer is not None else None
    if freezer is not None:  # during the run, newly frozen parameters leave distill's optimizer (the one stepped)
        freezer.optimizer = optimizer

    # In train mode a forward updates buffers (batch-norm running statistics): a step refused
    # after its forward (a non-finite loss, an error) puts them back as they were before it.
    buffer_slots = [(m, k) for m in gm.modules() for k, b in m._buffers.items() if b is not None] if train_mode else []
    saved_buffers: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(buffer_slots)

    @torch.no_grad()
    def save_buffers() -> None:
        for i, (m, k) in enumerate(buffer_slots):
            current, kept = m._buffers.get(k), saved_buffers[i]
            if current is None:
                saved_buffers[i] = None
            elif kept is not None and kept[0] is current and (kept[1].shape, kept[1].dtype) == (current.shape, current.dtype):
                kept[1].copy_(current)  # no new allocation per step
            else:
                saved_buffers[i] = (current, current.detach().clone())

    @torch.no_grad()
    def restore_buffers() -> None:
        for (m, k), kept in zip(buffer_slots, saved_buffers):
            if kept is not None:
                m._buffers[k] = kept[0]
                if kept[0].shape == kept[1].shape:
                    kept[0].copy_(kept[1])
                else:
                    m._buffers[k] = kept[1].clone()

    restore_modes = saved_modes(teacher, gm)
    teacher.eval()
    gm.train(train_mode)
    student, teacher_run, student_eval = _runner(gm, train_mode), _runner(teacher, False), _runner(gm, False)

    def batch_loss(out, target, args, kwargs) -> torch.Tensor:
        if callable(loss):
            return loss(out, target, (args, kwargs))
        mask = kwargs.get("attention_mask") if skip_padding else None
        return output_loss(out, target, loss, temperature, mask=mask if isinstance(mask, torch.Tensor) else None)

    @torch.no_grad()
    def held_out_loss() -> float:  # in eval mode (no dropout), whatever train_mode is
        gm.eval()
        try:
            return sum(float(batch_loss(student_eval(*a, **k), teacher_run(*a, **k), a, k)) for a, k in held) / len(held)
        finally:
            gm.train(train_mode)

    def inputs_of(index: int, batch: Any) -> tuple[tuple, dict]:
        if index == 0:
            return first_inputs
        args, kwargs = normalize_inputs(batch)
        _fits(gm, args, kwargs, f"batch {index}")
        return args, kwargs

    curve = DistillCurve()
    best: tuple[float, dict[str, torch.Tensor]] | None = None
    bar = tqdm(total=steps, desc="distill", unit="step", disable=None if progress else True, file=sys.stderr, leave=False)
    step = 0
    try:
        if held is not None:
            curve.validation.append((0, held_out_loss()))
            best, curve.best_step = (curve.validation[0][1], {k: v.detach().clone() for k, v in gm.state_dict().items()}), 0
        for step, batch in itertools.chain([first], stream):
            args, kwargs = inputs_of(step, batch)
            save_buffers()
            try:
                # per pair: the student's output, then each teacher layer's (a fused layer's members)
                captured: dict[int, list[torch.Tensor | None]] = {i: [None] * (1 + len(t)) for i, (_, t, _) in enumerate(pairs)}
                hooks = []
                for i, (s_mod, t_mods, _) in enumerate(pairs):
                    for j, mod in enumerate([s_mod, *t_mods]):
                        hooks.append(mod.register_forward_hook(lambda m, a, o, i=i, j=j: captured[i].__setitem__(j, o)))
                try:
                    with torch.no_grad():
                        target = teacher_run(*args, **kwargs)
                    out = student(*args, **kwargs)
                finally:
                    for h in hooks:
                        h.remove()
                value = batch_loss(out, target, args, kwargs)
                keep = kwargs.get("attention_mask") if skip_padding else None
                keep = keep.to(torch.bool) if isinstance(keep, torch.Tensor) and keep.any() else None
                for i, (s_out, *t_outs) in captured.items():
                    if s_out is not None and all(t is not None for t in t_outs):
                        t_out = t_outs[0] if len(t_outs) == 1 else torch.cat(t_outs, dim=-1)
                        value = value + feature_weight * _feature_loss(s_out, t_out.detach(), keep, pairs[i][2])
                if not torch.isfinite(value):
                    raise FloatingPointError(
                        f"distillation loss is {float(value.detach())} at step {step} (a batch with NaN or infinite values, or a "
                        f"learning rate too high); stopped before it reached the parameters: the model keeps those of "
                        f"step {step}"
                    )
            except BaseException:
                restore_buffers()
                raise
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            if freezer is not None:
                freezer.step()
            curve.append(float(value.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{curve[-1]:.4g}")
            if best is not None and ((step + 1) % check_every == 0 or step + 1 == steps):
                curve.validation.append((step + 1, held_out_loss()))
                if curve.validation[-1][1] < best[0] or best[0] != best[0]:  # (a NaN start is beaten by anything)
                    best = (curve.validation[-1][1], {k: v.detach().clone() for k, v in gm.state_dict().items()})
                    curve.best_step = step + 1
        if len(curve) < steps:
            warnings.warn(
                f"distill: batches ran out after {len(curve)} of {steps} steps (an iterator is read once): pass a list "
                "or a DataLoader to cycle over them, or fewer steps",
                FxlrdWarning,
                stacklevel=2,
            )
            if best is not None and curve.validation[-1][0] != len(curve):
                curve.validation.append((len(curve), held_out_loss()))
                if curve.validation[-1][1] < best[0] or best[0] != best[0]:
                    best = (curve.validation[-1][1], {k: v.detach().clone() for k, v in gm.state_dict().items()})
                    curve.best_step = len(curve)
        if best is not None and curve.best_step != len(curve):
            gm.load_state_dict(best[1])
    except Exception as exc:
        if not curve:  # nothing trained yet: the model is left as it was, freezing flags too
            for p, flag in flags.items():
                p.requires_grad_(flag)
        elif not isinstance(exc, FloatingPointError):
            exc.add_note(f"fxlrd.recover.distill stopped at step {step}: the model keeps the parameters of step {step}")
        raise
    finally:
        bar.close()
        restore_modes()
        if freezer is not None:
            freezer.optimizer = freezer_optimizer
    return curve


# -- block-local reconstruction of narrowed MLP blocks ------------------------------------------
class _Reached(Exception):
    """Raised by `_capture_input` once the wanted value is computed (the rest is not run)."""

    def __init__(self, value: torch.Tensor):
        super().__init__()
        self.value = value


def _capture_input(gm: fx.GraphModule, node: fx.Node, flat: list[Any]) -> torch.Tensor:
    """The value of ``node`` when ``gm`` runs on the placeholder values ``flat`` (the graph is
    run only up to it)."""

    from .calibrate import EvalInterpreter

    class Until(EvalInterpreter):  # (an export graph captured in training mode: no dropout, statistics left alone)
        def run_node(self, n: fx.Node) -> Any:
            out = super().run_node(n)
            if n is node:
                raise _Reached(out)
            return out

    try:
        Until(gm).run(*flat)
    except _Reached as reached:
        return reached.value
    raise RuntimeError(f"the graph never computed {node.name!r}")  # unreachable for a node of gm's graph


def reconstruct_mlps(
    gm: fx.GraphModule,
    teacher: nn.Module,
    batches: Iterable,
    *,
    steps: int = 800,
    lr: float = 3e-4,
    tokens_per_step: int = 2048,
    holdout: float = 0.1,
    skip_padding: bool = True,
    sensitivity: bool | str | Callable[[Any, Any], Any] = False,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """Refit each narrowed MLP block of ``gm`` by gradient steps on its own output error.

    `fxlrd.narrow` keeps ``k`` of a block's hidden neurons and refits the down layer in
    closed form; the up layer stays as it was. This trains every layer of the narrowed
    block (weights and biases; a gated block's partner layer too), one block at a time, so
    that on ``batches`` it reproduces what the original block computes on the same inputs:
    ``min ‖down′(act(up′(x))) − down(act(up(x)))‖²`` (gated: ``down′(act(up′(x)) ⊙
    partner′(x))``) over the block inputs ``x`` of the compressed model. Blocks go in graph
    order, each on the inputs produced by the blocks refitted before it. No full-model backward pass runs; each block needs its inputs and
    targets in memory (2 × positions × width floats).

    A share ``holdout`` of the positions is kept out of training: their error is checked
    every 5 % of the steps, the block keeps the parameters of the best check (early
    stopping: on small data the training error keeps falling after the held-out error has
    turned), and it is only changed when that error is below the one it started from.
    Shapes do not change: `fxlrd.save`, `fxlrd.export_onnx` and fine-tuning work as before;
    parameters are updated in place.

    Args:
        gm: a model from `fxlrd.transform`/`fxlrd.apply` with ``LRDConfig(mlp="narrow")``.
        teacher: the original model; only its weights are read (at the same parameter
            paths), it is not run and not changed.
        batches: inputs in the form of ``example_inputs`` (tensor, tuple or dict).
        steps: Adam steps per block.
        lr: Adam's learning rate, on a half cosine down to 0.
        tokens_per_step: positions (rows of the block input) drawn at random per step.
        holdout: the share of positions held out to check each block's refit.
        skip_padding: leave out positions where the inputs' ``attention_mask`` is 0 (when it
            has the block input's leading shape).
        sensitivity: weigh the block's output error by the model output's sensitivity to it
            (as in `fxlrd.calibrate.collect_stats`: True, ``"kl"`` or ``fn(outputs,
            inputs)``; estimated once on ``batches`` before the refits, one backward pass a
            batch): ``‖(y′ − y) L‖²`` with ``L Lᵀ`` the down layer's output-channel matrix.
            The reported errors are then weighted too.
        seed: for the held-out split and the draws.
        progress: a progress bar over the blocks.

    Returns:
        Per block (keyed by its up layer): its down layer, width, positions, and the relative
        squared output error ``‖y′ − y‖² / ‖y‖²`` before and after on the training and the
        held-out positions, whether the refit was applied, and the step whose parameters it
        kept (``steps`` without held-out positions; 0 when no check beat the start).
    """
    import sys

    from tqdm.auto import tqdm

    from .calibrate import TokenMasks, _real_tokens, collect_stats, token_streams
    from .capture import flat_inputs, normalize_inputs
    from .config import check_sensitivity
    from .errors import ConfigError, FxlrdWarning, PlanMismatchError
    from .sites import _get_attr, find_sites
    from .narrow import block_nodes, run_block_nodes

    steps, tokens_per_step = _count("steps", steps), _count("tokens_per_step", tokens_per_step)
    lr = _number("lr", lr)
    if not _number("holdout", holdout, strict=False) < 1:
        raise ConfigError(f"holdout must be in [0, 1), got {holdout!r}")
    check_sensitivity(sensitivity, "full")
    plan = getattr(gm, "fxlrd_plan", None)
    records = (plan.settings.get("narrowed") or []) if plan is not None else []
    if not records:
        raise ConfigError(
            "reconstruct_mlps found no narrowed MLP blocks in this model: it refits the blocks that "
            "fxlrd.transform(..., LRDConfig(mlp='narrow'), calibration=...) narrowed; use fxlrd.recover.distill otherwise"
        )
    if isinstance(batches, (torch.Tensor, Mapping)):
        raise ConfigError("batches must be an iterable of inputs (a list of batches); wrap a single batch in a list")
    raw = list(batches)
    data = [normalize_inputs(b) for b in raw]
    if not data:
        raise ConfigError("reconstruct_mlps needs at least one batch of inputs")

    sites = find_sites(gm)
    convolutional = [r["up"] for r in records if r["up"] in sites and sites[r["up"]].spec.kind == "conv"]
    if convolutional:
        if len(convolutional) == len(records):
            raise ConfigError(
                "reconstruct_mlps refits narrowed linear MLP blocks; this model's narrowed blocks are convolutional "
                f"(first: {convolutional[0]!r}; their project convs are refitted by least squares as they are narrowed): "
                "use fxlrd.recover.distill to train them"
            )
        warnings.warn(f"reconstruct_mlps: {len(convolutional)} narrowed convolutional blocks are left as they are "
                      f"(first: {convolutional[0]!r}); it refits linear MLP blocks", FxlrdWarning, stacklevel=2)  # fmt: skip
        records = [r for r in records if r["up"] not in convolutional]
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    blocks = []
    for rec in records:
        up, down = sites.get(rec["up"]), sites.get(rec["down"])
        partner = sites.get(rec["partner"]) if rec.get("partner") else None
        if (up is None or down is None or len(up.nodes) != 1 or len(down.nodes) != 1
                or (rec.get("partner") and (partner is None or len(partner.nodes) != 1))):  # fmt: skip
            raise PlanMismatchError(f"the narrowed block {rec['up']!r} → {rec['down']!r} is not in this model's graph")
        if partner is not None and partner.input(partner.nodes[0]) is not up.input(up.nodes[0]):
            raise PlanMismatchError(f"the gated block of {rec['up']!r}: its partner {rec['partner']!r} reads another input")
        layers = (up, down, partner) if partner is not None else (up, down)  # (a gated block's partner: trained too)
        teacher_tensors = []
        for site in layers:
            for path in (site.weight_path, site.bias_path):
                if path is None:
                    teacher_tensors.append(None)
                    continue
                try:
                    t = _get_attr(teacher, path).detach()
                except AttributeError:
                    raise PlanMismatchError(
                        f"the teacher has no tensor {path!r}: pass the original model that was compressed"
                    ) from None
                teacher_tensors.append(t.T if site.transposed_weight and path == site.weight_path else t)
        # the hidden width as the teacher's up (and partner) rows and down columns give it
        widths = [(rec["up"], teacher_tensors[0].shape[0]), (rec["down"], teacher_tensors[2].shape[1])]
        if partner is not None:
            widths.append((rec["partner"], teacher_tensors[4].shape[0]))
        for name, width in widths:
            if width != rec["hidden"]:
                raise PlanMismatchError(f"the teacher's {name!r} has {width} hidden neurons, the plan {rec['hidden']}: "
                                        "pass the original model that was compressed")  # fmt: skip
        blocks.append((rec, layers, teacher_tensors))
    blocks.sort(key=lambda b: order[b[1][0].nodes[0]])
    weighting: dict[str, torch.Tensor] = {}
    if sensitivity is not False:
        stats = collect_stats(gm, raw, names=[b[1][1].name for b in blocks], sensitivity=sensitivity, progress=progress)
        for _, (_, down, *_), _ in blocks:
            w = stats[down.name].output_weights() if down.name in stats else None
            if w is not None:  # L with L Lᵀ = the weighting: errors are measured as ‖(y′ − y) L‖²
                weighting[down.name] = (torch.linalg.cholesky(w) if w.dim() == 2 else torch.diag(w.sqrt())).float()

    generator = torch.Generator().manual_seed(seed)
    restore_modes = saved_modes(gm)
    gm.eval()
    report: dict[str, dict[str, Any]] = {}
    bar = tqdm(blocks, desc="reconstruct MLPs", unit="block", disable=None if progress else True, file=sys.stderr, leave=False)
    try:
        for rec, layers, teacher_tensors in bar:
            up, down = layers[:2]
            up_node = up.nodes[0]
            x_node = up.input(up_node)
            partner_node = layers[2].nodes[0] if len(layers) > 2 else None
            between, end = block_nodes(gm, sites, rec["up"])
            rows = []
            streams = token_streams(gm, [x_node])
            layouts: dict[str, bool | None] = {}
            with torch.no_grad():
                for args, kwargs in data:
                    x = _capture_input(gm, x_node, flat_inputs(gm, (args, kwargs), "batches"))
                    if skip_padding:  # the real tokens, as calibration reads them (a flattened input, a decoder's own mask)
                        x = _real_tokens(up, x, TokenMasks((args, kwargs), streams).for_node(x_node), layouts)
                    rows.append(x.reshape(-1, x.shape[-1]).float())
            x = torch.cat(rows)
            del rows

            lower = weighting.get(down.name)

            def block(x_: torch.Tensor, w1, b1, w2, b2, w3=None, b3=None) -> torch.Tensor:
                hidden = {up_node: F.linear(x_, w1, b1)}
                if partner_node is not None:
                    hidden[partner_node] = F.linear(x_, w3, b3)
                out = F.linear(run_block_nodes(gm, between, hidden, end), w2, b2)
                return out if lower is None else out @ lower

            teacher_params = [None if t is None else t.float() for t in teacher_tensors]
            with torch.no_grad():
                y = torch.cat([block(x[i : i + 8192], *teacher_params) for i in range(0, len(x), 8192)])
            perm = torch.randperm(len(x), generator=generator)
            n_held = int(len(x) * holdout)
            held, train = perm[:n_held], perm[n_held:]
            if len(train) == 0:
                raise ConfigError(f"no positions to train {rec['up']!r} on: pass more batches or a smaller holdout")
            current = [None if t is None else t.detach().float() for site in layers for t in (site.weight(gm), site.bias(gm))]

            @torch.no_grad()
            def error(params, idx, x=x, y=y) -> float:  # x, y bound now: the loop deletes them after each block
                if len(idx) == 0:
                    return float("nan")
                num = den = 0.0
                for i in range(0, len(idx), 8192):
                    j = idx[i : i + 8192]
                    num += float((block(x[j], *params) - y[j]).double().pow(2).sum())
                    den += float(y[j].double().pow(2).sum())
                return num / max(den, 1e-300)

            before = (error(current, train), error(current, held))
            params = [None if t is None else t.clone().requires_grad_(True) for t in current]
            optimizer = torch.optim.Adam([p for p in params if p is not None], lr=lr)
            scheduler = _cosine_schedule(optimizer, steps)
            scale = float(y[train].pow(2).mean().clamp_min(1e-12))
            # with held-out positions: the parameters at the check (every ~5 % of the steps) where
            # their error was lowest, so a block that starts to overfit small data stops there
            check_every = max(steps // 20, 1) if n_held else steps
            best, best_step = (before[1], [None if t is None else t.clone() for t in current]), 0
            for step in range(1, steps + 1):
                j = train[torch.randint(len(train), (min(tokens_per_step, len(train)),), generator=generator)]
                loss = (block(x[j], *params) - y[j]).pow(2).mean() / scale
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                if n_held and (step % check_every == 0 or step == steps):
                    held_error = error(params, held)
                    if held_error < best[0]:
                        best, best_step = (held_error, [None if t is None else t.detach().clone() for t in params]), step
            if n_held:
                params = best[1]
            after = (error(params, train), error(params, held))
            applied = after[1] < before[1] if n_held else after[0] < before[0]
            if applied:
                with torch.no_grad():
                    for site, w, b in zip(layers, params[0::2], params[1::2]):
                        target = _get_attr(gm, site.weight_path)
                        target.copy_(w.T if site.transposed_weight else w)
                        if b is not None:
                            _get_attr(gm, site.bias_path).copy_(b)
            report[rec["up"]] = {"down": rec["down"], "width": rec["width"], "positions": len(x),
                                 "train_before": before[0], "train_after": after[0],
                                 "held_out_before": before[1], "held_out_after": after[1], "applied": applied,
                                 "steps": best_step if n_held else steps}  # fmt: skip
            bar.set_postfix(error=f"{before[1 if n_held else 0]:.3g}->{after[1 if n_held else 0]:.3g}")
            del x, y
    finally:
        bar.close()
        restore_modes()
    return report
