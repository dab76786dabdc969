"""Stacked expert weights factorized per expert (`fxlrd.experts`)."""

import copy
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxlrd
from fxlrd import LRDConfig
from fxlrd.capture import capture as capture_graph
from fxlrd.errors import ConfigError, PlanMismatchError
from fxlrd.experts import ExpertFactors, find_stacked
from fxlrd.latency import LayerTimer

from conftest import rel_err

FULL = LRDConfig(rank_rule="fixed", rank=10**6, allow_larger=True)


class Experts(nn.Module):
    """``e`` experts stored ``(e, m, n)``, each token through its own expert, read as
    ``bmm(W[ids], x)`` ("left", or "method": ``W[ids].bmm(x)``), ``bmm(x, W[ids])`` ("right",
    the matrix stored (in, out)), ``bmm(x, W[ids].mT)`` ("mT") or ``bmm(W[ids].mT, x)``
    ("mT_left", stored (in, out)); then a second stack (``down``) as transformers' MoEs do.
    "grouped" (stored (out, in)) and "grouped_in_out" sort the tokens by expert and multiply
    each expert's group, ``F.grouped_mm(x, W.mT, offs=...)`` or ``torch._grouped_mm(x, W, offs)``,
    as transformers' default experts do (``down`` then too)."""

    def __init__(self, e=4, d=8, hidden=12, read="left", rank=None):
        super().__init__()
        self.read, self.e = read, e
        shape = (e, d, hidden) if read in ("right", "mT_left", "grouped_in_out") else (e, hidden, d)
        if rank is None:
            self.up = nn.Parameter(torch.randn(shape) / 3)
        else:  # exactly rank `rank` per expert
            self.up = nn.Parameter(torch.randn(e, shape[1], rank) @ torch.randn(e, rank, shape[2]) / 3)
        self.down = nn.Parameter(torch.randn(e, d, hidden) / 3)

    def forward(self, x, idx):  # x: (tokens, d), idx: (tokens,)
        if self.read.startswith("grouped"):
            order = torch.argsort(idx, stable=True)
            offs = torch.cumsum(torch.bincount(idx, minlength=self.e), 0).to(torch.int32)
            xs = x[order]
            if self.read == "grouped":
                h = torch.nn.functional.grouped_mm(xs, self.up.mT, offs=offs)
            else:
                h = torch._grouped_mm(xs, self.up, offs)
            y = torch._grouped_mm(torch.relu(h), self.down.mT, offs)
            return y[torch.argsort(order)]
        if self.read == "left":
            h = torch.bmm(self.up[idx], x.unsqueeze(-1)).squeeze(-1)
        elif self.read == "method":  # P[ids].bmm(x)
            h = self.up[idx].bmm(x.unsqueeze(-1)).squeeze(-1)
        elif self.read == "right":
            h = torch.bmm(x.unsqueeze(1), self.up[idx]).squeeze(1)
        elif self.read == "mT_left":  # stored (in, out), its transpose on the left
            h = torch.bmm(self.up[idx].mT, x.unsqueeze(-1)).squeeze(-1)
        else:
            h = torch.bmm(x.unsqueeze(1), self.up[idx].mT).squeeze(1)
        return torch.bmm(self.down[idx], torch.relu(h).unsqueeze(-1)).squeeze(-1)


def _inputs(e=4, d=8, tokens=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, d, generator=g), torch.randint(0, e, (tokens,), generator=g)


def _no_dense_gather(gm, paths):
    """The graph reads none of the dense stacks any more."""
    return all(not (n.op == "get_attr" and n.target in paths) for n in gm.graph.nodes)


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("read", ["left", "method", "right", "mT", "mT_left", "grouped", "grouped_in_out"])
def test_full_rank_reproduces_the_experts(capture, read):
    torch.manual_seed(0)
    model, inputs = Experts(read=read).eval(), _inputs()
    tol = 1e-5
    if capture == "export" and read.startswith("grouped"):  # torch's fake grouped_mm takes bfloat16 only
        model = Experts(read=read, hidden=16).eval().to(torch.bfloat16)  # (rows of 16 bytes)
        inputs, tol = (inputs[0].to(torch.bfloat16), inputs[1]), 2e-2
    gm = fxlrd.transform(model, FULL, example_inputs=inputs, capture=capture)
    assert rel_err(gm(*inputs).float(), model(*inputs).float()) < tol
    assert isinstance(gm.get_submodule("up"), ExpertFactors) and isinstance(gm.get_submodule("down"), ExpertFactors)
    assert _no_dense_gather(gm, {"up", "down"})
    assert isinstance(model.up, nn.Parameter) and model.up.shape[0] == 4  # the user's model untouched


def test_grouped_products_count_the_macs_of_the_same_products_under_bmm():
    """torch's FLOP counter does not know grouped_mm: fxlrd.count_macs counts it as the rows it
    multiplies, so the same experts count alike however they are read, and factorized too."""
    inputs = _inputs()
    counts = {read: fxlrd.count_macs(Experts(read=read), inputs) for read in ("left", "grouped", "grouped_in_out")}
    assert len(set(counts.values())) == 1 and counts["left"] == 10 * 2 * 8 * 12
    config = LRDConfig(rank_rule="fixed", rank=4)
    factorized = [fxlrd.count_macs(fxlrd.transform(Experts(read=read), config, example_inputs=inputs, capture="fx"), inputs)
                  for read in ("left", "grouped")]  # fmt: skip
    assert factorized == [10 * 2 * 4 * (8 + 12)] * 2


@settings(max_examples=20, deadline=None)
@given(e=st.integers(2, 5), m=st.integers(2, 12), n=st.integers(2, 12), rank=st.integers(1, 12),
       read=st.sampled_from(["left", "method", "right", "mT", "mT_left", "grouped", "grouped_in_out"]),
       seed=st.integers(0, 2**16))  # fmt: skip
