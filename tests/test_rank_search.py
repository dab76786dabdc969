"""Latency-quantized ranks: the selection rule, candidates, global solver, search in the planner."""

import copy
import itertools
import math

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from torch import nn

import fxlrd
from fxlrd import ConfigError, LRDConfig
from fxlrd.latency import LatencyConfig, LayerTimer
from fxlrd.ranks.allocate import solve_global, solve_two_budgets
from fxlrd.ranks.search import candidate_ranks, select_ranks

# --- the selection rule on synthetic timing tables ------------------------------------------------


def test_picks_largest_rank_within_tolerance_of_fastest():
    # The paper's Fig. 2 shape: a cliff after 256.
    timings = {(232,): 1.00, (240,): 1.01, (248,): 1.015, (256,): 1.019, (264,): 1.30, (309,): 1.35}
    assert select_ranks(2.0, timings, tolerance=0.02) == (256,)
    assert select_ranks(2.0, timings, tolerance=0.0) == (232,)


def test_keeps_the_original_when_no_candidate_is_faster():
    timings = {(8,): 1.2, (16,): 1.1}
    assert select_ranks(1.0, timings, 0.02) is None
    assert select_ranks(1.1, timings, 0.02) is None  # as fast is not faster


def test_ties_go_to_the_largest_rank():
    assert select_ranks(5.0, {(8, 8): 1.0, (16, 16): 1.0, (24, 24): 1.0}, 0.0) == (24, 24)


def test_candidates_window_quantum_and_target():
    assert candidate_ranks("svd", (309,), (512,), 0.25, 8) == [(r,) for r in (232, 240, 248, 256, 264, 272, 280, 288, 296, 304, 309)]
    assert candidate_ranks("svd", (10,), (64,), 0.25, 1) == [(8,), (9,), (10,)]
    assert candidate_ranks("svd", (5,), (64,), 0.25, 8) == [(5,)]


def test_tucker_candidates_follow_the_ray():
    cands = candidate_ranks("tucker2", (40, 80), (128, 256), 0.25, 8)
    assert (40, 80) in cands and all(r2 == 2 * r1 for r1, r2 in cands if (r1, r2) != (40, 80))
    # Tucker-1: the full mode stays whole.
    assert all(r1 == 3 for r1, _ in candidate_ranks("tucker2", (3, 22), (3, 64), 0.25, 8))


# --- global solver ----------------------------------------------------------------------------------

option_tables = st.lists(
    st.dictionaries(st.one_of(st.none(), st.tuples(st.integers(1, 64))), st.tuples(st.floats(0.1, 10), st.floats(0, 1)),
                    min_size=1, max_size=4),
    min_size=1, max_size=5,
)  # fmt: skip


@given(option_tables, st.floats(0.5, 40))
def test_global_solution_fits_the_budget_and_is_near_optimal(options, budget):
    choices, met = solve_global(options, budget)
    total_t = sum(o[c][0] for o, c in zip(options, choices))
    total_e = sum(o[c][1] for o, c in zip(options, choices))
    feasible = [combo for combo in itertools.product(*[list(o) for o in options])
                if sum(o[c][0] for o, c in zip(options, combo)) <= budget]  # fmt: skip
    assert met == bool(feasible)
    if feasible:
        assert total_t <= budget + 1e-9
        best = min(sum(o[c][1] for o, c in zip(options, combo)) for combo in feasible)
        # Lagrangian relaxation can miss the optimum by at most one layer's error range.
        slack = max(max(v[1] for v in o.values()) - min(v[1] for v in o.values()) for o in options)
        assert total_e <= best + slack + 1e-9


integer_tables = st.lists(
    st.dictionaries(st.one_of(st.none(), st.tuples(st.integers(0, 64))), st.tuples(st.integers(1, 16), st.floats(0, 1)),
                    min_size=1, max_size=5),
    min_size=1, max_size=5,
)  # fmt: skip


@example([{None: (6, 0.0), (0,): (5, 0.145), (1,): (11, 0.434), (2,): (3, 0.445)},
          {None: (8, 0.0), (0,): (15, 0.965), (1,): (2, 0.718), (2,): (6, 0.566), (3,): (13, 0.684)},
          {None: (14, 0.0), (0,): (1, 0.769)}, {None: (9, 0.0), (0,): (13, 0.454)}], 36)
