"""Branched Tucker (paper 2.4): a block-diagonal core, i.e. N parallel Tucker branches.

With ``r1 = N·R1`` and ``r2 = N·R2`` the core keeps only its N diagonal blocks and becomes a
grouped conv (``groups=N``): N times fewer core parameters at the same ranks. Two ways to
get the blocks from a Tucker-2 weight ``W ≈ G ×₀ U ×₁ V``:

- ``truncate``: keep the diagonal blocks of ``G`` (an approximation: the off-diagonal
  blocks are dropped);
- ``btd``: fit a block-term decomposition ``W ≈ Σ_g G_g ×₀ U_g ×₁ V_g`` by block coordinate
  descent (alternating least squares over the blocks): each sweep refits one block as the
  best Tucker-2 of what the others leave, starting from the truncation and keeping a block's
  update only when it lowers the error — so it is never worse than truncation.

Pure math on tensors; knows nothing of FX.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .decompose import tucker2_factors

__all__ = ["BlockTerms", "truncate_blocks", "fit_btd", "reconstruct"]


@dataclass
class BlockTerms:
    """N blocks: ``in_factors[g]`` (C×R1), ``cores[g]`` (R2×R1×k…), ``out_factors[g]`` (S×R2)."""

    in_factors: list[torch.Tensor]
    cores: list[torch.Tensor]
    out_factors: list[torch.Tensor]


def reconstruct(bt: BlockTerms) -> torch.Tensor:
    """``Σ_g G_g ×₀ U_g ×₁ V_g`` as a full ``(S, C, k…)`` weight."""
    return sum(torch.einsum("rq...,sr,cq->sc...", g, u, v) for g, u, v in zip(bt.cores, bt.out_factors, bt.in_factors))


def truncate_blocks(in_factor: torch.Tensor, core: torch.Tensor, out_factor: torch.Tensor, branches: int) -> BlockTerms:
    """The diagonal blocks of a Tucker core (ranks rounded down to multiples of ``branches``)."""
    r1, r2 = core.shape[1] // branches, core.shape[0] // branches
    if r1 < 1 or r2 < 1:
        raise ValueError(f"ranks {tuple(core.shape[:2])} are too small for {branches} branches")
    return BlockTerms(
        in_factors=[in_factor[:, g * r1 : (g + 1) * r1] for g in range(branches)],
        cores=[core[g * r2 : (g + 1) * r2, g * r1 : (g + 1) * r1] for g in range(branches)],
        out_factors=[out_factor[:, g * r2 : (g + 1) * r2] for g in range(branches)],
    )


def fit_btd(weight: torch.Tensor, start: BlockTerms, sweeps: int = 5) -> BlockTerms:
    """Refit ``start`` to ``weight`` by block coordinate descent; never increases the error."""
    w = weight.double()
    bt = BlockTerms([t.double() for t in start.in_factors], [t.double() for t in start.cores],
                    [t.double() for t in start.out_factors])  # fmt: skip
    terms = [torch.einsum("rq...,sr,cq->sc...", g, u, v) for g, u, v in zip(bt.cores, bt.out_factors, bt.in_factors)]
    err = torch.linalg.norm(w - sum(terms))
    for _ in range(sweeps):
        improved = False
        for g in range(len(terms)):
            residual = w - (sum(terms) - terms[g])
            r2, r1 = bt.cores[g].shape[:2]
            t = tucker2_factors(residual, (r1, r2), n_iter=2)
            u = t.out_factor if t.out_factor is not None else torch.eye(w.shape[0], dtype=w.dtype)
            v = t.in_factor if t.in_factor is not None else torch.eye(w.shape[1], dtype=w.dtype)
            term = torch.einsum("rq...,sr,cq->sc...", t.core, u, v)
            new_err = torch.linalg.norm(residual - term)
            if new_err < err - 1e-12 * err:
                bt.in_factors[g], bt.cores[g], bt.out_factors[g], terms[g] = v, t.core, u, term
                err, improved = new_err, True
        if not improved:
            break
    return bt
