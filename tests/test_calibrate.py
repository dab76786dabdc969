"""Data-aware decomposition: calibration statistics, whitened SVD/Tucker, sequential fitting,
global allocation by output error, distillation, distributed statistics."""

from __future__ import annotations

import copy
import os
import tempfile
import time
import warnings

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from conftest import rel_err
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import fxlrd
from fxlrd import ConfigError, LRDConfig, Plan
from fxlrd.calibrate import InputStats, collect_stats
from fxlrd.capture import capture
from fxlrd.decompose import whitening
from fxlrd.factorized import LayerSpec, decompose_weight
from fxlrd.recover import distill


def _correlated(n: int, c: int, decay: float = 2.0, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(c, c, generator=g) * torch.logspace(0, -decay, c)
    return torch.randn(n, c, generator=g) @ mix.T


def _stats(x: torch.Tensor, shrink: bool = True) -> InputStats:
    s = InputStats(torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64), shrink=shrink)
    s.add(x)
    return s


def _product(fact) -> torch.Tensor:
    mats = [m.weight.detach().double().reshape(m.weight.shape[0], -1) for m in fact.children()]
    out = mats[0]
    for m in mats[1:]:
        out = m @ out
    return out


# --- the whitened optimum -----------------------------------------------------------------------
@given(c=st.integers(3, 12), s=st.integers(3, 12), r=st.integers(1, 3), seed=st.integers(0, 10_000))
def test_whitened_svd_is_the_output_error_optimum(c, s, r, seed):
    """At rank r, whitened SVD minimises ||(W - W')X||_F; the independent optimum is the
    projection of W X onto its top-r left singular vectors."""
    x = _correlated(200, c, seed=seed).double()
    w = torch.randn(s, c, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    spec = LayerSpec("linear", c, s, (), 1, False)
    fact, report = decompose_weight(w, None, spec, "svd", (r,), stats=_stats(x, shrink=False))
    got = ((w - _product(fact)) @ x.T).norm()
    u = torch.linalg.svd(w @ x.T, full_matrices=False).U[:, :r]
    best = ((w - u @ u.T @ w) @ x.T).norm()
    assert got <= best * (1 + 1e-3) + 1e-6
    # and the error curve predicts it (relative squared output error)
    from fxlrd.methods import get_method

    predicted = get_method("svd").error_curve(w, spec, _stats(x, shrink=False))((r,))
    actual = float((got / (w @ x.T).norm()) ** 2)
    assert predicted == pytest.approx(actual, rel=1e-3, abs=1e-9)


def test_whitened_beats_data_free_on_correlated_inputs():
    x = _correlated(1000, 32)
    w = torch.randn(24, 32)
    spec = LayerSpec("linear", 32, 24, (), 1, False)
    free, _ = decompose_weight(w, None, spec, "svd", (6,))
    aware, _ = decompose_weight(w, None, spec, "svd", (6,), stats=_stats(x))
    err = lambda f: float(((w.double() - _product(f)) @ x.double().T).norm())  # noqa: E731
    assert err(aware) < 0.5 * err(free)


def test_whitened_tucker_beats_data_free_output_error():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 12, 3, padding=1, bias=False)
    # inputs using few directions of the channel space
    x = torch.einsum("nchw,cd->ndhw", torch.randn(32, 4, 8, 8), torch.randn(4, 16)) + 0.01 * torch.randn(32, 16, 8, 8)
    model = nn.Sequential(conv).eval()
    cfg = LRDConfig(rank_rule="fixed", rank=(4, 12), rank_quantum=1, sensitivity=False)  # only the input mode truncated
    free = fxlrd.transform(model, cfg)
    aware = fxlrd.transform(model, cfg, calibration=[x[:16], x[16:]])
    assert aware.fxlrd_plan["0"].data_aware and not free.fxlrd_plan["0"].data_aware
    with torch.no_grad():
        assert rel_err(aware(x), model(x)) < 0.5 * rel_err(free(x), model(x))


@pytest.mark.parametrize("method, ranks", [("svd", (6,)), ("tucker2", (5, 4))])
def test_data_aware_factors_are_balanced_with_the_product_unchanged(method, ranks):
    """Unwhitening and output weighting may leave a channel's whole scale in one factor;
    `balance` evens each channel's norm across every factor boundary, exactly."""
    from fxlrd.factorized import balance, fill, skeleton

    torch.manual_seed(0)
    conv = nn.Conv2d(16, 12, 3 if method == "tucker2" else 1, bias=True)
    spec = fxlrd.factorized.layer_spec(conv)
    x = _correlated(400, 16, decay=4.0)  # inputs with some nearly unused directions: large S⁻¹
    fact, _ = decompose_weight(conv.weight, conv.bias, spec, method, ranks, stats=_stats(x))
    chain = list(fact.children())
    for a, b in zip(chain, chain[1:]):
        na = a.weight.detach().reshape(a.weight.shape[0], -1).norm(dim=1)
        nb = b.weight.detach().transpose(0, 1).reshape(b.weight.shape[1], -1).norm(dim=1)
        torch.testing.assert_close(na, nb, rtol=3e-3, atol=1e-6)
    # balance itself changes no product: apply it to an unbalanced chain
    raw = fill(skeleton(spec, method, ranks, dtype=torch.float64), {n: p.double() * (10.0 ** i)
               for i, (n, p) in enumerate(fact.named_parameters()) if n.endswith("weight")}, conv.bias.double())  # fmt: skip
    y = torch.randn(2, 16, 7, 7, dtype=torch.float64)
    out_before = raw(y)
    balance(raw)
    torch.testing.assert_close(raw(y), out_before)
    weights = [p.detach().abs().max() for n, p in raw.named_parameters() if n.endswith("weight")]
    assert max(weights) / min(weights) < 30  # was 10^(k) apart


def test_data_free_factors_are_left_as_the_paper_makes_them():
    conv = nn.Conv2d(16, 12, 3, bias=False)
    fact, _ = decompose_weight(conv.weight, None, fxlrd.factorized.layer_spec(conv), "tucker2", (5, 4))
    u = fact.out_proj.weight.detach().reshape(12, 4).double()
    torch.testing.assert_close(u.T @ u, torch.eye(4, dtype=torch.float64), rtol=0, atol=1e-5)  # orthonormal


# --- numerics -------------------------------------------------------------------------------------
def test_singular_gram_from_constant_inputs_decomposes_without_nan():
    x = torch.ones(50, 8)  # every sample the same: rank-1 Gram
    w = torch.randn(6, 8)
    spec = LayerSpec("linear", 8, 6, (), 1, True)
    fact, report = decompose_weight(w, torch.zeros(6), spec, "svd", (2,), stats=_stats(x))
    assert all(torch.isfinite(p).all() for p in fact.parameters())
    assert report["whitening"] in ("cholesky", "eigh") and report["note"]  # it says what it did
    assert "shrinkage" in report["note"] or "damping" in report["note"] or "eigen" in report["note"]


def test_fewer_samples_than_channels_shrinks_toward_identity():
    few = _stats(_correlated(4, 64))
    many = _stats(_correlated(20_000, 64))
    assert few.shrinkage() > 0.5 > many.shrinkage()
    assert torch.isfinite(few.whitening().factor).all()


def test_whitening_falls_back_to_an_eigendecomposition():
    g = torch.zeros(5, 5, dtype=torch.float64)
    g[0, 0] = 1.0
    g[1, 1] = -1e-3  # not positive semi-definite: Cholesky fails at every damping tried
    w = whitening(g, max_damping=1e-6)
    assert w.method == "eigh" and "eigendecomposition" in w.note
    assert torch.isfinite(w.inverse()).all()


def test_all_zero_inputs_keep_the_data_free_result():
    w = torch.randn(6, 8)
    spec = LayerSpec("linear", 8, 6, (), 1, False)
    free, _ = decompose_weight(w, None, spec, "svd", (3,))
    zero, report = decompose_weight(w, None, spec, "svd", (3,), stats=_stats(torch.zeros(10, 8)))
    torch.testing.assert_close(_product(zero), _product(free))
    assert "identity" in report["note"]


# --- streaming ------------------------------------------------------------------------------------
def test_streaming_statistics_equal_a_one_shot_computation():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Conv1d(16, 4, 1) if False else nn.Linear(16, 4)).eval()
    x = torch.randn(64, 8)
    gm = capture(model, x).gm
    batched = collect_stats(gm, [x[i : i + 8] for i in range(0, 64, 8)], progress=False)
    whole = collect_stats(gm, [x], progress=False)
    h = torch.relu(model[0](x)).double()
    for name, ref in (("0", x.double()), ("2", h)):
        assert batched[name].count == whole[name].count == 64
        torch.testing.assert_close(batched[name].inputs.gram, ref.T @ ref)
        torch.testing.assert_close(whole[name].inputs.gram, ref.T @ ref)


def test_conv_statistics_are_over_the_positions_the_layer_reads():
    conv = nn.Conv2d(3, 5, 1, stride=2)
    model = nn.Sequential(conv).eval()
    x = torch.randn(2, 3, 6, 6)
    stats = collect_stats(capture(model, x).gm, [x], progress=False)["0"]
    read = x[:, :, ::2, ::2].permute(0, 2, 3, 1).reshape(-1, 3).double()
    assert stats.count == read.shape[0]
    torch.testing.assert_close(stats.inputs.gram, read.T @ read)


