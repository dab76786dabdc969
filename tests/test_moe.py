"""Mixtures of experts: routers are kept, stacked expert weights are named, the rest decomposes."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxlrd
from fxlrd import LRDConfig
from fxlrd.capture import capture as capture_graph
from fxlrd.sites import find_sites, routes, stacked_weights

from conftest import rel_err

FULL = LRDConfig(rank_rule="fixed", rank=10**6, allow_larger=True)
ROUTER_NOTE = "router (topk of its output picks what runs next: experts, queries, tokens)"


class ToyMoE(nn.Module):
    """A router picking ``k`` of ``e`` experts per token (softmax, or DeepSeek's sigmoid plus a
    bias, then top-k), the experts computed densely and weighted by the picked scores."""

    def __init__(self, d=16, e=4, k=2, hidden=32, scoring="softmax"):
        super().__init__()
        self.k, self.scoring = k, scoring
        self.gate = nn.Linear(d, e, bias=False)
        self.score_bias = nn.Parameter(torch.zeros(e))
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d)) for _ in range(e))
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        logits = self.gate(x)
        if self.scoring == "softmax":
            scores = logits.float().softmax(-1)
            top, idx = torch.topk(scores, self.k, dim=-1)
        else:
            scores = torch.sigmoid(logits)
            _, idx = (scores + self.score_bias).topk(self.k, dim=-1)  # the bias only steers the choice
            top = scores.gather(-1, idx)
        weights = torch.zeros_like(scores).scatter(-1, idx, top / top.sum(-1, keepdim=True))
        out = sum(weights[..., i : i + 1] * expert(x) for i, expert in enumerate(self.experts))
        return self.proj(out)


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_a_router_is_kept_and_named_and_the_experts_are_decomposed(capture, scoring):
    torch.manual_seed(0)
    model, x = ToyMoE(scoring=scoring).eval(), torch.randn(2, 5, 16)
    gm = fxlrd.transform(model, LRDConfig(ratio=2, rank_quantum=1), example_inputs=x, capture=capture)
    rows = gm.fxlrd_plan.layers
    assert rows["gate"].method == "keep" and rows["gate"].reason.startswith(ROUTER_NOTE)
    assert {lp.name for lp in gm.fxlrd_plan.decomposed} == {n for n in rows if n != "gate"}
    assert ROUTER_NOTE in gm.fxlrd_plan.table()
    assert torch.equal(gm.gate.weight, model.gate.weight)  # untouched: the same experts run for every token
    full = fxlrd.transform(model, FULL, example_inputs=x, capture=capture)
    assert rel_err(full(x), model(x)) < 1e-5


class _LayerBeforeTopk(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(16, 8), nn.Linear(8, 4)

    def forward(self, x):
        h = self.b(torch.relu(self.a(x)))
        return h * torch.zeros_like(h).scatter(-1, h.topk(2, dim=-1).indices, 1.0)


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_only_the_layer_whose_output_topk_ranks_routes_not_one_further_up(capture):
    model, x = _LayerBeforeTopk().eval(), torch.randn(2, 16)
    gm = capture_graph(model, x, mode=capture).gm
    sites = find_sites(gm)
    assert routes(gm, sites["b"]) == "topk" and routes(gm, sites["a"]) == ""  # a's output reaches topk only through b
    plan = fxlrd.plan(model, LRDConfig(ratio=2, rank_quantum=1), example_inputs=x, capture=capture)
    assert [lp.name for lp in plan.decomposed] == ["a"]
    plan = fxlrd.plan(model, LRDConfig(ratio=2, rank_quantum=1, include=["*"]), example_inputs=x, capture=capture)
    assert [lp.name for lp in plan.decomposed] == ["a"] and "include=['*', 'b']" in plan.layers["b"].reason
    plan = fxlrd.plan(model, LRDConfig(ratio=2, rank_quantum=1, include=["*", "b"]), example_inputs=x, capture=capture)
    assert [lp.name for lp in plan.decomposed] == ["a", "b"]  # named exactly in include: decomposed all the same


def test_routes_stops_at_its_depth():
    class Far(nn.Module):
        def __init__(self, steps):
            super().__init__()
            self.fc, self.steps = nn.Linear(8, 4), steps

        def forward(self, x):
            h = self.fc(x)
            for _ in range(self.steps):
                h = torch.tanh(h)
            return h * torch.zeros_like(h).scatter(-1, h.topk(2, dim=-1).indices, 1.0)

    for steps, expected in [(0, "topk"), (5, "topk"), (6, "")]:
        gm = capture_graph(Far(steps).eval(), torch.randn(2, 8), mode="fx").gm
        assert routes(gm, find_sites(gm)["fc"]) == expected, steps


class _NotRouters(nn.Module):
    """Layers whose output meets a topk without routing: a head whose top-k the model only
    returns; a layer whose output only sets k (its size); a layer as wide as its input."""

    def __init__(self):
        super().__init__()
        self.head, self.sizer, self.wide = nn.Linear(16, 4), nn.Linear(16, 6), nn.Linear(16, 16)

    def forward(self, x):
        w = self.wide(x)
        picked = w * torch.zeros_like(w).scatter(-1, w.topk(2, dim=-1).indices, 1.0)
        k = self.sizer(x).shape[-1] // 2
        return self.head(x + picked).topk(2, dim=-1), x.topk(k, dim=-1).values


class _SoftmaxModule(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate, self.softmax, self.out = nn.Linear(16, 4, bias=False), nn.Softmax(dim=-1), nn.Linear(16, 16)

    def forward(self, x):
        probs = self.softmax(self.gate(x))
        top, idx = probs.topk(2, dim=-1)
        return self.out(x) * torch.zeros_like(probs).scatter(-1, idx, top).sum(-1, keepdim=True)


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_heads_whose_topk_is_returned_and_wide_or_sizing_layers_are_no_routers(capture):
    model, x = _NotRouters().eval(), torch.randn(3, 16)
    gm = capture_graph(model, x, mode=capture).gm
    found = {name: routes(gm, site) for name, site in find_sites(gm).items()}
    assert set(found.values()) == {""} and {"head", "wide"} <= set(found)
    assert "sizer" in found or capture == "export"  # (export drops a layer whose value only its size is read of)


class _NormedKeywordRouter(nn.Module):
    """Routers written other ways: a LayerNorm module between the router and its topk, topk
    called with keywords, and a selection head ranked by its maximum (``.values``) whose picks
    gather the queries, as RT-DETR's encoder head."""

    def __init__(self):
        super().__init__()
        self.gate, self.norm = nn.Linear(16, 4), nn.LayerNorm(4)
        self.keyword, self.score = nn.Linear(16, 4), nn.Linear(16, 3)

    def forward(self, x):  # x: (batch, tokens, 16)
        _, a = self.norm(self.gate(x)).topk(2, dim=-1)
        _, b = torch.topk(input=self.keyword(x).softmax(-1), k=2, dim=-1)
        picks = torch.topk(self.score(x).max(-1).values, 2, dim=1).indices
        chosen = x.gather(1, picks[..., None].expand(-1, -1, 16))
        return chosen.sum() + a.sum() + b.sum()


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_routers_are_found_the_same_in_both_captures(capture):
    model, x = _SoftmaxModule().eval(), torch.randn(3, 16)
    gm = capture_graph(model, x, mode=capture).gm
    sites = find_sites(gm)
    assert routes(gm, sites["gate"]) == "topk" and routes(gm, sites["out"]) == ""
    model, x = _NormedKeywordRouter().eval(), torch.randn(2, 5, 16)
    gm = capture_graph(model, x, mode=capture).gm
    assert {name: routes(gm, site) for name, site in find_sites(gm).items()} == {
        "gate": "topk", "keyword": "topk", "score": "topk"}  # fmt: skip


