"""Recovery after approximate merges: re-estimate moved norms, refit merged weights.

An approximate merge drops an activation from between two layers and moves a norm to the
narrow side; the moved norm has no statistics yet. Two tools, both on calibration batches:

- `reestimate_norms`: reset the running statistics of the moved norms (or all norms) and
  recompute them as a plain average over the batches;
- `refit_merged`: refit each merged layer by least squares so that, on the batches, it maps
  its actual input to what the unmerged model computed at that point (the output of the
  second layer of the pair), in graph order so each refit sees the earlier ones.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import fx, nn

__all__ = ["reestimate_norms", "refit_merged", "merged_nodes"]

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
