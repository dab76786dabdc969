"""Rank rules: from a compression ratio (the papers' formulas), energy, VBMF; quantization.

Pure functions of shapes and singular values; no modules, no graphs.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from scipy.optimize import minimize_scalar

__all__ = [
    "svd_rank_for_ratio",
    "tucker_ranks_for_ratio",
    "energy_rank",
    "vbmf_rank",
    "quantize_rank",
    "bottleneck",
]

_EPS = 1e-9  # guards floor() against float noise such as 15.999999999


def svd_rank_for_ratio(in_features: int, out_features: int, ratio: float) -> int:
    """``R = floor(C·S / (α·(C+S)))``: the SVD rank that shrinks a C→S layer α times."""
    c, s = in_features, out_features
    return math.floor(c * s / (ratio * (c + s)) + _EPS)


def tucker_ranks_for_ratio(
    in_channels: int, out_channels: int, kernel_numel: int, ratio: float, beta: float = 1.0
) -> tuple[int, int]:
    """Tucker-2 ranks ``(r1, r2)`` for compression ``ratio`` (paper eq. 7), ``r2 = floor(β·r1)``.

    ``kernel_numel`` is k² for a k×k kernel (the product of the kernel sizes in general).
    When a rank reaches its mode's size that mode is left whole (Tucker-1) and the other rank
    is solved again for the same ratio, so thin layers such as a 3-channel stem still shrink.
    """
    c, s, k2 = in_channels, out_channels, kernel_numel
    a = (c + beta * s) / (beta * k2)
    r1 = math.floor((-a + math.sqrt(a * a + 4 * c * s / (beta * ratio))) / 2 + _EPS)
    r2 = math.floor(beta * r1 + _EPS)
    budget = c * s * k2 / ratio
    if r1 >= c:  # no input factor: core C→r2 (k×k) then out_proj r2→S
        return c, min(s, math.floor(budget / (c * k2 + s) + _EPS))
    if r2 >= s:  # no output factor: in_proj C→r1 then core r1→S (k×k)
        return min(c, math.floor(budget / (c + s * k2) + _EPS)), s
    return r1, r2


def energy_rank(singular_values: torch.Tensor, energy: float) -> int:
    """Smallest rank whose leading singular values keep ``energy`` of Σσ²."""
    sq = singular_values.detach().double() ** 2
    total = float(sq.sum())
    if total == 0.0:
        return 0
    kept = torch.cumsum(sq, 0) / total
    return int(torch.searchsorted(kept, torch.tensor(energy - 1e-12, dtype=kept.dtype)).item()) + 1


def _tau(x: np.ndarray, alpha: float) -> np.ndarray:
    b = x - (1 + alpha)
    return 0.5 * (b + np.sqrt(np.maximum(b * b - 4 * alpha, 0.0)))


def vbmf_rank(matrix: torch.Tensor) -> int:
    """Rank estimated by empirical variational Bayes matrix factorization (EVBMF).

    The analytic global solution of Nakajima et al., "Global analytic solution of
    fully-observed variational Bayesian matrix factorization" (JMLR 2013), with the noise
    variance estimated by minimising the free energy over its admissible interval. A
    singular component is kept when it stands above the noise threshold.
    """
    m = matrix.detach().double().cpu()
    if m.shape[0] > m.shape[1]:
        m = m.T
    rows, cols = m.shape  # rows <= cols
    s = torch.linalg.svdvals(m).numpy()
    alpha = rows / cols
    tau_bar = 2.5129 * math.sqrt(alpha)
    x_bar = (1 + tau_bar) * (1 + alpha / tau_bar)
    sq = s**2
    if sq.sum() == 0:
        return 0

    def free_energy(sigma2: float) -> float:
        x = sq / (cols * sigma2)
        above = x[x > x_bar]
        below = np.maximum(x[x <= x_bar], 1e-300)  # exact zeros: a constant term (log 0 would be -inf)
        t = _tau(above, alpha)
        return float(
            np.sum(below - np.log(below))
            + np.sum(above - t)
            + np.sum(np.log((t + 1) / above))
            + alpha * np.sum(np.log(t / alpha + 1))
        )

    h_bar = min(math.ceil(rows / (1 + alpha)) - 1, rows - 1)
    upper = sq.sum() / (rows * cols)
    lower = max(sq[h_bar] / (cols * x_bar), sq[h_bar:].mean() / cols)
    if not lower < upper:
        sigma2 = upper
    else:
        # The free energy has several local minima over the interval (a bounded search alone
        # stopped in the wrong one: rank 16 for a weight of exact rank 29): a log-spaced grid
        # finds the basin of the global one, the bounded search refines it between its neighbours.
        grid = np.geomspace(lower if lower > 0 else upper * 1e-12, upper, 257)  # (lower is 0 when the tail is exact zeros)
        values = [free_energy(g) for g in grid]
        i = int(np.argmin(values))
        lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
        refined = minimize_scalar(free_energy, bounds=(lo, hi), method="bounded").x if lo < hi else grid[i]
        sigma2 = refined if free_energy(refined) <= values[i] else grid[i]
    threshold = math.sqrt(cols * sigma2 * x_bar)
    return int(np.sum(s > threshold))


def quantize_rank(rank: int, quantum: int) -> int:
    """Round ``rank`` down to a multiple of ``quantum``; a rank below the quantum is kept."""
    if quantum <= 1 or rank < quantum:
        return rank
    return rank // quantum * quantum


def bottleneck(ranks: Sequence[int], caps: Sequence[int]) -> int | None:
    """The smallest of ``ranks`` that cuts its mode (below its cap), or None when none does.
    A rank at its cap keeps that mode whole (Tucker-2 then has no factor there), so ``min_rank``
    does not apply to it."""
    return min((r for r, c in zip(ranks, caps) if r < c), default=None)
