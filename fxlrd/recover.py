"""Recovery: re-estimate moved norms and refit merged weights after approximate merges, and
distil a compressed model to its original.

An approximate merge drops an activation from between two layers and moves a norm to the
narrow side; the moved norm has no statistics yet. Two tools, both on calibration batches:

- `reestimate_norms`: reset the running statistics of the moved norms (or all norms) and
  recompute them as a plain average over the batches;
- `refit_merged`: refit each merged layer by least squares so that, on the batches, it maps
  its actual input to what the unmerged model computed at that point (the output of the
  second layer of the pair), in graph order so each refit sees the earlier ones.

`distill` then trains the compressed model toward the original's outputs (and optionally its
decomposed layers' outputs) for a few hundred steps, with any freezing policy.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn

if TYPE_CHECKING:
    from .freeze import SequentialFreezer

__all__ = ["reestimate_norms", "refit_merged", "merged_nodes", "distill", "output_loss"]

_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


def merged_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """Nodes of layers made by `MergePass`, in graph order (read from the modules' records)."""
    return [n for n in gm.graph.nodes if n.op == "call_module" and getattr(gm.get_submodule(n.target), "fxlrd_merge", None)]


def _batches(batches: Iterable) -> list[tuple[torch.Tensor, ...]]:
    out = []
    for b in batches:
        out.append(b if isinstance(b, tuple) else (b,))
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


def _reestimate(gm: nn.Module, names: Sequence[str], batches: Sequence[tuple[torch.Tensor, ...]]) -> None:
    """Reset and recompute the running statistics of the norms ``names``; the rest of the
    model runs in eval mode, and every module's mode and momentum are restored."""
    modes = {name: m.training for name, m in gm.named_modules()}
    momenta = {}
    gm.eval()
    for name in names:
        bn = gm.get_submodule(name)
        momenta[name] = bn.momentum
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average: every batch counts the same
        bn.train()
    try:
        for b in batches:
            gm(*b)
    finally:
        for name, m in gm.named_modules():
            m.train(modes.get(name, m.training))
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
    """
    batches = _batches(batches)
    gm_modes = gm.training
    gm.eval(), reference.eval()
    report = {}
    try:
        for node in merged_nodes(gm):
            info = gm.get_submodule(node.target).fxlrd_merge
            if info.get("exact"):
                continue
            layer = gm.get_submodule(node.target)
            source = reference.get_submodule(info["merged_from"][1])
            conv = not isinstance(layer, nn.Linear)
            xs, ts = [], []
            h1 = layer.register_forward_hook(lambda m, i, o: xs.append(_flatten_channels(i[0], conv).double()))
            h2 = source.register_forward_hook(lambda m, i, o: ts.append(_flatten_channels(o, conv).double()))
            try:
                for b in batches:
                    gm(*b)
                    reference(*b)
            finally:
                h1.remove(), h2.remove()
            x, t = torch.cat(xs, 1), torch.cat(ts, 1)
            xa = torch.cat([x, torch.ones(1, x.shape[1], dtype=x.dtype)], 0)  # bias row
            w_old = torch.cat([layer.weight.reshape(layer.weight.shape[0], -1).double(),
                               (layer.bias.double() if layer.bias is not None else torch.zeros(layer.weight.shape[0], dtype=x.dtype))[:, None]], 1)  # fmt: skip
            gram = xa @ xa.T
            gram += ridge * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
            w_new = torch.linalg.solve(gram, xa @ t.T).T
            err = lambda w: (torch.linalg.norm(t - w @ xa) / torch.linalg.norm(t)).item()  # noqa: E731
            before, after = err(w_old), err(w_new)
            report[node.target] = {"before": before, "after": after}
            if after >= before:
                continue
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
    finally:
        gm.train(gm_modes)
    return report


# -- distillation -----------------------------------------------------------------------------------
def _leaves(out) -> list[torch.Tensor]:
    from torch.utils import _pytree as pytree

    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def output_loss(student_out, teacher_out, kind: str = "auto", temperature: float = 1.0) -> torch.Tensor:
    """The distillation loss between two outputs (any structure of tensors, e.g. a ModelOutput).

    ``kind="kl"``: KL(teacher ‖ student) of the softmax over the last dimension, ×T² (classifier
    logits); ``"mse"``: mean squared error relative to the teacher's mean square (hidden states,
    embeddings); ``"auto"``: KL for 2-D outputs (batch × classes), MSE otherwise.
    """
    s_leaves, t_leaves = _leaves(student_out), _leaves(teacher_out)
    if len(s_leaves) != len(t_leaves) or not s_leaves:
        raise ValueError(f"student and teacher outputs differ in structure ({len(s_leaves)} vs {len(t_leaves)} tensors)")
    total = s_leaves[0].new_zeros(())
    for s, t in zip(s_leaves, t_leaves):
        k = ("kl" if s.dim() == 2 and s.shape[-1] > 1 else "mse") if kind == "auto" else kind
        if k == "kl":
            log_p = F.log_softmax(s / temperature, -1)
            log_q = F.log_softmax(t / temperature, -1)
            total = total + F.kl_div(log_p, log_q, log_target=True, reduction="batchmean") * temperature**2
        elif k == "mse":
            total = total + F.mse_loss(s, t) / t.pow(2).mean().clamp_min(1e-12)
        else:
            raise ValueError(f"loss kind must be 'auto', 'kl' or 'mse', got {kind!r}")
    return total


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
    progress: bool = True,
) -> list[float]:
    """A short knowledge distillation of the compressed model ``gm`` to the original ``teacher``.

    Cycles over ``batches`` (inputs in the form of ``example_inputs``: tensor, tuple or dict)
    for ``steps`` Adam steps. The loss is `output_loss` between the two models' outputs
    (softmax KL for classifier logits, relative MSE for hidden states and embeddings), plus,
    with ``features``, the relative MSE between each decomposed layer's output and the original
    layer's output (weighted by ``features`` when a number; layers are matched by name).

    Args:
        gm: the compressed model (trained in place).
        teacher: the original model (not changed; run under ``no_grad`` in eval mode).
        batches: an iterable of inputs, re-iterated as needed.
        steps: optimizer steps.
        lr: Adam's learning rate.
        freeze: a freezing policy for the factors (``"paper"``, ``"none"``, a mapping, see
            `fxlrd.freeze`) or a `fxlrd.SequentialFreezer` (stepped after every step).
        loss: ``"auto"``, ``"kl"``, ``"mse"`` (see `output_loss`), or a callable
            ``loss(student_outputs, teacher_outputs, (args, kwargs)) -> scalar`` (e.g. on
            mean-pooled sentence embeddings).
        temperature: softmax temperature for ``"kl"``.
        features: add per-layer feature matching.
        weight_decay: Adam's weight decay.
        schedule: the learning rate over the steps: ``"constant"``, or ``"cosine"`` (from
            ``lr`` down to 0 on a half cosine: large steps first, small ones to settle).
        train_mode: run the student in train mode (dropout, batch-norm statistics updating);
            default False: statistics stay as calibrated, gradients flow all the same.
        progress: a progress bar with the loss.

    Returns:
        The loss at every step.
    """
    import sys

    from tqdm.auto import tqdm

    from .capture import normalize_inputs
    from .freeze import SequentialFreezer
    from .freeze import freeze as apply_freeze
    from .freeze import param_groups

    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"schedule must be 'constant' or 'cosine', got {schedule!r}")
    freezer = freeze if isinstance(freeze, SequentialFreezer) else None
    if freeze is not None and freezer is None:
        apply_freeze(gm, freeze)
    data = [normalize_inputs(b) for b in batches]
    if not data:
        raise ValueError("distill needs at least one batch of inputs")
    groups = param_groups(gm, lr=lr, weight_decay=weight_decay)
    optimizer = torch.optim.Adam(groups)
    scheduler = None
    if schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps)))
    if freezer is not None:
        freezer.optimizer = freezer.optimizer or optimizer

    pairs: list[tuple[nn.Module, nn.Module]] = []
    if features:
        from .factorized import Factorized

        # A Factorized container's factors are separate graph nodes (the container itself is
        # never called): its output is its last factor's.
        named = dict(teacher.named_modules())
        pairs = [(list(m.children())[-1], named[n]) for n, m in gm.named_modules()
                 if isinstance(m, Factorized) and n in named and len(m)]  # fmt: skip
    feature_weight = float(features) if not isinstance(features, bool) else 1.0

    teacher_modes = {n: m.training for n, m in teacher.named_modules()}
    student_modes = {n: m.training for n, m in gm.named_modules()}
    teacher.eval()
    gm.train(train_mode)
    curve: list[float] = []
    bar = tqdm(range(steps), desc="distill", unit="step", disable=None if progress else True, file=sys.stderr, leave=False)
    try:
        for step in bar:
            args, kwargs = data[step % len(data)]
            captured: dict[int, list[torch.Tensor]] = {}
            hooks = []
            for i, (s_mod, t_mod) in enumerate(pairs):
                hooks.append(s_mod.register_forward_hook(lambda m, a, o, i=i: captured.setdefault(i, [None, None]).__setitem__(0, o)))
                hooks.append(t_mod.register_forward_hook(lambda m, a, o, i=i: captured.setdefault(i, [None, None]).__setitem__(1, o)))
            try:
                with torch.no_grad():
                    target = teacher(*args, **kwargs)
                out = gm(*args, **kwargs)
            finally:
                for h in hooks:
                    h.remove()
            value = loss(out, target, (args, kwargs)) if callable(loss) else output_loss(out, target, loss, temperature)
            for s_out, t_out in captured.values():
                if s_out is not None and t_out is not None:
                    value = value + feature_weight * F.mse_loss(s_out, t_out.detach()) / t_out.detach().pow(2).mean().clamp_min(1e-12)
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            if freezer is not None:
                freezer.step()
            curve.append(float(value.detach()))
            bar.set_postfix(loss=f"{curve[-1]:.4g}")
    finally:
        bar.close()
        for n, m in teacher.named_modules():
            m.train(teacher_modes.get(n, m.training))
        for n, m in gm.named_modules():
            m.train(student_modes.get(n, m.training))
    return curve
