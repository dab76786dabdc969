"""The method registry and CP decomposition of k×k convolutions, end to end."""

import copy

import numpy as np
import pytest
import torch
from conftest import rel_err
from torch import nn

import fxlrd
from fxlrd import ConfigError, Factorized, LatencyConfig, LRDConfig
from fxlrd.decompose import cp_factors
from fxlrd.export import max_relative_error, onnx_session
from fxlrd.factorized import decompose_weight, layer_spec
from fxlrd.methods import get_method, methods


def _cp_weight(s, c, kernel, r):
    """A conv weight of CP rank (at most) r: a sum of r outer products."""
    factors = [torch.randn(s, r), torch.randn(c, r)] + [torch.randn(k, r) for k in kernel]
    if len(kernel) == 1:
        return torch.einsum("sr,cr,hr->sch", *factors)
    return torch.einsum("sr,cr,hr,wr->schw", *factors)


def _reconstruct(f):
    if len(f.kernel_factors) == 1:
        return torch.einsum("sr,cr,hr->sch", f.out_factor, f.in_factor, f.kernel_factors[0])
    return torch.einsum("sr,cr,hr,wr->schw", f.out_factor, f.in_factor, *f.kernel_factors)


def _rel(approx, w):
    return float(torch.linalg.norm((approx - w).flatten()) / torch.linalg.norm(w.flatten()))


# --- the registry ------------------------------------------------------------------------------------


def test_registry_lists_the_built_in_methods():
    names = methods()
    assert {"svd", "tucker2", "cp"} <= set(names)
    cp = get_method("cp")
    assert cp.name == "cp" and cp.rank_names == ("rank",)
    assert cp.paper_trainable == {"in_proj": False, "core": True, "out_proj": False}
    with pytest.raises(ValueError, match="unknown decomposition method 'nope'"):
        get_method("nope")


def test_unknown_conv_method_is_a_config_error():
    with pytest.raises(ConfigError, match="conv_method"):
        LRDConfig(conv_method="nope")


@pytest.mark.parametrize("rule, extra", [("energy", {"energy": 0.9}), ("vbmf", {})])
def test_rank_rules_cp_does_not_define_are_config_errors(rule, extra):
    with pytest.raises(ConfigError, match=rf"rank_rule='{rule}' is not defined for conv_method='cp'"):
        LRDConfig(conv_method="cp", rank_rule=rule, **extra)


# --- exact CP-rank weights are reproduced ---------------------------------------------------------------

CASES = {
    "conv2d-stride-pad": (lambda: nn.Conv2d(8, 12, 3, stride=2, padding=1), (2, 8, 9, 9)),
    "conv2d-dilation-rect": (
        lambda: nn.Conv2d(8, 12, (3, 5), stride=(1, 2), padding=(2, 1), dilation=(2, 1)), (2, 8, 11, 11)
    ),
    "conv2d-same": (lambda: nn.Conv2d(6, 10, 3, padding="same", bias=False), (1, 6, 7, 7)),
    "conv2d-reflect": (lambda: nn.Conv2d(6, 10, 3, padding=1, padding_mode="reflect"), (2, 6, 8, 8)),
    "conv2d-circular": (lambda: nn.Conv2d(6, 10, 3, padding=2, dilation=2, padding_mode="circular"), (2, 6, 8, 8)),
    "conv1d": (lambda: nn.Conv1d(6, 10, 5, stride=2, padding=2, dilation=2), (2, 6, 20)),
    "conv1d-valid": (lambda: nn.Conv1d(7, 5, 3), (3, 7, 12)),
}


def _cp_conv(case, r=4):
    make, shape = CASES[case]
    conv = make()
    with torch.no_grad():
        conv.weight.copy_(_cp_weight(conv.out_channels, conv.in_channels, conv.kernel_size, r))
    return conv.eval(), torch.randn(*shape)