@given(integer_tables, st.integers(1, 60))
def test_with_whole_costs_the_solution_is_the_least_error_one(options, budget):
    # parameter counts are whole numbers: the dynamic programme makes the choice exact (the relaxation alone
    # kept 0.769 where 0.145 fits)
    choices, met = solve_global(options, budget)
    feasible = [combo for combo in itertools.product(*[list(o) for o in options])
                if sum(o[c][0] for o, c in zip(options, combo)) <= budget]  # fmt: skip
    assert met == bool(feasible)
    if feasible:
        assert sum(o[c][0] for o, c in zip(options, choices)) <= budget
        best = min(sum(o[c][1] for o, c in zip(options, combo)) for combo in feasible)
        assert sum(o[c][1] for o, c in zip(options, choices)) <= best + 1e-9


def test_a_budget_of_zero_is_met_by_options_that_cost_nothing():
    choices, met = solve_global([{None: (0.5, 0.0), "a": (0.0, 1.0)}], 0.0)  # divided by zero
    assert (choices, met) == (["a"], True)


@given(option_tables, st.floats(0.5, 20), st.floats(0, 20))
def test_more_budget_never_costs_more_error(options, budget, extra):
    a, met_a = solve_global(options, budget)
    b, met_b = solve_global(options, budget + extra)
    err = lambda ch: sum(o[c][1] for o, c in zip(options, ch))  # noqa: E731
    if met_a:
        assert err(b) <= err(a) + 1e-9


triple_tables = st.lists(
    st.dictionaries(st.one_of(st.none(), st.tuples(st.integers(1, 64))),
                    st.tuples(st.floats(0.1, 10), st.floats(1, 100), st.floats(0, 1)), min_size=1, max_size=4),
    min_size=1, max_size=4,
)  # fmt: skip


@given(triple_tables, st.floats(0.5, 40), st.floats(1, 400))
def test_two_budgets_are_both_met_or_the_fastest_of_that_size(options, time_budget, param_budget):
    choices, met = solve_two_budgets(options, time_budget, param_budget)
    total = lambda i, ch: sum(o[c][i] for o, c in zip(options, ch))  # noqa: E731
    combos = list(itertools.product(*[list(o) for o in options]))
    both = [c for c in combos if total(0, c) <= time_budget and total(1, c) <= param_budget]
    sized = [c for c in combos if total(1, c) <= param_budget]
    if met:
        assert total(0, choices) <= time_budget + 1e-9 and total(1, choices) <= param_budget + 1e-9
    elif sized:
        # the speed is out of reach at this size: the fastest model of this size, nearly
        assert total(1, choices) <= param_budget + 1e-9
        slack = max(max(v[0] for v in o.values()) - min(v[0] for v in o.values()) for o in options)
        assert total(0, choices) <= min(total(0, c) for c in sized) + slack + 1e-9
    if both and met:
        slack = max(max(v[2] for v in o.values()) - min(v[2] for v in o.values()) for o in options)
        assert total(2, choices) <= min(total(2, c) for c in both) + slack * len(options) + 1e-9


# --- search inside the planner, with a synthetic timer ---------------------------------------------


class CostTimer(LayerTimer):
    """Time = parameter count, plus a cliff for ranks that are not multiples of 16."""

    backend, context = "synthetic", "test"

    def __init__(self):
        self.calls = 0

    def time(self, module, input_shape):
        self.calls += 1
        params = sum(p.numel() for p in module.parameters())
        odd = any(m.weight.shape[0] % 16 for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
        return params * (1.5 if odd else 1.0) * 1e-9

    def speedup(self, original, other, input_shape):
        return self.time(original, input_shape) / self.time(other, input_shape)

    def time_model(self, model, inputs):
        return self.time(model, None)

    def speedup_model(self, original, other, inputs):
        return self.time(original, None) / self.time(other, None)


def install_timer(monkeypatch, timer: LayerTimer) -> LayerTimer:
    """Every latency search times with ``timer``."""
    monkeypatch.setattr("fxlrd.ranks.search.make_timer", lambda config: timer)
    return timer


@pytest.fixture
def cost_timer(monkeypatch):
    return install_timer(monkeypatch, CostTimer())


def _model():
    return nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(128, 128, 1), nn.Flatten(), nn.Linear(128 * 8 * 8, 100))  # fmt: skip


