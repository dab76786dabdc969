import math

import pytest
import torch
from torch import nn
from hypothesis import given
from hypothesis import strategies as st

import fxlrd
from fxlrd import ConfigError, LRDConfig
from fxlrd.ranks import energy_rank, quantize_rank, svd_rank_for_ratio, tucker_ranks_for_ratio, vbmf_rank


# The paper's Table 2 (ResNet-152, α = 2): the formulas must give these exactly.
@pytest.mark.parametrize("c, s, want", [(64, 64, 16), (64, 256, 25), (2048, 512, 204), (512, 2048, 204), (2048, 1000, 335)])
def test_svd_ratio_rank_matches_paper_table2(c, s, want):
    assert svd_rank_for_ratio(c, s, 2.0) == want


@pytest.mark.parametrize("c, want", [(64, 38), (512, 309)])
def test_tucker_ratio_rank_matches_paper_table2(c, want):
    assert tucker_ranks_for_ratio(c, c, 9, 2.0) == (want, want)


@given(
    c=st.integers(4, 600), s=st.integers(4, 600), k=st.sampled_from([1, 3, 5, 7, 9, 25]),
    ratio=st.floats(1.1, 8.0), beta=st.sampled_from([0.5, 1.0, 2.0]),
)  # fmt: skip
def test_tucker_ratio_ranks_respect_the_budget(c, s, k, ratio, beta):
    r1, r2 = tucker_ranks_for_ratio(c, s, k, ratio, beta)
    assert 0 <= r1 <= c and 0 <= r2 <= s
    params = (c * r1 if r1 < c else 0) + r1 * r2 * k + (r2 * s if r2 < s else 0)
    assert params <= c * s * k / ratio + 1e-6


def test_thin_stem_conv_becomes_tucker1():
    # ResNet's 3→64 7×7 stem: r1 would exceed C = 3, so the input mode stays whole.
    r1, r2 = tucker_ranks_for_ratio(3, 64, 49, 2.0)
    assert r1 == 3
    assert r2 == math.floor(3 * 64 * 49 / (2 * (3 * 49 + 64)))


@pytest.mark.parametrize("rank, q, want", [(309, 8, 304), (16, 8, 16), (5, 8, 5), (25, 1, 25), (335, 32, 320)])
def test_quantize_rounds_down_but_never_below_one_quantum(rank, q, want):
    assert quantize_rank(rank, q) == want


def test_energy_rank():
    s = torch.tensor([3.0, 2.0, 1.0, 0.0])  # squares 9, 4, 1: total 14
    assert energy_rank(s, 9 / 14) == 1
    assert energy_rank(s, 9 / 14 + 1e-3) == 2
    assert energy_rank(s, 13 / 14) == 2
    assert energy_rank(s, 1.0) == 3


@pytest.mark.parametrize("true_rank", [3, 8, 15])
@pytest.mark.parametrize("shape", [(60, 100), (120, 50)])
def test_vbmf_finds_the_rank_of_a_noisy_low_rank_matrix(true_rank, shape):
    g = torch.Generator().manual_seed(true_rank)
    m, n = shape
    signal = torch.randn(m, true_rank, generator=g, dtype=torch.float64) @ torch.randn(true_rank, n, generator=g, dtype=torch.float64)
    noisy = signal + 0.05 * torch.randn(m, n, generator=g, dtype=torch.float64)
    assert vbmf_rank(noisy) == true_rank


def test_vbmf_of_pure_noise_is_small():
    noise = torch.randn(80, 120, dtype=torch.float64)
    assert vbmf_rank(noise) <= 2


@pytest.mark.parametrize("config", [dict(allocation="global", ratio=2), dict(target_params=0.6)])
def test_global_allocation_takes_a_layer_whose_ratio_rank_is_zero(config):
    """A conv with one output channel gets Tucker-2 ratio ranks (0, 0): its candidates for a
    budget start at rank 1 (the ray r2 / r1 divided by zero)."""
    import fxlrd
    from fxlrd import LRDConfig

    model = nn.Sequential(nn.Conv1d(17, 1, 2), nn.Flatten(), nn.Linear(5, 64), nn.ReLU(), nn.Linear(64, 64)).eval()
    x = torch.randn(2, 17, 6)
    gm = fxlrd.transform(model, LRDConfig(rank_quantum=1, **config), example_inputs=x)
    assert torch.isfinite(gm(x)).all()


def test_a_parameter_target_at_or_above_the_model_size_is_refused():
    """target_params of the model's size or more compressed nothing, silently (a typo's extra zero)."""
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    size = fxlrd.count_params(model)
    for target in (size, 10 * size):
        with pytest.raises(ConfigError, match=rf"is not below the model's {size} parameters"):
            fxlrd.plan(model, LRDConfig(target_params=target))
    fxlrd.plan(model, LRDConfig(target_params=size - 1000))


def test_a_budget_min_rank_makes_impossible_names_min_rank():
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    with pytest.raises(ConfigError, match="cannot be met even by min_rank=40.*lower min_rank"):
        fxlrd.plan(model, LRDConfig(target_params=0.5, min_rank=40, rank_quantum=1))
    fxlrd.plan(model, LRDConfig(target_params=0.5, rank_quantum=1))


@pytest.mark.parametrize("rank", [24, 29, 30, 31])
def test_vbmf_finds_an_exact_rank_near_its_detection_limit(rank):
    """The free energy has several local minima in the noise variance: a bounded search alone
    stopped in one (rank 16 or 17 for exact ranks 29–31 of a 64×64 weight)."""
    g = torch.Generator().manual_seed(rank)
    w = torch.randn(64, rank, generator=g, dtype=torch.float64) @ torch.randn(rank, 64, generator=g, dtype=torch.float64)
    w = w + 1e-3 * torch.randn(64, 64, generator=g, dtype=torch.float64)
    assert vbmf_rank(w) == rank