def test_a_stack_of_rank_r_experts_is_reproduced_at_rank_r(e, m, n, rank, read, seed):
    torch.manual_seed(seed)
    if read.startswith("grouped"):  # (grouped_mm: rows of 16 bytes, so sizes and ranks multiples of 4 in float32)
        m, n = 4 * -(-m // 4), 4 * -(-n // 4)
    rank = min(rank, m, n)
    model = Experts(e=e, d=n, hidden=m, read=read, rank=rank).eval()
    with torch.no_grad():  # `down` exactly rank-r too, so the whole model is reproduced
        model.down.copy_(torch.randn(e, n, rank) @ torch.randn(e, rank, m))
    inputs = _inputs(e=e, d=n, tokens=7, seed=seed)
    config = LRDConfig(rank_rule="fixed", rank=rank, allow_larger=True)
    gm = fxlrd.transform(model, config, example_inputs=inputs, capture="fx")
    records = {r["weight"]: r for r in gm.fxlrd_plan.settings["stacked_experts"]}
    built = min(4 * -(-rank // 4), m, n) if read.startswith("grouped") else rank  # (rounded up for grouped_mm)
    assert records["up"]["rank"] == built and records["up"]["error"] < 1e-6
    assert gm.get_submodule("up").left.shape == (e, model.up.shape[1], built)
    assert rel_err(gm(*inputs), model(*inputs)) < 1e-4


def test_the_factors_are_each_experts_truncated_svd():
    """At rank r the stack's error is each expert's best rank-r error (Eckart–Young), checked
    against an SVD per expert computed here, and the recorded error is the stack's relative
    Frobenius error."""
    torch.manual_seed(1)
    model = Experts(e=3, d=10, hidden=14).eval()
    gm = fxlrd.transform(model, LRDConfig(rank_rule="fixed", rank=4), example_inputs=_inputs(e=3, d=10), capture="fx")
    approx = gm.get_submodule("up").weight().detach().double()
    w = model.up.detach().double()
    for e in range(3):
        u, s, vh = torch.linalg.svd(w[e])
        best = (u[:, :4] * s[:4]) @ vh[:4]
        assert torch.allclose(approx[e], best, atol=1e-5)
    rec = {r["weight"]: r for r in gm.fxlrd_plan.settings["stacked_experts"]}["up"]
    assert rec["error"] == pytest.approx(((approx - w).norm() / w.norm()).item(), rel=1e-4)


def test_the_ratio_rule_gives_the_linear_layers_rank_and_sizes_add_up():
    torch.manual_seed(0)
    model, inputs = Experts(e=4, d=32, hidden=64).eval(), _inputs(d=32)
    plan = fxlrd.plan(model, LRDConfig(ratio=2, rank_quantum=4), example_inputs=inputs, capture="fx")
    rec = {r["weight"]: r for r in plan.settings["stacked_experts"]}
    assert rec["up"]["rank"] == 8  # 64·32 / (2·96) = 10.7 → 10, down to a multiple of 4
    assert rec["up"]["params_after"] == 4 * 8 * (64 + 32) and rec["up"]["params_before"] == 4 * 64 * 32
    assert plan.params_after_model() == plan.model_params - sum(r["params_before"] - r["params_after"] for r in rec.values())
    gm = fxlrd.apply(model, plan, example_inputs=inputs)
    assert sum(p.numel() for p in gm.parameters()) == plan.params_after_model()
    table = plan.table()
    assert "2 stacked expert weights, not in the rows above (2 factorized per expert, 0 of them data-aware; 0 kept)" in table
    assert "up    4x64x32  rank 8, params 8.19K->3.07K" in table


def test_the_energy_rule_keeps_that_energy_over_the_stack():
    torch.manual_seed(0)
    model = Experts(e=3, d=16, hidden=16).eval()
    plan = fxlrd.plan(model, LRDConfig(rank_rule="energy", energy=0.8), example_inputs=_inputs(e=3, d=16), capture="fx")
    rank = {r["weight"]: r for r in plan.settings["stacked_experts"]}["up"]["rank"]
    s2 = torch.linalg.svdvals(model.up.detach().double()).pow(2)
    kept = lambda r: (s2[:, :r].sum() / s2.sum()).item()  # noqa: E731
    assert kept(rank) >= 0.8 > kept(rank - 1)


@pytest.mark.parametrize(
    "config, reason",
    [
        (LRDConfig(experts="keep"), "experts='keep'"),
        (LRDConfig(exclude=["up"]), "matched by exclude"),
        (LRDConfig(include=["down"]), "not matched by include"),
        (LRDConfig(filter_fn=lambda module, name: name != "up"), "filter_fn returned False"),
        (LRDConfig(rank_rule="vbmf"), "rank_rule='vbmf' does not apply to stacked experts"),
        (LRDConfig(rank_rule="fixed", rank=7), "factors would hold at least the weight's 96 parameters"),
        (LRDConfig(min_rank=20), "below min_rank=20"),
    ],
)
def test_a_stack_the_settings_leave_out_is_kept_with_the_reason(config, reason):
    torch.manual_seed(0)
    model, inputs = Experts().eval(), _inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxlrd.FxlrdWarning)  # (patterns matching no conv/linear layer)
        gm = fxlrd.transform(model, config, example_inputs=inputs, capture="fx")
    rec = {r["weight"]: r for r in gm.fxlrd_plan.settings["stacked_experts"]}["up"]
    assert rec["rank"] is None and reason in rec["reason"] and rec["params_after"] == rec["params_before"]
    assert torch.equal(gm.up, model.up) and f"kept: {rec['reason']}" in gm.fxlrd_plan.table()


class _WithLayer(Experts):
    """The experts, then a linear layer."""

    def __init__(self, **kwargs):
        super().__init__(**{"d": 32, "hidden": 64, **kwargs})
        self.fc = nn.Linear(self.down.shape[1], self.down.shape[1])

    def forward(self, x, idx):
        return self.fc(super().forward(x, idx))


@pytest.mark.parametrize("config", [LRDConfig(allocation="global", ratio=2), LRDConfig(target_params=0.5)])
def test_a_parameter_budget_sizes_the_stacks_beside_the_layers(config):
    """allocation='global' or target_params allocate the budget over the layers and the stacks
    together (a stack's options: keep, or each rank in steps of the quantum), and meet it."""
    torch.manual_seed(0)
    model, inputs = _WithLayer().eval(), _inputs(d=32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxlrd.FxlrdWarning)  # (no "kept whole" warning)
        gm = fxlrd.transform(model, config, example_inputs=inputs, capture="fx")
    plan = gm.fxlrd_plan
    recs = plan.settings["stacked_experts"]
    q = plan.settings["rank_quantum"]  # (as for a layer: the ranks below the quantum, and its multiples)
    assert all(r["rank"] is not None and (r["rank"] < q or r["rank"] % q == 0) for r in recs)
    result = plan.settings["allocation_result"]
    assert result["met"] and result["stacked_experts"] == 2
    stacks = sum(r["params_before"] for r in recs)
    layers = sum(lp.params_before for lp in plan.layers.values())
    assert result["layer_params_chosen"] <= result["layer_params_budget"]
    if config.target_params is None:
        assert result["layer_params_budget"] == pytest.approx((stacks + layers) / 2)
    else:
        assert plan.params_after_model() <= 0.5 * plan.model_params
    assert sum(p.numel() for p in gm.parameters()) == plan.params_after_model()
    assert rel_err(gm(*inputs), model(*inputs)) < 1


def test_the_allocation_gives_rank_where_it_lowers_the_error_most():
    """A nearly low-rank stack (rank 4 plus a little noise) beside a full-rank one: at the uniform
    ratio's size the allocation takes rank from the first and gives it to the second, so its total
    error (each stack's relative squared error, as the allocation counts it, computed here
    from each expert's singular values) is below the uniform ratio's."""
    from fxlrd.experts import error_curve

    torch.manual_seed(0)
    model, inputs = _WithLayer().eval(), _inputs(d=32)
    with torch.no_grad():
        model.up.copy_(torch.randn(4, 64, 4) @ torch.randn(4, 4, 32) + 0.01 * torch.randn(4, 64, 32))
    config = dict(rank_quantum=4, include=["up", "down"])
    uniform = fxlrd.plan(model, LRDConfig(ratio=2, **config), example_inputs=inputs, capture="fx")
    budget = LRDConfig(target_params=uniform.params_after_model(), **config)  # (the uniform ratio's size)
    allocated = fxlrd.plan(model, budget, example_inputs=inputs, capture="fx")

    def total(plan):
        recs = plan.settings["stacked_experts"]
        size = sum(r["params_after"] for r in recs)
        return sum(error_curve(getattr(model, r["weight"]))(r["rank"]) for r in recs), size, {r["weight"]: r["rank"] for r in recs}

    u_err, u_size, _ = total(uniform)
    a_err, a_size, ranks = total(allocated)
    assert a_size <= u_size and a_err < 0.75 * u_err  # (0.32 against 0.49)
    assert ranks["up"] < 8 < ranks["down"]  # (uniform: 8 and 8)
    w = model.down.detach().double()  # the curve: each expert's tail energy over the stack's
    s = torch.linalg.svdvals(w)
    want = float(s[:, ranks["down"]:].pow(2).sum() / s.pow(2).sum())
    assert error_curve(model.down)(ranks["down"]) == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize("sensitivity", [False, True])
def test_a_stacks_error_curve_is_in_a_linear_layers_units(sensitivity):
    """The allocation weighs a stack's error against the layers': one expert with the same
    statistics has the error curve of the linear layer of its matrix, data-free and data-aware,
    with and without output sensitivity (an (out, in) stack read on its columns)."""
    from fxlrd.calibrate import InputStats, SiteStats
    from fxlrd.experts import error_curve
    from fxlrd.factorized import LayerSpec
    from fxlrd.methods import get_method

    g = torch.Generator().manual_seed(3)
    w = torch.randn(12, 8, generator=g)
    x = torch.randn(200, 8, generator=g) @ torch.randn(8, 8, generator=g)
    inputs = InputStats(torch.zeros(8, 8, dtype=torch.float64))
    inputs.add(x)
    grads = torch.randn(200, 12, generator=g, dtype=torch.float64)
    st = SiteStats(inputs, grads.T @ grads if sensitivity else None, 50.0)
    spec = LayerSpec("linear", 8, 12)
    for stats, stack_stats in ((None, None), (st, [st])):
        layer = get_method("svd").error_curve(w, spec, stats)
        stack = error_curve(w[None], stack_stats, rows=False)
        assert [stack(r) for r in range(9)] == pytest.approx([layer((r,)) for r in range(9)], rel=1e-9, abs=1e-12)


class _Unreached(_WithLayer):
    """The experts' output multiplied by zero: the model's output does not depend on them."""

    def forward(self, x, idx):
        return self.fc(x) + 0 * Experts.forward(self, x, idx)


def test_a_stack_the_output_does_not_depend_on_costs_nothing_in_the_allocation():
    torch.manual_seed(0)
    model = _Unreached().eval()
    batches = [_inputs(d=32, tokens=64, seed=s) for s in range(2)]
    plan = fxlrd.plan(model, LRDConfig(allocation="global", ratio=2), example_inputs=batches[0], capture="fx",
                      calibration=batches)  # fmt: skip
    for rec in plan.settings["stacked_experts"]:
        assert "does not depend on its output" in rec["note"] and rec["error"] == rec["error"]  # (not NaN)
        assert rec["rank"] == 1  # (free to cut)


class _TwoForms(Experts):
    """One square stack read twice, on either side: ``bmm(P[ids], x)``, then ``bmm(h, P[ids])``."""

    def __init__(self):
        super().__init__(d=16, hidden=16)

    def forward(self, x, idx):
        h = torch.bmm(self.up[idx], x.unsqueeze(-1)).squeeze(-1)
        return torch.bmm(torch.relu(h).unsqueeze(1), self.up[idx]).squeeze(1)


@pytest.mark.parametrize("target_speedup", [None, 1.5])
def test_speed_modes_keep_a_stack_they_cannot_time_and_say_so(monkeypatch, target_speedup):
    """A stack read in two forms has no one product to time: kept, the reason naming the search."""
    monkeypatch.setattr("fxlrd.ranks.search.make_timer", lambda config: _ParamTimer())
    model, inputs = _TwoForms().eval(), _inputs(d=16)
    with pytest.warns(fxlrd.FxlrdWarning, match="1 stacked expert weights .* are kept whole"):
        plan = fxlrd.plan(model, _speed_config(target_speedup=target_speedup), example_inputs=inputs, capture="fx")
    (rec,) = plan.settings["stacked_experts"]
    search = "global speed search (target_speedup)" if target_speedup else "latency search"
    assert rec["rank"] is None and "latency" not in rec
    assert f"read in more than one form, or at sizes the example does not tell, are not timed by the {search}" in rec["reason"]


@pytest.mark.parametrize("config", [LRDConfig(ratio=2), LRDConfig(ratio=2, allocation="global")])
def test_inplace_keeps_the_stacks_the_models_forward_reads(config):
    """Kept, and under a budget not counted as savings: the layers are allocated for it alone."""
    torch.manual_seed(0)
    model, inputs = _WithLayer().eval(), _inputs(d=32)
    up = model.up.detach().clone()
    with pytest.warns(fxlrd.FxlrdWarning, match="inplace=True keeps the 2 stacked expert weights whole"):
        gm = fxlrd.transform(model, config, example_inputs=inputs, capture="fx", inplace=True)
    assert isinstance(model.up, nn.Parameter) and torch.equal(model.up, up) and model(*inputs).shape == (10, 32)
    recs = gm.fxlrd_plan.settings["stacked_experts"]
    assert all(r["rank"] is None and r["reason"].startswith("inplace=True") for r in recs)
    if config.allocation == "global":
        assert "stacked_experts" not in gm.fxlrd_plan.settings["allocation_result"]
        # a plan made for a copy counts the stacks in its budget: applied in place it would not meet it
        fresh = _WithLayer().eval()
        plan, state = fxlrd.plan(fresh, config, example_inputs=inputs, capture="fx"), copy.deepcopy(fresh.state_dict())
        with pytest.raises(ConfigError, match="the plan's parameter budget counts its factorized stacked experts"):
            fxlrd.apply(fresh, plan, example_inputs=inputs, inplace=True)
        assert all(torch.equal(v, state[k]) for k, v in fresh.state_dict().items())


class _OtherReads(nn.Module):
    def __init__(self, read):
        super().__init__()
        self.read = read
        self.w = nn.Parameter(torch.randn(4, 8, 8))

    def forward(self, x, idx):
        sel = self.w[idx]
        if self.read == "einsum":
            return torch.einsum("toi,ti->to", sel, x)
        if self.read == "matmul":  # matmul broadcasts (a 1-D operand, 4-D selections): not rewritten
            return torch.matmul(sel, x.unsqueeze(-1)).squeeze(-1)
        return torch.bmm(sel.mT, sel).sum(-1) + x  # the stack times itself


@pytest.mark.parametrize("read, reason", [("einsum", "not as an operand of torch.bmm"),
                                          ("matmul", "not as an operand of torch.bmm"),
                                          ("self", "multiplies the selected stack by itself")])  # fmt: skip
def test_other_reads_keep_the_stack_with_the_reason(read, reason):
    model, inputs = _OtherReads(read).eval(), _inputs()
    gm = capture_graph(model, inputs, mode="fx").gm
    found = find_stacked(model, gm)
    assert list(found) == ["w"] and reason in found["w"].reason and not found["w"].reads
    with pytest.warns(fxlrd.FxlrdWarning, match="read in a way fxlrd cannot factorize"):
        out = fxlrd.transform(model, LRDConfig(ratio=2), example_inputs=inputs, capture="fx")
    assert torch.equal(out(*inputs), model(*inputs))


def test_a_transformed_model_transformed_again_keeps_its_expert_factors():
    torch.manual_seed(0)
    model, inputs = Experts().eval(), _inputs()
    gm = fxlrd.transform(model, LRDConfig(ratio=2, rank_quantum=1), example_inputs=inputs, capture="fx")
    again = fxlrd.transform(gm, LRDConfig(ratio=2, rank_quantum=1), example_inputs=inputs)
    assert not again.fxlrd_plan.settings.get("stacked_experts")
    assert torch.equal(again.get_submodule("up").left, gm.get_submodule("up").left)
    assert torch.allclose(again(*inputs), gm(*inputs))


def test_factors_train_and_keep_the_stacks_requires_grad():
    torch.manual_seed(0)
    model, inputs = Experts().eval(), _inputs()
    model.down.requires_grad_(False)
    gm = fxlrd.transform(model, LRDConfig(ratio=2, rank_quantum=1), example_inputs=inputs, capture="fx")
    up, down = gm.get_submodule("up"), gm.get_submodule("down")
    assert up.left.requires_grad and not down.left.requires_grad and not down.right.requires_grad
    gm(*inputs).square().sum().backward()
    assert up.left.grad is not None and up.right.grad is not None and up.left.grad.abs().sum() > 0


def test_save_load_and_a_plan_applied_to_another_model():
    torch.manual_seed(0)
    model, inputs = Experts().eval(), _inputs()
    plan = fxlrd.plan(model, LRDConfig(ratio=2, rank_quantum=1), example_inputs=inputs, capture="export")
    gm = fxlrd.apply(model, plan, example_inputs=inputs)
    assert rel_err(gm(*inputs), fxlrd.transform(model, LRDConfig(ratio=2, rank_quantum=1), example_inputs=inputs,
                                                capture="export")(*inputs)) < 1e-6  # fmt: skip
    with pytest.raises(PlanMismatchError, match=r"stacked weight 'up' \(4×12×8\); in this model it is of shape \(6, 12, 8\)"):
        fxlrd.apply(Experts(e=6).eval(), plan, example_inputs=_inputs(e=6))


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model, inputs = Experts().eval(), _inputs()
    gm = fxlrd.transform(model, LRDConfig(ratio=2, rank_quantum=1), example_inputs=inputs, capture="export")
    fxlrd.save(gm, tmp_path / "m")
    loaded = fxlrd.load(Experts().eval(), tmp_path / "m")
    assert torch.equal(loaded(*inputs), gm(*inputs))


def test_bad_settings_and_weights_are_refused():
    with pytest.raises(ConfigError, match="experts must be 'factorize'"):
        LRDConfig(experts="lowrank")
    model, inputs = Experts().eval(), _inputs()
    with torch.no_grad():
        model.up[1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"stacked weight 'up' has NaN or infinite values.*exclude=\['up'\]"):
        fxlrd.plan(model, LRDConfig(ratio=2), example_inputs=inputs, capture="fx")


transformers = pytest.importorskip("transformers")


def _check_recorded_errors(model, gm, recs):
    """Each factorized stack's recorded (data-free) error is its weights' relative error."""
    for r in recs:
        dense = model.get_parameter(r["weight"]).detach()
        approx = gm.get_submodule(r["weight"]).weight().detach()
        assert r["error"] == pytest.approx(((approx - dense).norm() / dense.norm()).item(), rel=1e-3)


def _mixtral():
    cfg = transformers.MixtralConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.MixtralModel._from_config(cfg, experts_implementation="batched_mm").eval()
    ids = torch.randint(3, 100, (2, 9))
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@pytest.mark.slow
def test_a_mixtral_runs_its_factorized_experts_in_onnx_and_compiled(tmp_path):
    model, x = _mixtral()
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxlrd.FxlrdWarning)  # no stacked weight is left whole, so no warning
        gm = fxlrd.transform(model, LRDConfig(ratio=2, rank_quantum=1), example_inputs=x)
    recs = gm.fxlrd_plan.settings["stacked_experts"]
    assert [r["rank"] for r in recs] == [12, 10, 12, 10]  # gate_up 128×32, down 32×64 at α = 2
    assert _no_dense_gather(gm, {r["weight"] for r in recs})
    _check_recorded_errors(model, gm, recs)
    with torch.no_grad():
        out = gm(**x).last_hidden_state
        fxlrd.export_onnx(gm, x, tmp_path / "m.onnx")  # checks the ONNX model against gm
        assert rel_err(torch.compile(gm)(**x).last_hidden_state, out) < 1e-5
        full = fxlrd.transform(model, FULL, example_inputs=x)
        assert rel_err(full(**x).last_hidden_state, model(**x).last_hidden_state) < 1e-5


_COMMON = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
_FAMILIES = {  # small configs of transformers' MoE models whose experts are stacked
    "Qwen3Moe": dict(moe_intermediate_size=48, intermediate_size=64, num_experts=4, num_experts_per_tok=2, head_dim=8),
    "Olmoe": dict(intermediate_size=48, num_experts=4, num_experts_per_tok=2, eos_token_id=None),
    "GptOss": dict(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2, head_dim=8,
                   layer_types=["full_attention"] * 2),  # (in, out) storage, biases: bmm(x, P[ids])
}


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(_FAMILIES))
def test_transformers_moe_families_factorize_their_experts(family):
    cfg = getattr(transformers, f"{family}Config")(**_COMMON, **_FAMILIES[family])
    torch.manual_seed(0)
    model = getattr(transformers, f"{family}Model")._from_config(cfg, experts_implementation="batched_mm").eval()
    ids = torch.randint(3, 100, (2, 9))
    x = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        gm = fxlrd.transform(model, LRDConfig(ratio=2, rank_quantum=1), example_inputs=x)
        full = fxlrd.transform(model, FULL, example_inputs=x)
    recs = gm.fxlrd_plan.settings["stacked_experts"]
    assert len(recs) == 4 and all(r["rank"] is not None for r in recs)
    assert _no_dense_gather(gm, {r["weight"] for r in recs})
    _check_recorded_errors(model, gm, recs)
    rows = gm.fxlrd_plan.layers
    assert [n for n in rows if rows[n].reason.startswith("router")] == [n for n in rows if n.endswith(".gate")
                                                                         or n.endswith(".router")] != []  # fmt: skip
    assert {n for n in rows if "self_attn" in n} <= {lp.name for lp in gm.fxlrd_plan.decomposed}
    with torch.no_grad():
        ref = model(**x).last_hidden_state
        assert rel_err(full(**x).last_hidden_state, ref) < 1e-5


