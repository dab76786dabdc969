"""Latency-quantized ranks: choose each layer's ranks by measured time (paper Algorithm 1).

For a layer with target ranks R (from the rank rule), the candidates are the ranks in
``[ceil((1 - window)·R), R]`` that are multiples of ``quantum`` (plus R), along the Tucker ray
``r2/r1 = R2/R1``. Each candidate and the original layer are timed on the target backend; the
chosen ranks are the largest whose time is within ``(1 + tolerance)`` of the fastest. If even
they are not faster than the original layer, the layer is kept (the paper's "ORG" rows).

The paper's pseudo-code picks ``argmax Δt(r)``, the rank just past a latency cliff; "the
largest rank as fast as the fastest" is our well-defined reading of it: it keeps as much
accuracy as possible for the best speed the window offers.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Sequence

from torch import nn

from .factorized import factorized_like
from .latency import LatencyCache, LatencyConfig, LayerTimer, default_cache_path, make_timer
from .ranks import quantize_rank

__all__ = ["candidate_ranks", "select_ranks", "RankSearcher", "SearchResult", "solve_global"]

Ranks = tuple[int, ...]


def _window(target: int, window: float, quantum: int, cap: int) -> list[int]:
    lo = max(1, math.ceil((1 - window) * target))
    values = {r for r in range(lo, target + 1) if r % quantum == 0} | {target}
    return sorted(v for v in values if v <= cap)


def candidate_ranks(method: str, target: Ranks, full: Ranks, window: float, quantum: int) -> list[Ranks]:
    """The candidate ranks below ``target`` for one layer, smallest first.

    ``full`` is ``(min(C, S),)`` for SVD and ``(C, S)`` for Tucker. A Tucker mode at its full
    size stays whole; otherwise r1 moves through the window and r2 follows the ray.
    """
    if method == "svd":
        return [(r,) for r in _window(target[0], window, quantum, full[0])]
    (r1, r2), (c, s) = target, full
    if r1 >= c and r2 >= s:
        return [target]
    if r1 >= c:
        return [(c, v) for v in _window(r2, window, quantum, s)]
    if r2 >= s:
        return [(v, s) for v in _window(r1, window, quantum, c)]
    ray = r2 / r1
    out = set()
    for v in _window(r1, window, quantum, c):
        w = r2 if v == r1 else min(s, max(1, quantize_rank(math.floor(ray * v + 1e-9), quantum)))
        out.add((v, w))
    return sorted(out)


def select_ranks(original_s: float | None, timings: dict[Ranks, float], tolerance: float) -> Ranks | None:
    """The largest candidate within ``(1 + tolerance)`` of the fastest; None when it is not
    faster than the original layer (``original_s``), i.e. keep the layer."""
    if not timings:
        return None
    fastest = min(timings.values())
    chosen = max((r for r, t in timings.items() if t <= (1 + tolerance) * fastest), key=lambda r: (sum(r), r))
    if original_s is not None and timings[chosen] >= original_s:
        return None
    return chosen


@dataclass
class SearchResult:
    """What the search found for one layer: chosen ranks (None: keep) and every timing."""

    ranks: Ranks | None
    original_s: float | None
    candidates: dict[Ranks, float] = field(default_factory=dict)
    note: str = ""

    def record(self, backend: str) -> dict:
        """The JSON-ready record kept in the plan."""
        return {
            "backend": backend,
            "original_ms": None if self.original_s is None else self.original_s * 1e3,
            "candidates_ms": [[list(r), t * 1e3] for r, t in sorted(self.candidates.items())],
            "chosen": None if self.ranks is None else list(self.ranks),
            "note": self.note,
        }


class RankSearcher:
    """Times layers and candidates through a `LayerTimer`, with the disk cache and a budget."""

    def __init__(self, config: LatencyConfig, timer: LayerTimer | None = None, cache: LatencyCache | None = None):
        self.config = config
        self.timer = timer or make_timer(config)
        path = None if not config.cache else (config.cache_path or default_cache_path())
        self.cache = cache or LatencyCache(path)
        self.started = time.perf_counter()
        self._bar = None

    # -- progress -------------------------------------------------------------------------------
    def progress(self, total: int):
        from tqdm.auto import tqdm

        self._bar = tqdm(total=total, desc=f"latency search ({self.config.backend})", unit="layer",
                         disable=not self.config.progress, file=sys.stderr, leave=False)  # fmt: skip
        return self._bar

    def _tick(self) -> None:
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(cache_hits=self.cache.hits, timed=self.cache.misses)

    def close(self) -> None:
        self.cache.flush()
        if self._bar is not None:
            self._bar.close()

    # -- timing ---------------------------------------------------------------------------------
    @property
    def over_budget(self) -> bool:
        budget = self.config.time_budget_s
        return budget is not None and time.perf_counter() - self.started > budget

    def _key(self, module: nn.Module, input_shape: Sequence[int]) -> str:
        dtype = str(next(module.parameters()).dtype).replace("torch.", "")
        body = " ".join(repr(module).split())  # the repr holds every hyper-parameter and shape
        return f"{self.timer.backend}|{self.timer.context}|{dtype}|in={tuple(input_shape)}|{body}"

    def time_module(self, module: nn.Module, input_shape: Sequence[int]) -> float:
        return self.cache.timed(self._key(module, input_shape), lambda: self.timer.time(module, input_shape))

    def time_layer(self, layer: nn.Module, input_shape: Sequence[int]) -> float:
        """The original layer's time (timed on a copy: the user's module is not touched)."""
        return self.cache.timed(
            self._key(layer, input_shape), lambda: self.timer.time(copy.deepcopy(layer), input_shape)
        )

    def time_ranks(self, layer: nn.Module, method: str, ranks: Ranks, input_shape: Sequence[int]) -> float:
        skeleton = factorized_like(layer, method, ranks, device="meta")
        key = self._key(skeleton, input_shape)  # a module repr names no device: the context does
        if (hit := self.cache.get(key)) is not None:
            return hit
        module = factorized_like(layer, method, ranks, device="cpu")
        value = self.timer.time(module, input_shape)
        self.cache.put(key, value)
        return value

    # -- the search -----------------------------------------------------------------------------
    def search(self, layer: nn.Module, method: str, target: Ranks, full: Ranks, input_shape: Sequence[int]) -> SearchResult:
        """Algorithm 1 for one layer. Past the time budget: data-free quantized ranks."""
        cfg = self.config
        if self.over_budget:
            ranks = tuple(r if r >= f else quantize_rank(r, cfg.quantum) for r, f in zip(target, full))
            self._tick()
            return SearchResult(ranks, None, note=f"time budget of {cfg.time_budget_s:g} s spent: data-free quantized ranks")
        original = self.time_layer(layer, input_shape)
        timings = {r: self.time_ranks(layer, method, r, input_shape) for r in candidate_ranks(method, target, full, cfg.window, cfg.quantum)}
        chosen = select_ranks(original, timings, cfg.tolerance)
        note = "" if chosen is not None else f"original is faster ({original * 1e3:.3f} ms vs {min(timings.values()) * 1e3:.3f} ms)"
        self._tick()
        return SearchResult(chosen, original, timings, note)


def solve_global(options: list[dict[Ranks | None, tuple[float, float]]], budget_s: float) -> tuple[list[Ranks | None], bool]:
    """Pick one option per layer so that the summed time fits ``budget_s`` with the least
    summed error: a multiple-choice knapsack, solved by Lagrangian relaxation.

    ``options[i]`` maps a choice (ranks, or None for the original layer) to ``(time_s, error)``.
    For a price λ on time, each layer independently takes ``argmin error + λ·time``; λ is
    bisected to the smallest price whose choices fit the budget, then time left over is spent
    greedily on lower-error options. Returns the choices and
    whether the budget was met (if not, the fastest choice of every layer).
    """
    def pick(lam: float) -> list[Ranks | None]:
        return [min(opt, key=lambda k: (opt[k][1] + lam * opt[k][0], opt[k][0])) for opt in options]

    def total(choice: list[Ranks | None]) -> float:
        return sum(opt[c][0] for opt, c in zip(options, choice))

    fastest = [min(opt, key=lambda k: (opt[k][0], opt[k][1])) for opt in options]
    if total(fastest) > budget_s:
        return fastest, False
    if total(pick(0.0)) <= budget_s:
        return pick(0.0), True
    lo, hi = 0.0, 1.0
    while total(pick(hi)) > budget_s:
        hi *= 4
        if hi > 1e12:
            return fastest, True
    for _ in range(60):
        mid = (lo + hi) / 2
        if total(pick(mid)) <= budget_s:
            hi = mid
        else:
            lo = mid
    return _spend_slack(options, pick(hi), budget_s), True


def _spend_slack(options, choice, budget_s: float):
    """Greedy repair after the relaxation: while time is left in the budget, move a layer to a
    lower-error option that still fits (best error saved per second first). Identical layers
    switch at the same price, so the relaxation alone leaves such slack unused."""
    choice = list(choice)
    while True:
        slack = budget_s - sum(opt[c][0] for opt, c in zip(options, choice))
        best, best_gain = None, 0.0
        for i, opt in enumerate(options):
            t_now, e_now = opt[choice[i]]
            for k, (t, e) in opt.items():
                if e < e_now and t - t_now <= slack + 1e-15:
                    gain = (e_now - e) / max(t - t_now, 1e-12)
                    if best is None or gain > best_gain:
                        best, best_gain = (i, k), gain
        if best is None:
            return choice
        choice[best[0]] = best[1]