def test_vbmf_of_a_weight_with_exact_zeros_outside_a_block():
    """Exact zeros made log(0) in the free energy (RuntimeWarnings, and a grid it cannot start at
    0); without noise the estimate is degenerate, but it stays within the block's rank."""
    import warnings

    w = torch.zeros(32, 32, dtype=torch.float64)
    w[:4, :4] = torch.randn(4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert 1 <= vbmf_rank(w) <= 4


def test_a_parameter_cap_beside_a_speed_target_is_checked_before_any_timing(monkeypatch):
    """With target_speedup the size is a cap: one at the model's size is no error (the speed
    target still compresses), and one below the fixed parameters fails before any layer is timed."""
    from fxlrd.latency import LatencyConfig
    from fxlrd.ranks.search import RankSearcher

    model = nn.Sequential(nn.Embedding(1000, 64), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    x = torch.randint(0, 1000, (2, 5))
    size = fxlrd.count_params(model)

    def no_timing(*args, **kwargs):
        raise AssertionError("timed before the budget was checked")

    monkeypatch.setattr(RankSearcher, "__init__", no_timing)
    with pytest.raises(ConfigError, match="below the .* parameters outside the decomposable layers"):
        fxlrd.plan(model, LRDConfig(target_speedup=1.5, target_params=1000, latency=LatencyConfig(progress=False)),
                   example_inputs=x)  # fmt: skip
    with pytest.raises(AssertionError, match="timed before"):  # a cap at the model's size reaches the search
        fxlrd.plan(model, LRDConfig(target_speedup=1.5, target_params=size, latency=LatencyConfig(progress=False)),
                   example_inputs=x)  # fmt: skip


def test_a_budget_below_the_pointwise_layers_a_merge_keeps_says_how_to_size_a_merged_model():
    model = nn.Sequential(nn.Conv2d(8, 64, 1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 8, 1))
    pointwise = sum(p.numel() for i in (0, 4) for p in model[i].parameters())
    with pytest.raises(ConfigError, match="with merge the pointwise layers are not decomposed.*target_speedup or ratio"):
        fxlrd.plan(model, LRDConfig(merge="approximate", target_params=pointwise - 1), example_inputs=torch.randn(1, 8, 6, 6))
    with pytest.raises(ConfigError, match="outside the decomposable layers") as plain:  # without merge: no such hint
        fxlrd.plan(model, LRDConfig(target_params=10, exclude=["0"]), example_inputs=torch.randn(1, 8, 6, 6))
    assert "merge" not in str(plain.value)


def test_a_mode_kept_whole_is_no_bottleneck():
    """``min_rank`` applies to the modes a decomposition cuts: a rank at its cap keeps that mode
    whole, so a 3-channel stem's Tucker-1 (r_in = 3) is not refused by min_rank=4."""
    from fxlrd.ranks.rules import bottleneck

    assert bottleneck((3, 8), (3, 32)) == 8
    assert bottleneck((2, 8), (3, 32)) == 2
    assert bottleneck((3, 32), (3, 32)) is None
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1)).eval()
    plan = fxlrd.plan(model, LRDConfig(rank_rule="fixed", rank=(3, 8), rank_quantum=1, min_rank=4))
    lp = plan.layers["0"]
    assert lp.decomposed and tuple(lp.ranks) == (3, 8), lp.reason
    refused = fxlrd.plan(model, LRDConfig(rank_rule="fixed", rank=(3, 8), rank_quantum=1, min_rank=9)).layers["0"]
    assert not refused.decomposed and "min_rank" in refused.reason


# -- mutation audit 3 ------------------------------------------------------------------------------
def _embedded_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(100, 32), nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32)).eval()


def test_a_fractional_target_params_is_a_fraction_of_the_whole_model():
    """target_params=0.5 is half the model's parameters (the embedding included), of which the
    decomposable layers get what the rest leaves."""
    model = _embedded_mlp()
    ids = torch.randint(0, 100, (2, 5))
    total = sum(p.numel() for p in model.parameters())
    fixed = model[0].weight.numel()
    plan = fxlrd.plan(model, LRDConfig(target_params=0.5, rank_quantum=1), example_inputs=ids)
    result = plan.settings["allocation_result"]
    assert result["budget"] == f"model params <= {0.5 * total:.0f}"
    assert result["layer_params_budget"] == pytest.approx(0.5 * total - fixed)
    assert plan.params_after_model() <= 0.5 * total


def test_a_global_allocation_rounds_ranks_to_the_quantum():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 96), nn.ReLU(), nn.Linear(96, 64)).eval()
    plan = fxlrd.plan(model, LRDConfig(allocation="global", rank_quantum=8), example_inputs=torch.randn(2, 64))
    assert plan.decomposed
    # multiples of 8, or a rank below the quantum (left as it is, as quantize_rank does)
    assert all(r % 8 == 0 or r < 8 for lp in plan.decomposed for r in lp.ranks), [lp.ranks for lp in plan.decomposed]


def test_a_rank_reaching_its_mode_exactly_leaves_the_mode_whole_and_re_solves_the_other():
    """11 → 64, 3×3, α = 3: eq. 7 gives r1 = 11, the whole input mode, so no input factor is made
    (Tucker-1) and r2 is solved again for the budget 11·64·9/3 = 2112: core 11·r2·9 + out 64·r2
    ≤ 2112 gives r2 = 12 (not 11, the β·r1 of Tucker-2)."""
    assert tucker_ranks_for_ratio(11, 64, 9, 3.0) == (11, 12)
    assert 11 * 12 * 9 + 12 * 64 <= 11 * 64 * 9 / 3 < 11 * 13 * 9 + 13 * 64