class _SizedTopk(nn.Module):
    """A layer whose output only sets k, of a topk whose picks are used inside: no router."""

    def __init__(self):
        super().__init__()
        self.sizer, self.fc = nn.Linear(16, 6), nn.Linear(16, 16)

    def forward(self, x):
        k = self.sizer(x).shape[-1] // 2
        h = self.fc(x)
        return h * torch.zeros_like(x).scatter(-1, x.topk(k, dim=-1).indices, 1.0)


def test_a_layer_that_only_sets_k_is_no_router():
    model, x = _SizedTopk().eval(), torch.randn(3, 16)
    gm = capture_graph(model, x, mode="fx").gm
    assert routes(gm, find_sites(gm)["sizer"]) == ""


class _StackedExperts(nn.Module):
    """Experts stored as one 3-D weight and computed by an indexed bmm, as transformers' MoEs
    hold theirs (``read="bmm"``, which `fxlrd.experts` factorizes), or by an einsum, which it
    does not; beside them a Conv1d (3-D too, but a layer) and a Linear."""

    def __init__(self, e=4, d=8, hidden=12, read="einsum"):
        super().__init__()
        self.read = read
        self.up = nn.Parameter(torch.randn(e, hidden, d) / 3)
        self.conv = nn.Conv1d(d, d, 3, padding=1)
        self.fc = nn.Linear(hidden, d)

    def forward(self, x, idx):  # x: (tokens, d), idx: (tokens,) the expert of each token
        if self.read == "bmm":
            h = torch.bmm(self.up[idx], x.unsqueeze(-1)).squeeze(-1)
        else:
            h = torch.einsum("thd,td->th", self.up[idx], x)
        return self.fc(F.gelu(h)) + self.conv(x.T.unsqueeze(0))[0].T


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_stacked_expert_weights_are_named_in_a_warning_and_the_capture_notes(capture):
    model, inputs = _StackedExperts().eval(), (torch.randn(6, 8), torch.tensor([0, 1, 2, 3, 1, 0]))
    with pytest.warns(fxlrd.FxlrdWarning, match=r"1 stacked 3-D weight \(matrices stacked in one tensor, as a mixture "
                                                 r"of experts holds its experts: up \(4×12×8\)\) holds 384 parameters, \d+% of the model, "
                                                 r"read in a way fxlrd cannot factorize \(up: P\[ids\] used by "):
        gm = fxlrd.transform(model, LRDConfig(ratio=2, rank_quantum=1), example_inputs=inputs, capture=capture)
    assert any("stacked 3-D weight" in note for note in gm.fxlrd_capture["notes"])
    assert stacked_weights(model, gm) == [("up", (4, 12, 8))]  # the Conv1d's 3-D weight is a layer, not listed
    assert {lp.name for lp in gm.fxlrd_plan.decomposed} >= {"fc"}
    assert gm.fxlrd_plan.settings["stacked_experts"][0]["rank"] is None and torch.equal(gm.up, model.up)


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_stacked_expert_weights_read_by_an_indexed_bmm_are_factorized_without_a_warning(capture):
    model, inputs = _StackedExperts(read="bmm").eval(), (torch.randn(6, 8), torch.tensor([0, 1, 2, 3, 1, 0]))
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxlrd.FxlrdWarning)
        gm = fxlrd.transform(model, LRDConfig(ratio=2, rank_quantum=1), example_inputs=inputs, capture=capture)
    assert not any("stacked 3-D weight" in note for note in gm.fxlrd_capture["notes"])
    assert [(r["weight"], r["rank"]) for r in gm.fxlrd_plan.settings["stacked_experts"]] == [("up", 2)]  # 96 / 40
    assert isinstance(gm.get_submodule("up"), fxlrd.experts.ExpertFactors)