def _weight_of(fact):
    """The dense weight a CP `Factorized` computes, rebuilt from its modules."""
    a = fact.out_proj.weight.flatten(1)  # (S, R)
    b = fact.in_proj.weight.flatten(1)  # (R, C)
    if isinstance(fact.core, nn.Sequential):
        h, w = fact.core[0].weight[:, 0, :, 0], fact.core[1].weight[:, 0, 0, :]  # (R, kh), (R, kw)
        return torch.einsum("sr,rc,rh,rw->schw", a, b, h, w)
    return torch.einsum("sr,rc,rk->sck", a, b, fact.core.weight[:, 0, :])


@pytest.mark.parametrize("case", list(CASES))
def test_exact_cp_rank_weights_are_reproduced(case):
    """With enough ALS iterations CP at rank r reproduces a weight of CP rank r."""
    conv, x = _cp_conv(case)
    fact, report = decompose_weight(conv.weight, conv.bias, layer_spec(conv), "cp", (4,), options={"cp_iters": 1000})
    assert report["fit_error"] < 1e-5
    assert fact.roles() == ["in_proj", "core", "out_proj"]
    with torch.no_grad():
        assert rel_err(fact(x), conv(x)) < 1e-4


@pytest.mark.parametrize("case", list(CASES))
def test_cp_factors_carry_stride_padding_and_dilation(case):
    """The factor chain computes exactly the conv of its own CP weight with the layer's settings."""
    conv, x = _cp_conv(case)
    model = nn.Sequential(conv).eval()
    gm = fxlrd.transform(model, LRDConfig(conv_method="cp", rank_rule="fixed", rank=4, rank_quantum=1))
    lp = gm.fxlrd_plan["0"]
    assert lp.method == "cp" and lp.ranks == (4,)
    fact = gm.get_submodule("0")
    assert isinstance(fact, Factorized) and fact.roles() == ["in_proj", "core", "out_proj"]
    assert fact.in_proj.out_channels == fact.out_proj.in_channels == 4
    depthwise = list(fact.core) if isinstance(fact.core, nn.Sequential) else [fact.core]
    assert len(depthwise) == len(conv.kernel_size) and all(c.groups == 4 for c in depthwise)
    same_settings = copy.deepcopy(conv)
    with torch.no_grad():
        same_settings.weight.copy_(_weight_of(fact))
        torch.testing.assert_close(gm(x), same_settings(x), rtol=1e-4, atol=1e-4)
        assert gm(x).shape == conv(x).shape


@pytest.mark.parametrize("case", ["conv2d-stride-pad", "conv1d-valid"])
def test_transform_reproduces_exact_cp_rank_weights(case):
    conv, x = _cp_conv(case)
    model = nn.Sequential(conv).eval()
    gm = fxlrd.transform(model, LRDConfig(conv_method="cp", rank_rule="fixed", rank=4, rank_quantum=1))
    with torch.no_grad():
        assert rel_err(gm(x), model(x)) < 1e-3


def test_cp_factors_fit_an_exact_cp_tensor():
    w = _cp_weight(12, 8, (3, 3), 5).double()
    f = cp_factors(w, 5, n_iter=200)
    assert f.out_factor.shape == (12, 5) and f.in_factor.shape == (8, 5)
    assert [k.shape for k in f.kernel_factors] == [(3, 5), (3, 5)]
    assert _rel(_reconstruct(f), w) < 1e-4


def test_cp_fit_is_no_worse_than_random_factors():
    w = torch.randn(16, 12, 3, 3, dtype=torch.float64)
    for r in (2, 6, 12):
        fitted = _rel(_reconstruct(cp_factors(w, r, n_iter=50)), w)
        # Random factors of the same shapes, at their best scale.
        g = torch.Generator().manual_seed(r)
        shapes = [(16, r), (12, r), (3, r), (3, r)]
        rand = torch.einsum("sr,cr,hr,wr->schw", *[torch.randn(s, generator=g, dtype=torch.float64) for s in shapes])
        scale = float((rand * w).sum() / (rand * rand).sum())
        random_err = _rel(scale * rand, w)
        assert fitted < random_err
        assert fitted < 1.0  # better than the zero tensor