def test_sites_reading_one_input_share_statistics():
    class QKV(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            return self.q(x) + self.k(x)

    x = torch.randn(4, 8)
    stats = collect_stats(capture(QKV().eval(), x).gm, [x], progress=False)
    assert stats["q"].inputs is stats["k"].inputs


def _state(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict(keep_vars=False).items()}


def test_calibration_leaves_the_model_bitwise_unchanged():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
    model.train()  # batch norm would update its statistics if run in train mode
    before = _state(model)
    x = torch.randn(4, 3, 8, 8)
    fxlrd.plan(model, LRDConfig(), example_inputs=x, calibration=[x, x])
    gm = fxlrd.transform(model, LRDConfig(), example_inputs=x, calibration=[x])
    after = _state(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert model.training and all(m.training for m in model.modules())
    assert gm.training  # the captured copy keeps the model's mode too
    # and the calibration pass on the captured graph itself leaves it as it was
    g = capture(model, x).gm
    g.train()
    snap = _state(g)
    collect_stats(g, [x], sensitivity=True, progress=False)
    assert g.training and all(torch.equal(snap[k], v) for k, v in g.state_dict().items())
    assert all(p.grad is None for p in g.parameters())


# --- sequential ------------------------------------------------------------------------------------
def _deep_mlp(width: int = 32, depth: int = 5, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    layers = []
    for _ in range(depth):
        lin = nn.Linear(width, width)
        u, _, v = torch.linalg.svd(torch.randn(width, width, generator=g))
        lin.weight.data = u @ torch.diag(torch.logspace(0, -1.5, width)) @ v * 2
        layers += [lin, nn.Tanh()]
    return nn.Sequential(*layers).eval()


def test_sequential_fit_compensates_earlier_errors():
    model = _deep_mlp()
    x = _correlated(2000, 32, decay=1.0)
    cal, held = [x[i : i + 250] for i in range(0, 1000, 250)], x[1000:]
    base = LRDConfig(rank_rule="fixed", rank=8, rank_quantum=1, sensitivity=False)
    plain = fxlrd.transform(model, base, calibration=cal, example_inputs=x[:2])
    seq = fxlrd.transform(model, LRDConfig(rank_rule="fixed", rank=8, rank_quantum=1, sensitivity=False, sequential=True),
                          calibration=cal, example_inputs=x[:2])  # fmt: skip
    with torch.no_grad():
        ref = model(held)
        assert rel_err(seq(held), ref) < rel_err(plain(held), ref)


def test_sequential_needs_calibration(monkeypatch):
    # refused before anything runs (it came after planning, which may be a latency search of minutes)
    monkeypatch.setattr(fxlrd.api, "_plan_captured", lambda *a, **k: pytest.fail("planned before refusing"))
    with pytest.raises(ConfigError, match="sequential=True needs calibration"):
        fxlrd.transform(_deep_mlp(), LRDConfig(sequential=True))


# --- allocation ------------------------------------------------------------------------------------
def _mixed_spectra() -> nn.Module:
    """Layers of one size whose spectra differ: some nearly low-rank, some flat."""
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(*[nn.Linear(48, 48, bias=False) for _ in range(4)]).eval()
    for i, lin in enumerate(model):
        u, _, v = torch.linalg.svd(torch.randn(48, 48, generator=g))
        decay = [3.0, 0.1, 2.0, 0.2][i]
        lin.weight.data = u @ torch.diag(torch.logspace(0, -decay, 48)) @ v
    return model


@pytest.mark.parametrize("calibrated", [False, True])
def test_global_allocation_meets_the_budget_and_beats_uniform(calibrated):
    model = _mixed_spectra()
    x = torch.randn(512, 48)
    cal = [x[:256], x[256:]] if calibrated else None
    uniform = fxlrd.transform(model, LRDConfig(ratio=2, rank_quantum=1, sensitivity=False), calibration=cal, example_inputs=x[:2])
    budget = fxlrd.count_params(uniform)
    glob = fxlrd.transform(model, LRDConfig(target_params=budget, rank_quantum=1, sensitivity=False), calibration=cal,
                           example_inputs=x[:2])  # fmt: skip
    assert fxlrd.count_params(glob) <= budget
    assert fxlrd.count_params(glob) >= 0.95 * budget  # it spends the budget
    result = glob.fxlrd_plan.settings["allocation_result"]
    assert result["met"] and result["layer_params_chosen"] <= result["layer_params_budget"]
    total = lambda gm: sum(lp.error or 0.0 for lp in gm.fxlrd_plan.decomposed)  # noqa: E731
    uniform_err = sum(
        fxlrd.methods.get_method("svd").error_curve(model[int(lp.name)].weight, LayerSpec("linear", 48, 48, (), 1, False))(lp.ranks)
        for lp in uniform.fxlrd_plan.decomposed
    ) if not calibrated else None
    with torch.no_grad():
        e_glob, e_uni = rel_err(glob(x), model(x)), rel_err(uniform(x), model(x))
    assert e_glob < e_uni
    if uniform_err is not None:
        assert total(glob) < uniform_err


def test_global_ratio_applies_to_the_layers_as_a_whole():
    model = _mixed_spectra()
    layers = sum(p.numel() for p in model.parameters())
    gm = fxlrd.transform(model, LRDConfig(ratio=2, allocation="global", rank_quantum=1))
    assert fxlrd.count_params(gm) <= layers / 2
    assert len({lp.ranks for lp in gm.fxlrd_plan.decomposed}) > 1  # not uniform


def test_an_unreachable_parameter_budget_is_a_clear_error():
    with pytest.raises(ConfigError, match="parameter budget"):
        fxlrd.transform(_mixed_spectra(), LRDConfig(target_params=10))
    model = nn.Sequential(nn.Embedding(1000, 32), nn.Linear(32, 32))  # the embedding alone is over the budget
    with pytest.raises(ConfigError, match=r"below the 32000 parameters outside the decomposable layers"):
        fxlrd.plan(model, LRDConfig(target_params=1000), example_inputs=torch.randint(0, 1000, (2, 5)))


@pytest.mark.parametrize("value", [0, -3, 1.5, "half", True])
def test_bad_target_params(value):
    with pytest.raises(ConfigError, match="target_params"):
        LRDConfig(target_params=value)


# --- sensitivity ------------------------------------------------------------------------------------
def _channel_weights(w: torch.Tensor) -> torch.Tensor:
    return w.diagonal() if w.dim() == 2 else w


@pytest.mark.parametrize("matrix", ["full", "diagonal"])
def test_sensitivity_weights_follow_the_model_output(matrix):
    """Output channels of a layer the model's output ignores get (nearly) no weight."""
    torch.manual_seed(0)
    first, second = nn.Linear(8, 6), nn.Linear(6, 3)
    with torch.no_grad():
        second.weight[:, 3:] = 0.0  # channels 3..5 of `first` never reach the output
    model = nn.Sequential(first, second).eval()
    x = torch.randn(256, 8)
    stats = collect_stats(capture(model, x).gm, [x[:128], x[128:]], sensitivity=True, sensitivity_matrix=matrix,
                          progress=False)  # fmt: skip
    w = stats["0"].output_weights()
    assert w.dim() == (2 if matrix == "full" else 1)
    w = _channel_weights(w)
    assert w[:3].min() > 10 * w[3:].max()


def test_sensitivity_callable_picks_the_output_that_counts():
    model = nn.Sequential(nn.Linear(4, 4)).eval()
    x = torch.randn(64, 4)
    gm = capture(model, x).gm
    only_first = collect_stats(gm, [x], sensitivity=lambda out, inputs: out[:, :1], progress=False)["0"].output_weights()
    only_first = _channel_weights(only_first)
    assert only_first[0] > 10 * only_first[1:].max()


class _EmbeddingAndHead(nn.Module):  # a sensitivity on the embedding never reaches the head (as BERT's pooler)
    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 64)

    def forward(self, x):
        e = self.b(torch.relu(self.a(x)))
        return e, self.head(e)


def test_global_allocation_spends_nothing_on_a_layer_the_sensitivity_target_does_not_reach():
    # the head's error was its own relative output error, weighed against model-output errors: it got rank 12
    torch.manual_seed(0)
    model = _EmbeddingAndHead().eval()
    calibration = [torch.randn(32, 64) for _ in range(4)]
    config = LRDConfig(allocation="global", rank_quantum=4, sensitivity=lambda out, inputs: out[0])
    plan = fxlrd.plan(model, config, example_inputs=calibration[0], calibration=calibration)
    head = plan["head"]
    assert head.decomposed and head.ranks == (1,) and head.error == 0.0
    assert "does not depend on this layer" in head.notes and "does not depend" in plan.table()
    assert min(plan["a"].ranks + plan["b"].ranks) > 4 and plan["a"].notes == ""


@pytest.mark.parametrize("fn", [lambda out, inputs: None, lambda out, inputs: out.detach()])
def test_sensitivity_callable_that_returns_nothing_to_weigh_by_fails_clearly(fn):
    model = nn.Sequential(nn.Linear(4, 4)).train()
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(16, 4)
    with pytest.raises(ConfigError, match="the sensitivity function returned (NoneType|Tensor), with no tensor computed"):
        fxlrd.transform(model, LRDConfig(sensitivity=fn), example_inputs=x[:2], calibration=[x])
    assert model.training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def _sqrtm(m: torch.Tensor) -> torch.Tensor:
    e, v = torch.linalg.eigh(m)
    return v @ torch.diag(e.clamp_min(0).sqrt()) @ v.T


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_full_sensitivity_svd_is_the_two_sided_optimum(seed):
    """With an input Gram ``G`` and a sensitivity matrix ``M``, the SVD at rank r minimises
    ``tr(δWᵀ M δW G)``; the independent optimum uses symmetric square roots instead of
    Cholesky factors: ``M^-½ [M^½ W G^½]_r G^-½``."""
    from fxlrd.calibrate import SiteStats

    g = torch.Generator().manual_seed(seed)
    c, s, r = 7, 5, 2
    w = torch.randn(s, c, generator=g, dtype=torch.float64)
    inputs = _stats(_correlated(400, c, seed=seed), shrink=False)
    a = torch.randn(s, s, generator=g, dtype=torch.float64)
    site = SiteStats(inputs, a @ a.T + 0.1 * torch.eye(s, dtype=torch.float64), output_energy=1.0)
    m, gram = site.output_weights(), inputs.covariance()
    fact, _ = decompose_weight(w, None, LayerSpec("linear", c, s, (), 1, False), "svd", (r,), stats=site)
    got = _product(fact)
    ms, gs = _sqrtm(m), _sqrtm(gram)
    u, sv, vt = torch.linalg.svd(ms @ w @ gs)
    best = torch.linalg.inv(ms) @ (u[:, :r] * sv[:r]) @ vt[:r] @ torch.linalg.inv(gs)

    def cost(approx):
        d = w - approx
        return float(torch.trace(d.T @ m @ d @ gram))

    assert cost(got) == pytest.approx(cost(best), rel=1e-4)
    assert rel_err(got, best) < 1e-3


def test_full_sensitivity_weighs_correlated_output_channels_together():
    """The next layer reads only the sum of two channels and the difference of two others: the
    diagonal of JᵀJ sees four equally weighted channels, the full matrix sees that only two
    directions count. Compressing the first layer to rank 2, the full matrix keeps the model's
    output (all but the 1 % floor every direction keeps); the diagonal cannot."""
    torch.manual_seed(0)
    first, second = nn.Linear(6, 4, bias=False), nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        second.weight.copy_(torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, -1.0]]))
    model = nn.Sequential(first, second).eval()
    x = torch.randn(512, 6)
    cal = [x[i : i + 64] for i in range(0, 512, 64)]
    errors = {}
    for matrix in ("full", "diagonal"):
        cfg = LRDConfig(rank_rule="fixed", rank=2, rank_quantum=1, include=["0"], sensitivity_matrix=matrix)
        gm = fxlrd.transform(model, cfg, example_inputs=x[:2], calibration=cal)
        with torch.no_grad():
            errors[matrix] = rel_err(gm(x), model(x))
    assert errors["full"] < 0.01 and errors["diagonal"] > 0.2