def test_search_records_timings_and_chooses_by_them(cost_timer, tmp_path):
    x = torch.randn(1, 3, 8, 8)
    lat = LatencyConfig(cache_path=tmp_path / "c.json", quantum=8, progress=False)
    plan = fxlrd.plan(_model(), LRDConfig(latency=lat), example_inputs=x)
    lp = plan["2"]
    assert lp.latency["backend"] == "onnxruntime" and lp.latency["original_ms"] > 0
    cands = {tuple(r): t for r, t in lp.latency["candidates_ms"]}
    assert len(cands) >= 2
    expected = select_ranks(lp.latency["original_ms"], cands, lat.tolerance)
    assert (lp.ranks if lp.decomposed else None) == expected
    assert all(r % 16 == 0 for r in lp.ranks)  # avoids the synthetic cliff


def test_warm_cache_times_nothing(cost_timer, tmp_path):
    x = torch.randn(1, 3, 8, 8)
    cfg = LRDConfig(latency=LatencyConfig(cache_path=tmp_path / "c.json", progress=False))
    first = fxlrd.plan(_model(), cfg, example_inputs=x)
    calls = cost_timer.calls
    second = fxlrd.plan(_model(), cfg, example_inputs=x)
    assert calls > 0 and cost_timer.calls == calls
    assert first.to_dict() == second.to_dict()


def test_layers_outside_the_search_are_untouched(cost_timer, tmp_path):
    x = torch.randn(1, 3, 8, 8)
    lat = LatencyConfig(cache_path=tmp_path / "c.json", progress=False)
    plain = fxlrd.plan(_model(), LRDConfig(exclude=["6"]), example_inputs=x)
    searched = fxlrd.plan(_model(), LRDConfig(exclude=["6"], latency=lat), example_inputs=x)
    assert searched["6"] == plain["6"] and searched["6"].latency is None
    assert searched["6"].method == "keep"


def test_time_budget_falls_back_to_quantized_ranks(cost_timer, tmp_path):
    x = torch.randn(1, 3, 8, 8)
    lat = LatencyConfig(cache_path=tmp_path / "c.json", time_budget_s=1e-9, quantum=8, progress=False)
    plan = fxlrd.plan(_model(), LRDConfig(latency=lat), example_inputs=x)
    for lp in plan.decomposed:
        assert "time budget" in lp.latency["note"]
    assert "time budget" in plan.table()
    assert cost_timer.calls == 0


def test_missing_example_inputs_is_a_clear_error():
    with pytest.raises(ConfigError, match="needs example_inputs"):
        fxlrd.plan(_model(), LRDConfig(latency=LatencyConfig()))


def test_global_mode_meets_its_predicted_target(cost_timer, tmp_path):
    x = torch.randn(1, 3, 8, 8)
    lat = LatencyConfig(cache_path=tmp_path / "c.json", progress=False)
    plan = fxlrd.plan(_model(), LRDConfig(target_speedup=1.5, latency=lat), example_inputs=x)
    g = plan.settings["global_search"]
    assert g["met"] and g["measured_speedup"] >= 1.5 and 1 <= len(g["rounds"]) <= 4
    assert "trials_timed" not in g  # neither merged nor branched
    # The synthetic timer's time is the parameter count: check the measurement against it.
    gm = fxlrd.apply(_model(), plan)
    timer = CostTimer()
    assert timer.time(_model(), None) / timer.time(gm, None) == pytest.approx(g["measured_speedup"])
    with pytest.warns(UserWarning, match=r"target_speedup=1000 was not reached: the model chosen measured \d") as caught:
        hard = fxlrd.plan(_model(), LRDConfig(target_speedup=1000, latency=lat), example_inputs=x)
    assert not hard.settings["global_search"]["met"]
    other = hard.settings["global_search"]["other_fraction"]
    assert 0 < other < 1  # time outside the layers: the message names the ceiling it sets
    assert any(f"no ranks give more than {1 / other:.2f}x" in str(w.message) for w in caught)


