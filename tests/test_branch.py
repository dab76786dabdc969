"""Branched Tucker: grouped cores equal explicit branches; BTD beats truncation."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxlrd
from fxlrd import LRDConfig
from fxlrd.branch import fit_btd, reconstruct, truncate_blocks
from fxlrd.decompose import tucker2_factors
from fxlrd.passes import BranchPass


def test_grouped_core_equals_the_sum_of_explicit_branches():
    conv = nn.Conv2d(24, 32, 3, padding=1, stride=2, bias=True)
    gm = fxlrd.transform(nn.Sequential(conv), LRDConfig(rank_rule="fixed", rank=(12, 16), rank_quantum=1))
    gm = BranchPass(branches=4, init="truncate")(gm).graph_module
    fact = gm.get_submodule("0")
    core = fact.core
    assert core.groups == 4 and (core.in_channels, core.out_channels) == (12, 16)
    x = torch.randn(2, 24, 9, 9)
    r1, r2 = 3, 4
    total = 0
    for g in range(4):
        h = F.conv2d(x, fact.in_proj.weight[g * r1 : (g + 1) * r1])
        h = F.conv2d(h, core.weight[g * r2 : (g + 1) * r2], stride=2, padding=1)
        total = total + F.conv2d(h, fact.out_proj.weight[:, g * r2 : (g + 1) * r2])
    total = total + fact.out_proj.bias[None, :, None, None]
    with torch.no_grad():
        torch.testing.assert_close(gm(x), total, rtol=1e-5, atol=1e-5)


def _decaying(shape=(48, 40, 3, 3), seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g, dtype=torch.float64)
    u, _, vh = torch.linalg.svd(w.reshape(shape[0], -1), full_matrices=False)
    s = torch.logspace(0, -3, len(_))
    return ((u * s) @ vh).reshape(shape)


@pytest.mark.parametrize("decaying", [True, False])
def test_btd_is_never_worse_than_truncation_and_clearly_better_on_decaying_spectra(decaying):
    w = _decaying() if decaying else torch.randn(48, 40, 3, 3, dtype=torch.float64)
    t = tucker2_factors(w, (24, 24))
    start = truncate_blocks(t.in_factor, t.core, t.out_factor, 2)
    trunc = torch.linalg.norm(w - reconstruct(start))
    btd = torch.linalg.norm(w - reconstruct(fit_btd(w, start)))
    # Same parameter count: same block shapes.
    assert btd <= trunc * (1 + 1e-9)
    if decaying:
        assert btd < 0.8 * trunc


def test_branch_pass_rounds_ranks_and_is_idempotent():
    gm = fxlrd.transform(nn.Sequential(nn.Conv2d(32, 32, 3, padding=1)), LRDConfig(rank_rule="fixed", rank=(13, 11), rank_quantum=1))
    gm = BranchPass(branches=2)(gm).graph_module
    core = gm.get_submodule("0.core")
    assert (core.in_channels, core.out_channels, core.groups) == (12, 10, 2)
    assert gm.get_submodule("0").ranks == (12, 10)
    assert not BranchPass(branches=2)(gm).modified


def test_branches_through_the_config_fit_the_original_weight():
    model = nn.Sequential(nn.Conv2d(32, 64, 3, padding=1)).eval()
    x = torch.randn(2, 32, 8, 8)
    errs = {}
    for init in ("truncate", "btd"):
        gm = fxlrd.transform(model, LRDConfig(rank_rule="fixed", rank=(16, 32), rank_quantum=1, branches=2, branch_init=init))
        assert gm.get_submodule("0.core").groups == 2
        with torch.no_grad():
            errs[init] = (gm(x) - model(x)).norm() / model(x).norm()
    assert errs["btd"] <= errs["truncate"] * 1.01


def test_bad_branch_arguments():
    with pytest.raises(ValueError, match="branches"):
        BranchPass(branches=1)
    with pytest.raises(ValueError, match="init"):
        BranchPass(branches=2, init="random")


def test_the_plan_of_a_branched_model_says_what_it_holds(tmp_path):
    """Branching rounds ranks down to multiples of the branch count: the plan's ranks,
    parameters and MACs are the branched layer's, and the model saves and loads."""
    model = nn.Sequential(nn.Conv2d(24, 40, 3, padding=1)).eval()
    x = torch.randn(1, 24, 8, 8)
    gm = fxlrd.transform(model, LRDConfig(ratio=2, rank_quantum=1, branches=4), example_inputs=x)
    lp = gm.fxlrd_plan["0"]
    assert lp.ranks == gm.get_submodule("0").ranks == (16, 16)
    assert lp.params_after == sum(p.numel() for p in gm.parameters())
    assert lp.macs_after == 24 * 16 * 64 + 16 * 4 * 9 * 64 + 16 * 40 * 64  # in_proj, grouped core, out_proj
    fxlrd.save(gm, tmp_path / "b")
    with torch.no_grad():
        torch.testing.assert_close(fxlrd.load(model, tmp_path / "b")(x), gm(x), rtol=0, atol=0)


