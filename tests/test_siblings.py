"""Fusing sibling linears (`fxlrd.siblings`, ``LRDConfig(siblings="fuse")``): which layers are
grouped, the fused graph computes what the members did, the shared input factor, and the API
around it (plans, save/load, include/exclude, refusals)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import rel_err, tiny_bert
from torch import nn

import fxlrd
from fxlrd import ConfigError, LRDConfig
from fxlrd.capture import capture
from fxlrd.errors import PlanMismatchError
from fxlrd.siblings import find_siblings, fuse_siblings


class Attention(nn.Module):
    """q, k, v read ``x``; ``o`` reads their result; ``w`` reads ``x`` too, but has no bias;
    ``u`` reads ``x`` and is called twice."""

    def __init__(self, d=12, bias_w=False, shared_u=True):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.w = nn.Linear(d, 2 * d, bias=bias_w)
        self.u = nn.Linear(d, d) if shared_u else None

    def forward(self, x):
        a = torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2), -1) @ self.v(x)
        out = self.o(a) + self.w(x)[..., : x.shape[-1]]
        if self.u is not None:
            out = out + self.u(x) + self.u(out)
        return out


class QKV(nn.Module):
    """Three siblings only, their outputs combined (``"cat"``) or mixed by ``o``."""

    def __init__(self, d=12, combine="mix"):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.combine = combine

    def forward(self, x):
        if self.combine == "cat":
            return torch.cat([self.q(x), self.k(x), self.v(x)], -1)
        return self.o(self.q(x) * self.k(x) + self.v(x))


def _x(seed=0, n=4, t=5, d=12):
    return torch.randn(n, t, d, generator=torch.Generator().manual_seed(seed))


def _full(ratio_rank=64):
    return LRDConfig(rank_rule="fixed", rank=ratio_rank, allow_larger=True, siblings="fuse", rank_quantum=1)


def test_groups_are_the_layers_called_once_on_one_input_with_the_same_bias():
    gm = capture(Attention(), inputs=((_x(),), {}), mode="fx", copy_model=True).gm
    (group,) = find_siblings(gm)
    assert group.members == ["q", "k", "v"] and group.name == "q_k_v" and group.sizes == [12, 12, 12]
    gm = capture(Attention(bias_w=True, shared_u=False), inputs=((_x(),), {}), mode="fx", copy_model=True).gm
    (group,) = find_siblings(gm)
    assert group.members == ["q", "k", "v", "w"] and group.sizes == [12, 12, 12, 24]


@pytest.mark.parametrize("mode", ["fx", "export"])
def test_fused_graph_computes_what_the_members_did(mode):
    model = Attention(bias_w=True, shared_u=False).eval()
    x = _x()
    gm = capture(model, inputs=((x,), {}), mode=mode, copy_model=True).gm
    params = sum(p.numel() for p in gm.parameters())
    fused = fuse_siblings(gm, find_siblings(gm))
    assert [g.name for g in fused] == ["q_k_v_w"]
    assert not any(n in dict(gm.named_modules()) for n in ("q", "k", "v", "w"))  # the members left the model
    assert sum(p.numel() for p in gm.parameters()) == params
    assert rel_err(gm(_x(1)), model(_x(1))) < 1e-6


def test_transform_at_full_rank_reproduces_the_model_and_leaves_it_unchanged():
    model = Attention().eval()
    before = copy.deepcopy(model.state_dict())
    gm = fxlrd.transform(model, _full(), example_inputs=_x())
    assert "q_k_v" in gm.fxlrd_plan.layers and "q" not in gm.fxlrd_plan.layers
    assert gm.fxlrd_plan.settings["fused"] == [{"name": "q_k_v", "members": ["q", "k", "v"], "sizes": [12, 12, 12]}]
    assert rel_err(gm(_x(2)), model(_x(2))) < 1e-5
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert "1 groups of sibling linears fused" in gm.fxlrd_plan.table()


def test_shared_input_factor_reproduces_siblings_of_one_input_subspace_exactly():
    """Siblings ``W_i = A_i B`` with one ``B`` (rank r): fused at rank r they are reproduced
    exactly, with fewer parameters than three separate rank-r factorizations."""
    torch.manual_seed(1)
    model = QKV(d=16).eval()
    b = torch.randn(4, 16)
    with torch.no_grad():
        for lin in (model.q, model.k, model.v):
            lin.weight.copy_(torch.randn(16, 4) @ b)
    x = _x(d=16)
    cfg = dict(rank_rule="fixed", rank=4, rank_quantum=1, exclude=["o"])
    fused = fxlrd.transform(model, LRDConfig(**cfg, siblings="fuse"), example_inputs=x)
    separate = fxlrd.transform(model, LRDConfig(**cfg), example_inputs=x)
    assert rel_err(fused(_x(3, d=16)), model(_x(3, d=16))) < 1e-5
    assert fxlrd.count_params(fused) < fxlrd.count_params(separate)
    assert fused.fxlrd_plan.layers["q_k_v"].ranks == (4,)


def test_whitened_shared_factor_has_less_output_error_when_the_siblings_share_the_input_directions():
    """Inputs with a decaying spectrum (as trained models' are): at equal parameters the
    shared factor keeps the input's main directions for all three, and errs less."""
    torch.manual_seed(2)
    d = 24
    model = QKV(d=d, combine="cat").eval()
    mix = torch.randn(d, d) * torch.logspace(0, -2, d)
    cal = [torch.randn(64, d, generator=torch.Generator().manual_seed(i)) @ mix.T for i in range(6)]
    held = torch.randn(256, d, generator=torch.Generator().manual_seed(99)) @ mix.T
    errors = {}
    for siblings in ("separate", "fuse"):
        cfg = LRDConfig(ratio=2, rank_quantum=1, sensitivity=False, siblings=siblings)
        gm = fxlrd.transform(model, cfg, example_inputs=cal[0], calibration=cal)
        params = sum(lp.params_after for lp in gm.fxlrd_plan.decomposed)
        errors[siblings] = (float((gm(held) - model(held)).pow(2).sum() / model(held).pow(2).sum()), params)
    assert errors["fuse"][1] <= errors["separate"][1]
    assert errors["fuse"][0] < 0.7 * errors["separate"][0]


def test_members_left_out_by_the_user_or_the_model_are_not_fused():
    x = _x()
    gm = fxlrd.transform(Attention().eval(), LRDConfig(siblings="fuse", exclude=["k"], rank_quantum=1), example_inputs=x)
    assert [f["members"] for f in gm.fxlrd_plan.settings["fused"]] == [["q", "v"]]  # the others still read one input
    assert gm.fxlrd_plan.layers["k"].method == "keep"
    gm = fxlrd.transform(Attention().eval(), LRDConfig(siblings="fuse", exclude=["k", "v"], rank_quantum=1), example_inputs=x)
    assert not gm.fxlrd_plan.settings.get("fused") and "q" in gm.fxlrd_plan.layers
    gm = fxlrd.transform(Attention().eval(), LRDConfig(siblings="fuse", include=["q", "k", "v"], rank_quantum=1),
                         example_inputs=x)  # fmt: skip
    assert gm.fxlrd_plan.layers["q_k_v"].method == "svd"  # the fused layer is selected with its members
    gm = fxlrd.transform(Attention().eval(), LRDConfig(siblings="fuse", filter_fn=lambda m, n: n != "o", rank_quantum=1),
                         example_inputs=x)  # fmt: skip
    assert gm.fxlrd_plan.layers["q_k_v"].method == "svd" and gm.fxlrd_plan.layers["o"].method == "keep"


def test_tied_members_are_not_fused():
    model = Attention(shared_u=False).eval()
    model.k.weight = model.q.weight  # tied: q and k share a weight
    gm = capture(model, inputs=((_x(),), {}), mode="fx", copy_model=True).gm
    assert all("k" not in g.members and "q" not in g.members for g in find_siblings(gm))


def test_bert_export_capture_save_load_and_plan_replay(tmp_path):
    model = tiny_bert(layers=2)
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 100, (4, 9), generator=g), "attention_mask": torch.ones(4, 9, dtype=torch.long)}
               for _ in range(4)]  # fmt: skip
    batches[0]["attention_mask"][1, 6:] = 0
    x = batches[0]
    cfg = LRDConfig(ratio=1.5, allocation="global", sequential=True, siblings="fuse")
    gm = fxlrd.transform(model, cfg, example_inputs=x, calibration=batches)
    fused = gm.fxlrd_plan.settings["fused"]
    assert [f["name"] for f in fused] == [f"encoder.layer.{i}.attention.self.query_key_value" for i in range(2)]
    out = gm(**x).last_hidden_state
    fxlrd.save(gm, tmp_path / "s")
    loaded = fxlrd.load(tiny_bert(layers=2, seed=5), tmp_path / "s")
    assert torch.equal(loaded(**x).last_hidden_state, out)
    again = fxlrd.apply(model, fxlrd.Plan.from_json(gm.fxlrd_plan.to_json()), example_inputs=x, calibration=batches)
    assert rel_err(again(**x).last_hidden_state, out) < 1e-5