def test_global_mode_keeps_the_model_when_every_trial_is_slower():
    """Measured whole, each decomposed trial may run slower than the original (thin layers on
    some backends): then keeping every layer (1.0x) beats all of them."""
    from fxlrd.ranks.allocate import closed_loop

    options = [{None: (1.0, 0.0), (4,): (0.5, 1.0)}, {None: (1.0, 0.0), (8,): (0.6, 0.5)}]
    choices, record = closed_loop(options, 1.5, 2.0, lambda choices: 0.8 if any(choices) else 1.0)
    assert choices == [None, None] and record["measured_speedup"] == 1.0 and not record["met"]
    assert record["kept_all"] and record["chosen_round"] is None  # the rounds are the measured trials only
    assert all(r["measured_speedup"] == 0.8 for r in record["rounds"])
    sized = closed_loop(options, 1.5, 2.0, lambda c: 0.8, params=[{None: 10, (4,): 4}, {None: 10, (8,): 5}],
                        param_budget=12)[0]  # fmt: skip
    assert sized != [None, None]  # a size budget is a hard limit: the fastest model within it, not the original


def test_global_mode_says_why_it_kept_every_layer(monkeypatch, tmp_path):
    class Slower(CostTimer):
        def speedup_model(self, original, other, inputs):
            return 0.8  # every decomposed model measured slower than the original

    install_timer(monkeypatch, Slower())
    lat = LatencyConfig(cache_path=tmp_path / "c.json", progress=False)
    with pytest.warns(UserWarning, match="every layer is kept: each model tried was slower than the original"):
        plan = fxlrd.plan(_model(), LRDConfig(target_speedup=1.5, latency=lat), example_inputs=torch.randn(1, 3, 8, 8))
    assert plan.settings["global_search"]["kept_all"] and not plan.decomposed
    assert {lp.reason for lp in plan.layers.values()} == {"global: kept (every model tried measured slower than the original)"}


def test_global_mode_with_a_size_budget(cost_timer, tmp_path):
    x = torch.randn(1, 3, 8, 8)
    lat = LatencyConfig(cache_path=tmp_path / "c.json", progress=False, quantum=8)
    budget = int(0.4 * fxlrd.count_params(_model()))
    plan = fxlrd.plan(_model(), LRDConfig(target_speedup=1.2, target_params=budget, latency=lat), example_inputs=x)
    g = plan.settings["global_search"]
    assert g["layer_params_chosen"] <= g["layer_params_budget"]
    assert fxlrd.count_params(fxlrd.apply(_model(), plan)) <= budget
    assert g["met"] and g["measured_speedup"] >= 1.2


def test_global_mode_offers_ranks_small_enough_for_its_size_budget(cost_timer, tmp_path):
    # candidates spanned R/4..2R of the ratio's rank: a budget size-only allocation meets (a twentieth) was refused
    x = torch.randn(1, 3, 8, 8)
    lat = LatencyConfig(cache_path=tmp_path / "c.json", progress=False, quantum=8)
    budget = int(0.05 * fxlrd.count_params(_model()))
    assert fxlrd.plan(_model(), LRDConfig(target_params=budget), example_inputs=x).params_after_model() <= budget
    plan = fxlrd.plan(_model(), LRDConfig(target_speedup=1.2, target_params=budget, latency=lat), example_inputs=x)
    assert fxlrd.count_params(fxlrd.apply(_model(), plan)) <= budget


def test_global_mode_keeps_a_global_ratio_as_its_size_budget(cost_timer, tmp_path):
    # allocation="global" with ratio=3 is a size budget under a speed target too (it was dropped)
    x = torch.randn(1, 3, 8, 8)
    lat = LatencyConfig(cache_path=tmp_path / "c.json", progress=False, quantum=8)
    plan = fxlrd.plan(_model(), LRDConfig(target_speedup=1.2, allocation="global", ratio=3, latency=lat), example_inputs=x)
    g = plan.settings["global_search"]
    layers = sum(lp.params_before for lp in plan.layers.values() if lp.decomposed or lp.reason.startswith("global"))
    assert g["layer_params_budget"] == pytest.approx(layers / 3)
    assert sum(lp.params_after for lp in plan) <= g["layer_params_budget"]


@pytest.mark.parametrize("kwargs", [{"backend": "tpu"}, {"window": 1.0}, {"quantum": 0}, {"tolerance": -1}, {"time_budget_s": 0}])
def test_bad_latency_config(kwargs):
    with pytest.raises(ConfigError):
        LatencyConfig(**kwargs)