def _subspace_batches(e, d, k, n_batches=4, tokens=64, seed=0):
    """Batches whose tokens for expert i lie in a k-dimensional subspace of its own."""
    g = torch.Generator().manual_seed(seed)
    bases = torch.randn(e, k, d, generator=g)
    out = []
    for _ in range(n_batches):
        idx = torch.randint(0, e, (tokens,), generator=g)
        x = torch.einsum("tk,tkd->td", torch.randn(tokens, k, generator=g), bases[idx])
        out.append((x, idx))
    return out


@pytest.mark.parametrize("read", ["left", "right", "mT", "mT_left", "grouped", "grouped_in_out"])
def test_with_calibration_inputs_in_a_subspace_are_reproduced_at_its_dimension(read):
    """Each expert's tokens span k dimensions: whitened factors of rank k reproduce its
    outputs on them (up to the statistics' shrinkage toward the identity, small with 512
    tokens per expert in 16 dimensions); data-free truncation at rank k loses most of them."""
    torch.manual_seed(0)
    e, d, k = 4, 16, 3
    model = Experts(e=e, d=d, hidden=20, read=read).eval()
    batches = _subspace_batches(e, d, k, tokens=512)
    config = LRDConfig(rank_rule="fixed", rank=k, include=["up"])
    aware = fxlrd.transform(model, config, example_inputs=batches[0], capture="fx", calibration=batches)
    free = fxlrd.transform(model, config, example_inputs=batches[0], capture="fx")
    x, idx = _subspace_batches(e, d, k, n_batches=5, tokens=512, seed=0)[4]  # the same subspaces, a batch not calibrated on
    ref = model(x, idx)
    assert rel_err(aware(x, idx), ref) < 5e-3
    assert rel_err(free(x, idx), ref) > 0.3
    rec = {r["weight"]: r for r in aware.fxlrd_plan.settings["stacked_experts"]}["up"]
    # (the recorded error is under the shrunk statistics, which give unseen directions some weight)
    assert rec["data_aware"] and rec["calibrated_experts"] == e and rec["error"] < 0.1