def test_kl_sensitivity_is_the_fisher_of_the_softmax():
    """``JᵀJ`` of `kl_outputs` at the original logits equals the Hessian of
    ``KL(p ‖ softmax(z))`` there (computed independently by autograd)."""
    from fxlrd.calibrate import kl_outputs

    z0 = torch.randn(10, dtype=torch.float64)
    p = z0.softmax(-1)
    jac = torch.autograd.functional.jacobian(lambda z: _kl_view_with_fixed_p(z, p), z0)
    hess = torch.autograd.functional.hessian(lambda z: (p * (p.log() - z.log_softmax(-1))).sum(), z0)
    assert torch.allclose(jac.T @ jac, hess, atol=1e-10)
    # and kl_outputs computes that view, holding p at the current prediction
    assert torch.allclose(kl_outputs(z0[None])[0], _kl_view_with_fixed_p(z0, p))


def _kl_view_with_fixed_p(z, p):
    return p.sqrt() * (z - (p * z).sum())


def test_kl_sensitivity_picks_the_logits_of_a_model_output():
    from fxlrd.calibrate import kl_outputs

    z = torch.randn(3, 5)
    assert torch.equal(kl_outputs({"logits": z, "hidden": torch.randn(3, 7)}), kl_outputs(z))
    with pytest.raises(ConfigError, match="sensitivity='kl' needs a model that returns its logits"):
        kl_outputs((torch.randn(3, 5), torch.randn(3, 5)))


class _TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 3), nn.Linear(6, 3)

    def forward(self, x):
        h = self.body(x)
        return self.a(h), self.b(h)


