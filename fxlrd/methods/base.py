"""The interface every decomposition method implements, and what they share.

A method is one `Method` handler: which layers it applies to, its target ranks under a rank
rule, its candidate ranks for the latency search, its truncation-error curve, the factor
modules it makes and how it fills them, and which factors the paper's freezing trains. The
planner, the passes, the freezer and the exporter ask the handler; none of them branches on
a method's name.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Mapping, Sequence

import torch
from torch import nn

from ..decompose import Whitening
from ..ranks.rules import quantize_rank

if TYPE_CHECKING:
    from ..config import LRDConfig
    from ..factorized import LayerSpec

__all__ = [
    "Method", "Ranks", "window", "along_ray", "tail_energy", "tail_sums", "whiten_input", "unwhiten_input",
    "weigh_output", "unweigh_output", "output_weights", "data_aware_weight", "error_from_tail",
]

Ranks = tuple[int, ...]
_FRACTIONS = (0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0, 1.125, 1.25, 1.5, 1.75, 2.0)


class Method:
    """One decomposition method. Subclasses set the class attributes and the abstract methods.

    Attributes:
        name: the name used in configs and plans (``"svd"``, ``"tucker2"``, ``"cp"``).
        rank_names: what each rank is (``("rank",)``, ``("r_in", "r_out")``).
        paper_trainable: role → trainable under the paper's freezing policy (paper 2.2).
        rank_rules: the rank rules this method can follow.
        data_aware: whether `factorize` uses calibration statistics (input whitening).
    """

    name: ClassVar[str] = ""
    rank_names: ClassVar[tuple[str, ...]] = ("rank",)
    paper_trainable: ClassVar[Mapping[str, bool]] = {}
    rank_rules: ClassVar[tuple[str, ...]] = ("ratio", "fixed", "energy", "vbmf")
    data_aware: ClassVar[bool] = True

    @property
    def n_ranks(self) -> int:
        return len(self.rank_names)

    # -- which layers, which ranks -----------------------------------------------------------------
    def applies(self, spec: "LayerSpec") -> str:
        """Empty when the method can decompose a layer of ``spec``; else why not."""
        raise NotImplementedError

    def caps(self, spec: "LayerSpec") -> Ranks:
        """The largest each rank may be; a rank at its cap drops that side's factor, if any."""
        raise NotImplementedError

    def target_ranks(self, weight: torch.Tensor, spec: "LayerSpec", config: "LRDConfig", stats: Any = None) -> Ranks:
        """The ranks the config's rank rule gives (before quantization; within the caps)."""
        raise NotImplementedError

    def quantize(self, ranks: Ranks, caps: Ranks, quantum: int) -> Ranks:
        """Round each rank down to a multiple of ``quantum``; a rank at its cap stays."""
        return tuple(r if r >= c else quantize_rank(r, quantum) for r, c in zip(ranks, caps))

    def candidates(self, target: Ranks, caps: Ranks, window_: float, quantum: int) -> list[Ranks]:
        """Candidates for the latency search (paper Alg. 1): quantized ranks in
        ``[ceil((1 - window)·R), R]`` plus R, smallest first."""
        return [(r,) for r in window(target[0], window_, quantum, caps[0])]

    def global_candidates(self, target: Ranks, caps: Ranks, quantum: int, *, every: bool = False) -> list[Ranks]:
        """Quantized ranks for global allocation, within the caps: a dozen from R/4 to 2R (each
        is timed in latency mode), or with ``every`` every multiple of the quantum (a
        parameter budget needs only error curves, which are cheap)."""
        values = _every if every else _scaled
        return [(v,) for v in values(target[0], caps[0], quantum)]

    def error_curve(self, weight: torch.Tensor, spec: "LayerSpec", stats: Any = None) -> Callable[[Ranks], float]:
        """``ranks -> relative squared error`` of the layer's approximation: of the weight,
        or with ``stats`` (calibration) of the layer's output on the calibration inputs."""
        raise NotImplementedError

    # -- the factors ---------------------------------------------------------------------------------
    def modules(self, spec: "LayerSpec", ranks: Ranks, *, device=None, dtype=None) -> "OrderedDict[str, nn.Module]":
        """The factor modules (no bias; the caller adds it to the last), keyed by role."""
        raise NotImplementedError

    def factorize(self, weight: torch.Tensor, spec: "LayerSpec", ranks: Ranks, *, stats: Any = None,
                  options: Mapping[str, Any] | None = None, report: dict | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
        """The factors' weights (parameter name inside the `Factorized` → tensor, any float dtype)."""
        raise NotImplementedError

    def phases(self) -> tuple[frozenset[str], frozenset[str]]:
        """Sequential freezing: the roles trained in phase 0 (the paper's) and in phase 1 (the rest)."""
        on = frozenset(r for r, t in self.paper_trainable.items() if t)
        return on, frozenset(self.paper_trainable) - on

    def __repr__(self) -> str:
        return f"<fxlrd method {self.name!r}>"


def window(target: int, window_: float, quantum: int, cap: int) -> list[int]:
    """Multiples of ``quantum`` in ``[ceil((1 - window)·target), target]``, plus ``target``."""
    lo = max(1, math.ceil((1 - window_) * target))
    values = {r for r in range(lo, target + 1) if r % quantum == 0} | {target}
    return sorted(v for v in values if v <= cap)


def _scaled(r: int, cap: int, quantum: int) -> list[int]:
    return sorted({min(cap, max(1, quantize_rank(math.floor(r * f), quantum))) for f in _FRACTIONS})


def _every(r: int, cap: int, quantum: int) -> list[int]:
    """Every multiple of ``quantum`` up to ``cap`` (and the ranks below the quantum)."""
    return sorted(set(range(1, min(quantum, cap + 1))) | set(range(quantum, cap + 1, quantum)) | {cap})


def along_ray(target: Ranks, caps: Ranks, values: Callable[[int, int], Sequence[int]], quantum: int) -> list[Ranks]:
    """Two-rank candidates: a side at its cap stays there, otherwise the first rank takes
    ``values`` and the second follows the ray ``r2 / r1`` of the target (Tucker)."""
    (r1, r2), (c, s) = target, caps
    r1, r2 = max(r1, 1), max(r2, 1)  # a thin layer's ratio rule can give rank 0: the ray starts at 1
    if r1 >= c and r2 >= s:
        return [(r1, r2)]
    if r1 >= c:
        return [(c, v) for v in values(r2, s)]
    if r2 >= s:
        return [(v, s) for v in values(r1, c)]
    ray = r2 / r1
    out = set()
    for v in values(r1, c):
        w = r2 if v == r1 else min(s, max(1, quantize_rank(math.floor(ray * v + 1e-9), quantum)))
        out.add((v, w))
    return sorted(out)


def tail_energy(singular_values: torch.Tensor) -> torch.Tensor:
    """``tail[r] = Σ_{i ≥ r} σ_i² / Σ σ²`` for r = 0..len(σ): the relative squared error of
    truncating to rank r."""
    sq = singular_values.double() ** 2
    total = sq.sum().clamp_min(1e-300)
    return torch.cat([sq.flip(0).cumsum(0).flip(0), sq.new_zeros(1)]) / total


def whiten_input(weight: torch.Tensor, w: Whitening) -> torch.Tensor:
    """``W ×_C Sᵀ``: the weight seen in whitened input coordinates, so that the Frobenius
    error of the whitened weight is the output error on the calibration inputs."""
    return torch.einsum("sc...,cd->sd...", weight.double(), w.factor)


def unwhiten_input(first_factor: torch.Tensor, w: Whitening) -> torch.Tensor:
    """Map the input-channel mode (dim 1) of the factor that takes the layer's input back from
    whitened coordinates: ``F ×_C S⁻ᵀ``."""
    return torch.einsum("rc...,cd->rd...", first_factor.double(), w.inverse())


def output_weights(stats: Any) -> torch.Tensor | None:
    """The per-output-channel weights of data-aware stats (model-output sensitivity), if any."""
    get = getattr(stats, "output_weights", None)
    return get() if callable(get) else None


def weigh_output(weight: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    """The weight in output coordinates where errors count as the model's output sees them:
    ``Lᵀ W`` with ``L Lᵀ = M`` for a sensitivity matrix ``M``, or output channel s scaled by
    ``√w_s`` for a diagonal ``w`` (then ``‖Lᵀ δW‖² = tr(δWᵀ M δW)``)."""
    if w is None:
        return weight
    if w.dim() == 2:
        return torch.einsum("ts,t...->s...", _cholesky(w), weight.double())
    return weight * w.sqrt().to(weight.dtype).reshape(-1, *([1] * (weight.dim() - 1)))


def unweigh_output(last_factor: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    """Undo `weigh_output` on the factor that produces the layer's output (its dim 0)."""
    if w is None:
        return last_factor
    if w.dim() == 2:
        flat = last_factor.double().reshape(last_factor.shape[0], -1)
        return torch.linalg.solve_triangular(_cholesky(w).T, flat, upper=True).reshape(last_factor.shape)
    return last_factor.double() / w.sqrt().double().reshape(-1, *([1] * (last_factor.dim() - 1)))


def _cholesky(m: torch.Tensor) -> torch.Tensor:
    """Lower ``L`` with ``L Lᵀ = m`` (symmetric positive definite: `SiteStats.output_weights`
    adds a floor to its diagonal)."""
    m = m.double()
    return torch.linalg.cholesky((m + m.T) / 2)


def data_aware_weight(weight: torch.Tensor, stats: Any) -> tuple[torch.Tensor, Whitening | None, torch.Tensor | None]:
    """The weight as data-aware methods decompose it: input mode whitened by the calibration
    inputs, output mode weighted by the model's sensitivity (when known); float64."""
    w = weight.detach().double().cpu()
    if stats is None:
        return w, None, None
    white = stats.whitening()
    out_w = output_weights(stats)
    return weigh_output(whiten_input(w, white), out_w), white, out_w


def error_from_tail(tail_abs: torch.Tensor, total: float, absolute: bool) -> Callable[[int], float]:
    """Errors from absolute tail energies: as they are when they are already in units of the
    model's relative output error (sensitivity-weighted), else relative to ``total``."""
    scale = 1.0 if absolute else 1.0 / max(total, 1e-300)
    return lambda r: float(tail_abs[min(r, len(tail_abs) - 1)]) * scale


def tail_sums(singular_values: torch.Tensor) -> torch.Tensor:
    """``tail[r] = Σ_{i ≥ r} σ_i²`` for r = 0..len(σ)."""
    sq = singular_values.double() ** 2
    return torch.cat([sq.flip(0).cumsum(0).flip(0), sq.new_zeros(1)])
