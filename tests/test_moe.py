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
ROUTER_NOTE = "router (its output picks experts by topk)"


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
        self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x):
        h = self.b(torch.relu(self.a(x)))
        return h + torch.zeros_like(h).scatter(-1, h.topk(3, dim=-1).indices, 1.0)


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_only_the_layer_whose_output_reaches_topk_routes_not_one_further_up(capture):
    model, x = _LayerBeforeTopk().eval(), torch.randn(2, 16)
    gm = capture_graph(model, x, mode=capture).gm
    sites = find_sites(gm)
    assert routes(sites["b"]) == "topk" and routes(sites["a"]) == ""  # a's output reaches topk only through b
    plan = fxlrd.plan(model, LRDConfig(ratio=2, rank_quantum=1), example_inputs=x, capture=capture)
    assert [lp.name for lp in plan.decomposed] == ["a"]


def test_routes_stops_at_its_depth():
    class Far(nn.Module):
        def __init__(self, steps):
            super().__init__()
            self.fc, self.steps = nn.Linear(8, 8), steps

        def forward(self, x):
            h = self.fc(x)
            for _ in range(self.steps):
                h = torch.tanh(h)
            return h.topk(2, dim=-1).values

    for steps, expected in [(0, "topk"), (5, "topk"), (6, "")]:
        gm = capture_graph(Far(steps).eval(), torch.randn(2, 8), mode="fx").gm
        assert routes(find_sites(gm)["fc"]) == expected, steps


class _StackedExperts(nn.Module):
    """Experts stored as one 3-D weight and computed by an indexed bmm, as transformers' MoEs
    hold theirs; beside them a Conv1d (3-D too, but a layer) and a Linear."""

    def __init__(self, e=4, d=8, hidden=12):
        super().__init__()
        self.up = nn.Parameter(torch.randn(e, hidden, d) / 3)
        self.conv = nn.Conv1d(d, d, 3, padding=1)
        self.fc = nn.Linear(hidden, d)

    def forward(self, x, idx):  # x: (tokens, d), idx: (tokens,) the expert of each token
        h = torch.bmm(self.up[idx], x.unsqueeze(-1)).squeeze(-1)
        return self.fc(F.gelu(h)) + self.conv(x.T.unsqueeze(0))[0].T


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_stacked_expert_weights_are_named_in_a_warning_and_the_capture_notes(capture):
    model, inputs = _StackedExperts().eval(), (torch.randn(6, 8), torch.tensor([0, 1, 2, 3, 1, 0]))
    with pytest.warns(fxlrd.FxlrdWarning, match=r"1 stacked 3-D weight \(one matrix per expert, as a mixture of experts "
                                                 r"holds them: up \(4×12×8\)\) hold 384 parameters, \d+% of the model"):
        gm = fxlrd.transform(model, LRDConfig(ratio=2, rank_quantum=1), example_inputs=inputs, capture=capture)
    assert any("stacked 3-D weight" in note for note in gm.fxlrd_capture["notes"])
    assert stacked_weights(model, gm) == [("up", (4, 12, 8))]  # the Conv1d's 3-D weight is a layer, not listed
    assert {lp.name for lp in gm.fxlrd_plan.decomposed} >= {"fc"}


def test_no_stacked_weight_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxlrd.FxlrdWarning)
        fxlrd.transform(ToyMoE().eval(), LRDConfig(ratio=2), example_inputs=torch.randn(2, 5, 16), capture="fx")


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
def test_a_transformers_mixtral_keeps_its_routers_and_names_its_experts():
    model, x = _mixtral("batched_mm")
    with pytest.warns(fxlrd.FxlrdWarning, match=r"4 stacked 3-D weights .*layers\.0\.mlp\.experts\.gate_up_proj \(4×128×32\)"):
        gm = fxlrd.transform(model, LRDConfig(ratio=2, rank_quantum=1), example_inputs=x)
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
    except fxlrd.CaptureError as exc:  # (a torch whose fake kernel takes float32 captures it)
        assert "runs on example_inputs, but not on the fake tensors" in str(exc)
        assert 'experts_implementation="batched_mm"' in str(exc)