def test_the_plan_error_of_a_branched_data_aware_layer_is_the_branched_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(12, 12, 3, padding=1)).eval()
    scale = torch.linspace(0.05, 3, 12).reshape(1, 12, 1, 1)
    batches = [torch.randn(8, 12, 6, 6) * scale for _ in range(8)]
    config = LRDConfig(rank_rule="fixed", rank=6, rank_quantum=1, sensitivity=False, branches=2)
    gm = fxlrd.transform(model, config, example_inputs=batches[0], calibration=batches)
    with torch.no_grad():
        measured = sum(float((gm(b) - model(b)).pow(2).sum()) for b in batches) / sum(float(model(b).pow(2).sum()) for b in batches)
    assert gm.fxlrd_plan["0"].error == pytest.approx(measured, rel=0.05)  # (the statistics are shrunk a little)


def test_layers_whose_ranks_are_below_the_branch_count_stay_unbranched_and_say_so():
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 32, 3, padding=1)).eval()
    with pytest.warns(fxlrd.FxlrdWarning, match=r"branches=4: 2 Tucker-2 layers have a rank below 4 .*'0'"):
        gm = fxlrd.transform(model, LRDConfig(rank_rule="fixed", rank=(2, 2), rank_quantum=1, branches=4),
                             example_inputs=torch.randn(1, 8, 6, 6))  # fmt: skip
    assert gm.get_submodule("0").core.groups == 1


def test_branches_of_a_data_aware_layer_are_fitted_to_its_output_on_the_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(12, 12, 3, padding=1)).eval()
    scale = torch.linspace(0.05, 3, 12).reshape(1, 12, 1, 1)  # channels of very different sizes
    batches = [torch.randn(8, 12, 6, 6) * scale for _ in range(8)]
    config = LRDConfig(rank_rule="fixed", rank=6, rank_quantum=1, sensitivity=False, branches=2)

    def output_error(gm):
        with torch.no_grad():
            return sum(float((gm(b) - model(b)).pow(2).sum()) for b in batches) / sum(float(model(b).pow(2).sum()) for b in batches)

    data_free = fxlrd.transform(model, config, example_inputs=batches[0])
    data_aware = fxlrd.transform(model, config, example_inputs=batches[0], calibration=batches)
    assert data_aware.get_submodule("0").core.groups == 2
    assert output_error(data_aware) < 0.85 * output_error(data_free)


@pytest.mark.parametrize("conv_kwargs", [
    {"dilation": 2, "padding": 2},
    {"padding": 1, "padding_mode": "circular"},
    {"stride": 2, "dilation": (1, 2), "padding": (1, 2), "padding_mode": "reflect"},
])
def test_truncated_branches_are_the_tucker_layer_with_its_off_diagonal_core_blocks_zeroed(conv_kwargs):
    """(mutation audit) ``init="truncate"`` keeps the core's diagonal blocks: the branched layer
    computes what the unbranched Tucker layer computes with the off-diagonal blocks of its core
    set to zero, for any stride, padding, dilation and padding mode of the core."""
    conv = nn.Conv2d(12, 16, 3, bias=True, **conv_kwargs)
    gm = fxlrd.transform(nn.Sequential(conv), LRDConfig(rank_rule="fixed", rank=(8, 6), rank_quantum=1))
    x = torch.randn(2, 12, 11, 11)
    fact = gm.get_submodule("0")
    reference = copy.deepcopy(fact)
    with torch.no_grad():
        w = reference.core.weight  # (r2=6, r1=8, k, k) in 2 branches: blocks of (3, 4)
        mask = torch.zeros_like(w)
        mask[:3, :4] = mask[3:, 4:] = 1
        w.mul_(mask)
        want = reference(x)
    gm = BranchPass(branches=2, init="truncate")(gm).graph_module
    core = gm.get_submodule("0.core")
    assert core.groups == 2
    with torch.no_grad():
        torch.testing.assert_close(gm(x), want, rtol=1e-5, atol=1e-5)