def test_kl_sensitivity_on_a_model_without_logits_fails_clearly_and_leaves_it_unchanged():
    model = _TwoHeads().train()
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(16, 6)
    with pytest.raises(ConfigError, match="returns 2 floating tensors. Pass sensitivity=fn"):
        fxlrd.transform(model, LRDConfig(ratio=1.5, sensitivity="kl"), example_inputs=x[:2], calibration=[x])
    assert model.training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_kl_sensitivity_keeps_a_classifier_s_predictions_better_than_squared_logits():
    """A classifier whose logits include large, never-predicted classes: weighting every
    logit alike spends the rank on them; the softmax's Fisher spends it on the classes the
    model predicts (measured by KL to the original)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 8)).eval()
    with torch.no_grad():
        model[2].bias[4:] = -30.0  # classes 4..7: large logits, probability ~0
        model[2].weight[4:] *= 10.0
    x = torch.randn(512, 12)
    cal = [x[i : i + 64] for i in range(0, 512, 64)]
    kl = {}
    for sens in (True, "kl"):
        cfg = LRDConfig(rank_rule="fixed", rank=3, rank_quantum=1, include=["2"], sensitivity=sens)
        gm = fxlrd.transform(model, cfg, example_inputs=x[:2], calibration=cal)
        with torch.no_grad():
            ref, out = model(x).log_softmax(-1), gm(x).log_softmax(-1)
        kl[sens] = float(torch.nn.functional.kl_div(out, ref, log_target=True, reduction="batchmean"))
    assert kl["kl"] < 0.5 * kl[True]


@pytest.mark.parametrize("kwargs, match", [
    ({"sensitivity": "fisher"}, "sensitivity must be True, False, 'kl'"),
    ({"sensitivity_matrix": "dense"}, "sensitivity_matrix must be 'full' or 'diagonal'"),
])  # fmt: skip
def test_bad_sensitivity_settings(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        LRDConfig(**kwargs)
    model = nn.Sequential(nn.Linear(4, 4)).eval()
    x = torch.randn(8, 4)
    with pytest.raises(ConfigError, match=match):  # collect_stats, called directly, says the same
        collect_stats(capture(model, x).gm, [x], **{"sensitivity": True, **kwargs}, progress=False)


# --- distillation ----------------------------------------------------------------------------------
def test_distill_lowers_the_distillation_loss():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 5)).eval()
    x = torch.randn(128, 16)
    gm = fxlrd.transform(teacher, LRDConfig(rank_rule="fixed", rank=3, rank_quantum=1))
    batches = [x[i : i + 32] for i in range(0, 128, 32)]
    curve = distill(gm, teacher, batches, steps=120, lr=1e-2, progress=False)
    assert len(curve) == 120
    assert sum(curve[-4:]) < 0.5 * sum(curve[:4])  # the same four batches, first and last pass


def test_distill_keeps_frozen_factors_frozen():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 5)).eval()
    x = torch.randn(64, 16)
    gm = fxlrd.transform(teacher, LRDConfig(rank_rule="fixed", rank=3, rank_quantum=1))
    frozen = {n: p.detach().clone() for n, p in gm.named_parameters() if n.endswith("in_proj.weight")}
    curve = distill(gm, teacher, [x], steps=30, lr=1e-2, freeze="paper", progress=False)
    assert curve[-1] < curve[0]
    params = dict(gm.named_parameters())
    assert frozen and all(torch.equal(params[n], v) and not params[n].requires_grad for n, v in frozen.items())


def test_distill_with_sequential_freezer_and_features():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 5)).eval()
    gm = fxlrd.transform(teacher, LRDConfig(rank_rule="fixed", rank=3, rank_quantum=1))
    x = torch.randn(64, 16)
    freezer = fxlrd.SequentialFreezer(gm, period=5)
    plain = distill(copy.deepcopy(gm), teacher, [x], steps=1, lr=1e-2, progress=False)
    curve = distill(gm, teacher, [x], steps=20, lr=1e-2, freeze=freezer, features=True, progress=False)
    assert freezer.steps == 20 and curve[-1] < curve[0]
    assert curve[0] > plain[0] * 1.01  # the decomposed layers' feature mismatch is in the loss


def test_distill_cosine_schedule_decays_the_learning_rate_to_zero(monkeypatch):
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 5)).eval()
    gm = fxlrd.transform(teacher, LRDConfig(rank_rule="fixed", rank=3, rank_quantum=1))
    x = torch.randn(64, 16)
    seen = []
    step = torch.optim.Adam.step
    monkeypatch.setattr(torch.optim.Adam, "step", lambda self, *a, **k: (seen.append(self.param_groups[0]["lr"]), step(self, *a, **k))[1])
    curve = distill(gm, teacher, [x], steps=40, lr=1e-2, schedule="cosine", progress=False)
    assert seen[0] == pytest.approx(1e-2) and seen[20] == pytest.approx(5e-3) and seen[-1] < 1e-4
    assert all(a >= b for a, b in zip(seen, seen[1:])) and curve[-1] < curve[0]


def test_auto_loss_sees_a_shifted_2d_output_and_distill_removes_it():
    """A 2-D output may be an embedding or a regression, not logits: a shift of every row,
    which the softmax cannot see, must count in the "auto" loss."""
    from fxlrd.recover import output_loss

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 16)).eval()
    gm = fxlrd.transform(model, LRDConfig(rank_rule="fixed", rank=1000, allow_larger=True, rank_quantum=1),
                         example_inputs=torch.randn(4, 16))  # fmt: skip
    with torch.no_grad():
        gm.get_submodule("2").out_proj.bias += 5.0
    x = torch.randn(64, 16)
    with torch.no_grad():
        t, s = model(x), gm(x)
    assert float(output_loss(s, t, "kl")) < 1e-6  # blind to it
    assert float(output_loss(s, t)) == pytest.approx(float(output_loss(s, t, "mse")), rel=1e-4) and output_loss(s, t) > 10
    err = lambda: float(rel_err(gm(x), model(x)))  # noqa: E731
    before = err()
    distill(gm, model, [x[i : i + 16] for i in range(0, 64, 16)], steps=200, lr=1e-2, progress=False)
    with torch.no_grad():
        assert err() < 0.2 * before


def test_output_loss_leaves_padding_positions_out():
    from fxlrd.recover import output_loss

    torch.manual_seed(0)
    t = torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    s = t + 0.1 * torch.randn(2, 5, 8)
    junk = s.clone()
    junk[1, 2:] += 100.0  # differs at the padding positions only
    masked = output_loss(s, t, mask=mask)
    assert output_loss(junk, t, mask=mask) == pytest.approx(float(masked))
    assert output_loss(junk, t) > 100 * masked  # unmasked, padding dominates
    keep = mask.bool()  # the masked loss is the relative MSE over the real tokens alone
    expected = (s[keep] - t[keep]).pow(2).mean() / t[keep].pow(2).mean()
    assert masked == pytest.approx(float(expected))
    # an all-padding mask, or one that does not fit, compares everything; KL stays KL on 3-D logits
    assert output_loss(junk, t, mask=torch.zeros_like(mask)) == pytest.approx(float(output_loss(junk, t)))
    assert output_loss(junk, t, mask=torch.ones(3, 5)) == pytest.approx(float(output_loss(junk, t)))
    kl = output_loss(s, t, kind="kl", mask=mask)  # summed over the real tokens, per sequence: the unmasked scale
    log_p, log_q = s[keep].log_softmax(-1), t[keep].log_softmax(-1)
    assert kl == pytest.approx(float(torch.nn.functional.kl_div(log_p, log_q, log_target=True, reduction="sum")) / 2)
    assert output_loss(s, t, kind="kl", mask=torch.ones_like(mask)) == pytest.approx(float(output_loss(s, t, kind="kl")))


def test_distill_leaves_padding_out_of_a_text_models_loss():
    class Tokens(nn.Module):  # per-token outputs; the teacher's at padding contradict its real tokens'
        def __init__(self, junk: float):
            super().__init__()
            torch.manual_seed(0)
            self.emb, self.proj, self.junk = nn.Embedding(30, 16), nn.Linear(16, 16), junk

        def forward(self, input_ids, attention_mask):
            m = attention_mask[..., None].float()
            y = self.proj(self.emb(input_ids))
            return y * m + self.junk * y * (1 - m)

    teacher = Tokens(junk=-3.0).eval()
    student = Tokens(junk=1.0)  # the same function at every position, as a real encoder's
    with torch.no_grad():
        student.proj.weight.mul_(0.5)
    batch = {"input_ids": torch.randint(0, 30, (4, 6)), "attention_mask": torch.tensor([[1] * 6, [1] * 6, [1, 1, 1, 0, 0, 0], [1] * 4 + [0] * 2])}

    def real_token_error(model) -> float:
        keep = batch["attention_mask"].bool()
        with torch.no_grad():
            return float((model(**batch)[keep] - teacher(**batch)[keep]).pow(2).mean())

    start = real_token_error(student)
    masked = copy.deepcopy(student)
    curve = distill(masked, teacher, [batch], steps=60, lr=1e-2, progress=False)
    assert curve[-1] < 0.2 * curve[0] and real_token_error(masked) < 0.2 * start
    unmasked = copy.deepcopy(student)
    curve = distill(unmasked, teacher, [batch], steps=60, lr=1e-2, skip_padding=False, progress=False)
    assert curve[-1] > 0.3 * curve[0]  # the padding positions' targets cannot be met with the real tokens'
    assert real_token_error(unmasked) > 5 * real_token_error(masked)


def test_distill_with_validation_keeps_the_best_check():
    from fxlrd.recover import output_loss

    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 5)).eval()
    gm = fxlrd.transform(teacher, LRDConfig(rank_rule="fixed", rank=3, rank_quantum=1))
    with torch.no_grad():  # a poor start, so that training helps before it overfits
        for p in gm.parameters():
            p.copy_(0.3 * torch.randn_like(p))
    train, held = torch.randn(6, 16), torch.randn(64, 16)  # six samples: it overfits them

    def held_loss(model) -> float:
        with torch.no_grad():
            return float(output_loss(model(held), teacher(held), "mse"))

    start = held_loss(gm)
    curve = distill(gm, teacher, [train], steps=200, lr=3e-2, loss="mse", validation=[held], check_every=10,
                    progress=False)  # fmt: skip
    steps = [s for s, _ in curve.validation]
    assert len(curve) == 200 and steps == [0, *range(10, 201, 10)]
    assert curve.validation[0][1] == pytest.approx(start)
    losses = dict(curve.validation)
    assert curve.best_step == min(losses, key=losses.get)
    assert 0 < curve.best_step < 200  # it improved, then overfit the six samples
    assert held_loss(gm) == pytest.approx(losses[curve.best_step], rel=1e-5)  # the kept parameters are the best check's
    assert held_loss(gm) < start and curve[-1] < curve[0]


def test_distill_that_only_hurts_the_held_out_data_leaves_the_model_as_it_was():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 5)).eval()
    gm = fxlrd.transform(teacher, LRDConfig(rank_rule="fixed", rank=3, rank_quantum=1))
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    curve = distill(gm, teacher, [torch.randn(8, 16)], steps=20, lr=50.0, validation=[torch.randn(32, 16)], progress=False)
    assert curve.best_step == 0 and len(curve.validation) == 21
    assert all(torch.equal(v, before[k]) for k, v in gm.state_dict().items())
    teacher.train()
    gm.train()
    with pytest.raises(RuntimeError):  # a held-out batch that does not fit: both models' modes are restored
        distill(gm, teacher, [torch.randn(8, 16)], steps=2, validation=[torch.randn(8, 7)], progress=False)
    assert teacher.training and gm.training
    with pytest.raises(ValueError, match="validation is empty"):
        distill(gm, teacher, [torch.randn(8, 16)], steps=1, validation=[])
    with pytest.raises(ValueError, match="check_every must be an int >= 1"):
        distill(gm, teacher, [torch.randn(8, 16)], steps=1, validation=[torch.randn(8, 16)], check_every=0)
    assert distill(gm, teacher, [torch.randn(8, 16)], steps=2, progress=False).validation == []  # no checks without it


def test_distill_bad_input():
    teacher = nn.Sequential(nn.Linear(4, 4))
    gm = fxlrd.transform(teacher, LRDConfig(rank_rule="fixed", rank=1, rank_quantum=1))
    with pytest.raises(ValueError, match="at least one batch"):
        distill(gm, teacher, [], steps=1)
    with pytest.raises(ValueError, match="steps"):
        distill(gm, teacher, [torch.randn(2, 4)], steps=0)
    with pytest.raises(ValueError, match="schedule must be 'constant' or 'cosine'"):
        distill(gm, teacher, [torch.randn(2, 4)], steps=1, schedule="linear")


# --- bad input -----------------------------------------------------------------------------------
def test_empty_calibration_is_a_clear_error():
    with pytest.raises(ConfigError, match="calibration is empty"):
        fxlrd.transform(_deep_mlp(), LRDConfig(), calibration=[], example_inputs=torch.randn(2, 32))


def test_calibration_items_that_do_not_fit_are_named():
    model = _deep_mlp()
    before = _state(model)
    with pytest.raises(ValueError, match=r"calibration item \(float32\[4, 7\]\) does not run through"):
        fxlrd.transform(model, LRDConfig(), calibration=[torch.randn(4, 7)], example_inputs=torch.randn(2, 32))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class _Keyword(nn.Module):
    def __init__(self, branch: bool):
        super().__init__()
        self.fc, self.fc2, self.branch = nn.Linear(16, 32), nn.Linear(32, 4), branch

    def forward(self, x, scale=1.0):
        if self.branch:  # fx cannot trace a branch on the input's rank: export captures it
            x = x if x.dim() == 2 else x.flatten(1)
        return self.fc2(torch.relu(self.fc(x * scale)))


@pytest.mark.parametrize("calibration,match", [
    ("batches.pt", r"calibration is a path \('batches.pt'\), not batches: load them first"),
    (5, "calibration must be an iterable of inputs .* got int"),
    ([None], "calibration batch 0 is a NoneType: each batch must be like example_inputs"),
    ([torch.randn(4, 16), np.zeros((4, 16), dtype=np.float32)], "calibration batch 1 is a ndarray .*torch.from_numpy"),
    ([{"y": torch.randn(4, 16)}], r"calibration batch 0 has inputs the captured model does not take: \['y'\]|"
                                  r"inputs \['x'\] were given at capture and are missing from calibration batch 0"),
])  # fmt: skip
@pytest.mark.parametrize("capture", ["fx", "export"])
def test_calibration_that_is_not_batches_gets_a_clear_error(calibration, match, capture):
    """Each names calibration (not example_inputs), the batch and the fix; nothing is dropped
    silently (an input the captured graph does not take would be ignored); the model is unchanged."""
    model = _Keyword(branch=capture == "export").eval()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ConfigError, match=match):
        fxlrd.transform(model, LRDConfig(), example_inputs={"x": torch.randn(4, 16)}, calibration=calibration,
                        capture=capture)  # fmt: skip
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_calibration_may_name_the_inputs_an_export_capture_took_by_position():
    model = _Keyword(branch=True).eval()
    x = torch.randn(16, 16)
    by_name = fxlrd.transform(model, LRDConfig(), example_inputs=x, calibration=[{"x": x}])  # captured with x positional
    by_position = fxlrd.transform(model, LRDConfig(), example_inputs=x, calibration=[x])
    assert by_name.fxlrd_capture["mode"] == "export"
    with torch.no_grad():
        torch.testing.assert_close(by_name(x), by_position(x), rtol=0, atol=0)


def test_an_input_not_given_at_export_capture_is_not_dropped_from_calibration():
    """torch.export bakes an input it was not given into the graph: a calibration batch that
    sets it would be calibrated as if it had not (it was silently dropped)."""
    model = _Keyword(branch=True).eval()
    cal = [{"x": torch.randn(4, 16), "scale": torch.full((16,), 3.0)}]
    with pytest.raises(ConfigError, match=r"does not take: \['scale'\] \(it takes \['x'\]\)"):
        fxlrd.transform(model, LRDConfig(), example_inputs={"x": torch.randn(4, 16)}, calibration=cal)
    gm = fxlrd.transform(model, LRDConfig(), example_inputs=cal[0], calibration=cal)  # captured with it: fine
    assert gm.fxlrd_capture["mode"] == "export"


def test_a_single_tensor_is_not_a_calibration_iterable():
    with pytest.raises(ConfigError, match="iterable of inputs"):
        fxlrd.transform(_deep_mlp(), LRDConfig(), calibration=torch.randn(8, 32), example_inputs=torch.randn(2, 32))


def test_calibration_with_a_rank_rule_that_cannot_use_it():
    with pytest.raises(ConfigError, match="vbmf"):
        fxlrd.transform(_deep_mlp(), LRDConfig(rank_rule="vbmf"), calibration=[torch.randn(8, 32)])


def test_a_data_aware_plan_needs_calibration_to_be_applied():
    model = _deep_mlp()
    x = torch.randn(16, 32)
    plan = fxlrd.plan(model, LRDConfig(), calibration=[x], example_inputs=x)
    assert any(lp.data_aware for lp in plan.decomposed)
    with pytest.raises(ConfigError, match="calibration"):
        fxlrd.apply(model, plan)
    gm = fxlrd.apply(model, plan, calibration=[x])
    ref = fxlrd.transform(model, LRDConfig(), calibration=[x], example_inputs=x)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), ref(x))


def _first_output(outputs, inputs):
    """A sensitivity function: only the first output channel counts."""
    return outputs[..., :1]


@pytest.mark.parametrize("settings", [dict(sensitivity=False), dict(sensitivity="kl"), dict(sensitivity_matrix="diagonal"),
                                      dict(sequential=True), dict(sensitivity=_first_output)])  # fmt: skip
def test_apply_fits_data_aware_layers_as_the_plan_says(settings):
    """apply rebuilds transform's model from its plan (in memory and through JSON): the same
    sensitivity, sensitivity matrix and sequential fit, not the defaults."""
    model = _deep_mlp()
    x = _correlated(48, 32, seed=5)
    cal = [x[:24], x[24:]]
    ref = fxlrd.transform(model, LRDConfig(ratio=2, rank_quantum=1, **settings), calibration=cal, example_inputs=x[:2])
    default = fxlrd.transform(model, LRDConfig(ratio=2, rank_quantum=1), calibration=cal, example_inputs=x[:2])
    fn = settings.get("sensitivity") if callable(settings.get("sensitivity")) else None
    for plan in (ref.fxlrd_plan, Plan.from_json(ref.fxlrd_plan.to_json())):
        if fn is not None and plan is not ref.fxlrd_plan:
            with pytest.raises(ConfigError, match="sensitivity function"):
                fxlrd.apply(model, plan, calibration=cal, example_inputs=x[:2])
        gm = fxlrd.apply(model, plan, calibration=cal, example_inputs=x[:2], sensitivity=fn)
        with torch.no_grad():
            torch.testing.assert_close(gm(x), ref(x), rtol=0, atol=0)
            assert not torch.allclose(gm(x), default(x))  # the setting matters here: the check can fail


# --- distributed ---------------------------------------------------------------------------------------
_DISTRIBUTED = [{}, dict(sequential=True, mlp="narrow")]  # plain; + the inputs' sums and cross moments


def _worker(rank: int, world: int, init: str, out: str, settings: dict) -> None:  # pragma: no cover  (a subprocess)
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = _deep_mlp(width=16, depth=2)
        x = _correlated(64, 16, seed=3)
        shard = x[rank::world]
        # Gram matrices and counts are all-reduced; sensitivity (random projections) is off so
        # the comparison can be exact.
        gm = fxlrd.transform(model, LRDConfig(rank_rule="fixed", rank=4, rank_quantum=1, sensitivity=False, **settings),
                             calibration=[shard[:16], shard[16:]], example_inputs=x[:2])  # fmt: skip
        torch.save({k: v.clone() for k, v in gm.state_dict().items()}, f"{out}.{rank}")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("settings", _DISTRIBUTED)
def test_distributed_statistics_equal_one_process_on_the_union(settings):
    torch.manual_seed(0)
    model = _deep_mlp(width=16, depth=2)
    x = _correlated(64, 16, seed=3)
    single = fxlrd.transform(model, LRDConfig(rank_rule="fixed", rank=4, rank_quantum=1, sensitivity=False, **settings),
                             calibration=[x[0::2], x[1::2]], example_inputs=x[:2])  # fmt: skip
    if settings.get("mlp"):
        assert single.fxlrd_plan.settings.get("narrowed"), "nothing narrowed: the test would not see the inputs' sums"
    with tempfile.TemporaryDirectory() as tmp:
        init = f"file://{os.path.join(tmp, 'rendezvous')}"
        out = os.path.join(tmp, "state")
        mp.spawn(_worker, args=(2, init, out, settings), nprocs=2, join=True)
        states = [torch.load(f"{out}.{r}") for r in range(2)]
    ref = single.state_dict()
    for state in states:
        assert state.keys() == ref.keys()
        for k in ref:
            torch.testing.assert_close(state[k], ref[k], rtol=1e-5, atol=1e-6)


def _empty_shard_worker(rank: int, world: int, init: str, out: str) -> None:  # pragma: no cover  (a subprocess)
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        model, x = _deep_mlp(width=16, depth=2), _correlated(32, 16, seed=3)
        try:
            fxlrd.transform(model, LRDConfig(sensitivity=False), calibration=[x] if rank == 0 else [], example_inputs=x[:2])
            message = "no error"
        except ConfigError as exc:
            message = str(exc)
        with open(f"{out}.{rank}", "w") as f:
            f.write(message)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_a_process_without_calibration_batches_is_refused_on_every_process():
    """One process with no batch refused alone, while the others waited for it in the sums."""
    with tempfile.TemporaryDirectory() as tmp:
        init, out = f"file://{os.path.join(tmp, 'rendezvous')}", os.path.join(tmp, "message")
        context = mp.start_processes(_empty_shard_worker, args=(2, init, out), nprocs=2, join=False, start_method="spawn")
        end = time.monotonic() + 120
        while not context.join(timeout=max(0.0, end - time.monotonic())):
            if time.monotonic() >= end:
                for p in context.processes:
                    p.kill()
                pytest.fail("the processes hung in the statistics' sums")
        messages = [open(f"{out}.{r}").read() for r in range(2)]
    assert all("calibration is empty on 1 of the processes: every process needs at least one batch" in m for m in messages)


def test_distill_refuses_bad_calls_before_touching_the_model():
    """Each refused call leaves the model's parameters and requires_grad flags as they were
    (the freeze policy used to be applied before the checks)."""
    model = _deep_mlp(width=16, depth=2)
    gm = fxlrd.transform(model, LRDConfig(rank_quantum=1), example_inputs=torch.randn(2, 16))
    x = torch.randn(8, 16)
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    flags = {n: p.requires_grad for n, p in gm.named_parameters()}
    for kwargs, match in [
        (dict(batches=[]), "at least one batch"),
        (dict(batches=[x], check_every=0, validation=[x]), "check_every"),
        (dict(batches=x), "wrap a single batch in a list"),
        (dict(batches=[x], lr=-1.0), "lr must be a number > 0"),
        (dict(batches=[x], steps=True), "steps must be an int"),
        (dict(batches=[x], teacher=gm), "teacher is the model being distilled"),
        (dict(batches=[x], loss="kld"), "loss must be 'auto', 'kl', 'mse' or a callable"),
        (dict(batches=[x], temperature=0), "temperature must be a number > 0"),
        (dict(batches=[x], temperature=-1.0), "temperature must be a number > 0"),
        (dict(batches=[x], features=-1.0), "features must be a number >= 0"),
        (dict(batches=[x], weight_decay=-1.0), "weight_decay must be a number >= 0"),
        (dict(batches=[x], lr=float("inf")), "lr must be a number > 0 \\(finite\\)"),
        (dict(batches=[x], train_mode="yes"), "train_mode must be True or False"),
        (dict(batches=[x, x, torch.randn(8, 16), (x, torch.zeros(8))]), "batch 3 does not fit .* labels\\?"),
        (dict(batches=[{"inputs": x}]), "batch 0 does not fit"),
        (dict(batches=[{"input": x, "labels": torch.zeros(8)}]), "batch 0 holds labels"),
        (dict(batches=iter([])), "at least one batch"),
    ]:  # fmt: skip
        args = {"teacher": model, "steps": 3, "freeze": "paper", "progress": False} | kwargs
        with pytest.raises(ValueError, match=match):
            distill(gm, args.pop("teacher"), args.pop("batches"), **args)
        assert {n: p.requires_grad for n, p in gm.named_parameters()} == flags
        assert all(torch.equal(v, before[k]) for k, v in gm.state_dict().items())


def test_distill_stops_at_a_non_finite_loss_with_the_parameters_still_finite():
    model = _deep_mlp(width=16, depth=2)
    gm = fxlrd.transform(model, LRDConfig(rank_quantum=1), example_inputs=torch.randn(2, 16))
    bad = torch.randn(8, 16)
    bad[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="loss is nan at step 1 .* the model keeps those of step 1"):
        distill(gm, model, [torch.randn(8, 16), bad], steps=4, lr=1e-3, progress=False)
    assert all(torch.isfinite(p).all() for p in gm.parameters())


@pytest.mark.parametrize("settings", [{}, {"sequential": True}, {"sensitivity": True}])
def test_unbatched_conv_inputs_calibrate_as_the_same_samples_batched(settings):
    """torch convs take one unbatched sample (C, H, W): its channels are dimension 0."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 5, 3, padding=1)).eval()
    data = [torch.randn(6, 7, 9) * torch.linspace(0.1, 3, 6).reshape(6, 1, 1) for _ in range(6)]
    config = LRDConfig(rank_rule="fixed", rank=3, rank_quantum=1, **settings)
    unbatched = fxlrd.transform(model, config, example_inputs=data[0], calibration=data)
    batched = fxlrd.transform(model, config, example_inputs=data[0][None], calibration=[d[None] for d in data])
    for a, b in zip(unbatched.parameters(), batched.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("settings", [{}, {"sequential": True}, {"mlp": "narrow"}, {"sensitivity": True},
                                      {"sensitivity": True, "allocation": "global", "mlp": "narrow"}])  # fmt: skip
def test_padding_positions_are_left_out_of_the_statistics(settings):
    """The same real tokens calibrate to the same model whether or not their batches are
    padded (positions where attention_mask is 0); with a sensitivity, the random projections
    are drawn for the real tokens alone."""
    from conftest import tiny_bert

    model = tiny_bert()
    g = torch.Generator().manual_seed(1)
    real = [torch.randint(5, 40, (4, 6), generator=g) for _ in range(6)]
    unpadded = [{"input_ids": r, "attention_mask": torch.ones_like(r)} for r in real]
    padded = []
    for r in real:
        ids = torch.zeros(4, 20, dtype=torch.long)
        ids[:, :6] = r
        padded.append({"input_ids": ids, "attention_mask": (ids != 0).long()})
    config = LRDConfig(ratio=2, rank_quantum=4, **{"sensitivity": False, **settings})
    a = fxlrd.transform(model, config, example_inputs=unpadded[0], calibration=unpadded)
    b = fxlrd.transform(model, config, example_inputs=unpadded[0], calibration=padded)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-4, msg=name)