def test_bad_target_speedup():
    with pytest.raises(ConfigError, match="target_speedup must be a number > 1"):
        LRDConfig(target_speedup=0.9)


def test_the_search_times_no_candidate_below_min_rank(cost_timer, tmp_path):
    """The smallest candidates are the fastest here: below min_rank they would be chosen, then kept."""
    x = torch.randn(1, 3, 8, 8)
    lat = LatencyConfig(cache_path=tmp_path / "c.json", quantum=1, progress=False, window=0.5)
    plan = fxlrd.plan(_model(), LRDConfig(latency=lat, min_rank=40), example_inputs=x)
    lp = plan["6"]  # the Linear: R = 127 for α = 2, candidates from 64 up
    assert lp.decomposed and min(lp.ranks) >= 40
    assert all(min(r) >= 40 for r, _ in lp.latency["candidates_ms"])


def test_global_allocation_offers_no_rank_below_min_rank():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 48), nn.ReLU(), nn.Linear(48, 10)).eval()
    x = torch.randn(2, 32)
    plan = fxlrd.plan(model, LRDConfig(ratio=2, allocation="global", rank_quantum=1, min_rank=8), example_inputs=x)
    assert all(min(lp.ranks) >= 8 for lp in plan.decomposed)
    result = plan.settings["allocation_result"]
    assert sum(lp.params_after for lp in plan) == result["layer_params_chosen"] <= result["layer_params_budget"]
    with pytest.raises(ConfigError, match="cannot be met"):  # only reachable below min_rank
        fxlrd.plan(model, LRDConfig(ratio=3, allocation="global", rank_quantum=1, min_rank=8), example_inputs=x)


def test_min_rank_leaves_a_mode_kept_whole_alone():
    # a 3-channel stem: Tucker-2 keeps its input mode whole (rank 3 = its cap, no factor); min_rank=4
    # applies to the cut output mode only (the layer was kept, and a size budget refused)
    model = nn.Sequential(nn.Conv2d(3, 64, 7, stride=2, padding=3)).eval()
    x = torch.randn(1, 3, 16, 16)
    (lp,) = fxlrd.plan(model, LRDConfig(min_rank=4), example_inputs=x).layers.values()
    assert lp.method == "tucker2" and lp.ranks[0] == 3 and lp.ranks[1] >= 4
    plan = fxlrd.plan(model, LRDConfig(min_rank=4, target_params=0.6, rank_quantum=1), example_inputs=x)
    (lp,) = plan.layers.values()
    assert lp.decomposed and lp.ranks[1] >= 4 and plan.params_after_model() <= 0.6 * plan.model_params
    with pytest.raises(ConfigError, match="cannot be met"):  # an output rank below min_rank would be needed
        fxlrd.plan(model, LRDConfig(min_rank=40, target_params=0.3, rank_quantum=1), example_inputs=x)


def test_a_model_with_every_layer_kept_is_never_faster_than_the_original():
    from fxlrd.ranks.allocate import closed_loop

    noisy = lambda choices: 1.03  # noqa: E731  (timing noise around an unchanged model)
    choices, record = closed_loop([{None: (1.0, 0.0)}, {None: (2.0, 0.0)}], 1.01, 3.0, noisy)
    assert choices == [None, None] and record["measured_speedup"] == 1.0 and not record["met"]


def test_speed_and_size_targets_refuse_a_size_they_cannot_reach(cost_timer, tmp_path):
    x = torch.randn(1, 3, 8, 8)
    lat = LatencyConfig(cache_path=tmp_path / "c.json", progress=False)
    with pytest.raises(ConfigError, match="parameter budget .* cannot be met"):
        fxlrd.plan(_model(), LRDConfig(latency=lat, target_speedup=1.2, target_params=2000), example_inputs=x)