class _TransposedExperts(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 8, 8))

    def forward(self, x, idx):  # one expert per token, its matrix stored (in, out): x @ Wᵀ via .mT
        return torch.bmm(x.unsqueeze(1), self.w[idx].mT).squeeze(1)


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_stacked_weights_read_through_an_attribute_transpose_are_named(capture):
    model, inputs = _TransposedExperts().eval(), (torch.randn(6, 8), torch.tensor([0, 1, 2, 3, 1, 0]))
    gm = capture_graph(model, inputs, mode=capture).gm
    assert stacked_weights(model, gm) == [("w", (4, 8, 8))]


def test_the_stacked_weight_warning_points_at_the_callers_line():
    model, inputs = _StackedExperts().eval(), (torch.randn(6, 8), torch.tensor([0, 1, 2, 3, 1, 0]))
    for call in (lambda: fxlrd.transform(model, LRDConfig(ratio=2, rank_quantum=1), example_inputs=inputs),
                 lambda: fxlrd.plan(model, LRDConfig(ratio=2, rank_quantum=1), example_inputs=inputs, capture="export")):
        with pytest.warns(fxlrd.FxlrdWarning, match="stacked 3-D weight") as caught:
            call()
        assert {w.filename for w in caught if "stacked" in str(w.message)} == {__file__}


