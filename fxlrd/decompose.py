"""The decomposition math: truncated SVD, Tucker-2, CP, and input whitening. Knows nothing of torch.fx.

Weights are taken in PyTorch's layout: a linear ``W`` is ``(S, C)`` (out x in), a conv ``W``
is ``(S, C, *kernel)``. Factors are computed and returned in float64, whatever the weight's
dtype (bfloat16 and float32 included); callers cast them back to the layer's dtype.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, TypeVar

import numpy as np
import tensorly
import torch
from tensorly.decomposition import partial_tucker

__all__ = [
    "single_threaded", "user_threads", "thread_map", "SVDFactors", "TuckerFactors", "CPFactors", "Whitening", "leading_svd", "svd_factors", "tucker2_factors",
    "cp_factors", "unfold", "whitening",
]


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """Run linear algebra on one thread (numpy's BLAS and torch's intra-op pool).

    Layer weights are small matrices (at most a few thousand on a side): a second thread
    gains little, and BLAS and OpenMP worker threads busy-wait, so with anything else running
    on the machine a 768×768 eigendecomposition took 10 s on 2 threads and 0.1 s on one (here,
    2 cores). ResNet-50's decomposition: 4.4–5.0 s on 2 threads, 2.1 s on one.
    """
    previous = torch.get_num_threads()
    token = _USER_THREADS.set(_USER_THREADS.get() or previous)
    torch.set_num_threads(1)
    try:
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:  # pragma: no cover  (a declared dependency; degrade gracefully)
            yield
            return
        with threadpool_limits(limits=1, user_api="blas"):
            yield
    finally:
        torch.set_num_threads(previous)
        _USER_THREADS.reset(token)


_USER_THREADS: contextvars.ContextVar[int | None] = contextvars.ContextVar("fxlrd_user_threads", default=None)

_T = TypeVar("_T")
_R = TypeVar("_R")


def _one_thread_worker() -> None:
    torch.set_num_threads(1)  # this worker's own OpenMP pool; the worker dies with the executor


def thread_map(fn: Callable[[_T], _R], items: Iterable[_T], max_workers: int | None = None) -> list[_R]:
    """``[fn(x) for x in items]`` on as many threads as torch may use, each single-threaded.

    Factorizing one layer is a chain of small LAPACK/BLAS calls that scale poorly past one
    thread; factorizing layers side by side keeps every core busy (BERT-base's 73 layers on
    2 cores: 7.9 s one after another, 4.0 s two at a time). The eigensolvers
    release the GIL. The calling thread's linear algebra is made single-threaded for the
    duration (`single_threaded`) and restored after; results keep the order of ``items``,
    and the first exception raised by ``fn`` is raised here. ``max_workers`` caps the threads
    (callers bound memory with it: each worker holds one layer's float64 working copies).
    """
    items = list(items)
    workers = min(torch.get_num_threads(), len(items), max_workers or len(items))
    if workers <= 1:
        return [fn(x) for x in items]
    grad = torch.is_grad_enabled()

    def call(x: _T) -> _R:
        with torch.set_grad_enabled(grad):  # grad mode is thread-local
            return fn(x)

    with single_threaded(), ThreadPoolExecutor(workers, initializer=_one_thread_worker) as pool:
        return list(pool.map(call, items))


# tensorly's backend is process-wide state that its context manager saves and restores:
# two threads inside it at once could leave the user's backend changed.
_TENSORLY = threading.Lock()


def user_threads() -> int:
    """torch's intra-op thread count as the user set it (also inside `single_threaded`): what
    timing backends use by default."""
    return _USER_THREADS.get() or torch.get_num_threads()


@dataclass(frozen=True)
class SVDFactors:
    """``W ≈ out_factor @ in_factor`` with the singular values split as √Σ on both sides."""

    in_factor: torch.Tensor  # (r, C) = √Σ_r V_rᵀ
    out_factor: torch.Tensor  # (S, r) = U_r √Σ_r


@dataclass(frozen=True)
class TuckerFactors:
    """``W ≈ core ×₀ out_factor ×₁ in_factor``; a factor is None where its mode was not truncated."""

    in_factor: torch.Tensor | None  # (C, r1)
    core: torch.Tensor  # (r2, r1, *kernel), or with C / S in place of a rank not truncated
    out_factor: torch.Tensor | None  # (S, r2)


def leading_svd(matrix: np.ndarray, k: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ``k`` leading singular triplets ``(U, s, Vh)`` of a matrix, in float64.

    Computed from the eigendecomposition of the Gram matrix of the short side: layer weights
    are far from square (C x S·k² unfoldings, 2048 x 512 projections), and this is several
    times faster than a full SVD on a CPU while exact in float64 for the leading vectors.
    ``U s Vh`` is always the orthogonal projection of the matrix onto the kept subspace.
    The eigensolver is torch's (multi-threaded LAPACK): 768 x 768 in 44 ms against numpy's
    63 ms on a 2-core Xeon, which is most of a transformer's transform time.
    """
    m = np.asarray(matrix, dtype=np.float64)
    k = min(m.shape) if k is None else min(k, min(m.shape))
    wide = m.shape[0] <= m.shape[1]
    gram = m @ m.T if wide else m.T @ m
    evals, evecs = (t.numpy() for t in torch.linalg.eigh(torch.from_numpy(gram)))
    order = np.argsort(evals)[::-1][:k]
    vecs = evecs[:, order]
    s = np.sqrt(np.clip(evals[order], 0.0, None))
    safe = np.maximum(s, s[0] * 1e-12 if s.size and s[0] > 0 else 1.0)
    if wide:
        return vecs, s, (vecs.T @ m) / safe[:, None]
    u = (m @ vecs) / safe
    if s.size and s[-1] < s[0] * 1e-6:
        # Rank-deficient: columns for σ ≈ 0 are noise. Orthonormalise them (QR keeps the good
        # columns, which are orthonormal already, up to sign), as Tucker needs orthonormal factors.
        q, r = np.linalg.qr(u)
        u = q * np.where(np.diag(r) < 0, -1.0, 1.0)
    return u, s, vecs.T


def svd_factors(matrix: torch.Tensor, rank: int) -> SVDFactors:
    """Truncated SVD of a ``(S, C)`` matrix at ``rank`` (the Eckart–Young optimum)."""
    if not 1 <= rank <= min(matrix.shape):
        raise ValueError(f"rank {rank} outside [1, {min(matrix.shape)}] for a matrix of shape {tuple(matrix.shape)}")
    u, s, vh = leading_svd(matrix.detach().to(device="cpu", dtype=torch.float64).numpy(), rank)
    root = np.sqrt(s)
    return SVDFactors(in_factor=torch.from_numpy(root[:, None] * vh), out_factor=torch.from_numpy(u * root))


def unfold(tensor: torch.Tensor, mode: int) -> torch.Tensor:
    """Mode-``mode`` unfolding: that mode's fibres become the rows."""
    return tensor.movedim(mode, 0).reshape(tensor.shape[mode], -1)


def _tensorly_svd(matrix: np.ndarray, n_eigenvecs: int | None = None, **_: object):
    """`leading_svd` in the form tensorly's ``svd=`` argument takes."""
    return leading_svd(matrix, n_eigenvecs)


def tucker2_factors(weight: torch.Tensor, ranks: tuple[int, int], n_iter: int = 0) -> TuckerFactors:
    """Tucker-2 of a conv weight ``(S, C, *kernel)`` on its two channel modes, through tensorly.

    Args:
        weight: the conv weight.
        ranks: ``(r1, r2)``: input-side and output-side ranks. A rank equal to its mode's size
            leaves that mode untouched (Tucker-1): no square factor is made.
        n_iter: HOOI iterations after the HOSVD initialisation (0: plain HOSVD truncation).
    """
    r1, r2 = ranks
    out_channels, in_channels = weight.shape[:2]
    if not (1 <= r1 <= in_channels and 1 <= r2 <= out_channels):
        raise ValueError(f"ranks {ranks} outside [1, {in_channels}] x [1, {out_channels}] for weight {tuple(weight.shape)}")
    modes, mode_ranks = [], []
    if r2 < out_channels:
        modes.append(0)
        mode_ranks.append(r2)
    if r1 < in_channels:
        modes.append(1)
        mode_ranks.append(r1)
    w = weight.detach().to(device="cpu", dtype=torch.float64)
    if not modes:
        return TuckerFactors(in_factor=None, core=w, out_factor=None)
    # tensorly's backend is global state; pin numpy here whatever the user chose.
    with _TENSORLY, tensorly.backend_context("numpy"):
        (core, factors), _ = partial_tucker(
            w.numpy(), rank=mode_ranks, modes=modes, n_iter_max=n_iter, init="svd", svd=_tensorly_svd, tol=0
        )
    by_mode = dict(zip(modes, factors))
    as_torch = lambda a: None if a is None else torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    return TuckerFactors(in_factor=as_torch(by_mode.get(1)), core=as_torch(core), out_factor=as_torch(by_mode.get(0)))


@dataclass(frozen=True)
class CPFactors:
    """``W ≈ Σ_r out[:, r] ⊗ in[:, r] ⊗ k_1[:, r] ⊗ …``: one factor per mode of the weight,
    norms balanced across the modes (the scale of each rank-1 term shared equally)."""

    out_factor: torch.Tensor  # (S, R)
    in_factor: torch.Tensor  # (C, R)
    kernel_factors: tuple[torch.Tensor, ...]  # (k_i, R) per spatial dimension


def cp_factors(weight: torch.Tensor, rank: int, n_iter: int = 100, seed: int = 0) -> CPFactors:
    """CP (CANDECOMP/PARAFAC) decomposition of a conv weight ``(S, C, *kernel)`` through
    tensorly's ``parafac`` (SVD initialisation, alternating least squares), in float64."""
    from tensorly.decomposition import parafac

    if rank < 1:
        raise ValueError(f"CP rank must be >= 1, got {rank}")
    w = weight.detach().to(device="cpu", dtype=torch.float64).numpy()
    with _TENSORLY, tensorly.backend_context("numpy"):
        init = "svd" if rank <= min(w.shape) else "random"
        cp = parafac(w, rank=rank, n_iter_max=max(n_iter, 1), init=init, tol=1e-10, random_state=seed,
                     svd=_tensorly_svd if init == "svd" else "truncated_svd")  # fmt: skip
    weights, factors = cp
    factors = [np.asarray(f, dtype=np.float64) for f in factors]
    # Balance: each rank-1 term's scale (λ times the factor norms) shared equally by the modes.
    norms = np.stack([np.linalg.norm(f, axis=0) for f in factors])  # (modes, R)
    norms = np.where(norms > 0, norms, 1.0)
    scale = (np.abs(np.asarray(weights)) * norms.prod(0)) ** (1.0 / len(factors))
    sign = np.sign(np.asarray(weights, dtype=np.float64))
    sign = np.where(sign == 0, 1.0, sign)
    balanced = [f / n * scale for f, n in zip(factors, norms)]
    balanced[0] = balanced[0] * sign
    t = [torch.from_numpy(np.ascontiguousarray(f)) for f in balanced]
    return CPFactors(out_factor=t[0], in_factor=t[1], kernel_factors=tuple(t[2:]))


@dataclass(frozen=True)
class Whitening:
    """``G ≈ S Sᵀ`` for an input Gram matrix ``G`` (C×C), and how it was obtained."""

    factor: torch.Tensor  # S, (C, C), float64, invertible
    method: str  # "cholesky" or "eigh"
    damping: float  # λ added to the diagonal, relative to mean(diag G)
    note: str = ""

    def inverse(self) -> torch.Tensor:
        eye = torch.eye(self.factor.shape[0], dtype=self.factor.dtype)
        if self.method == "cholesky":
            return torch.linalg.solve_triangular(self.factor, eye, upper=False)
        return torch.linalg.solve(self.factor, eye)


def whitening(gram: torch.Tensor, *, max_damping: float = 1e-2) -> Whitening:
    """A square root ``S`` of the input Gram matrix with ``S Sᵀ = G + λ·mean(diag G)·I``.

    Cholesky first with no damping; on failure (singular ``G``: constant channels, fewer
    samples than channels) the damping grows from 1e-10 by ×10 only as far as needed, up to
    ``max_damping``; past that, an eigendecomposition with eigenvalues floored at
    ``max_damping·mean(diag G)``. Always float64.
    """
    g = gram.detach().to(dtype=torch.float64, device="cpu")
    g = (g + g.T) / 2
    n = g.shape[0]
    scale = float(g.diagonal().mean())
    if not math.isfinite(scale):
        raise ValueError("the calibration Gram matrix has NaN or infinite entries")
    if scale <= 0:  # all-zero inputs: any S works; the identity keeps the data-free result
        return Whitening(torch.eye(n, dtype=torch.float64), "eigh", 0.0, "all-zero inputs: identity used")
    eye = torch.eye(n, dtype=torch.float64)
    damping = 0.0
    while damping <= max_damping:
        factor, info = torch.linalg.cholesky_ex(g + damping * scale * eye)
        if int(info) == 0 and bool(torch.isfinite(factor).all()) and float(factor.diagonal().min()) > 0:
            note = "" if damping == 0 else f"Gram matrix singular: damping {damping:g}·mean(diag) added"
            return Whitening(factor, "cholesky", damping, note)
        damping = 1e-10 if damping == 0 else damping * 10
    evals, evecs = torch.linalg.eigh(g)
    floor = max_damping * scale
    factor = evecs * evals.clamp_min(floor).sqrt()
    return Whitening(factor, "eigh", max_damping, f"Cholesky failed: eigendecomposition, eigenvalues floored at {max_damping:g}·mean(diag)")