def test_a_rank_0_candidate_is_never_timed():
    """``Linear(3, 1)``'s ratio rank is 0: ``bottleneck or min_rank`` took that 0 for "no mode
    cut", and a zero-width factor chain was built and timed."""
    import warnings as _warnings

    from fxlrd import LatencyConfig

    model, x = torch.nn.Sequential(torch.nn.Linear(3, 1)), torch.randn(1, 3)
    latency = LatencyConfig(backend="eager", repeats=2, warmup=1, cache=False, progress=False, quantum=1)
    with _warnings.catch_warnings():
        _warnings.simplefilter("error", UserWarning)  # torch: "Initializing zero-element tensors is a no-op"
        plan = fxlrd.plan(model, LRDConfig(latency=latency), example_inputs=x)
    lp = plan.layers["0"]
    assert not lp.decomposed and not (lp.latency or {}).get("candidates_ms")


def test_onnxruntime_timings_on_a_gpu_are_cached_under_its_name(monkeypatch):
    import onnxruntime as ort

    from fxlrd import LatencyConfig
    from fxlrd.latency import OnnxRuntimeTimer

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    context = OnnxRuntimeTimer(LatencyConfig(backend="onnxruntime", threads=2)).context
    assert context.startswith("NVIDIA H100 80GB HBM3|")


def test_budget_left_over_is_spent_on_a_move_that_fills_it_exactly():
    """Two identical layers whose costs are not whole numbers (seconds): the relaxation takes the
    same option for both (0.5 of 1.25), and the dynamic programme, which rounds costs up, finds
    nothing better; keeping one layer then costs exactly the budget (0.25 + 1.0 = 1.25) and must
    still be taken, as brute force does."""
    options = [{None: (1.0, 0.0), (1,): (0.25, 0.5)} for _ in range(2)]
    choices, met = solve_global(options, 1.25)
    best = min(sum(o[c][1] for o, c in zip(options, combo)) for combo in itertools.product(*[list(o) for o in options])
               if sum(o[c][0] for o, c in zip(options, combo)) <= 1.25)  # fmt: skip
    assert met and best == 0.5
    assert sum(o[c][1] for o, c in zip(options, choices)) == best
    assert sum(o[c][0] for o, c in zip(options, choices)) <= 1.25


# -- mutation audit 3 ------------------------------------------------------------------------------
def test_a_candidate_at_min_rank_is_timed(cost_timer, tmp_path):
    """min_rank is the smallest rank allowed: a candidate exactly at it is timed (and, fastest here, chosen)."""
    x = torch.randn(1, 3, 8, 8)
    lat = LatencyConfig(cache_path=tmp_path / "c.json", quantum=1, progress=False, window=0.5)
    free = fxlrd.plan(_model(), LRDConfig(latency=lat), example_inputs=x)["6"]
    smallest = min(min(r) for r, _ in free.latency["candidates_ms"])
    held = fxlrd.plan(_model(), LRDConfig(latency=lat, min_rank=smallest), example_inputs=x)["6"]
    assert min(min(r) for r, _ in held.latency["candidates_ms"]) == smallest
    assert held.latency["candidates_ms"] == free.latency["candidates_ms"]


def test_past_the_time_budget_ranks_are_still_rounded_to_the_quantum(cost_timer, tmp_path):
    x = torch.randn(1, 3, 8, 8)
    lat = LatencyConfig(cache_path=tmp_path / "c.json", time_budget_s=1e-9, quantum=8, progress=False)
    plan = fxlrd.plan(_model(), LRDConfig(latency=lat), example_inputs=x)
    linear = plan["6"]  # R = floor(8192·100 / (2·8292)) = 49: 48 in multiples of 8
    assert linear.ranks == (48,)
    for lp in plan.decomposed:
        caps = (lp.in_channels, lp.out_channels)
        assert all(r % 8 == 0 or r in caps for r in lp.ranks), (lp.name, lp.ranks)


def test_the_cache_key_of_a_window_is_its_canonical_key_not_its_size():
    """Two windows of as many operations (a conv followed by ReLU, or by a residual add) time differently."""
    import types

    from fxlrd.latency import LatencyCache
    from fxlrd.ranks.search import RankSearcher

    timer = types.SimpleNamespace(backend="eager", context="window")
    searcher = RankSearcher(LatencyConfig(progress=False, cache=False), timer=timer, cache=LatencyCache(None))
    layer = nn.Linear(4, 4)
    relu = types.SimpleNamespace(key="relu(site)", size=1)
    add = types.SimpleNamespace(key="add(site, x)", size=1)
    assert searcher._key(layer, window=relu) != searcher._key(layer, window=add)
    assert searcher._key(layer, window=relu) == searcher._key(layer, window=types.SimpleNamespace(key="relu(site)", size=1))