def test_more_als_iterations_do_not_increase_the_error():
    w = torch.randn(10, 8, 3, 3, dtype=torch.float64)
    errs = [_rel(_reconstruct(cp_factors(w, 6, n_iter=n)), w) for n in (1, 10, 60)]
    assert errs[0] >= errs[1] - 1e-9 >= errs[2] - 2e-9
    # and more rank fits better
    assert _rel(_reconstruct(cp_factors(w, 12, n_iter=60)), w) < errs[2]


# --- the rest of the pipeline works with CP, no special cases ---------------------------------------


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.conv = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.conv1d = nn.Conv1d(32, 32, 3, padding=1)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = self.conv(torch.relu(self.bn(self.stem(x))))
        x = self.conv1d(x.flatten(2))
        return self.head(x.mean(-1))


def test_planner_gives_cp_ranks_from_the_ratio_rule():
    plan = fxlrd.plan(Net(), LRDConfig(conv_method="cp", ratio=2, rank_quantum=1))
    lp = plan["conv"]
    # R = floor(C·S·k² / (α (C + S + kh + kw))) = floor(16·32·9 / (2·54)) = 42
    assert lp.method == "cp" and lp.ranks == (42,)
    assert lp.params_after == 16 * 42 + 2 * 3 * 42 + 42 * 32 + 32
    assert lp.params_before == 16 * 32 * 9 + 32
    assert plan["head"].method == "svd"  # pointwise layers keep their own method
    quantized = fxlrd.plan(Net(), LRDConfig(conv_method="cp", ratio=2, rank_quantum=8))
    assert quantized["conv"].ranks == (40,)


def test_a_parameter_budget_fits_a_dozen_cp_ranks_not_every_one(monkeypatch):
    # each candidate's error is an ALS fit: every multiple of the quantum up to the cap took minutes per layer
    from fxlrd.methods import cp

    fits = []
    real = cp.cp_factors
    monkeypatch.setattr(cp, "cp_factors", lambda w, r, **k: fits.append((tuple(w.shape), r)) or real(w, r, **k))
    plan = fxlrd.plan(Net(), LRDConfig(conv_method="cp", target_params=0.5, rank_quantum=1))
    per_layer = {shape: {r for s, r in fits if s == shape} for shape, _ in fits}
    assert len(per_layer) == 3 and all(0 < len(ranks) <= 12 for ranks in per_layer.values())  # conv's cap: 144
    assert plan.params_after_model() <= 0.5 * plan.model_params


def test_a_small_parameter_budget_centres_the_cp_ranks_on_it():
    # a dozen ranks around the ratio's rank (R/4..2R) had none small enough for a tenth of the model
    for fraction in (0.1, 0.05):
        plan = fxlrd.plan(Net(), LRDConfig(conv_method="cp", target_params=fraction, rank_quantum=1))
        assert plan.params_after_model() <= fraction * plan.model_params


def test_cp_plan_json_round_trip_and_apply():
    model = Net().eval()
    plan = fxlrd.plan(model, LRDConfig(conv_method="cp", ratio=2))
    again = fxlrd.Plan.from_json(plan.to_json())
    assert again["conv"].method == "cp"
    gm = fxlrd.apply(model, again)
    assert gm.get_submodule("conv").method == "cp"
    assert gm(torch.randn(2, 3, 8, 8)).shape == (2, 10)