@pytest.mark.parametrize("read, warning", [("einsum", "stacked 3-D weight"), ("bmm", "inplace=True keeps the 1 stacked")])
def test_a_model_with_stacked_weights_is_still_transformed_in_place(read, warning):
    model, inputs = _StackedExperts(read=read).eval(), (torch.randn(6, 8), torch.tensor([0, 1, 2, 3, 1, 0]))
    with pytest.warns(fxlrd.FxlrdWarning, match=warning):
        gm = fxlrd.transform(model, LRDConfig(ratio=2, rank_quantum=1), example_inputs=inputs, capture="fx", inplace=True)
    assert isinstance(model.fc, fxlrd.Factorized) and gm.fxlrd_plan.decomposed
    assert isinstance(model.up, nn.Parameter) and gm.fxlrd_plan.settings["stacked_experts"][0]["rank"] is None


class _ThreeDButNotExperts(nn.Module):
    """3-D parameters that are no stacked weights: a ViT's class token and position
    embeddings (added), one only read for its shape, one with a dimension of 1; and a
    Conv1d whose weight an einsum reads (an unseen layer, named as such, not as experts)."""

    def __init__(self):
        super().__init__()
        self.cls, self.pos = nn.Parameter(torch.zeros(1, 1, 8)), nn.Parameter(torch.zeros(1, 5, 8))
        self.sized, self.thin = nn.Parameter(torch.zeros(4, 8, 8)), nn.Parameter(torch.randn(4, 1, 8))
        self.conv, self.fc = nn.Conv1d(8, 8, 1), nn.Linear(8, 8)

    def forward(self, x):  # x: (batch, 4, 8)
        h = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        h = h * self.sized.shape[0] + torch.einsum("oik,bti->bto", self.conv.weight, h)
        return self.fc(h) + torch.bmm(self.thin, h[:4, :1].transpose(1, 2)).sum()


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_three_dimensional_parameters_that_are_no_experts_are_not_named(capture):
    model, x = _ThreeDButNotExperts().eval(), torch.randn(4, 4, 8)
    gm = capture_graph(model, x, mode=capture).gm
    assert stacked_weights(model, gm) == []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fxlrd.transform(model, LRDConfig(ratio=2), example_inputs=x, capture=capture)
    assert not [w for w in caught if "stacked" in str(w.message)]
    assert [w for w in caught if "conv.weight (read by" in str(w.message)]


transformers = pytest.importorskip("transformers")


def _mixtral(implementation):
    cfg = transformers.MixtralConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.MixtralModel._from_config(cfg, experts_implementation=implementation).eval()
    ids = torch.randint(3, 100, (2, 9))
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@pytest.mark.slow
def test_a_transformers_mixtral_keeps_its_routers_and_factorizes_its_experts():
    model, x = _mixtral("batched_mm")
    gm = fxlrd.transform(model, LRDConfig(ratio=2, rank_quantum=1), example_inputs=x)
    stacked = gm.fxlrd_plan.settings["stacked_experts"]
    assert [r["weight"] for r in stacked if r["rank"]] == [f"layers.{i}.mlp.experts.{p}" for i in (0, 1)
                                                           for p in ("gate_up_proj", "down_proj")]  # fmt: skip
    rows = gm.fxlrd_plan.layers
    routers = [n for n in rows if n.endswith("mlp.gate")]
    assert len(routers) == 2 and all(rows[n].reason.startswith(ROUTER_NOTE) for n in routers)
    assert {lp.name for lp in gm.fxlrd_plan.decomposed} == {n for n in rows if "self_attn" in n}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxlrd.FxlrdWarning)
        full = fxlrd.transform(model, FULL, example_inputs=x)
    with torch.no_grad():
        ref = model(**x).last_hidden_state
        assert rel_err(full(**x).last_hidden_state, ref) < 1e-4
        assert gm(**x).last_hidden_state.shape == ref.shape


def test_a_mixtral_looping_over_its_experts_gets_the_implementation_export_can_capture():
    model, x = _mixtral("eager")
    with pytest.raises(fxlrd.CaptureError, match='experts_implementation="batched_mm"'):
        fxlrd.plan(model, LRDConfig(ratio=2), example_inputs=x)


def test_a_mixtral_on_grouped_mm_gets_the_implementation_export_can_trace():
    """transformers' default grouped_mm experts run in float32 on this CPU, but torch's fake
    kernel for grouped_mm takes bfloat16 only (torch 2.13), so export cannot trace them."""
    model, x = _mixtral("grouped_mm")
    with torch.no_grad():
        model(**x)  # it runs
    try:
        fxlrd.plan(model, LRDConfig(ratio=2), example_inputs=x)
    except fxlrd.CaptureError as exc:
        assert "runs on the inputs given, but not on the fake tensors" in str(exc)
        assert 'experts_implementation="batched_mm"' in str(exc) and "cast it to bfloat16" in str(exc)
    else:
        pytest.skip("this torch's fake kernel for grouped_mm takes float32: the model is captured")