def _speed_options(n=2):
    """Per layer: keep (1 s, no error) or a decomposition taking 0.9 .. 0.3 s, the faster the more error."""
    times = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3]
    return [{None: (1.0, 0.0), **{(r,): (t, (1 - t) ** 2 * (i + 1)) for r, t in zip(range(70, 0, -10), times)}}
            for i in range(n)]  # fmt: skip


def _predicted(options, choices, model_s=2.0):
    return model_s / sum(opt[c][0] for opt, c in zip(options, choices))


def test_closed_loop_raises_its_internal_target_when_the_model_measures_slower_than_predicted():
    from fxlrd.ranks.allocate import closed_loop

    options = _speed_options()
    choices, record = closed_loop(options, 1.5, 2.0, lambda c: 0.8 * _predicted(options, c))
    first, second = record["rounds"][:2]
    assert first["measured_speedup"] < 1.5
    assert second["internal_target"] == pytest.approx(1.5 * 1.5 * 1.02 / first["measured_speedup"])  # (aimed 2 % above)
    assert record["met"] and record["measured_speedup"] >= 1.5


@pytest.mark.parametrize("target", [1.3, 1.4, 1.5, 1.6])
def test_closed_loop_follows_the_secant_where_the_model_gains_less_than_predicted(target):
    """Measured = √predicted (the model gains half what the layers' times promise, in log): scaling
    the internal target by the shortfall creeps and misses the target in 3 rounds; from the third
    round the secant through the last two is followed and reaches it."""
    from fxlrd.ranks.allocate import closed_loop

    options = _speed_options(6)
    choices, record = closed_loop(options, target, 6.0, lambda c: _predicted(options, c, 6.0) ** 0.5)
    rounds = record["rounds"]
    assert record["met"] and record["measured_speedup"] >= target
    (x1, y1), (x2, y2) = ((r["internal_target"], r["measured_speedup"]) for r in rounds[:2])
    slope = math.log(y2 / y1) / math.log(x2 / x1)
    scaled = x2 * 1.02 * target / y2
    step = min(math.log(1.02 * target / y2) / slope, 2 * math.log(scaled / x2))  # (at most twice scaling's step)
    step = max(step, 0.5 * math.log(scaled / x2))  # (at least half of it)
    assert rounds[2]["internal_target"] == pytest.approx(x2 * math.exp(step))
    assert rounds[2]["internal_target"] > scaled  # further than scaling would go


def test_closed_loop_scales_where_two_rounds_chose_the_same_model():
    """Two rounds with the same choices measured apart by noise alone: no secant through them."""
    from fxlrd.ranks.allocate import closed_loop

    options = [{None: (1.0, 0.0), (8,): (0.5, 1.0)}, {None: (1.0, 0.0), (8,): (0.5, 1.0)}]
    measured = iter([1.5, 1.62, 1.7, 1.75])  # every internal target picks both layers' only option
    seen = []
    record = closed_loop(options, 1.9, 2.0, lambda c: seen.append(c) or next(measured))[1]
    rounds = record["rounds"]
    assert len(seen) >= 3 and all(c == seen[0] for c in seen)
    # (a secant through rounds 1 and 2 would be followed: slope log(1.62/1.5) / log(x2/x1) ≈ 0.3)
    assert rounds[2]["internal_target"] == pytest.approx(rounds[1]["internal_target"] * 1.9 * 1.02 / 1.62)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan")])
def test_closed_loop_refuses_a_timer_that_gives_no_speed(bad):
    from fxlrd.ranks.allocate import closed_loop

    with pytest.raises(ValueError, match="a timer must give positive, finite times"):
        closed_loop(_speed_options(), 1.5, 2.0, lambda c: bad)


def test_closed_loop_does_not_follow_a_falling_secant():
    """Noise: the second round measured slower for a higher internal target; the third is scaled."""
    from fxlrd.ranks.allocate import closed_loop

    options = _speed_options(6)
    measured = iter([1.2, 1.1, 1.3, 1.4])
    record = closed_loop(options, 1.5, 6.0, lambda c: next(measured))[1]
    second, third = record["rounds"][1:3]
    assert third["internal_target"] == pytest.approx(second["internal_target"] * 1.5 * 1.02 / 1.1)


