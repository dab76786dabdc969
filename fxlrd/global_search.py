"""Global mode: ranks for a whole-model latency target with the least truncation error.

1. Time the original model once on the backend (``T``), and each decomposable layer
   (``t0``): the rest of the model costs ``T - Σ t0`` and does not change.
2. For each layer, options are: keep it (time ``t0``, error 0) or decompose it at one of a
   dozen quantized ranks from R/4 to 2R (R from the rank rule), each timed on the backend
   (cached) and scored by its relative truncation error ``‖W - Ŵ‖² / ‖W‖²`` — exact for SVD
   (Eckart–Young), the HOSVD bound (discarded energy of both unfoldings) for Tucker.
3. Choose one option per layer so that the predicted model time ``T_other + Σ t`` is at most
   ``T / target`` with the least summed error: a multiple-choice knapsack, solved by
   Lagrangian relaxation (`fxlrd.rank_search.solve_global`). Layers timed alone cost more
   than inside the model (no fusion with their norm and activation, one run call each), so
   times are used as fractions of the layers' total ``Σ t0``, not as absolute seconds.
4. Close the loop: build the chosen model, time it whole on the backend, and scale the
   internal target by ``target / measured`` (up to 3 rounds). The least-error choice whose
   *measured* speed-up reaches the target is kept; the rounds are recorded in the plan.
"""

from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING, Callable, Sequence

import torch
from torch import fx

from .decompose import unfold
from .errors import ConfigError
from .factorized import factorized_like
from .metrics import count_params
from .ranks import quantize_rank
from .rank_search import RankSearcher, solve_global

if TYPE_CHECKING:
    from .config import LRDConfig
    from .plan import Plan
    from .planner import _Todo

__all__ = ["plan_globally", "global_candidates", "truncation_errors"]

_FRACTIONS = (0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0, 1.125, 1.25, 1.5, 1.75, 2.0)


def global_candidates(method: str, target: tuple[int, ...], caps: tuple[int, ...], quantum: int) -> list[tuple[int, ...]]:
    """A dozen quantized ranks from R/4 to 2R along the layer's ray, within the caps."""

    def values(r: int, cap: int) -> list[int]:
        return sorted({min(cap, max(1, quantize_rank(math.floor(r * f), quantum))) for f in _FRACTIONS})

    if method == "svd":
        return [(v,) for v in values(target[0], caps[0])]
    (r1, r2), (c, s) = target, caps
    if r1 >= c:
        return [(c, v) for v in values(r2, s)]
    if r2 >= s:
        return [(v, s) for v in values(r1, c)]
    ray = r2 / r1
    return sorted({(v, min(s, max(1, quantize_rank(math.floor(ray * v), quantum)))) for v in values(r1, c)})


def _tail(s: torch.Tensor) -> torch.Tensor:
    """tail[r] = Σ_{i ≥ r} σ_i² / Σ σ², for r = 0..len(s)."""
    sq = s.double() ** 2
    total = sq.sum().clamp_min(1e-300)
    return torch.cat([sq.flip(0).cumsum(0).flip(0), sq.new_zeros(1)]) / total


def truncation_errors(weight: torch.Tensor, method: str):
    """A function ``ranks -> relative squared error`` for this weight."""
    w = weight.detach().double().cpu()
    if method == "svd":
        tail = _tail(torch.linalg.svdvals(w.reshape(w.shape[0], -1)))
        return lambda r: float(tail[min(r[0], len(tail) - 1)])
    out_tail, in_tail = _tail(torch.linalg.svdvals(unfold(w, 0))), _tail(torch.linalg.svdvals(unfold(w, 1)))
    return lambda r: float(in_tail[min(r[0], len(in_tail) - 1)] + out_tail[min(r[1], len(out_tail) - 1)])