def test_a_transformers_model_without_experts_gets_no_experts_hint():
    """transformers sets experts_implementation "eager" on every model without grouped_mm
    experts: a BERT that neither capture can take must not be told about experts."""

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = transformers.BertModel(transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1,
                                                                       num_attention_heads=4, intermediate_size=64))  # fmt: skip
            self.config = self.bert.config

        def forward(self, input_ids):
            h = self.bert(input_ids=input_ids).last_hidden_state
            return h if h.sum() > 0 else -h  # a Python branch on a value: neither capture takes it

    model = Branchy().eval()
    assert model.config._experts_implementation == "eager"
    with pytest.raises(fxlrd.CaptureError) as raised:
        fxlrd.plan(model, LRDConfig(ratio=2), example_inputs={"input_ids": torch.randint(3, 100, (2, 7))})
    assert "could not capture Branchy" in str(raised.value) and "experts" not in str(raised.value)


@pytest.mark.slow
def test_a_bfloat16_mixtral_on_grouped_mm_keeps_its_routers_and_factorizes_its_experts():
    """In bfloat16 torch's fake kernel takes grouped_mm, transformers' default: the experts are
    factorized there as under batched_mm (the same factors), each grouped product becoming two
    of the same groups, at ranks that are multiples of 8 (rows of 16 bytes); full rank
    reproduces the model, and calibration with padding makes them data-aware, the padding left
    out as under batched_mm (the rows were gathered from the tokens by ``perm // top_k``)."""
    model, x = _mixtral("grouped_mm")
    model = model.to(torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxlrd.FxlrdWarning)  # (no stack kept whole)
        gm = fxlrd.transform(model, LRDConfig(ratio=2, rank_quantum=1), example_inputs=x)
    rows = gm.fxlrd_plan.layers
    assert [n for n in rows if rows[n].reason.startswith(ROUTER_NOTE)] == ["layers.0.mlp.gate", "layers.1.mlp.gate"]
    recs = gm.fxlrd_plan.settings["stacked_experts"]
    assert [r["rank"] for r in recs] == [16] * 4  # (ratio 2's 12 and 10, rounded up)
    assert sum(n.target is torch.ops.aten._grouped_mm.default for n in gm.graph.nodes) == 8
    batched, _ = _mixtral("batched_mm")
    batched.load_state_dict(model.state_dict())
    batched = batched.to(torch.bfloat16)
    ref = fxlrd.transform(batched, LRDConfig(rank_rule="fixed", rank=16), example_inputs=x)
    for r in recs:
        assert torch.equal(gm.get_submodule(r["weight"]).left, ref.get_submodule(r["weight"]).left)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxlrd.FxlrdWarning)
        full = fxlrd.transform(model, FULL, example_inputs=x)
    with torch.no_grad():
        out, want = gm(**x).last_hidden_state, model(**x).last_hidden_state
        assert out.dtype == torch.bfloat16
        assert rel_err(full(**x).last_hidden_state.float(), want.float()) < 1e-2
    padded = dict(x, attention_mask=torch.ones_like(x["attention_mask"]))
    padded["attention_mask"][1, 6:] = 0
    config = LRDConfig(rank_rule="fixed", rank=16, sensitivity=False)
    aware = fxlrd.transform(model, config, example_inputs=x, calibration=[padded, x])
    recs = aware.fxlrd_plan.settings["stacked_experts"]
    assert all(r["data_aware"] and "padding" not in r.get("note", "") for r in recs)
    ref = fxlrd.transform(batched, config, example_inputs=x, calibration=[padded, x])
    with pytest.MonkeyPatch.context() as patch:  # (grouped rows not told apart: the padding counted)
        patch.setattr(fxlrd.experts, "_real_rows", lambda gathered, mask: None)
        counted = fxlrd.transform(model, config, example_inputs=x, calibration=[padded, x])
    for r in recs:  # (bfloat16 inputs, summed in another order: equal up to rounding)
        got, want, other = (m.get_submodule(r["weight"]).weight().float() for m in (aware, ref, counted))
        assert rel_err(got, want) < 2e-3 and rel_err(other, want) > 0.05