def test_a_plan_fusing_layers_the_model_lacks_is_refused():
    model = Attention().eval()
    gm = fxlrd.transform(model, LRDConfig(siblings="fuse", rank_quantum=1), example_inputs=_x())
    plan = copy.deepcopy(gm.fxlrd_plan)
    plan.settings["fused"][0]["members"] = ["q", "k", "nope"]
    with pytest.raises(PlanMismatchError, match="'nope' is not a linear layer"):
        fxlrd.apply(model, plan, example_inputs=_x())
    plan.settings["fused"][0]["members"], plan.settings["fused"][0]["sizes"] = ["q", "k", "v"], [12, 12, 13]
    with pytest.raises(PlanMismatchError, match="do not read one input"):
        fxlrd.apply(model, plan, example_inputs=_x())


def test_bad_settings_are_refused():
    with pytest.raises(ConfigError, match="siblings must be .separate., .fuse."):
        LRDConfig(siblings="shared")
    with pytest.raises(ConfigError, match="inplace=True cannot be combined with siblings='fuse'"):
        fxlrd.transform(Attention().eval(), LRDConfig(siblings="fuse"), example_inputs=_x(), inplace=True)


class Heads(nn.Module):
    """Siblings whose outputs are viewed and changed in place, and a pair of siblings with the
    input changed in place between them (``mutate``)."""

    def __init__(self, mutate=False):
        super().__init__()
        self.a, self.b, self.c, self.d = (nn.Linear(8, 8) for _ in range(4))
        self.relu, self.mutate = nn.ReLU(inplace=True), mutate

    def forward(self, x):
        n = x.shape[0]
        out = self.relu(self.a(x)).view(n, -1) + self.b(x).view(n, -1)
        h = x * 2
        c = self.c(h)
        if self.mutate == "view":
            h[:, :, :4].relu_()
        elif self.mutate:
            h.relu_()
        return out + (c + self.d(h)).view(n, -1)