class _SequenceFirst(nn.Module):
    """Token ids (batch, length) in, but its linears run on (length, batch, channels)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(40, 12)
        self.up, self.down = nn.Linear(12, 16), nn.Linear(16, 8)

    def forward(self, input_ids, attention_mask):
        x = (self.emb(input_ids) * attention_mask[..., None]).transpose(0, 1)
        return self.down(torch.relu(self.up(x))).transpose(0, 1)


def _sequence_first_batches(square_first: bool):
    g = torch.Generator().manual_seed(2)
    real = [torch.randint(5, 40, (4, 3), generator=g) for _ in range(6)]
    unpadded = [{"input_ids": r, "attention_mask": torch.ones_like(r)} for r in real]
    padded = []
    for i, r in enumerate(real):
        width = 6 if (i == 0) != square_first else 4  # 4 tokens for 4 rows: a square mask
        ids = torch.zeros(4, width, dtype=torch.long)
        ids[:, :3] = r
        padded.append({"input_ids": ids, "attention_mask": (ids != 0).long()})
    return unpadded, padded


@pytest.mark.parametrize("settings", [{}, {"sequential": True}, {"mlp": "narrow"}])
def test_padding_is_left_out_of_a_sequence_first_models_statistics(settings):
    """A model whose linears see (length, batch, ...) has its padding found too, also in the
    batches whose mask is square (the layout shown by the others)."""
    torch.manual_seed(0)
    model = _SequenceFirst().eval()
    unpadded, padded = _sequence_first_batches(square_first=False)
    config = LRDConfig(ratio=2, rank_quantum=2, sensitivity=False, **settings)  # (a sensitivity draws random projections)
    a = fxlrd.transform(model, config, example_inputs=unpadded[0], calibration=unpadded)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        b = fxlrd.transform(model, config, example_inputs=unpadded[0], calibration=padded)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-4, msg=name)


def test_a_square_first_batch_of_a_sequence_first_model_warns():
    model = _SequenceFirst().eval()
    unpadded, padded = _sequence_first_batches(square_first=True)
    with pytest.warns(UserWarning, match="'up' runs sequence-first.*put a batch of another shape first"):
        fxlrd.transform(model, LRDConfig(rank_rule="fixed", rank=4), example_inputs=unpadded[0], calibration=padded)


def test_distill_refuses_a_teacher_that_shares_the_students_parameters_or_swapped_arguments():
    model = _deep_mlp(width=16, depth=2)
    x = torch.randn(8, 16)
    gm = fxlrd.transform(model, LRDConfig(rank_quantum=1), example_inputs=x, inplace=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="teacher shares parameters .* pass a copy of the original"):
        distill(gm, model, [x], steps=2, progress=False)
    fresh = _deep_mlp(width=16, depth=2)
    compressed = fxlrd.transform(fresh, LRDConfig(rank_quantum=1), example_inputs=x)
    with pytest.raises(ConfigError, match="arguments look swapped"):
        distill(fresh, compressed, [x], steps=2, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_distill_takes_batches_lazily_and_accepts_numpy_counts():
    """Only the batches it trains on are read (an endless generator works); a one-shot
    iterator that runs out ends the run early, with a warning."""
    model = _deep_mlp(width=16, depth=2)
    gm = fxlrd.transform(model, LRDConfig(rank_quantum=1), example_inputs=torch.randn(2, 16))
    taken = []

    def endless():
        while True:
            taken.append(1)
            yield torch.randn(8, 16)

    assert len(distill(gm, model, endless(), steps=np.int64(3), lr=np.float32(1e-3), progress=False)) == 3
    assert len(taken) <= 4
    with pytest.warns(fxlrd.FxlrdWarning, match="batches ran out after 2 of 5 steps"):
        curve = distill(gm, model, iter([torch.randn(8, 16)] * 2), steps=5, progress=False)
    assert len(curve) == 2
    assert len(distill(gm, model, [torch.randn(8, 16)] * 2, steps=5, progress=False)) == 5  # a list is cycled


def test_a_distill_that_fails_midway_says_where_and_a_freezer_keeps_its_own_optimizer():
    model = _deep_mlp(width=16, depth=2)
    x = torch.randn(8, 16)
    gm = fxlrd.transform(model, LRDConfig(rank_quantum=1), example_inputs=x)
    with pytest.raises(RuntimeError) as info:  # the shapes do not fit: found only when the batch runs
        distill(gm, model, [x, x, torch.randn(8, 15)], steps=5, progress=False)
    assert "stopped at step 2: the model keeps the parameters of step 2" in "".join(getattr(info.value, "__notes__", []))
    freezer = fxlrd.SequentialFreezer(gm, period=2)
    distill(gm, model, [x], steps=3, freeze=freezer, progress=False)
    assert freezer.optimizer is None  # distill's own optimizer is not left behind


class _GeluLinear(nn.Module):  # a custom layer: F.linear on its own parameters, then an activation
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(32, 32) / 32**0.5)
        self.bias = nn.Parameter(torch.zeros(32))

    def forward(self, x):
        return F.gelu(F.linear(x, self.weight, self.bias))


def test_distill_features_match_only_layer_outputs():
    """A custom module's output is not its F.linear's, a merged factor holds a neighbour, and a
    compiled student's names carry a prefix: features pair only what is the same quantity."""
    torch.manual_seed(0)
    model = nn.Sequential(_GeluLinear(), nn.Linear(32, 4)).eval()
    x = torch.randn(16, 32)
    gm = fxlrd.transform(model, LRDConfig(rank_rule="fixed", rank=32, rank_quantum=1, allow_larger=True, exclude=["1"]),
                         example_inputs=x)  # fmt: skip
    with pytest.raises(ConfigError, match="features=... matched no decomposed layer"):
        distill(gm, model, [x], steps=1, features=True, progress=False)

    mlp = _deep_mlp(width=16, depth=2)
    y = torch.randn(8, 16)
    small = fxlrd.transform(mlp, LRDConfig(ratio=2, rank_quantum=1), example_inputs=y)
    plain = distill(copy.deepcopy(small), mlp, [y], steps=1, progress=False)[0]
    with_features = distill(copy.deepcopy(small), mlp, [y], steps=1, features=True, progress=False)[0]
    compiled = distill(torch.compile(copy.deepcopy(small)), mlp, [y], steps=1, features=True, progress=False)[0]
    assert with_features > plain and compiled == pytest.approx(with_features, rel=1e-4)