class _MaskedOutput(Experts):
    """The experts, their output's last half of channels multiplied by zero: the model's
    output does not depend on those channels of ``down``'s output."""

    def forward(self, x, idx):
        y = super().forward(x, idx)
        return y * torch.cat([torch.ones(y.shape[-1] // 2), torch.zeros(y.shape[-1] - y.shape[-1] // 2)])


@pytest.mark.parametrize("matrix", ["full", "diagonal"])
@pytest.mark.parametrize("read", ["left", "grouped"])
def test_output_sensitivity_spends_the_rank_on_the_channels_the_model_output_sees(matrix, read):
    """With the model's output sensitivity (the default with calibration) a stack's output
    channels weigh what they cost the output: ``down`` at rank 4 of 8 output channels, half of
    them masked out, keeps the 4 that count (plain whitening spreads its rank over all 8)."""
    torch.manual_seed(0)
    model = _MaskedOutput(read=read).eval()
    batches = [_inputs(tokens=64, seed=s) for s in range(3)]
    config = dict(rank_rule="fixed", rank=4, include=["down"], sensitivity_matrix=matrix)
    aware = fxlrd.transform(model, LRDConfig(**config), example_inputs=batches[0], capture="fx", calibration=batches)
    plain = fxlrd.transform(model, LRDConfig(sensitivity=False, **config), example_inputs=batches[0], capture="fx",
                            calibration=batches)  # fmt: skip
    x, idx = _inputs(tokens=64, seed=9)
    ref = model(x, idx)
    assert rel_err(aware(x, idx), ref) < 0.05 < 0.5 * rel_err(plain(x, idx), ref)
    assert {r["weight"]: r for r in aware.fxlrd_plan.settings["stacked_experts"]}["down"]["data_aware"]


def test_whitened_factors_reach_the_output_error_optimum():
    """At rank r the data-aware stack's output error on the calibration tokens equals, per
    expert, the optimum min ‖(W − W′)X‖ = ‖W X − [W X]_r‖ computed here independently (3 000
    tokens per expert in 10 dimensions: the statistics' shrinkage is negligible)."""
    torch.manual_seed(2)
    e, d, hidden, r = 3, 10, 12, 4
    model = Experts(e=e, d=d, hidden=hidden).eval()
    g = torch.Generator().manual_seed(5)
    scales = torch.logspace(0, -2, d)  # correlated, anisotropic inputs
    batches = [(torch.randn(3000, d, generator=g) * scales @ torch.randn(d, d, generator=g), torch.randint(0, e, (3000,), generator=g))
               for _ in range(3)]  # fmt: skip
    config = LRDConfig(rank_rule="fixed", rank=r, include=["up"], sensitivity=False)  # (whitening alone)
    gm = fxlrd.transform(model, config, example_inputs=batches[0], capture="fx", calibration=batches)
    approx = gm.get_submodule("up").weight().detach().double()
    x = torch.cat([b[0] for b in batches]).double()
    idx = torch.cat([b[1] for b in batches])
    lost = whole = 0.0
    for i in range(e):
        w, xi = model.up[i].detach().double(), x[idx == i].T  # (hidden, d), (d, samples)
        s = torch.linalg.svdvals(w @ xi)
        optimum = s[r:].pow(2).sum()
        got = ((w - approx[i]) @ xi).pow(2).sum()
        assert got == pytest.approx(float(optimum), rel=1e-3, abs=1e-9)
        lost, whole = lost + float(optimum), whole + float(s.pow(2).sum())
    rec = {rr["weight"]: rr for rr in gm.fxlrd_plan.settings["stacked_experts"]}["up"]
    assert rec["error"] == pytest.approx((lost / whole) ** 0.5, rel=1e-2)  # (estimated under the shrunk statistics)


def test_an_expert_no_calibration_token_reaches_keeps_its_data_free_factors():
    torch.manual_seed(0)
    model = Experts(e=4).eval()
    batches = [(torch.randn(32, 8), torch.randint(0, 3, (32,))) for _ in range(2)]  # expert 3 never picked
    config = LRDConfig(rank_rule="fixed", rank=3, include=["up"])
    aware = fxlrd.transform(model, config, example_inputs=batches[0], capture="fx", calibration=batches)
    free = fxlrd.transform(model, config, example_inputs=batches[0], capture="fx")
    assert torch.allclose(aware.get_submodule("up").weight()[3], free.get_submodule("up").weight()[3], atol=1e-6)
    assert not torch.allclose(aware.get_submodule("up").weight()[0], free.get_submodule("up").weight()[0], atol=1e-3)
    rec = {r["weight"]: r for r in aware.fxlrd_plan.settings["stacked_experts"]}["up"]
    assert rec["calibrated_experts"] == 3 and "(3 of 4 experts calibrated)" in aware.fxlrd_plan.table()


def test_a_data_aware_plan_needs_the_calibration_to_be_applied_and_calibration_changes_nothing():
    torch.manual_seed(0)
    model = Experts().eval().train()  # in training mode: calibration runs in eval and restores it
    batches = [_inputs(tokens=32, seed=s) for s in range(3)]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    plan = fxlrd.plan(model, LRDConfig(ratio=2, rank_quantum=1), example_inputs=batches[0], capture="fx",
                      calibration=batches)  # fmt: skip
    assert all(r["data_aware"] for r in plan.settings["stacked_experts"])
    assert model.training and all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with pytest.raises(ConfigError, match="calibration"):
        fxlrd.apply(model, plan, example_inputs=batches[0])
    gm = fxlrd.apply(model, plan, example_inputs=batches[0], calibration=batches)
    direct = fxlrd.transform(model, LRDConfig(ratio=2, rank_quantum=1), example_inputs=batches[0], capture="fx",
                             calibration=batches)  # fmt: skip
    gm.eval(), direct.eval()
    assert torch.allclose(gm(*batches[0]), direct(*batches[0]), atol=1e-6)


def test_calibration_items_that_do_not_fit_get_a_clear_error():
    model, inputs = Experts().eval(), _inputs()
    with pytest.raises(ValueError, match="calibration"):
        fxlrd.transform(model, LRDConfig(ratio=2), example_inputs=inputs, capture="fx",
                        calibration=[(torch.randn(5, 3), torch.zeros(5, dtype=torch.long))])  # fmt: skip
    with pytest.raises(ConfigError, match="calibration is empty"):
        fxlrd.transform(model, LRDConfig(ratio=2), example_inputs=inputs, capture="fx", calibration=[])


def test_inplace_with_calibration_keeps_the_stacks_without_asking_for_calibration_again():
    torch.manual_seed(0)
    model, batches = Experts().eval(), [_inputs(tokens=32, seed=s) for s in range(2)]
    with pytest.warns(fxlrd.FxlrdWarning, match="inplace=True keeps"):
        gm = fxlrd.transform(model, LRDConfig(ratio=2, rank_quantum=1), example_inputs=batches[0], capture="fx",
                             inplace=True, calibration=batches)  # fmt: skip
    recs = gm.fxlrd_plan.settings["stacked_experts"]
    assert all(r["rank"] is None and "data_aware" not in r for r in recs)
    assert "0 of them data-aware" in gm.fxlrd_plan.table()
    plan = fxlrd.plan(model, LRDConfig(ratio=2, rank_quantum=1), example_inputs=batches[0], capture="fx",
                      calibration=batches)  # fmt: skip
    with pytest.warns(fxlrd.FxlrdWarning, match="inplace=True keeps"):
        fxlrd.apply(Experts().eval(), plan, example_inputs=batches[0], inplace=True)  # no calibration needed


class _PaddedExperts(nn.Module):
    """Token batches (batch, sequence, d) with an attention mask, flattened to tokens × top-1;
    "bmm" reads ``up[ids]``, "grouped" sorts the tokens by expert (``x[order]``, as
    transformers gathers them) for a grouped_mm, "index_select" gathers them another way."""

    def __init__(self, e=3, d=8, hidden=12, read="bmm"):  # (grouped_mm: rows of 16 bytes)
        super().__init__()
        self.e, self.read = e, read
        self.up = nn.Parameter(torch.randn(e, hidden, d))
        self.down = nn.Parameter(torch.randn(e, d, hidden) / 3)  # ("grouped_down": after up, over the same offs)

    def forward(self, x, idx, attention_mask):
        flat, ids = x.reshape(-1, x.shape[-1]), idx.reshape(-1)
        if self.read == "bmm":
            h = torch.bmm(self.up[ids], flat.unsqueeze(-1)).squeeze(-1)
        else:
            order = torch.argsort(ids, stable=True)
            offs = torch.cumsum(torch.bincount(ids, minlength=self.e), 0).to(torch.int32)
            xs = flat.index_select(0, order) if self.read == "index_select" else flat[order].contiguous()
            h = torch.nn.functional.grouped_mm(xs, self.up.mT, offs=offs)
            if self.read == "grouped_down":
                h = torch._grouped_mm(torch.relu(h), self.down.mT, offs)
            h = h[torch.argsort(order)]
        return h.reshape(x.shape[0], x.shape[1], -1) * attention_mask[..., None]


@pytest.mark.parametrize("read", ["bmm", "grouped", "grouped_down", "index_select"])
def test_padding_tokens_are_left_out_of_the_experts_statistics(read):
    """Padding left out: the factors of padded batches are those of their real tokens alone (a
    grouped product after the one that gathered the tokens, over the same groups, too, with
    that one kept whole); a grouped product whose rows are not gathered by a token index
    counts them, and says so."""
    torch.manual_seed(0)
    model = _PaddedExperts(read=read).eval()
    g = torch.Generator().manual_seed(1)
    real = [(torch.randn(2, 5, 8, generator=g), torch.randint(0, 3, (2, 5), generator=g)) for _ in range(3)]
    short = [{"x": x, "idx": i, "attention_mask": torch.ones(2, 5)} for x, i in real]
    padded = []
    for x, i in real:  # three padding tokens each, of huge values
        mask = torch.cat([torch.ones(2, 5), torch.zeros(2, 3)], 1)
        padded.append({"x": torch.cat([x, 1e3 * torch.randn(2, 3, 8, generator=g)], 1),
                       "idx": torch.cat([i, torch.randint(0, 3, (2, 3), generator=g)], 1), "attention_mask": mask})  # fmt: skip
    stack = "down" if read == "grouped_down" else "up"
    config = LRDConfig(rank_rule="fixed", rank=2, include=[stack])
    a = fxlrd.transform(model, config, example_inputs=short[0], calibration=short, capture="fx")
    b = fxlrd.transform(model, config, example_inputs=padded[0], calibration=padded, capture="fx")
    (rec,) = [r for r in b.fxlrd_plan.settings["stacked_experts"] if r.get("rank")]
    assert rec["weight"] == stack and rec["data_aware"]
    if read == "index_select":
        assert "padding tokens counted" in rec["note"]
        assert rel_err(b.get_submodule(stack).weight(), a.get_submodule(stack).weight()) > 0.01
        return
    assert "padding" not in rec.get("note", "")
    torch.testing.assert_close(b.get_submodule(stack).weight(), a.get_submodule(stack).weight(), rtol=1e-5, atol=1e-6)


def test_expert_statistics_report_calibration_items_that_do_not_fit():
    from fxlrd.experts import expert_stats

    model, inputs = Experts().eval(), _inputs()
    gm = capture_graph(model, inputs, mode="fx").gm
    stacks = find_stacked(model, gm)
    with pytest.raises(ValueError, match="calibration item .* does not run through"):
        expert_stats(gm, stacks, [(torch.randn(5, 3), torch.zeros(5, dtype=torch.long))], progress=False)
    with pytest.raises(ConfigError, match="calibration is empty"):
        expert_stats(gm, stacks, [], progress=False)


def _distributed_worker(rank, world, init, out):  # pragma: no cover  (a subprocess)
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = Experts(d=8, hidden=12).eval()
        batches = [_inputs(tokens=40, seed=s) for s in range(4)]
        gm = fxlrd.transform(model, LRDConfig(rank_rule="fixed", rank=3, sensitivity=False), example_inputs=batches[0],
                             capture="fx", calibration=batches[rank::world])  # fmt: skip
        torch.save({k: v.clone() for k, v in gm.state_dict().items()}, f"{out}.{rank}")
        # with sensitivity (random projections: no one-process twin) every process gets the same summed statistics
        gm = fxlrd.transform(model, LRDConfig(rank_rule="fixed", rank=3), example_inputs=batches[0], capture="fx",
                             calibration=batches[rank::world])  # fmt: skip
        torch.save({k: v.clone() for k, v in gm.state_dict().items()}, f"{out}.sens.{rank}")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_distributed_expert_statistics_equal_one_process_on_the_union(tmp_path):
    import torch.multiprocessing as mp

    torch.manual_seed(0)
    model = Experts(d=8, hidden=12).eval()
    batches = [_inputs(tokens=40, seed=s) for s in range(4)]
    single = fxlrd.transform(model, LRDConfig(rank_rule="fixed", rank=3, sensitivity=False), example_inputs=batches[0],
                             capture="fx", calibration=batches)  # fmt: skip
    assert all(r["data_aware"] for r in single.fxlrd_plan.settings["stacked_experts"])
    init, out = f"file://{tmp_path / 'rendezvous'}", str(tmp_path / "state")
    mp.spawn(_distributed_worker, args=(2, init, out), nprocs=2, join=True)
    for r in range(2):
        state = torch.load(f"{out}.{r}")
        for k, v in single.state_dict().items():
            torch.testing.assert_close(state[k], v, rtol=1e-5, atol=1e-6)
    first, second = torch.load(f"{out}.sens.0"), torch.load(f"{out}.sens.1")
    for k, v in first.items():
        torch.testing.assert_close(second[k], v, rtol=1e-6, atol=1e-7)


def test_a_transformed_model_wrapped_and_traced_again_keeps_its_expert_factors():
    """Traced again inside another module (fx rebuilds the path with plain modules), the
    factors are still no stacks."""
    torch.manual_seed(0)
    model, inputs = Experts().eval(), _inputs()
    gm = fxlrd.transform(model, LRDConfig(ratio=2, rank_quantum=1), example_inputs=inputs, capture="fx")

    class Wrapper(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x, idx):
            return self.inner(x, idx)

    wrapped = Wrapper(gm)
    again = fxlrd.transform(wrapped, LRDConfig(ratio=2, rank_quantum=1), example_inputs=inputs, capture="fx")
    assert not again.fxlrd_plan.settings.get("stacked_experts")
    assert torch.allclose(again(*inputs), gm(*inputs))


class _BothWays(nn.Module):
    """One selection used as P[ids] @ x, then Pᵀ[ids] @ h: two input modes of one stack."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 12, 8))

    def forward(self, x, idx):
        sel = self.w[idx]
        h = torch.bmm(sel, x.unsqueeze(-1))
        return torch.bmm(sel.mT, torch.relu(h)).squeeze(-1)


def test_a_stack_read_on_both_modes_is_factorized_data_free_with_a_note():
    torch.manual_seed(0)
    model, batches = _BothWays().eval(), [_inputs(tokens=32, seed=s) for s in range(2)]
    full = fxlrd.transform(model, FULL, example_inputs=batches[0], capture="fx")
    assert rel_err(full(*batches[0]), model(*batches[0])) < 1e-5
    gm = fxlrd.transform(model, LRDConfig(rank_rule="fixed", rank=3), example_inputs=batches[0], capture="fx",
                         calibration=batches)  # fmt: skip
    rec = gm.fxlrd_plan.settings["stacked_experts"][0]
    assert rec["rank"] == 3 and not rec["data_aware"] and "different modes" in rec["note"]
    assert "different modes" in gm.fxlrd_plan.table()


def test_filter_fn_sees_the_users_module_and_layer_types_apply():
    torch.manual_seed(0)
    model, inputs = Experts().eval(), _inputs()
    seen = []
    fxlrd.plan(model, LRDConfig(ratio=2, filter_fn=lambda m, n: seen.append((type(m), n)) or True),
               example_inputs=inputs, capture="export")  # fmt: skip
    assert (Experts, "up") in seen  # the model itself owns the stack (an export graph's modules are plain)
    plan = fxlrd.plan(model, LRDConfig(ratio=2, layer_types=[nn.Conv2d]), example_inputs=inputs, capture="fx")
    assert all("Linear not in layer_types" in r["reason"] for r in plan.settings["stacked_experts"])


def test_a_hand_edited_rank_above_full_is_capped_and_recorded():
    torch.manual_seed(0)
    model, inputs = Experts().eval(), _inputs()
    plan = fxlrd.plan(model, LRDConfig(ratio=2, rank_quantum=1), example_inputs=inputs, capture="fx")
    plan.settings["stacked_experts"][0]["rank"] = 100
    gm = fxlrd.apply(model, plan, example_inputs=inputs)
    rec = gm.fxlrd_plan.settings["stacked_experts"][0]
    assert rec["rank"] == 8 and rec["params_after"] == 4 * 8 * 20 and gm.get_submodule("up").rank == 8
    assert "the plan's rank 100 built as 8 (above full rank)" in rec["note"]
    assert sum(p.numel() for p in gm.parameters()) == gm.fxlrd_plan.params_after_model()


@pytest.mark.parametrize("read", ["grouped", "grouped_in_out"])
def test_grouped_mm_ranks_are_rounded_up_to_rows_of_16_bytes_also_when_edited_by_hand(read):
    """grouped_mm wants each matrix's rows at multiples of 16 bytes: a float32 stack it reads
    gets ranks that are multiples of 4 (rank 5 -> 8; a bmm stack keeps 5), and a rank edited
    by hand in the plan is rounded up too and recorded."""
    torch.manual_seed(0)
    model, inputs = Experts(read=read, d=16, hidden=20).eval(), _inputs(d=16)
    config = LRDConfig(rank_rule="fixed", rank=5)
    gm = fxlrd.transform(model, config, example_inputs=inputs, capture="fx")
    assert [r["rank"] for r in gm.fxlrd_plan.settings["stacked_experts"]] == [8, 8]
    assert gm.get_submodule("up").rank == 8 and gm(*inputs).shape == (10, 16)
    bmm = fxlrd.plan(Experts(d=16, hidden=20).eval(), config, example_inputs=inputs, capture="fx")
    assert [r["rank"] for r in bmm.settings["stacked_experts"]] == [5, 5]
    plan = fxlrd.plan(model, config, example_inputs=inputs, capture="fx")
    plan.settings["stacked_experts"][0]["rank"] = 6
    gm = fxlrd.apply(model, plan, example_inputs=inputs)
    rec = gm.fxlrd_plan.settings["stacked_experts"][0]
    assert rec["rank"] == 8 and rec["params_after"] == 4 * 8 * 36 and gm.get_submodule("up").rank == 8
    assert "the plan's rank 6 built as 8 (grouped_mm wants rows of 16 bytes: ranks in multiples of 4 in float32)" in rec["note"]
    assert gm(*inputs).shape == (10, 16)
    plan.settings["stacked_experts"][0]["rank"] = 12  # a float32 plan's rank, applied in bfloat16: multiples of 8
    half = copy.deepcopy(model).to(torch.bfloat16)
    gm = fxlrd.apply(half, plan, example_inputs=(inputs[0].to(torch.bfloat16), inputs[1]))
    rec = gm.fxlrd_plan.settings["stacked_experts"][0]
    assert rec["rank"] == 16 and "ranks in multiples of 8 in bfloat16" in rec["note"]


class _FallbackExperts(nn.Module):
    """Experts run by transformers' own grouped loop (``torch.ops.transformers.grouped_mm_fallback``,
    what it runs where torch's grouped_mm cannot), weights stored ``(E, in, out)``."""

    def __init__(self, e=4, d=8, hidden=12):
        super().__init__()
        self.e = e
        self.up = nn.Parameter(torch.randn(e, d, hidden) / 3)

    def forward(self, x, idx):
        order = torch.argsort(idx, stable=True)
        offs = torch.cumsum(torch.bincount(idx, minlength=self.e), 0).to(torch.int32)
        return torch.ops.transformers.grouped_mm_fallback(x[order], self.up, offs)[torch.argsort(order)]


def test_transformers_grouped_fallback_is_factorized_too():
    pytest.importorskip("transformers.integrations.moe")  # (registers the operator)
    torch.manual_seed(0)
    model, inputs = _FallbackExperts().eval(), _inputs()
    assert fxlrd.count_macs(model, inputs) == 10 * 8 * 12  # (one expert's product per token)
    full = fxlrd.transform(model, FULL, example_inputs=inputs, capture="fx")
    assert rel_err(full(*inputs), model(*inputs)) < 1e-5 and _no_dense_gather(full, {"up"})
    gm = fxlrd.transform(model, LRDConfig(rank_rule="fixed", rank=4), example_inputs=inputs, capture="fx")
    approx = gm.get_submodule("up").weight().detach()
    assert [r["rank"] for r in gm.fxlrd_plan.settings["stacked_experts"]] == [4]
    x, idx = inputs
    ref = torch.stack([x[t] @ approx[idx[t]] for t in range(len(idx))])  # each token through its factorized expert
    assert rel_err(gm(*inputs), ref) < 1e-5


def test_nan_weights_of_a_stack_the_settings_keep_are_no_error():
    model, inputs = Experts().eval(), _inputs()
    with torch.no_grad():
        model.up[0, 0, 0] = float("nan")
    plan = fxlrd.plan(model, LRDConfig(rank_rule="vbmf"), example_inputs=inputs, capture="fx")
    assert all(r["rank"] is None for r in plan.settings["stacked_experts"])


# -- calibration memory: the sensitivity's backward pass does not keep gathered stacks ---------------
@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("read", ["left", "method", "right", "mT", "mT_left"])
def test_the_sensitivity_backward_gathers_expert_stacks_again_instead_of_keeping_them(capture, read):
    """``P[ids]`` (one matrix per token: batched_mm's memory) is freed after its product; the
    backward pass gathers it again, and its gradients are autograd's own."""
    import weakref

    from fxlrd.calibrate import EvalInterpreter

    model, (x, idx) = Experts(read=read).eval(), _inputs(tokens=12)
    gm = capture_graph(model, (x, idx), mode=capture).gm
    gathered = []

    class Watch(EvalInterpreter):
        def run_node(self, node):
            out = super().run_node(node)
            if node in self._gathers:
                gathered.append(weakref.ref(out))
            return out

    xg = x.clone().requires_grad_()
    with torch.enable_grad():
        out = Watch(gm).run(xg, idx)
        assert len(gathered) == 2 and all(ref() is None for ref in gathered)  # up's and down's: not kept
        (grad,) = torch.autograd.grad(out.pow(2).sum(), xg)
        xr = x.clone().requires_grad_()
        (expected,) = torch.autograd.grad(model(xr, idx).pow(2).sum(), xr)
    torch.testing.assert_close(grad, expected, rtol=0, atol=0)


@pytest.mark.parametrize("outer", ["pack_hooks", "disabled"])
def test_the_callers_saved_tensor_hooks_are_kept_and_disabled_hooks_are_no_error(outer):
    """Under the caller's own saved-tensor hooks, those apply (fxlrd's would replace them inside
    its run); where hooks are disabled, setting any raises: autograd keeps the gathered stacks
    then, and the gradients are the same."""
    from fxlrd.calibrate import EvalInterpreter

    model, (x, idx) = Experts().eval(), _inputs(tokens=12)
    gm = capture_graph(model, (x, idx), mode="fx").gm
    packed = []
    if outer == "pack_hooks":
        context = torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(1) or t, lambda t: t)
    else:
        context = torch.autograd.graph.disable_saved_tensors_hooks("the caller's")
    xg, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    with torch.enable_grad():
        (expected,) = torch.autograd.grad(model(xr, idx).pow(2).sum(), xr)
        with context:
            out = EvalInterpreter(gm).run(xg, idx)
        (grad,) = torch.autograd.grad(out.pow(2).sum(), xg)
    torch.testing.assert_close(grad, expected, rtol=0, atol=0)
    assert (len(packed) > 0) == (outer == "pack_hooks")  # (the caller's pack hook saw the saved tensors)


def test_expert_and_layer_statistics_with_the_sensitivity_equal_those_of_kept_stacks(monkeypatch):
    """A Mixtral on batched_mm calibrated with the output sensitivity: the same statistics, bit
    for bit, as when autograd keeps the gathered stacks."""
    from fxlrd import calibrate
    from fxlrd.calibrate import EvalInterpreter, collect_stats
    from fxlrd.experts import expert_stats

    model, inputs = _mixtral()
    gm = capture_graph(model, inputs, mode="export").gm
    stacks = find_stacked(model, gm)
    batches = [inputs] * 2

    def both():
        return (expert_stats(gm, stacks, batches, progress=False, sensitivity=True),
                collect_stats(gm, batches, progress=False, sensitivity=True))  # fmt: skip

    pack, substituted = EvalInterpreter._pack, []

    def counting(self, t):
        packed = pack(self, t)
        substituted.append(isinstance(packed, tuple))
        return packed

    monkeypatch.setattr(EvalInterpreter, "_pack", counting)
    experts, layers = both()
    assert sum(substituted) >= 2 * 2 * 2  # (each layer's two stacks, both passes, at least once each)
    monkeypatch.setattr(calibrate, "_is_gather", lambda node: False)  # autograd's default: it keeps what it saves
    kept_experts, kept_layers = both()
    assert experts.keys() == kept_experts.keys() and len(experts) == 2 * 2 and layers.keys() == kept_layers.keys()
    pairs = [(a, b) for p in experts for a, b in zip(experts[p], kept_experts[p]) if a is not None]
    pairs += [(layers[n], kept_layers[n]) for n in layers]
    for a, b in pairs:
        assert torch.equal(a.output_sensitivity, b.output_sensitivity) and a.output_energy == b.output_energy
        assert torch.equal(a.inputs.gram, b.inputs.gram)


class _InPlace(nn.Module):
    """A gathered stack changed in place before its product ("gathered"), or a saved value
    changed in place after it was saved ("saved": autograd's error)."""

    def __init__(self, change):
        super().__init__()
        self.change = change
        self.up = nn.Parameter(torch.randn(4, 8, 12) / 3)

    def forward(self, x, idx):
        w = self.up[idx]
        if self.change == "gathered":
            w.mul_(2)
        h = torch.bmm(x.unsqueeze(1), w).squeeze(1).exp()
        if self.change == "saved":
            h.mul_(2)  # (exp saved its output for the backward pass)
        return h


@pytest.mark.parametrize("change", ["gathered", "saved"])
def test_values_changed_in_place_are_not_gathered_again_and_autograd_still_checks_them(change):
    from fxlrd.calibrate import EvalInterpreter

    model, (x, idx) = _InPlace(change).eval(), _inputs(tokens=6)
    gm = capture_graph(model, (x, idx), mode="fx").gm
    with torch.enable_grad():
        xg, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
        out, want = EvalInterpreter(gm).run(xg, idx), model(xr, idx)
        if change == "saved":
            for value, leaf in ((out, xg), (want, xr)):
                with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                    torch.autograd.grad(value.sum(), leaf)
            return
        (grad,), (expected,) = torch.autograd.grad(out.sum(), xg), torch.autograd.grad(want.sum(), xr)
    torch.testing.assert_close(grad, expected, rtol=0, atol=0)


class _DecoderExperts(nn.Module):
    """Experts over an encoder-decoder's decoder tokens (as long as the encoder's): the
    encoder's ``attention_mask`` says nothing of them."""

    def __init__(self, e=3, d=8, hidden=12, read="bmm"):
        super().__init__()
        self.experts = _PaddedExperts(e, d, hidden, read)
        self.encoder = nn.Embedding(50, d)
        self.decoder = nn.Embedding(50, d)

    def forward(self, input_ids, attention_mask, decoder_input_ids):
        memory = self.encoder(input_ids).mean(1, keepdim=True)  # (the mask changes no decoder value here)
        y = self.decoder(decoder_input_ids) + memory
        return self.experts(y, decoder_input_ids % self.experts.e, torch.ones_like(decoder_input_ids))


@pytest.mark.parametrize("read", ["bmm", "grouped"])
def test_an_encoder_decoders_padding_mask_is_not_applied_to_its_decoder_tokens(read):
    """The decoder's tokens all count (no ``decoder_attention_mask``): the experts' factors are
    those of every decoder token, whatever the encoder's mask (it used to fall on the decoder's
    tokens where the two sequences had one length)."""
    torch.manual_seed(0)
    model = _DecoderExperts(read=read).eval()
    g = torch.Generator().manual_seed(2)
    batches = [{"input_ids": torch.randint(0, 50, (2, 6), generator=g), "attention_mask": torch.ones(2, 6, dtype=torch.long),
                "decoder_input_ids": torch.randint(0, 50, (2, 6), generator=g)} for _ in range(3)]  # fmt: skip
    masked = [dict(b, attention_mask=torch.tensor([[1] * 6, [1, 1, 1, 0, 0, 0]])) for b in batches]
    config = LRDConfig(rank_rule="fixed", rank=4, include=["experts.up"], sensitivity=False)
    a, b = (fxlrd.transform(model, config, example_inputs=batches[0], calibration=c, capture="fx") for c in (batches, masked))
    torch.testing.assert_close(b.get_submodule("experts.up").weight(), a.get_submodule("experts.up").weight(),
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    (rec,) = [r for r in b.fxlrd_plan.settings["stacked_experts"] if r.get("rank")]
    assert rec["data_aware"] and "padding" not in rec.get("note", "")


# -- latency mode: a stack's product timed alone, as a layer is (Algorithm 1) ------------------------
class _StackTimer(LayerTimer):
    """A stack's product (run once, to check it runs): flat up to rank 32, slower above it;
    the dense stack ``dense`` long."""

    backend, context = "synthetic", "stacks"

    def __init__(self, dense):
        self.dense, self.timed = dense, []

    def time_inputs(self, module, inputs):
        rank = module.form[3]
        self.timed.append((rank, tuple(inputs[0].shape), module(*inputs).shape))
        return self.dense if rank is None else 1.0 + (rank > 32)


@pytest.mark.parametrize("capture, read", [("fx", "right"), ("export", "right"), ("fx", "left"), ("fx", "mT"),
                                           ("fx", "mT_left"), ("fx", "grouped"), ("fx", "grouped_in_out")])  # fmt: skip
def test_latency_mode_times_each_stacks_product_and_takes_the_largest_rank_as_fast_as_the_fastest(monkeypatch, capture,
                                                                                                  read):  # fmt: skip
    from fxlrd.latency import LatencyConfig

    """The rule's rank 42 (not quantized: the search's target, as a layer's; 44 for grouped_mm,
    rows of 16 bytes) and the multiples of 8 down to half of it are timed; ranks above 32 are
    slower, so 32 is chosen (the largest as fast as the fastest). Each probe runs in the
    read's form."""
    timer = _StackTimer(dense=3.0)
    monkeypatch.setattr("fxlrd.ranks.search.make_timer", lambda config: timer)
    model, inputs = Experts(e=4, d=64, hidden=160, read=read).eval(), _inputs(d=64, tokens=24)
    latency = LatencyConfig(backend="eager", cache=False, progress=False, quantum=8, window=0.5)
    config = LRDConfig(rank_rule="fixed", rank=42, rank_quantum=16, latency=latency)
    gm = fxlrd.transform(model, config, example_inputs=inputs, capture=capture)
    for path, rec in {r["weight"]: r for r in gm.fxlrd_plan.settings["stacked_experts"]}.items():
        assert [r for r, _ in rec["latency"]["candidates_ms"]] == [[24], [32], [40], [44 if "grouped" in read else 42]]
        assert rec["rank"] == 32 and gm.get_submodule(path).rank == 32
        assert rec["latency"]["original_ms"] == 3000.0 and "timed alone (24 rows over 4 experts" in rec["latency"]["note"]
    assert gm.fxlrd_plan.table().count("its product 1000.000 ms (dense 3000.000 ms)") == 2  # (the table's stack rows)
    assert {(x, y) for _, x, y in timer.timed} == {((24, 64), (24, 160)), ((24, 160), (24, 64))}  # (up, then down)
    assert sum(p.numel() for p in gm.parameters()) == gm.fxlrd_plan.params_after_model()


class _RoutingTimer(_StackTimer):
    """`_StackTimer`, keeping each probe's experts and index."""

    def time_inputs(self, module, inputs):
        self.routed = getattr(self, "routed", [])
        self.routed.append((module.form[0], inputs[1].tolist()))
        return super().time_inputs(module, inputs)


@pytest.mark.parametrize("read", ["left", "grouped"])
def test_latency_mode_times_a_stack_routed_as_the_example_routed_it_and_caches_by_routing(monkeypatch, tmp_path, read):
    """The example sends its 24 tokens to 3 of 8 experts (12, 8 and 4): each probe reads those 3,
    renumbered, in the example's order (batched_mm) or groups (grouped_mm). Another routing is
    timed anew, not read from the cache; the same one is read from it."""
    from fxlrd.latency import LatencyConfig

    timer = _RoutingTimer(dense=3.0)
    monkeypatch.setattr("fxlrd.ranks.search.make_timer", lambda config: timer)
    model = Experts(e=8, d=64, hidden=160, read=read).eval()
    x = torch.randn(24, 64)
    skewed = torch.tensor([5] * 4 + [0] * 12 + [3] * 8)[torch.randperm(24, generator=torch.Generator().manual_seed(0))]
    latency = LatencyConfig(backend="eager", cache_path=tmp_path / "cache.json", progress=False, quantum=8, window=0.5)
    config = LRDConfig(rank_rule="fixed", rank=40, latency=latency)
    plan = fxlrd.plan(model, config, example_inputs=(x, skewed), capture="fx")
    renumbered = {0: 0, 3: 1, 5: 2}
    want = [12, 20, 24] if read == "grouped" else [renumbered[int(i)] for i in skewed]
    assert timer.routed and all(experts == 3 and index == want for experts, index in timer.routed)
    for rec in plan.settings["stacked_experts"]:
        assert "(24 rows over 3 experts, as the example routed them, 4-12 rows each" in rec["latency"]["note"]
    calls = len(timer.routed)
    fxlrd.plan(model, config, example_inputs=(x, skewed), capture="fx")
    assert len(timer.routed) == calls  # (the same routing: from the cache)
    other = torch.tensor([0, 3, 5] * 8)  # the same experts, 8 rows each
    fxlrd.plan(model, config, example_inputs=(x, other), capture="fx")
    assert len(timer.routed) > calls and all(experts == 3 and index != want for experts, index in timer.routed[calls:])


def test_a_search_whose_example_does_not_run_for_real_spreads_the_rows_evenly(monkeypatch):
    from fxlrd import calibrate
    from fxlrd.latency import LatencyConfig

    class Failing(calibrate.EvalInterpreter):
        def run_node(self, node):
            raise RuntimeError("no real forward here")

    monkeypatch.setattr(calibrate, "EvalInterpreter", Failing)
    timer = _RoutingTimer(dense=3.0)
    monkeypatch.setattr("fxlrd.ranks.search.make_timer", lambda config: timer)
    model, x = Experts(e=8, d=64, hidden=160).eval(), torch.randn(24, 64)
    latency = LatencyConfig(backend="eager", cache=False, progress=False, quantum=8, window=0.5)
    plan = fxlrd.plan(model, LRDConfig(rank_rule="fixed", rank=40, latency=latency), example_inputs=(x, torch.zeros(24).long()),
                      capture="fx")  # fmt: skip
    assert all(experts == 8 and index == [i % 8 for i in range(24)] for experts, index in timer.routed)
    for rec in plan.settings["stacked_experts"]:
        assert "(24 rows over 8 experts, spread evenly" in rec["latency"]["note"]


def test_latency_mode_keeps_a_stack_whose_dense_product_is_faster(monkeypatch):
    from fxlrd.latency import LatencyConfig

    monkeypatch.setattr("fxlrd.ranks.search.make_timer", lambda config: _StackTimer(dense=0.5))
    model, inputs = Experts(e=4, d=32, hidden=64, read="right").eval(), _inputs(d=32, tokens=24)
    latency = LatencyConfig(backend="eager", cache=False, progress=False, quantum=8)
    gm = fxlrd.transform(model, LRDConfig(ratio=2, rank_quantum=8, latency=latency), example_inputs=inputs, capture="fx")
    for rec in gm.fxlrd_plan.settings["stacked_experts"]:
        assert rec["rank"] is None and "the dense stack is faster (500.000 ms" in rec["reason"]
        assert rec["latency"]["chosen"] is None
    assert not any(isinstance(m, ExpertFactors) for m in gm.modules())


def test_latency_mode_on_onnxruntime_keeps_grouped_stacks_it_cannot_export_and_says_so():
    from fxlrd.latency import LatencyConfig

    model, inputs = Experts(read="grouped", d=16, hidden=32).eval(), _inputs(d=16)
    config = LRDConfig(latency=LatencyConfig(backend="onnxruntime", cache=False, progress=False, repeats=1, warmup=0))
    with pytest.warns(fxlrd.FxlrdWarning, match="could not time its product on onnxruntime"):
        records = fxlrd.plan(model, config, example_inputs=inputs, capture="fx").settings["stacked_experts"]
    assert all(r["rank"] is None and "could not time its product on onnxruntime" in r["reason"] for r in records)


# -- global speed mode (target_speedup): the stacks chosen beside the layers ------------------------
class _ParamTimer(LayerTimer):
    """Time = parameters of whatever runs (a whole model, a layer, a stack's probe, which it runs
    once to check it runs); a grouped_mm probe ``fails`` if asked (as onnxruntime's export does)."""

    backend, context = "synthetic", "params"

    def __init__(self, fail_grouped=False):
        self.fail_grouped, self.probes, self.trials = fail_grouped, [], []

    def time(self, module, input_shape):
        return sum(p.numel() for p in module.parameters()) * 1e-9 + 1e-6

    def time_inputs(self, module, inputs):
        if self.fail_grouped and module.form[6]:
            raise RuntimeError("grouped_mm cannot be exported")
        self.probes.append((module.form[3], module(*inputs).shape))
        return self.time(module, None)

    def time_model(self, model, inputs):
        return self.time(model, None)

    def speedup_model(self, original, other, inputs):
        self.trials.append({n: (m.weight().detach(), m.rank) for n, m in other.named_modules() if isinstance(m, ExpertFactors)})
        return self.time(original, None) / self.time(other, None)


def _probe_of(rec):
    """The probe `_StackProbe` the search timed for ``rec`` at its rank (only its parameters count here)."""
    from fxlrd.experts import _StackProbe

    e, (m, n) = rec["experts"], rec["shape"]
    return _StackProbe(e, m, n, rec["rank"], True, False, torch.float32, device="meta")


def test_factors_passed_at_another_rank_are_refused():
    from fxlrd.experts import factorize_experts

    model, inputs = Experts().eval(), _inputs()
    gm = capture_graph(model, inputs, mode="fx").gm
    rec = {"weight": "up", "experts": 4, "shape": [12, 8], "rank": 4}
    with pytest.raises(ValueError, match=r"factors for 'up' of shapes \(4, 12, 3\) and \(4, 3, 8\) do not match its rank 4"):
        factorize_experts(gm, gm, [rec], factors={"up": (torch.zeros(4, 12, 3), torch.zeros(4, 3, 8))})


def _speed_config(**kwargs):
    from fxlrd.latency import LatencyConfig

    return LRDConfig(latency=LatencyConfig(backend="eager", cache=False, progress=False, quantum=8), **kwargs)


@pytest.mark.parametrize("capture, read", [("fx", "left"), ("export", "right"), ("fx", "grouped")])
def test_global_speed_mode_chooses_the_stacks_beside_the_layers_on_the_measured_model(monkeypatch, capture, read):
    """Time is parameters here, and the stacks hold most of them: a 2x target is met only by
    factorizing them. Each stack's candidates are timed as its product alone; each trial is
    measured whole, its stacks built at the trial's ranks; the model returned is that trial
    with real factors."""
    timer = _ParamTimer()
    monkeypatch.setattr("fxlrd.ranks.search.make_timer", lambda config: timer)
    torch.manual_seed(0)
    model, inputs = _WithLayer(read=read).eval(), _inputs(d=32, tokens=24)
    gm = fxlrd.transform(model, _speed_config(target_speedup=2), example_inputs=inputs, capture=capture)
    g, recs = gm.fxlrd_plan.settings["global_search"], gm.fxlrd_plan.settings["stacked_experts"]
    assert g["met"] and g["measured_speedup"] >= 2 and g["stacked_experts"] == 2
    assert timer.time(model, None) / timer.time(gm, None) == pytest.approx(g["measured_speedup"])
    for rec in recs:
        assert rec["rank"] is not None and rec["latency"]["chosen"] == [rec["rank"]] and rec["rank"] % 8 == 0
        assert "its product timed alone (24 rows over 4 experts" in rec["latency"]["note"]
        ranks = [r for (r,), _, _ in rec["latency"]["candidates_ms"]]
        assert len(ranks) >= 3 and all(r * 96 < 32 * 64 for r in ranks)  # (around the ratio's rank, each a saving)
        assert isinstance(gm.get_submodule(rec["weight"]), ExpertFactors)
        assert gm.get_submodule(rec["weight"]).weight().abs().sum() > 0
    assert {rank for rank, _ in timer.probes} >= {None, *(r["rank"] for r in recs)}
    assert all("as the example routed them" in r["latency"]["note"] for r in recs)
    for rec in recs:  # (one call's time, as the latency search records it, and in the plan's table)
        probe = next(t for (r,), t, _ in rec["latency"]["candidates_ms"] if r == rec["rank"])
        assert probe == pytest.approx(timer.time(_probe_of(rec), None) * 1e3)
        assert f"its product {probe:.3f} ms (dense {rec['latency']['original_ms']:.3f} ms)" in gm.fxlrd_plan.table()
    for trial in timer.trials:  # each trial's stacks: the data-free truncation (so its routers route as the model's)
        for path, (weight, r) in trial.items():
            u, s, vh = torch.linalg.svd(getattr(model, path).detach().double(), full_matrices=False)
            want = (u[:, :, :r] * s[:, None, :r]) @ vh[:, :r]
            assert 0 < r < 32 and rel_err(weight.double(), want) < 1e-4
    assert timer.trials and any(timer.trials)
    assert rel_err(gm(*inputs), model(*inputs)) < 1  # (an approximation of the model, not zeros)
    assert sum(p.numel() for p in gm.parameters()) == gm.fxlrd_plan.params_after_model()


def test_global_speed_mode_counts_the_stacks_in_its_size_budget(monkeypatch):
    monkeypatch.setattr("fxlrd.ranks.search.make_timer", lambda config: _ParamTimer())
    torch.manual_seed(0)
    model, inputs = _WithLayer().eval(), _inputs(d=32, tokens=24)
    budget = int(0.3 * fxlrd.count_params(model))
    gm = fxlrd.transform(model, _speed_config(target_speedup=1.2, target_params=budget), example_inputs=inputs,
                         capture="fx")  # fmt: skip
    g = gm.fxlrd_plan.settings["global_search"]
    assert g["layer_params_chosen"] <= g["layer_params_budget"] and fxlrd.count_params(gm) <= budget
    assert all(r["rank"] is not None for r in gm.fxlrd_plan.settings["stacked_experts"])  # (the budget needs them)


def test_global_speed_mode_keeps_a_stack_the_backend_cannot_time_and_warns(monkeypatch):
    monkeypatch.setattr("fxlrd.ranks.search.make_timer", lambda config: _ParamTimer(fail_grouped=True))
    model, inputs = _WithLayer(read="grouped").eval(), _inputs(d=32, tokens=24)
    with pytest.warns(fxlrd.FxlrdWarning, match="could not time its product on synthetic"):
        plan = fxlrd.plan(model, _speed_config(target_speedup=1.2), example_inputs=inputs, capture="fx")
    for rec in plan.settings["stacked_experts"]:
        assert rec["rank"] is None and "the global speed search could not time its product on synthetic (RuntimeError: " \
            "grouped_mm" in rec["reason"]  # fmt: skip
    assert plan["fc"].latency["candidates_ms"]  # (the layers are still timed and chosen)


@pytest.mark.parametrize("backend", ["eager", "onnxruntime"])
def test_a_stack_probe_runs_on_the_backend_and_keeps_its_gather(backend, tmp_path):
    """The probe gives the stack's product and, exported, still gathers per row (its ids are an
    input: nothing folds the gather into a constant the real model does not have)."""
    from fxlrd.experts import _StackProbe

    torch.manual_seed(0)
    ids = torch.arange(6) % 3
    x = torch.randn(6, 8)
    for rank, x_left, transposed in [(None, True, False), (4, True, True), (4, False, False), (None, False, True)]:
        probe = _StackProbe(3, 8 if x_left != transposed else 5, 5 if x_left != transposed else 8, rank, x_left,
                            transposed, torch.float32)  # fmt: skip
        weight = probe.mats[0] if rank is None else probe.mats[0] @ probe.mats[1]
        weight = weight.mT if transposed else weight
        want = torch.bmm(x.unsqueeze(1), weight[ids]).squeeze(1) if x_left else torch.bmm(weight[ids], x.unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(probe(x, ids), want)
    offs = _StackProbe.index(6, 3, grouped=True)
    assert offs.tolist() == [2, 4, 6]
    for rank, transposed in [(None, False), (4, True)]:  # (grouped_mm: rows of 16 bytes)
        grouped = _StackProbe(3, 8 if not transposed else 12, 12 if not transposed else 8, rank, True, transposed,
                              torch.float32, grouped=True)  # fmt: skip
        weight = grouped.mats[0] if rank is None else grouped.mats[0] @ grouped.mats[1]
        weight = weight.mT if transposed else weight
        want = torch.cat([x[2 * e:2 * e + 2] @ weight[e] for e in range(3)])
        torch.testing.assert_close(grouped(x, offs), want)
    if backend == "onnxruntime":
        pytest.importorskip("onnxruntime")
        path = tmp_path / "probe.onnx"
        torch.onnx.export(probe, (x, ids), str(path), dynamo=False)
        import onnx

        assert "Gather" in {node.op_type for node in onnx.load(str(path)).graph.node}
    from fxlrd.latency import LatencyConfig, make_timer

    timer = make_timer(LatencyConfig(backend=backend, repeats=1, warmup=0, cache=False, progress=False))
    assert timer.time_inputs(probe, (x, ids)) > 0