@pytest.mark.parametrize("mode", ["fx", "export"])
def test_members_outputs_stay_tensors_of_their_own(mode):
    """A member's output viewed across dimensions, or changed in place under autograd, works as
    before fusion (the split parts are strided views of one storage)."""
    model, x = Heads().eval(), _x(d=8)
    gm = fxlrd.transform(model, LRDConfig(rank_rule="fixed", rank=8, allow_larger=True, siblings="fuse"),
                         example_inputs=x, capture=mode)  # fmt: skip
    assert len(gm.fxlrd_plan.settings["fused"]) == 2
    out = gm(_x(1, d=8))
    out.sum().backward()
    assert rel_err(out, model(_x(1, d=8))) < 1e-5


@pytest.mark.parametrize("mutate", [True, "view"])
def test_siblings_whose_input_changes_in_place_between_them_are_not_fused(mutate):
    model = Heads(mutate=mutate).eval()
    gm = fxlrd.transform(model, LRDConfig(rank_rule="fixed", rank=8, allow_larger=True, siblings="fuse"),
                         example_inputs=_x(d=8), capture="fx")  # fmt: skip
    assert [f["members"] for f in gm.fxlrd_plan.settings["fused"]] == [["a", "b"]]
    assert rel_err(gm(_x(1, d=8)), model(_x(1, d=8))) < 1e-5