def test_distill_features_skip_merged_factors():
    from fxlrd.zoo import ResNet

    torch.manual_seed(0)
    model = ResNet([1, 1, 1, 1], num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    gm = fxlrd.transform(model, LRDConfig(ratio=2, merge="approximate"), example_inputs=x)
    curve = distill(gm, model, [x], steps=1, features=True, progress=False)
    assert len(curve) == 1 and curve[0] == curve[0]


class _CalledTwice(nn.Module):  # one layer called twice (weights shared across depth, as ALBERT's)
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(64, 64)

    def forward(self, a, b):
        return self.lin(a), self.lin(b)


def _two_subspaces():  # the first call sees only channels 0-3, the second only channels 8-11
    a, b = torch.zeros(64, 64), torch.zeros(64, 64)
    a[:, :4], b[:, 8:12] = torch.randn(64, 4), torch.randn(64, 4)
    return a, b


@pytest.mark.parametrize("sequential", [False, True])
def test_a_layer_called_twice_is_fitted_on_both_calls(sequential):
    """Rank 8 holds both calls' 4-dimensional inputs; the statistics of one call used to
    overwrite the other's, leaving the other call's output 0.8 off."""
    torch.manual_seed(0)
    model = _CalledTwice().eval()
    cal = [_two_subspaces() for _ in range(4)]
    config = LRDConfig(rank_rule="fixed", rank=8, rank_quantum=1, sensitivity=False, sequential=sequential)
    gm = fxlrd.transform(model, config, example_inputs=cal[0], calibration=cal)
    x = _two_subspaces()
    with torch.no_grad():
        for got, want in zip(gm(*x), model(*x)):
            assert rel_err(got, want) < 1e-2


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_sequential_stream_runs_a_shared_layers_factors_at_every_call(seed):
    """After a shared layer's second call, the next layer is fitted to what the compressed
    model computes there (the factors), not to the dense layer's output: sequential fitting
    then beats fitting each layer alone (it did not, on two of these three models)."""

    class Chain(nn.Module):
        def __init__(self):
            super().__init__()
            self.shared, self.last = nn.Linear(16, 16), nn.Linear(16, 16)

        def forward(self, x):
            return self.last(torch.relu(self.shared(torch.relu(self.shared(x)))))

    torch.manual_seed(seed)
    model = Chain().eval()
    cal, held = [torch.randn(32, 16) for _ in range(4)], torch.randn(256, 16)
    errors = []
    for sequential in (False, True):
        config = LRDConfig(rank_rule="fixed", rank=4, rank_quantum=1, sensitivity=False, sequential=sequential)
        gm = fxlrd.transform(model, config, example_inputs=cal[0], calibration=cal)
        with torch.no_grad():
            errors.append(rel_err(gm(held), model(held)))
    assert errors[1] < errors[0]


@pytest.mark.parametrize("capture_mode", ["fx", "export"])
def test_sensitivity_is_taken_before_an_in_place_activation_overwrites_the_output(capture_mode):
    """nn.ReLU(inplace=True) overwrites the layer's output: the output sensitivity must still be
    the gradient at the layer's output (through the ReLU's mask), as with nn.ReLU()."""
    def net(inplace):
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(16, 32), nn.ReLU(inplace=inplace), nn.Linear(32, 32), nn.ReLU(inplace=inplace),
                             nn.Linear(32, 4)).eval()  # fmt: skip

    plain, inplace = net(False), net(True)
    with torch.no_grad():  # half of the first layer's channels mostly dead after the ReLU
        for m in (plain, inplace):
            m[0].bias[:16] -= 3.0
    calibration = [torch.randn(64, 16, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    stats = [collect_stats(capture(m, inputs=((calibration[0],), {}), mode=capture_mode, copy_model=True).gm,
                           calibration, sensitivity=True, progress=False) for m in (plain, inplace)]  # fmt: skip
    for name in ("0", "2"):
        assert torch.allclose(stats[0][name].output_weights(), stats[1][name].output_weights(), rtol=1e-6, atol=1e-9)


def test_sequential_fit_with_an_in_place_residual_in_an_export_graph():
    """``h += fc1(h)`` stays aten.add_ in an export graph: the original and compressed streams
    must each change their own h (they shared it, and both saw h + fc1(h) + fc1'(h))."""

    class Net(nn.Module):
        def __init__(self, inplace):
            super().__init__()
            self.inplace, self.fc1, self.fc2 = inplace, nn.Linear(16, 16), nn.Linear(16, 16)

        def forward(self, x):
            h = x * 1.0
            if self.inplace:
                h += self.fc1(h)
            else:
                h = h + self.fc1(h)
            return self.fc2(h)

    plain, inplace = Net(False).eval(), Net(True).eval()
    inplace.load_state_dict(plain.state_dict())
    calibration = [torch.randn(64, 16, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    cfg = LRDConfig(rank_rule="fixed", rank=4, sequential=True)
    a, b = (fxlrd.transform(m, cfg, example_inputs=calibration[0], calibration=calibration, capture="export")
            for m in (plain, inplace))  # fmt: skip
    assert torch.allclose(a.fc2.in_proj.weight, b.fc2.in_proj.weight, atol=1e-6)


class _ViewWrites(nn.Module):
    """``h`` changed through a view of it (``h.view(-1).add_(...)``, ``y[:, :8].relu_()``), or
    the same computed out of place: sequential fitting and sensitivities must not tell them apart."""

    def __init__(self, inplace):
        super().__init__()
        self.inplace, self.fc1, self.fc2, self.fc3 = inplace, nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x):
        h = x * 1.0
        if self.inplace:
            h.view(-1).add_(self.fc1(h).view(-1))
        else:
            h = h + self.fc1(h)
        y = self.fc2(h)
        if self.inplace:
            y[:, :8].relu_()
        else:
            y = torch.cat([y[:, :8].relu(), y[:, 8:]], 1)
        return self.fc3(y)


def _view_writes_pair():
    torch.manual_seed(0)
    plain = _ViewWrites(False).eval()
    inplace = _ViewWrites(True).eval()
    inplace.load_state_dict(plain.state_dict())
    with torch.no_grad():  # many of fc2's first outputs negative: the ReLU's mask matters
        for m in (plain, inplace):
            m.fc2.bias[:8] -= 1.0
    return plain, inplace, [torch.randn(64, 16, generator=torch.Generator().manual_seed(i)) for i in range(4)]


@pytest.mark.parametrize("capture_mode", ["fx", "export"])
def test_sequential_fit_with_an_in_place_write_through_a_view(capture_mode):
    plain, inplace, calibration = _view_writes_pair()
    cfg = LRDConfig(rank_rule="fixed", rank=4, sequential=True, rank_quantum=1)
    a, b = (fxlrd.transform(m, cfg, example_inputs=calibration[0], calibration=calibration, capture=capture_mode)
            for m in (plain, inplace))  # fmt: skip
    for name in ("fc2", "fc3"):
        for p, q in zip(a.get_submodule(name).parameters(), b.get_submodule(name).parameters()):
            assert torch.allclose(p, q, atol=1e-5), name
    with torch.no_grad():
        assert torch.allclose(a(calibration[1]), b(calibration[1]), atol=1e-5)


@pytest.mark.parametrize("capture_mode", ["fx", "export"])
def test_sensitivity_with_an_in_place_write_through_a_view_of_the_output(capture_mode):
    plain, inplace, calibration = _view_writes_pair()
    stats = [collect_stats(capture(m, inputs=((calibration[0],), {}), mode=capture_mode, copy_model=True).gm,
                           calibration, sensitivity=True, progress=False) for m in (plain, inplace)]  # fmt: skip
    for name in ("fc1", "fc2", "fc3"):
        assert torch.allclose(stats[0][name].output_weights(), stats[1][name].output_weights(), rtol=1e-5, atol=1e-9), name


def test_calibration_of_a_model_captured_in_training_mode_runs_as_in_eval_mode():
    """A Hugging Face model straight from its constructor is in training mode: its export graph
    bakes dropout (hidden and attention) in, which calibration used to run — other factors at
    every call. Calibration now runs as in eval mode: the factors are those of model.eval()."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.5,
                                  attention_probs_dropout_prob=0.5)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.BertModel(cfg).train()
    g = torch.Generator().manual_seed(0)
    cal = [{"input_ids": torch.randint(0, 100, (4, 8), generator=g), "attention_mask": torch.ones(4, 8, dtype=torch.long)}
           for _ in range(3)]  # fmt: skip
    config = LRDConfig(ratio=2, rank_quantum=1, sequential=True, allocation="global", mlp="narrow")
    with pytest.warns(UserWarning, match="training mode"):
        trained = fxlrd.transform(model, config, example_inputs=cal[0], calibration=cal)
    evaluated = fxlrd.transform(copy.deepcopy(model).eval(), config, example_inputs=cal[0], calibration=cal)
    assert [lp.ranks for lp in trained.fxlrd_plan.decomposed] == [lp.ranks for lp in evaluated.fxlrd_plan.decomposed]
    a, b = dict(trained.named_parameters()), dict(evaluated.named_parameters())
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


def test_calibration_leaves_the_running_statistics_of_a_training_mode_export_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 8, 3)).train()
    cal = [torch.randn(4, 3, 10, 10) for _ in range(3)]
    captured = capture(model, inputs=((cal[0],), {}), mode="export", copy_model=True).gm
    before = {k: v.clone() for k, v in captured.state_dict().items()}
    collect_stats(captured, cal, sensitivity=True, progress=False)
    assert all(torch.equal(before[k], v) for k, v in captured.state_dict().items())


def test_a_text_mask_never_falls_on_another_sequence_of_the_same_length():
    """CLIP: 17 vision tokens (4×4 patches + CLS) beside text padded to 17 — the text
    attention_mask was applied to the vision tower's values (6 samples instead of 34) and to
    its outputs' projections. The same sentences and images calibrate to the same model
    whether the text is padded to 16 or to 17."""
    transformers = pytest.importorskip("transformers")
    tc = {"vocab_size": 100, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
          "num_attention_heads": 2, "max_position_embeddings": 64}  # fmt: skip
    vc = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
          "image_size": 32, "patch_size": 8}  # fmt: skip
    torch.manual_seed(0)
    model = transformers.CLIPModel(transformers.CLIPConfig(text_config=tc, vision_config=vc, projection_dim=16)).eval()
    g = torch.Generator().manual_seed(1)
    cal17 = []
    for _ in range(3):
        mask = torch.zeros(2, 17, dtype=torch.long)
        mask[:, :3] = 1
        cal17.append({"input_ids": torch.randint(0, 100, (2, 17), generator=g), "attention_mask": mask,
                      "pixel_values": torch.randn(2, 3, 32, 32, generator=g)})  # fmt: skip
    cal16 = [{**b, "input_ids": b["input_ids"][:, :16], "attention_mask": b["attention_mask"][:, :16]} for b in cal17]
    stats = collect_stats(capture(model, inputs=((), cal17[0]), copy_model=True).gm, cal17[:1], progress=False)
    assert stats["vision_model.encoder.layers.0.mlp.fc1"].inputs.count == 2 * 17
    config = LRDConfig(ratio=2, rank_quantum=1)
    a = fxlrd.transform(model, config, example_inputs=cal16[0], calibration=cal16)
    b = fxlrd.transform(model, config, example_inputs=cal17[0], calibration=cal17)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("inplace", [False, True])
def test_a_training_mode_export_calibrates_without_its_dropout_in_place_or_not(inplace):
    """nn.Dropout(inplace=True) exports as aten.dropout_, which calibration still ran."""
    from fxlrd.capture import training_ops

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.5, inplace=inplace), nn.Linear(32, 8)).train()
    cal = [torch.randn(8, 16, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    gm = capture(model, inputs=((cal[0],), {}), mode="export", copy_model=True).gm
    assert training_ops(gm) == 1  # (the in-place form went uncounted: no training-mode warning)
    got = collect_stats(gm, cal, progress=False)["3"].inputs.gram
    want = collect_stats(capture(copy.deepcopy(model).eval(), inputs=((cal[0],), {}), mode="export",
                                 copy_model=True).gm, cal, progress=False)["3"].inputs.gram  # fmt: skip
    assert torch.allclose(got, want)


@pytest.mark.parametrize("capture_mode", ["fx", "export"])
def test_calibration_runs_a_buffer_the_forward_writes_and_reads_back(capture_mode):
    """Skipping in-place buffer updates was meant for a batch norm's step counter: a cache the
    forward fills and reads back must be written (an export capture calibrated on zeros)."""

    class Cached(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("cache", torch.zeros(8, 16))
            self.fc = nn.Linear(16, 4)

        def forward(self, x):
            self.cache.copy_(x)
            return self.fc(self.cache * 1.0)

    cal = [torch.randn(8, 16, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    gm = capture(Cached().eval(), inputs=((cal[0],), {}), mode=capture_mode, copy_model=True).gm
    gram = collect_stats(gm, cal, progress=False)["fc"].inputs.gram
    want = sum(x.double().T @ x.double() for x in cal)
    assert torch.allclose(gram, want, rtol=1e-6)


# --- mutation audit: behaviours no other test pinned down ---------------------------------------------
def test_a_layer_called_twice_pools_the_samples_of_both_calls():
    """The pooled statistics of a shared layer are those of the union of its calls' samples:
    the Gram matrices, the sums and the sample counts all add up (the count enters the
    shrinkage and the mean)."""
    model = _CalledTwice().eval()
    cal = [_two_subspaces() for _ in range(3)]
    gm = capture(model, cal[0]).gm
    stats = collect_stats(gm, cal, progress=False)["lin"].inputs
    rows = torch.cat([t for batch in cal for t in batch]).double()
    assert stats.count == rows.shape[0] == 2 * 3 * 64
    torch.testing.assert_close(stats.gram, rows.T @ rows)
    torch.testing.assert_close(stats.total, rows.sum(0))
    torch.testing.assert_close(stats.covariance(), rows.T @ rows / rows.shape[0])


def test_diagonal_sensitivity_svd_is_the_weighted_optimum():
    """With a per-channel sensitivity ``d`` the SVD at rank r minimises
    ``Σ_s d_s ‖(W − W′)_s X‖²``; the independent optimum is ``D^-½ [D^½ W G^½]_r G^-½`` with
    symmetric square roots. At full rank the layer comes back unchanged."""
    from fxlrd.calibrate import SiteStats

    g = torch.Generator().manual_seed(0)
    c, s, r = 7, 5, 2
    w = torch.randn(s, c, generator=g, dtype=torch.float64)
    inputs = _stats(_correlated(400, c, seed=1), shrink=False)
    d = torch.tensor([4.0, 0.5, 2.0, 1.0, 0.25], dtype=torch.float64)  # all above the 1 % floor
    site = SiteStats(inputs, d, output_energy=1.0)
    torch.testing.assert_close(site.output_weights(), d)
    gram = inputs.covariance()
    spec = LayerSpec("linear", c, s, (), 1, False)
    got = _product(decompose_weight(w, None, spec, "svd", (r,), stats=site)[0])
    ds, gs = torch.diag(d.sqrt()), _sqrtm(gram)
    u, sv, vt = torch.linalg.svd(ds @ w @ gs)
    best = torch.linalg.inv(ds) @ (u[:, :r] * sv[:r]) @ vt[:r] @ torch.linalg.inv(gs)

    def cost(approx):
        delta = w - approx
        return float(torch.trace(delta.T @ torch.diag(d) @ delta @ gram))

    assert cost(got) == pytest.approx(cost(best), rel=1e-6)
    assert rel_err(got, best) < 1e-6
    full = _product(decompose_weight(w, None, spec, "svd", (min(c, s),), stats=site)[0])
    torch.testing.assert_close(full, w)


def test_an_output_channel_the_model_ignores_keeps_the_floor_weight_and_decomposes_finite():
    """A zero sensitivity (an output channel nothing downstream reads) is raised to the floor,
    1 % of the mean, so the weighted SVD has no zero row to divide by when unweighting."""
    from fxlrd.calibrate import SiteStats

    c, s = 6, 4
    sens = torch.tensor([3.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    site = SiteStats(_stats(_correlated(200, c), shrink=False), sens, output_energy=2.0)
    weights = site.output_weights()
    mean = float((sens / 2.0).mean())
    torch.testing.assert_close(weights, torch.tensor([1.5, 0.01 * mean, 0.5, 0.01 * mean], dtype=torch.float64))
    w = torch.randn(s, c, dtype=torch.float64)
    fact, _ = decompose_weight(w, None, LayerSpec("linear", c, s, (), 1, False), "svd", (2,), stats=site)
    assert all(torch.isfinite(p).all() for p in fact.parameters())
    torch.testing.assert_close(
        _product(decompose_weight(w, None, LayerSpec("linear", c, s, (), 1, False), "svd", (4,), stats=site)[0]), w
    )


def _fake_world(monkeypatch, world: int) -> list[torch.Tensor]:
    """``torch.distributed.all_reduce`` as ``world`` processes holding the same data would see it
    (SUM: each tensor times ``world``); returns the tensors reduced, in order."""
    import torch.distributed as dist

    reduced = []

    def all_reduce(tensor, op=None, group=None):
        assert op == dist.ReduceOp.SUM
        reduced.append(tensor)
        tensor.mul_(world)

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    return reduced


def _stats_with_cross(seed: int = 0) -> InputStats:
    x = _correlated(50, 5, seed=seed).double()
    s = InputStats(torch.zeros(5, 5, dtype=torch.float64))
    s.add(x, x + 0.1 * torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)))
    return s


def test_all_reduce_stats_sums_grams_and_counts_over_the_processes(monkeypatch):
    """Two processes with the same shard: the statistics of the union are twice one's (a Gram
    matrix left out of the reduction, or a count, would be one process's only)."""
    from fxlrd.calibrate import all_reduce_stats

    _fake_world(monkeypatch, 2)
    s = _stats_with_cross()
    gram, count = s.gram.clone(), s.count
    s.whitening()  # cached: must be dropped, as the statistics change
    all_reduce_stats([s])
    torch.testing.assert_close(s.gram, 2 * gram)
    assert s.count == 2 * count
    assert s._whitening is None
    torch.testing.assert_close(s.covariance(), gram / count)  # the same samples twice: the same second moments


def test_all_reduce_stats_sums_the_means_and_cross_moments_once(monkeypatch):
    """The inputs' sums (narrowing's mean) and the cross moments (sequential compensation) are
    sums over samples like the Gram matrix: over two identical processes, twice one's."""
    from fxlrd.calibrate import all_reduce_stats

    reduced = _fake_world(monkeypatch, 2)
    s = _stats_with_cross()
    total, cross = s.total.clone(), s.cross.clone()
    all_reduce_stats([s])
    torch.testing.assert_close(s.total, 2 * total)
    torch.testing.assert_close(s.cross, 2 * cross)
    assert len(reduced) == 4  # gram, count, cross, total: each once (a collective per statistic on every process)


def test_the_compensated_weight_is_the_layer_itself_where_the_streams_agree():
    """``W* = W C G̃⁻¹`` with both moments shrunk alike: where the compressed model's inputs are
    the original's (nothing compressed before the layer), ``W*`` is ``W`` however few the samples
    (8 samples of 12 channels: strong shrinkage)."""
    from fxlrd.calibrate import _compensated_weight

    x = _correlated(8, 12, seed=4).double()
    s = InputStats(torch.zeros(12, 12, dtype=torch.float64))
    s.add(x, x)
    assert s.shrinkage() > 0.1
    w = torch.randn(5, 12, dtype=torch.float64)
    torch.testing.assert_close(_compensated_weight(w, s), w)


def test_the_compensated_weight_is_the_least_squares_map_from_the_compressed_inputs():
    """Plain moments (no shrinkage), many samples: ``W*`` minimises ``‖W X − W* X̃‖``, which an
    independent least-squares solve finds."""
    from fxlrd.calibrate import _compensated_weight

    g = torch.Generator().manual_seed(5)
    x = torch.randn(400, 6, generator=g, dtype=torch.float64) + 0.5  # well conditioned: the 1e-6 ridge is invisible
    x_c = x @ torch.randn(6, 6, generator=g, dtype=torch.float64) * 0.3 + x + 0.05 * torch.randn(400, 6, generator=g,
                                                                                                   dtype=torch.float64)
    s = InputStats(torch.zeros(6, 6, dtype=torch.float64), shrink=False)
    s.add(x_c, x)
    w = torch.randn(4, 6, generator=g, dtype=torch.float64)
    want = torch.linalg.lstsq(x_c, x @ w.T).solution.T
    torch.testing.assert_close(_compensated_weight(w, s), want, rtol=1e-4, atol=1e-6)


def test_eval_mode_gives_every_module_its_flag_back_when_the_block_raises():
    """(mutation audit 3) A failure inside the block must not leave the user's model in eval mode."""
    from fxlrd.modes import eval_mode

    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.Dropout())
    model.train()
    model[1].eval()  # a norm the user froze
    with pytest.raises(RuntimeError, match="inside"):
        with eval_mode(model):
            assert not any(m.training for m in model.modules())
            raise RuntimeError("inside")
    assert [m.training for m in model.modules()] == [True, True, False, True]


def test_calibration_items_that_do_not_fit_get_a_clear_error_and_the_model_stays_as_it_was():
    """A number where the model takes a tensor (torch raised its own TypeError), and more
    positional inputs than the model takes (the extra ones were dropped without a word)."""

    import fxlrd
    from fxlrd import ConfigError, LRDConfig

    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 1)).eval()
    x = torch.randn(2, 3, 8, 8)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="calibration item .* does not run through"):
        fxlrd.transform(model, LRDConfig(), example_inputs=x, calibration=[(1,)])
    with pytest.raises(ConfigError, match="gives 2 positional inputs; the model takes 1"):
        fxlrd.transform(model, LRDConfig(), example_inputs=x, calibration=[(x, x)])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


