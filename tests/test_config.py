import math
import re

import pytest
from torch import nn

from fxlrd import ConfigError, LRDConfig


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"ratio": 1.0}, "ratio must be a number > 1"),
        ({"ratio": 0.5}, "ratio must be a number > 1"),
        ({"ratio": math.nan}, "ratio must be a number > 1"),
        ({"ratio": "2"}, "ratio must be a number > 1"),
        ({"rank_rule": "magic"}, "rank_rule must be one of"),
        ({"rank_rule": "fixed"}, "needs rank="),
        ({"rank_rule": "fixed", "rank": 0}, "rank must be >= 1"),
        ({"rank_rule": "fixed", "rank": -3}, "rank must be >= 1"),
        ({"rank_rule": "fixed", "rank": (4, 0)}, "rank must be >= 1"),
        ({"rank_rule": "fixed", "rank": 2.5}, "positive int"),
        ({"rank_rule": "energy"}, "needs energy="),
        ({"rank_rule": "energy", "energy": 0.0}, "energy must be in (0, 1]"),
        ({"rank_rule": "energy", "energy": 1.5}, "energy must be in (0, 1]"),
        ({"rank_quantum": 0}, "rank_quantum must be an int >= 1"),
        ({"min_rank": 0}, "min_rank must be an int >= 1"),
        ({"beta": 0}, "beta"),
        ({"include": [""]}, "include must be glob patterns"),
        ({"include": []}, "include=[] matches no layer"),  # it decomposed nothing, silently
        ({"rank": 4}, "rank=4 is used by rank_rule='fixed' only"),  # ignored under the ratio rule
        ({"energy": 0.9}, "energy=0.9 is used by rank_rule='energy' only"),
        ({"filter_fn": 3}, "filter_fn must be callable"),
        ({"layer_types": (int,)}, "layer_types must be nn.Module subclasses"),
        ({"tucker_iters": -1}, "tucker_iters"),
        ({"cp_iters": 0}, "cp_iters must be an int >= 1"),  # it ran 300 iterations
        ({"target_params": 1.0}, "target_params=1.0 is neither a fraction of the model"),
        ({"target_params": 2.5}, "target_params must be a parameter count"),
        ({"linear_method": "cp"}, "linear_method='cp' cannot decompose Linear and 1x1 conv layers"),
        ({"linear_method": "tucker2"}, "linear_method='tucker2' cannot decompose Linear"),
        ({"conv_method": "svd"}, "conv_method='svd' cannot decompose k×k convolutions"),
        ({"branches": 2, "conv_method": "cp"}, "branches=2 groups Tucker-2 cores: it needs conv_method='tucker2'"),
        ({"allocation": "global", "rank_rule": "fixed", "rank": 4}, "rank_rule='fixed' is not used when global allocation"),
        ({"target_params": 0.5, "rank_rule": "energy", "energy": 0.9}, "rank_rule='energy' is not used when global"),
    ],
)
def test_bad_values_name_the_problem(kwargs, fragment):
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        LRDConfig(**kwargs)


def test_config_is_frozen_and_normalised():
    cfg = LRDConfig(include="layer1.*", exclude=["fc"], layer_types=nn.Linear)
    assert cfg.include == ("layer1.*",)
    assert cfg.exclude == ("fc",)
    assert cfg.layer_types == (nn.Linear,)
    with pytest.raises(AttributeError):
        cfg.ratio = 3.0  # type: ignore[misc]


def test_config_errors_are_value_errors():
    with pytest.raises(ValueError):
        LRDConfig(ratio=1)


def test_to_dict_is_json_ready():
    import json

    d = LRDConfig(filter_fn=lambda m, n: True).to_dict()
    json.dumps(d)
    assert d["layer_types"] == ["Linear", "Conv1d", "Conv2d", "ConvTranspose1d", "ConvTranspose2d"]
    assert d["ratio"] == 2.0