def test_paper_freezing_trains_the_cp_core_and_freezes_the_projections():
    gm = fxlrd.transform(Net(), LRDConfig(conv_method="cp", rank_rule="fixed", rank=4, rank_quantum=1))
    fxlrd.freeze(gm, "paper")
    fact = gm.get_submodule("conv")
    assert fact.method == "cp"
    assert all(p.requires_grad for p in fact.core.parameters())
    assert not any(p.requires_grad for p in fact.in_proj.parameters())
    assert not any(p.requires_grad for p in fact.out_proj.parameters())
    info = {n.target: n.meta["fxlrd"] for n in gm.graph.nodes if "fxlrd" in n.meta}
    assert info["conv.core"]["trainable"] and not info["conv.in_proj"]["trainable"]
    assert info["conv.core"]["method"] == "cp"
    # One training step: only trainable factors change.
    groups = {g["name"]: g for g in fxlrd.param_groups(gm)}
    assert {id(p) for p in fact.core.parameters()} <= {id(p) for p in groups["factors_trainable"]["params"]}
    opt = torch.optim.SGD(fxlrd.param_groups(gm), lr=0.1)
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    gm(torch.randn(4, 3, 8, 8)).square().mean().backward()
    opt.step()
    after = gm.state_dict()
    assert torch.equal(before["conv.in_proj.weight"], after["conv.in_proj.weight"])
    assert not torch.equal(before["conv.core.0.weight"], after["conv.core.0.weight"])


def test_sequential_freezer_alternates_cp_factors():
    gm = fxlrd.transform(Net(), LRDConfig(conv_method="cp", rank_rule="fixed", rank=4, rank_quantum=1))
    freezer = fxlrd.SequentialFreezer(gm, period=1)
    fact = gm.get_submodule("conv")
    assert fact.core[0].weight.requires_grad and not fact.in_proj.weight.requires_grad
    assert freezer.step()
    assert not fact.core[0].weight.requires_grad and fact.in_proj.weight.requires_grad
    assert fact.out_proj.weight.requires_grad


def test_cp_model_exports_to_onnx(tmp_path):
    model = Net().eval()
    gm = fxlrd.transform(model, LRDConfig(conv_method="cp", ratio=2))
    assert gm.get_submodule("conv").method == "cp" and gm.get_submodule("stem").method == "cp"
    x = torch.randn(2, 3, 8, 8)
    path = fxlrd.export_onnx(gm, x, tmp_path / "cp.onnx")
    session = onnx_session(path)
    x3 = torch.randn(3, 3, 8, 8)
    (got,) = session.run(None, {session.get_inputs()[0].name: x3.numpy()})
    with torch.no_grad():
        want = gm(x3).numpy()
    assert got.shape == (3, 10) and max_relative_error(got, want) <= 1e-4
    assert np.isfinite(got).all()


def test_latency_search_works_with_cp(tmp_path):
    latency = LatencyConfig(backend="eager", repeats=2, warmup=1, threads=1, cache_path=tmp_path / "lat.json",
                            progress=False, tolerance=10.0)  # fmt: skip
    cfg = LRDConfig(conv_method="cp", ratio=2, include=["conv"], latency=latency)
    plan = fxlrd.plan(Net(), cfg, example_inputs=torch.randn(1, 3, 16, 16))
    record = plan["conv"].latency
    assert record is not None and record["backend"] == "eager" and record["original_ms"] > 0
    timed = [tuple(r) for r, _ in record["candidates_ms"]]
    assert (42,) in timed and all(r <= 42 for (r,) in timed) and len(timed) >= 2
    assert all(t > 0 for _, t in record["candidates_ms"])
    if plan["conv"].decomposed:  # kept only when no candidate beats the original
        assert plan["conv"].method == "cp" and plan["conv"].ranks in timed
    else:
        assert record["chosen"] is None


def test_cp_and_tucker_side_by_side_in_one_model():
    model = Net().eval()
    cp = fxlrd.transform(model, LRDConfig(conv_method="cp", rank_rule="fixed", rank=8, rank_quantum=1))
    tucker = fxlrd.transform(model, LRDConfig(rank_rule="fixed", rank=8, rank_quantum=1))
    assert cp.get_submodule("conv").method == "cp" and tucker.get_submodule("conv").method == "tucker2"
    # CP at rank R has far fewer parameters than Tucker-2 at (R, R).
    assert fxlrd.count_params(cp.get_submodule("conv")) < fxlrd.count_params(tucker.get_submodule("conv"))