class FunctionalNorm(nn.Module):
    """A norm calling ``F.batch_norm(..., training=self.training)``: an fx trace in training
    mode bakes ``training=True`` into the graph."""

    def __init__(self, c):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.rand(c) + 0.5), nn.Parameter(torch.randn(c) * 0.1)
        self.register_buffer("running_mean", torch.randn(c) * 0.1)
        self.register_buffer("running_var", torch.rand(c) + 0.5)

    def forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training, 0.1, 1e-5)


def test_calibration_leaves_the_running_statistics_of_a_functional_norm_traced_in_training_mode_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), FunctionalNorm(8), nn.ReLU(), nn.Conv2d(8, 4, 1)).train()
    cal = [torch.randn(4, 3, 6, 6) for _ in range(3)]
    captured = capture(model, inputs=((cal[0],), {}), mode="fx", copy_model=True).gm
    assert any(n.target is F.batch_norm and n.kwargs.get("training") is True for n in captured.graph.nodes)
    before = {k: v.clone() for k, v in captured.state_dict().items()}
    collect_stats(captured, cal, progress=False)
    assert all(torch.equal(before[k], v) for k, v in captured.state_dict().items())


@pytest.mark.parametrize("frozen", ["first", "all"])
def test_frozen_parameters_do_not_change_the_sensitivity(frozen):
    """Sensitivity is the model's, whatever requires gradients: a frozen first layer (or a
    model frozen whole, as for inference) gets the same statistics as a trainable one, not
    "unreached" (which cut such a layer to rank 1)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    batches = [torch.randn(8, 16) for _ in range(3)]
    want = collect_stats(capture(model, batches[0]).gm, batches, sensitivity=True, progress=False)
    (model[0] if frozen == "first" else model).requires_grad_(False)
    got = collect_stats(capture(model, batches[0]).gm, batches, sensitivity=True, progress=False)
    assert want.keys() == got.keys() == {"0", "2", "4"}
    for name in want:
        assert not got[name].unreached
        torch.testing.assert_close(got[name].output_sensitivity, want[name].output_sensitivity)
        assert got[name].output_energy == pytest.approx(want[name].output_energy)
    assert all(not p.requires_grad for p in model[0].parameters())  # (left as it was)


@pytest.mark.parametrize("settings", [{}, {"sequential": True}, {"mlp": "narrow"}])
def test_a_calibration_batch_with_nan_is_refused_naming_it(settings):
    """One NaN in one batch made every statistic of the layers after it NaN: narrowing wrote
    NaN weights without a word. Refused, naming the batch and the layer; the model unchanged."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32))
    batches = [torch.randn(16, 32) for _ in range(3)]
    batches[2][3, 5] = float("nan")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ConfigError, match=r"calibration batch 2: the input of layer '[02]' holds NaN or infinite values \(in the batch itself.*float32$"):
        fxlrd.transform(model, LRDConfig(ratio=2, **settings), example_inputs=batches[0], calibration=batches)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_calibration_from_a_loader_over_an_iterable_dataset():
    """A DataLoader over an IterableDataset has ``__len__``, which raises: a streaming dataset
    calibrates as any iterable does (no total on the progress bar)."""
    from torch.utils.data import DataLoader, IterableDataset

    class Stream(IterableDataset):
        def __iter__(self):
            g = torch.Generator().manual_seed(0)
            return iter([torch.randn(32, generator=g) for _ in range(48)])

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32))
    loader = DataLoader(Stream(), batch_size=16)
    with pytest.raises(TypeError):
        len(loader)
    gm = fxlrd.transform(model, LRDConfig(ratio=2), example_inputs=torch.randn(4, 32), calibration=loader)
    same = fxlrd.transform(model, LRDConfig(ratio=2), example_inputs=torch.randn(4, 32), calibration=list(loader))
    assert all(lp.data_aware for lp in gm.fxlrd_plan.decomposed)
    x = torch.randn(4, 32)
    assert torch.equal(gm(x), same(x))


