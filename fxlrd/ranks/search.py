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
import sys
import time
from dataclasses import dataclass, field
from typing import Sequence

from torch import nn

from ..factorized import Factorized, LayerSpec, skeleton
from ..latency import LatencyCache, LatencyConfig, LayerTimer, default_cache_path, make_timer
from ..methods import get_method
from .context import Window
from .rules import bottleneck

__all__ = ["candidate_ranks", "select_ranks", "RankSearcher", "SearchResult"]

Ranks = tuple[int, ...]


def candidate_ranks(method: str, target: Ranks, full: Ranks, window: float, quantum: int) -> list[Ranks]:
    """The candidate ranks below ``target`` for one layer, smallest first, as the method's
    handler gives them (``full``: the most each rank may be; Tucker moves along its ray)."""
    return get_method(method).candidates(tuple(target), tuple(full), window, quantum)


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
                         disable=None if self.config.progress else True, file=sys.stderr, leave=False)  # fmt: skip
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

    def _key(self, module: nn.Module, input_shape: Sequence[int] | None = None, window: Window | None = None) -> str:
        """The cache key of ``module`` timed alone at ``input_shape``, or in ``window``."""
        dtype = str(next(module.parameters()).dtype).replace("torch.", "")
        body = " ".join(repr(module).split())  # the repr holds every hyper-parameter and shape
        where = f"window={window.key}" if window is not None else f"in={tuple(input_shape)}"
        return f"{self.timer.backend}|{self.timer.context}|{dtype}|{where}|{body}"

    def time_module(self, module: nn.Module, input_shape: Sequence[int]) -> float:
        return self.cache.timed(self._key(module, input_shape), lambda: self.timer.time(module, input_shape))

    def time_layer(self, layer: nn.Module, input_shape: Sequence[int]) -> float:
        """The original layer's time (timed on a copy: the user's module is not touched)."""
        return self.cache.timed(
            self._key(layer, input_shape), lambda: self.timer.time(copy.deepcopy(layer), input_shape)
        )

    def time_ranks(self, layer: nn.Module, method: str, ranks: Ranks, input_shape: Sequence[int],
                   spec: LayerSpec | None = None) -> float:  # fmt: skip
        from ..factorized import layer_spec

        spec = spec or layer_spec(layer)
        dtype = next(layer.parameters()).dtype
        meta = skeleton(spec, method, ranks, device="meta", dtype=dtype)
        key = self._key(meta, input_shape)  # a module repr names no device: the context does
        return self.cache.timed(key, lambda: self.timer.time(_random_skeleton(spec, method, ranks, dtype), input_shape))

    def time_in_window(self, window: Window, layer: nn.Module, method: str | None = None, ranks: Ranks | None = None,
                       spec: LayerSpec | None = None) -> float:  # fmt: skip
        """The window's time with the original ``layer`` in its site (``method=None``), or with
        the factor chain of ``method`` at ``ranks``; cached by the window's canonical key."""
        from ..factorized import layer_spec

        dtype = next(layer.parameters()).dtype
        if method is None:
            key = self._key(layer, window=window)
            make = lambda: copy.deepcopy(layer)  # noqa: E731
        else:
            spec = spec or layer_spec(layer)
            key = self._key(skeleton(spec, method, tuple(ranks), device="meta", dtype=dtype), window=window)
            make = lambda: _random_skeleton(spec, method, tuple(ranks), dtype)  # noqa: E731
        return self.cache.timed(key, lambda: self.timer.time_inputs(window.with_site(make()), window.example()))

    # -- the search -----------------------------------------------------------------------------
    def search(self, layer: nn.Module, method: str, target: Ranks, full: Ranks, input_shape: Sequence[int],
               spec: LayerSpec | None = None, window: Window | None = None, min_rank: int = 1) -> SearchResult:  # fmt: skip
        """Algorithm 1 for one layer, timed alone or, given a ``window``, in its neighbours'
        company (times are then the window's). Past the time budget: data-free quantized ranks.
        Candidates below ``min_rank`` are not timed (the plan would keep the layer)."""
        cfg = self.config
        if self.over_budget:
            ranks = get_method(method).quantize(tuple(target), tuple(full), cfg.quantum)
            self._tick()
            return SearchResult(ranks, None, note=f"time budget of {cfg.time_budget_s:g} s spent: data-free quantized ranks")
        def cut(r: Ranks) -> int | None:  # None: every mode kept whole, not held to min_rank (a rank of 0 is)
            return bottleneck(r, full)

        candidates = [r for r in candidate_ranks(method, target, full, cfg.window, cfg.quantum)
                      if cut(r) is None or cut(r) >= min_rank]  # fmt: skip
        if not candidates:
            self._tick()
            return SearchResult(None, None, note=f"no candidate rank in the search window is >= min_rank {min_rank}")
        if window is not None:
            original = self.time_in_window(window, layer)
            timings = {r: self.time_in_window(window, layer, method, r, spec) for r in candidates}
        else:
            original = self.time_layer(layer, input_shape)
            timings = {r: self.time_ranks(layer, method, r, input_shape, spec) for r in candidates}
        chosen = select_ranks(original, timings, cfg.tolerance)
        note = "" if chosen is not None else f"original is faster ({original * 1e3:.3f} ms vs {min(timings.values()) * 1e3:.3f} ms)"
        if window is not None:
            note = f"timed in a window of {window.size} neighbouring operations" + (f"; {note}" if note else "")
        self._tick()
        return SearchResult(chosen, original, timings, note)


def _random_skeleton(spec: LayerSpec, method: str, ranks: Ranks, dtype) -> Factorized:
    module = skeleton(spec, method, ranks, device="cpu", dtype=dtype)
    for p in module.parameters():  # random weights: latency depends only on shapes
        p.data.normal_(0, 0.02)
    return module