def test_siblings_of_different_parent_modules_are_not_fused():
    """(A T5 decoder's cross-attention keys and values of every layer read the encoder output.)"""

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.one, self.two = QKV(), QKV()

        def forward(self, x):
            return self.one(x) + self.two(x)

    gm = fxlrd.transform(Two().eval(), LRDConfig(siblings="fuse", rank_quantum=1), example_inputs=_x())
    assert [f["name"] for f in gm.fxlrd_plan.settings["fused"]] == ["one.q_k_v", "two.q_k_v"]


def test_a_plan_fusing_members_that_changed_is_refused():
    model = Attention(shared_u=False).eval()
    model.q.bias = None
    model.k.bias = model.v.bias = None
    gm = fxlrd.transform(model, LRDConfig(siblings="fuse", rank_quantum=1), example_inputs=_x())
    assert gm.fxlrd_plan.settings["fused"][0]["members"] == ["q", "k", "v", "w"]  # w has no bias either
    with pytest.raises(PlanMismatchError, match="all with a bias or none"):
        fxlrd.apply(Attention(shared_u=False).eval(), gm.fxlrd_plan, example_inputs=_x())


def test_patterns_choose_the_members():
    x = _x()
    gm = fxlrd.transform(Attention(shared_u=False).eval(), LRDConfig(siblings=["q", "k"], rank_quantum=1), example_inputs=x)
    assert [f["members"] for f in gm.fxlrd_plan.settings["fused"]] == [["q", "k"]]
    assert gm.fxlrd_plan.layers["v"].method == "svd"  # decomposed on its own
    with pytest.raises(ConfigError, match="glob patterns of the layers to fuse"):
        LRDConfig(siblings="fused")
    with pytest.raises(ConfigError, match="glob patterns of the layers to fuse"):
        LRDConfig(siblings=[])


def test_feature_distillation_matches_a_fused_layer_to_its_members_concatenated():
    model = QKV().eval()
    gm = fxlrd.transform(model, LRDConfig(siblings="fuse", exclude=["o"], rank_rule="fixed", rank=4, rank_quantum=1),
                         example_inputs=_x())  # fmt: skip
    ((student, teachers, name),) = fxlrd.recover._feature_pairs(gm, model)
    assert name == "q_k_v" and teachers == [model.q, model.k, model.v]
    x = _x(1)
    with torch.no_grad():
        s_out = gm.get_submodule("q_k_v")[-1](gm.get_submodule("q_k_v")[0](x))
        t_out = torch.cat([model.q(x), model.k(x), model.v(x)], -1)
    expected = float(torch.nn.functional.mse_loss(s_out, t_out) / t_out.pow(2).mean())
    assert expected > 1e-3  # rank 4 of 12: the feature term is not zero
    curve = fxlrd.recover.distill(gm, model, [x], steps=1, lr=1e-9, features=True, loss=lambda s, t, i: (s * 0).sum(),
                                  progress=False)  # fmt: skip
    assert curve[0] == pytest.approx(expected, rel=1e-4)




@pytest.mark.parametrize("mode", ["fx", "export"])
def test_multihead_cross_attention_keys_and_values_are_siblings(mode):
    """``nn.MultiheadAttention(h, mem, mem)``: the swapped module's key and value projections read
    one node under either capture (fx used to see two copies of ``mem``)."""

    class Cross(nn.Module):
        def __init__(self):
            super().__init__()
            self.self_attn = nn.MultiheadAttention(16, 2, batch_first=True)
            self.cross = nn.MultiheadAttention(16, 2, batch_first=True)

        def forward(self, x, mem):
            h = self.self_attn(x, x, x, need_weights=False)[0]
            return self.cross(h, mem, mem, need_weights=False)[0]

    torch.manual_seed(0)
    model, inputs = Cross().eval(), (torch.randn(2, 5, 16), torch.randn(2, 7, 16))
    gm = fxlrd.transform(model, LRDConfig(rank_rule="fixed", rank=32, allow_larger=True, siblings="fuse"),
                         example_inputs=inputs, capture=mode)  # fmt: skip
    assert [f["members"] for f in gm.fxlrd_plan.settings["fused"]] == [["cross.k_proj", "cross.v_proj"]]
    other = (torch.randn(3, 4, 16), torch.randn(3, 9, 16))
    assert rel_err(gm(*other), model(*other)) < 1e-5