def plan_globally(
    gm: fx.GraphModule, todos: "list[_Todo]", config: "LRDConfig", example_inputs: Sequence[torch.Tensor],
    plan: "Plan", fill: Callable[["_Todo", tuple[int, ...] | None, str], None], max_rounds: int = 3,
) -> None:
    """Choose every layer's ranks (or keep) for ``config.target_speedup``, calling ``fill``.

    Closed loop: solve on the layer timings, build the model, measure it whole on the backend,
    and correct the internal target by the measured/predicted gap, up to ``max_rounds``
    times; the least-error choice that measured at or above the target wins.
    """
    from fxlrd.passes import DecomposePass

    if len(example_inputs) != 1:
        raise ConfigError("target_speedup (global mode) supports models with one input tensor for now")
    target = config.target_speedup
    shape = tuple(example_inputs[0].shape)
    searcher = RankSearcher(config.latency)
    searcher.progress(len(todos))
    try:
        model_s = searcher.timer.time(copy.deepcopy(gm), shape)
        options = []
        for todo in todos:
            calls = len(todo.call_sites)
            t0 = searcher.time_layer(todo.module, todo.lp.input_shape) * calls
            error = truncation_errors(todo.module.weight, todo.method)
            opts: dict = {None: (t0, 0.0)}
            for ranks in global_candidates(todo.method, todo.ranks, todo.caps, config.latency.quantum):
                if count_params(factorized_like(todo.module, todo.method, ranks, device="meta")) >= todo.lp.params_before:
                    continue  # not a compression
                opts[ranks] = (searcher.time_ranks(todo.module, todo.method, ranks, todo.lp.input_shape) * calls, error(ranks))
            options.append(opts)
            searcher.cache.flush()
            searcher._tick()
    finally:
        searcher.close()
    # Layers timed alone cost more than inside the model (no fusion, a run call each), so
    # their sum can exceed the model's time: work in fractions of the layers' total.
    layers_s = sum(opt[None][0] for opt in options)
    other = max(0.0, model_s - layers_s) / model_s

    def solve(internal_target: float):
        keep_fraction = (1 / internal_target - other) / (1 - other)
        choices, met = solve_global(options, layers_s * keep_fraction if keep_fraction > 0 else 0.0)
        chosen_s = sum(opt[c][0] for opt, c in zip(options, choices))
        return choices, 1 / (other + (1 - other) * chosen_s / layers_s)

    def apply_choices(choices) -> None:
        for todo, choice in zip(todos, choices):
            fill(todo, choice, "" if choice is not None else "global: kept (least error for the target)")

    rounds, internal, best = [], target, None
    for _ in range(max_rounds):
        choices, predicted = solve(internal)
        apply_choices(choices)
        trial = DecomposePass(plan)(copy.deepcopy(gm)).graph_module
        measured = searcher.timer.speedup(copy.deepcopy(gm), trial, shape)
        error = sum(opt[c][1] for opt, c in zip(options, choices))
        rounds.append({"internal_target": internal, "predicted_speedup": predicted, "measured_speedup": measured, "total_error": error})
        if measured >= target and (best is None or error < best[1]):
            best = (choices, error, len(rounds) - 1)
        if target <= measured <= target * 1.05:
            break
        internal = max(1.0 + 1e-3, internal * target / measured)
    if best is None:  # never reached: the fastest measured
        i = max(range(len(rounds)), key=lambda k: rounds[k]["measured_speedup"])
        best = (solve(rounds[i]["internal_target"])[0], rounds[i]["total_error"], i)
    choices, error, index = best
    apply_choices(choices)
    plan.settings["global_search"] = {
        "target_speedup": target, "measured_speedup": rounds[index]["measured_speedup"],
        "met": rounds[index]["measured_speedup"] >= target, "model_original_ms": model_s * 1e3,
        "layers_original_ms": layers_s * 1e3, "other_fraction": other, "rounds": rounds, "chosen_round": index,
    }  # fmt: skip
    for todo, opts, choice in zip(todos, options, choices):
        todo.lp.latency = {
            "backend": config.latency.backend, "original_ms": opts[None][0] * 1e3,
            "candidates_ms": [[list(r), t * 1e3, e] for r, (t, e) in opts.items() if r is not None],
            "chosen": None if choice is None else list(choice), "note": "" if choice is not None else "global: kept",
        }  # fmt: skip