def test_closed_loop_keeps_the_least_error_round_that_reached_the_target():
    """Round 1 overshoots (measured 1.5x the prediction), round 2 aims lower and still reaches the
    target with less error: round 2 is kept."""
    from fxlrd.ranks.allocate import closed_loop

    options = _speed_options()
    choices, record = closed_loop(options, 1.5, 2.0, lambda c: 1.5 * _predicted(options, c))
    rounds = record["rounds"]
    assert len(rounds) >= 2 and all(r["measured_speedup"] >= 1.5 for r in rounds)
    least = min(range(len(rounds)), key=lambda k: rounds[k]["total_error"])
    assert least != 0 and record["chosen_round"] == least
    assert sum(opt[c][1] for opt, c in zip(options, choices)) == pytest.approx(rounds[least]["total_error"])


def test_closed_loop_that_never_reaches_its_target_keeps_the_fastest_round():
    from fxlrd.ranks.allocate import closed_loop

    options = _speed_options()
    # round 1 aims at 1.6x and measures 0.4 of that; the later rounds take every layer's fastest
    choices, record = closed_loop(options, 1.6, 2.0, lambda c: 0.4 * _predicted(options, c))
    assert not record["met"]
    speeds = [r["measured_speedup"] for r in record["rounds"]]
    assert speeds[0] < 1 < max(speeds)
    assert record["measured_speedup"] == max(speeds) == pytest.approx(0.4 * 2.0 / 0.6)  # every layer at 0.3 s
    assert record["chosen_round"] == speeds.index(max(speeds)) and choices == [(10,), (10,)]


def test_closed_loop_counts_the_time_outside_the_layers_against_the_model_s_time():
    """Layers taking 2 s of a 4 s model: half the time is elsewhere, and the prediction says so."""
    from fxlrd.ranks.allocate import closed_loop

    options = _speed_options()
    choices, record = closed_loop(options, 1.2, 4.0, lambda c: 1 / (0.5 + 0.5 * sum(o[k][0] for o, k in zip(options, c)) / 2))
    assert record["other_fraction"] == pytest.approx(0.5)
    layers = sum(o[k][0] for o, k in zip(options, choices))
    assert record["rounds"][record["chosen_round"]]["predicted_speedup"] == pytest.approx(1 / (0.5 + 0.5 * layers / 2))
    assert record["met"]


def _bottleneck():
    return nn.Sequential(nn.Conv2d(16, 64, 1), nn.BatchNorm2d(64), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1),
                         nn.BatchNorm2d(64), nn.ReLU(), nn.Conv2d(64, 32, 1)).eval()  # fmt: skip


@pytest.mark.parametrize("built", [{"merge": "approximate"}, {"branches": 2, "conv_method": "tucker2"}])
def test_global_mode_times_its_trials_merged_and_branched_as_built(cost_timer, tmp_path, built):
    """The closed loop measures the model `transform` returns: with ``merge``/``branches`` the
    trials are merged/branched before they are timed (they were timed as decomposed, and the
    returned model's speed-up was another than the one recorded)."""
    x = torch.randn(1, 16, 8, 8)
    lat = LatencyConfig(cache_path=tmp_path / "c.json", progress=False, quantum=16)
    plan = fxlrd.plan(_bottleneck(), LRDConfig(target_speedup=1.3, latency=lat, **built), example_inputs=x)
    g = plan.settings["global_search"]
    assert plan.decomposed and g["trials_timed"].startswith("merged" if "merge" in built else "branched")
    gm = fxlrd.apply(_bottleneck(), plan)
    decomposed_only = copy.deepcopy(plan)
    decomposed_only.settings.update(merge=None, branches=1)
    unbuilt = fxlrd.apply(_bottleneck(), decomposed_only)
    timer = CostTimer()
    original = timer.time(_bottleneck(), None)
    assert fxlrd.count_params(gm) != fxlrd.count_params(unbuilt)  # what is built is not the decomposed model
    assert original / timer.time(gm, None) == pytest.approx(g["measured_speedup"])
    assert g["met"] and g["measured_speedup"] >= 1.3