def test_a_latency_search_may_follow_any_rank_rule_beside_a_global_budget():
    from fxlrd import LatencyConfig

    LRDConfig(latency=LatencyConfig(), target_speedup=1.5, allocation="global", rank_rule="fixed", rank=4)  # its centres


@pytest.mark.parametrize("budget", [{"target_params": 0.5}, {"allocation": "global"}])
def test_a_latency_search_without_a_speed_target_refuses_a_size_budget(budget):
    # the per-layer search picks each layer's fastest ranks: the budget was silently ignored
    from fxlrd import LatencyConfig

    with pytest.raises(ConfigError, match="latency=... alone times each layer.*add target_speedup"):
        LRDConfig(latency=LatencyConfig(), **budget)


def test_fixed_and_energy_ranks_are_not_rounded_down_by_the_machine_quantum():
    # rank=24 came out 16 on an AVX-512 machine (quantum 16), 24 on another; energy lost its guarantee
    assert LRDConfig(rank_rule="fixed", rank=24).rank_quantum == 1
    assert LRDConfig(rank_rule="energy", energy=0.9).rank_quantum == 1
    assert LRDConfig(rank_rule="fixed", rank=24, rank_quantum=8).rank_quantum == 8  # asked for: kept
    from fxlrd.timing import default_rank_quantum

    assert LRDConfig().rank_quantum == default_rank_quantum()


def test_numpy_scalars_are_numbers():
    np = pytest.importorskip("numpy")
    cfg = LRDConfig(ratio=np.float32(2.0), target_params=np.int64(5000), min_rank=np.int32(2))
    assert (cfg.ratio, cfg.target_params, cfg.min_rank) == (2.0, 5000, 2)
    assert type(cfg.target_params) is int and type(cfg.ratio) is float
    assert LRDConfig(rank_rule="fixed", rank=(np.int64(4), np.int64(8))).rank == (4, 8)


# -- mutation audit 3: the edges of each range, and what a setting implies --------------------------------
def test_each_range_admits_its_documented_edge():
    """energy in (0, 1] takes 1 (keep the whole spectrum); tucker_iters >= 0 takes 0 (HOSVD only)."""
    assert LRDConfig(rank_rule="energy", energy=1.0).energy == 1.0
    assert LRDConfig(tucker_iters=0).tucker_iters == 0
    assert LRDConfig(ratio=1.0001).ratio == 1.0001


@pytest.mark.parametrize("speedup", [1, 1.0, 0.99])
def test_a_target_speedup_of_one_or_less_is_refused(speedup):
    with pytest.raises(ConfigError, match="target_speedup must be a number > 1"):
        LRDConfig(target_speedup=speedup)


def test_a_target_speedup_implies_a_default_latency_search():
    from fxlrd import LatencyConfig

    config = LRDConfig(target_speedup=1.5)
    assert config.latency == LatencyConfig()
    own = LatencyConfig(backend="eager", progress=False)
    assert LRDConfig(target_speedup=1.5, latency=own).latency is own


def test_a_whole_number_target_params_given_as_a_float_is_a_parameter_count():
    config = LRDConfig(target_params=5e6)
    assert config.target_params == 5_000_000 and type(config.target_params) is int
    assert type(LRDConfig(target_params=0.25).target_params) is float


def test_pointwise_layers_are_decomposed_unless_merging():
    assert LRDConfig().decompose_pointwise is True
    assert LRDConfig(merge="exact").decompose_pointwise is False
    assert LRDConfig(merge="approximate").decompose_pointwise is False
    assert LRDConfig(merge="exact", decompose_pointwise=True).decompose_pointwise is True


@pytest.mark.parametrize("rank", [True, (4, False)])
def test_a_bool_is_not_a_rank(rank):
    with pytest.raises(ConfigError, match="rank must be a positive int or a pair"):
        LRDConfig(rank_rule="fixed", rank=rank)