@pytest.mark.parametrize("downsample_first", [False, True])
def test_layers_sharing_an_input_each_read_their_own_positions(downsample_first):
    """A ResNet's strided 1×1 downsample reads every other position of the input its 3×3 conv
    reads whole: each gets statistics of its own positions, whichever runs first (they were
    sampled as the first one was)."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.down = nn.Conv2d(8, 16, 3, 2, 1), nn.Conv2d(8, 16, 1, 2)

        def forward(self, x):
            if downsample_first:
                d = self.down(x)
                return self.conv(x) + d
            return self.conv(x) + self.down(x)

    x = torch.randn(2, 8, 8, 8)
    x[:, :, ::2, ::2] += 5  # the positions the downsample reads
    stats = collect_stats(capture(Block(), x).gm, [x], progress=False)
    assert (stats["conv"].inputs.count, stats["down"].inputs.count) == (2 * 8 * 8, 2 * 4 * 4)
    for name, seen in (("conv", x), ("down", x[:, :, ::2, ::2])):
        rows = seen.movedim(1, -1).reshape(-1, 8).double()
        torch.testing.assert_close(stats[name].inputs.gram, rows.T @ rows)


def test_a_frozen_layers_output_written_in_place_downstream_still_calibrates():
    """The sensitivity's gradient is taken at a frozen layer's output as a leaf of its own; a
    module that writes its input in place (unseen by the graph: a leaf module) must not write
    that leaf."""

    class Doubling(nn.Module):
        def forward(self, x):
            return x.mul_(2)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), Doubling(), nn.ReLU(), nn.Linear(16, 4))
    model[0].requires_grad_(False)
    batches = [torch.randn(8, 16) for _ in range(2)]
    gm = capture(model, batches[0], leaf_modules=[Doubling]).gm
    stats = collect_stats(gm, batches, sensitivity=True, progress=False)
    assert not stats["0"].unreached and stats["0"].output_sensitivity is not None
