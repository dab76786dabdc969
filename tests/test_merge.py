"""MergePass and recovery: exact merges are exact, approximate ones have the intended shape."""

import copy
import itertools

import pytest
import torch
from torch import fx, nn
from torch.fx.passes.infra.pass_manager import PassManager

import fxlrd
from fxlrd import LRDConfig, zoo
from fxlrd.passes import MergePass
from fxlrd.recover import merged_nodes, reestimate_norms, refit_merged

from conftest import rel_err


def _layers(gm):
    return sum(isinstance(gm.get_submodule(n.target), (nn.Conv2d, nn.Linear, nn.Conv1d))
               for n in gm.graph.nodes if n.op == "call_module")  # fmt: skip


def _randomize_bn(model):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5), m.bias.data.uniform_(-0.5, 0.5)
    return model


class Chain(nn.Module):
    def __init__(self, act: bool):
        super().__init__()
        self.a = nn.Conv2d(16, 64, 1)
        self.bn = nn.BatchNorm2d(64)
        self.act = nn.ReLU() if act else nn.Identity()
        self.b = nn.Conv2d(64, 48, 1, stride=2)
        self.c = nn.Conv2d(48, 8, 3, padding=1)

    def forward(self, x):
        return self.c(self.b(self.act(self.bn(self.a(x)))))


def _decomposed(act: bool):
    model = _randomize_bn(Chain(act)).eval()
    gm = fxlrd.transform(model, LRDConfig(include=["b"], rank_rule="fixed", rank=12, rank_quantum=1))
    return model, gm


def test_exact_merge_equals_the_unmerged_graph():
    model, gm = _decomposed(act=False)
    x = torch.randn(2, 16, 10, 10)
    with torch.no_grad():
        want = gm(x)
    n_before = _layers(gm)
    result = MergePass("exact")(gm)
    assert result.modified and _layers(result.graph_module) == n_before - 1
    merged = merged_nodes(result.graph_module)
    assert [n.meta["fxlrd"]["merged_from"] for n in merged] == [["a", "b.in_proj"]]
    assert result.graph_module.get_submodule("a").stride == (2, 2)  # strides of 1×1 convs compose
    with torch.no_grad():
        torch.testing.assert_close(result.graph_module(x), want, rtol=1e-5, atol=1e-5)


def test_exact_mode_does_not_cross_an_activation():
    _, gm = _decomposed(act=True)
    assert not MergePass("exact")(gm).modified


def test_factors_of_one_layer_are_not_merged_back():
    gm = fxlrd.transform(nn.Sequential(nn.Conv2d(32, 32, 1)).eval())
    assert not MergePass("approximate")(gm).modified


def test_approximate_merge_moves_norm_to_the_narrow_side():
    _, gm = _decomposed(act=True)
    result = PassManager(passes=[MergePass("approximate")])(gm)
    gm = result.graph_module
    a, bn = gm.get_submodule("a"), gm.get_submodule("bn")
    assert (a.in_channels, a.out_channels) == (16, 12) and bn.num_features == 12  # narrows: norm after
    order = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert order == ["a", "bn", "act", "b.out_proj", "c"]
    assert not MergePass("approximate")(gm).modified  # idempotent


@pytest.mark.slow
def test_resnet50_merged_gets_its_depth_back():
    model = zoo.resnet50().eval()
    original = _layers(fx.symbolic_trace(model))
    vanilla = _layers(fxlrd.transform(model, LRDConfig(ratio=2)))
    tucker_only = _layers(fxlrd.transform(model, LRDConfig(ratio=2, decompose_pointwise=False)))
    gm = fxlrd.transform(model, LRDConfig(ratio=2, merge="approximate"))
    # +1: the 7×7 stem becomes Tucker-1 (core, out_proj) with a max-pool after it, nothing to merge with.
    assert original == 54 and vanilla > 110 and tucker_only == 54 + 2 * 16 + 1
    assert _layers(gm) == original + 1
    assert _layers(fxlrd.transform(model, LRDConfig(ratio=2, merge="approximate", exclude=["conv1"]))) == original
    conv1, bn1, fact = (gm.get_submodule(f"layer1.1.{n}") for n in ("conv1", "bn1", "conv2"))
    r1 = fact.core.in_channels
    assert (conv1.in_channels, conv1.out_channels, bn1.num_features) == (256, r1, r1)
    assert [n for n, _ in fact.named_children()] == ["core"]
    conv3, bn2 = gm.get_submodule("layer1.1.conv3"), gm.get_submodule("layer1.1.bn2")
    assert conv3.in_channels == fact.core.out_channels == bn2.num_features
    assert fxlrd.count_params(gm) < 0.6 * fxlrd.count_params(model)  # fc and downsample stay whole
    with torch.no_grad():
        assert gm(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


def _bottleneck_model():
    torch.manual_seed(0)
    return _randomize_bn(nn.Sequential(
        nn.Conv2d(8, 32, 1), nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32),
        nn.ReLU(), nn.Conv2d(32, 16, 1),
    )).eval()  # fmt: skip


def test_bn_reestimation_sets_statistics_of_the_moved_norms():
    model = _bottleneck_model()
    cfg = LRDConfig(rank_rule="fixed", rank=8, merge="approximate")
    gm = fxlrd.transform(model, cfg)
    moved = [n.target for n in gm.graph.nodes if n.meta.get("fxlrd", {}).get("moved_norm")]
    assert sorted(moved) == ["1", "4"]
    bn = gm.get_submodule("1")
    assert torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))
    batches = [torch.randn(4, 8, 6, 6) for _ in range(3)]
    seen = []
    hook = bn.register_forward_hook(lambda m, i, o: seen.append(i[0].detach()))
    assert sorted(reestimate_norms(gm, batches)) == ["1", "4"]
    hook.remove()
    inputs = torch.cat(seen)
    torch.testing.assert_close(bn.running_mean, inputs.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    assert not gm.training and not bn.training


def test_refit_recovers_output_error():
    model = _bottleneck_model()
    reference = fxlrd.transform(model, LRDConfig(rank_rule="fixed", rank=8, decompose_pointwise=False))
    gm = fxlrd.transform(model, LRDConfig(rank_rule="fixed", rank=8, merge="approximate"))
    calib = [torch.randn(8, 8, 6, 6) for _ in range(4)]
    x = torch.randn(8, 8, 6, 6)
    with torch.no_grad():
        want = reference(x)
        naive = rel_err(gm(x), want)
        reestimate_norms(gm, calib)
        after_bn = rel_err(gm(x), want)
        report = refit_merged(gm, reference, calib)
        after_refit = rel_err(gm(x), want)
    assert set(report) == {"0", "6"}
    assert all(r["after"] <= r["before"] for r in report.values())
    assert after_refit < after_bn and after_refit < naive


@pytest.mark.parametrize("which", ["original", "pointwise decomposed"])
def test_refit_merged_refuses_a_reference_that_is_not_the_unmerged_model(which):
    """The natural wrong references (the original model; the same settings without merge, which
    then decompose the 1×1 convs too) are refused before anything changes, naming the fix."""
    model = _bottleneck_model()
    gm = fxlrd.transform(model, LRDConfig(rank_rule="fixed", rank=8, merge="approximate"))
    reference = model if which == "original" else fxlrd.transform(model, LRDConfig(rank_rule="fixed", rank=8))
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    with pytest.raises(fxlrd.ConfigError, match=r"no layer '\d.*as a module of its own.*merge=None, decompose_pointwise=False"):
        refit_merged(gm, reference, [torch.randn(4, 8, 6, 6)])
    assert all(torch.equal(before[k], v) for k, v in gm.state_dict().items())


def test_refit_merged_that_fails_part_way_leaves_the_model_as_it_was(monkeypatch):
    model = _bottleneck_model()
    reference = fxlrd.transform(model, LRDConfig(rank_rule="fixed", rank=8, decompose_pointwise=False))
    gm = fxlrd.transform(model, LRDConfig(rank_rule="fixed", rank=8, merge="approximate"))
    for layer in (gm.get_submodule(n.target) for n in merged_nodes(gm)):
        layer.bias = None  # (a refit adds a bias: the failed call must take it away again)
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    calls, forward = [0], reference.forward

    def failing(*args, **kwargs):  # the reference fails in the second layer's pass, after the first refit
        calls[0] += 1
        if calls[0] > 2:
            raise RuntimeError("out of memory")
        return forward(*args, **kwargs)

    monkeypatch.setattr(reference, "forward", failing)
    with pytest.raises(RuntimeError, match="out of memory"):
        refit_merged(gm, reference, [torch.randn(4, 8, 6, 6), torch.randn(4, 8, 6, 6)])
    after = gm.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    monkeypatch.undo()
    assert set(refit_merged(gm, reference, [torch.randn(4, 8, 6, 6)])) == {"0", "6"}  # (and the first did refit)
    assert gm.state_dict().keys() != before.keys()


def test_refit_merged_restores_both_models_modes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 8, 1)).eval()
    reference = fxlrd.transform(model, LRDConfig(rank_rule="fixed", rank=8))
    gm = fxlrd.transform(model, LRDConfig(rank_rule="fixed", rank=8, merge="approximate"))
    for m in (gm, reference):
        m.train()
        next(b for b in m.modules() if isinstance(b, nn.BatchNorm2d)).eval()  # a frozen norm in a training model
    modes = [{n: m.training for n, m in model_.named_modules()} for model_ in (gm, reference)]
    refit_merged(gm, reference, [torch.randn(4, 8, 6, 6) for _ in range(2)])
    assert [{n: m.training for n, m in model_.named_modules()} for model_ in (gm, reference)] == modes


def test_bad_mode():
    with pytest.raises(ValueError, match="merge mode"):
        MergePass("sometimes")


def test_inplace_merge_is_refused_and_model_untouched():
    model = _bottleneck_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(fxlrd.ConfigError, match="inplace=True cannot be combined with merge"):
        fxlrd.transform(model, LRDConfig(merge="approximate"), inplace=True)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_norm_without_affine_or_statistics():
    for norm, merges in ((nn.BatchNorm2d(64, affine=False), True), (nn.BatchNorm2d(64, track_running_stats=False), False)):
        model = nn.Sequential(nn.Conv2d(16, 64, 1), norm, nn.ReLU(), nn.Conv2d(64, 48, 1)).eval()
        gm = fxlrd.transform(model, LRDConfig(include=["3"], rank_rule="fixed", rank=12, rank_quantum=1))
        result = MergePass("approximate")(gm)
        assert result.modified == merges
        with torch.no_grad():
            assert result.graph_module(torch.randn(1, 16, 4, 4)).shape == (1, 48, 4, 4)


def test_approximate_merge_does_not_chain_through_a_merged_factor():
    """A merged layer sitting in a factor slot still carries both layers it came from: it is not
    merged again with a factor of either (that would collapse two layers and their activation)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)).eval()
    gm = fxlrd.transform(model, LRDConfig(ratio=1.5, rank_quantum=1, merge="approximate", decompose_pointwise=True),
                         example_inputs=torch.randn(8, 64))  # fmt: skip
    kinds = [type(gm.get_submodule(n.target)).__name__ for n in gm.graph.nodes if n.op == "call_module"]
    assert kinds.count("ReLU") == 2 and "ReLUReLU" not in "".join(kinds)  # every activation between two layers
    for m in gm.modules():
        if hasattr(m, "fxlrd_merge"):
            assert len(m.fxlrd_merge["sources"]) == 2, m.fxlrd_merge  # each merge joins two layers, once


def test_exact_merge_of_a_training_model_is_refused_and_a_merged_save_loads_onto_one(tmp_path):
    """Exact merging folds norms with their running statistics: what they compute in eval mode
    only. A training model is refused (it would fine-tune without its norms, silently); loading
    a merged save onto a fresh model in training mode still works (the values come from the file)."""
    model = nn.Sequential(nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16), nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16),
                          nn.Conv2d(16, 8, 1))  # fmt: skip
    x = torch.randn(2, 8, 6, 6)
    with pytest.raises(fxlrd.ConfigError, match="folds batch norm '1' .* in training mode: call model.eval\\(\\)"):
        fxlrd.transform(model.train(), LRDConfig(ratio=1.5, merge="exact"), example_inputs=x)
    assert model.training
    # a norm the merge does not fold (after an activation) may train: that merge is exact in either mode
    free = nn.Sequential(nn.Conv2d(8, 32, 1), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(32),
                         nn.Conv2d(32, 8, 3, padding=1)).train()  # fmt: skip
    merged = fxlrd.transform(free, LRDConfig(ratio=1.5, rank_quantum=1, merge="exact"), example_inputs=x)
    plain = fxlrd.transform(free, LRDConfig(ratio=1.5, rank_quantum=1, decompose_pointwise=False), example_inputs=x)
    assert any(hasattr(m, "fxlrd_merge") for m in merged.modules())
    torch.testing.assert_close(merged.train()(x), plain.train()(x), rtol=1e-4, atol=1e-5)
    gm = fxlrd.transform(model.eval(), LRDConfig(ratio=1.5, merge="exact"), example_inputs=x)
    fxlrd.save(gm, tmp_path / "saved")
    loaded = fxlrd.load(model.train(), tmp_path / "saved")
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), gm(x), rtol=0, atol=0)


class _Bottleneck(nn.Module):
    def __init__(self, act: bool = True):
        super().__init__()
        self.c1, self.n1 = nn.Conv2d(16, 32, 1), nn.BatchNorm2d(32)
        self.c2, self.n2 = nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.c3, self.act = nn.Conv2d(32, 16, 1), nn.ReLU() if act else nn.Identity()

    def forward(self, x):
        return self.c3(self.act(self.n2(self.c2(self.act(self.n1(self.c1(x))))))) + x


@pytest.mark.parametrize("mode", ["approximate", "exact"])
def test_paper_freezing_trains_merged_layers(mode):
    """A merged layer holds a neighbouring layer (and its norm), not only a factor: the paper's
    policy trains it wherever it sits, and freezing leaves the merge record alone."""
    from fxlrd.freeze import factors

    model = _Bottleneck(act=mode == "approximate").eval()  # exact merging stops at an activation
    gm = fxlrd.transform(model, LRDConfig(ratio=1.5, rank_quantum=1, merge=mode), example_inputs=torch.randn(2, 16, 9, 9))
    merged = {n: m for n, m in gm.named_modules() if hasattr(m, "fxlrd_merge")}
    records = {n: dict(m.fxlrd_merge) for n, m in merged.items()}
    assert merged
    fxlrd.freeze(gm, "paper")
    assert all(p.requires_grad for m in merged.values() for p in m.parameters())
    assert {n: m.fxlrd_merge for n, m in merged.items()} == records
    unmerged = [n for n, role, _, m in factors(gm) if not hasattr(m, "fxlrd_merge") and role != "core"]
    assert all(not p.requires_grad for n in unmerged for p in gm.get_submodule(n).parameters())  # the rest: the paper's


def test_a_save_made_under_the_first_merge_rule_still_loads(tmp_path):
    """Saves made before merged layers kept both sources (no ``merge_rule`` in the plan) replay
    the merge as it was then, so they load bitwise; new plans record the rule."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)).eval()
    x = torch.randn(8, 64)
    config = LRDConfig(ratio=1.5, rank_quantum=1, decompose_pointwise=True)
    old = MergePass("approximate", rule=1)(fxlrd.transform(model, config, example_inputs=x)).graph_module
    old.fxlrd_plan.settings["merge"] = "approximate"  # as the first rule's transform recorded it
    assert "merge_rule" not in old.fxlrd_plan.settings
    fxlrd.save(old, tmp_path / "old")
    with torch.no_grad():
        torch.testing.assert_close(fxlrd.load(model, tmp_path / "old")(x), old(x), rtol=0, atol=0)
    new = fxlrd.transform(model, LRDConfig(ratio=1.5, rank_quantum=1, decompose_pointwise=True, merge="approximate"),
                          example_inputs=x)  # fmt: skip
    assert new.fxlrd_plan.settings["merge_rule"] == MergePass.RULE == 2
    fxlrd.save(new, tmp_path / "new")
    with torch.no_grad():
        torch.testing.assert_close(fxlrd.load(model, tmp_path / "new")(x), new(x), rtol=0, atol=0)


class CalledTwice(nn.Module):
    """``which`` module runs twice: the decomposed conv ``c``, the pointwise ``p`` or the norm ``bn``."""

    def __init__(self, which):
        super().__init__()
        torch.manual_seed(0)
        self.which = which
        self.p, self.bn, self.c, self.q = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-1, 1)
            self.bn.running_var.uniform_(0.5, 2)

    def forward(self, x):
        if self.which == "c":  # c's out_proj → bn → q would merge
            return self.c(self.q(self.bn(self.c(x))))
        if self.which == "p":  # p → bn → c's in_proj would merge
            return self.p(self.c(self.bn(self.p(x))))
        return self.bn(self.q(self.c(torch.relu(self.bn(self.p(x))))))  # the norm would be moved


@pytest.mark.parametrize("which", ["c", "p", "bn"])
@pytest.mark.parametrize("mode", ["exact", "approximate"])
def test_modules_that_run_twice_are_not_merged(which, mode):
    model, x = CalledTwice(which).eval(), torch.randn(2, 8, 5, 5)
    config = dict(rank_rule="fixed", rank=4, rank_quantum=1)
    plain = fxlrd.transform(model, LRDConfig(**config), example_inputs=x)
    gm = fxlrd.transform(model, LRDConfig(**config, merge=mode), example_inputs=x)
    twice = {"c": "c.out_proj", "p": "p", "bn": "bn"}[which]
    assert not hasattr(gm.get_submodule(twice), "fxlrd_merge") and gm.get_submodule(twice).weight.shape[0] == 8
    with torch.no_grad():
        if mode == "exact":
            torch.testing.assert_close(gm(x), plain(x), rtol=1e-4, atol=1e-4)
        else:
            assert gm(x).shape == model(x).shape


def test_a_batch_norm_over_tokens_is_not_folded_into_linears():
    class Tokens(nn.Module):  # BatchNorm1d on (N, L, C) normalizes dim 1 (the tokens), not the features
        def __init__(self):
            super().__init__()
            self.a, self.bn, self.b = nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 8)
            with torch.no_grad():
                self.bn.running_mean.uniform_(-1, 1)

        def forward(self, x):
            return self.b(self.bn(self.a(x)))

    config = dict(rank_rule="fixed", rank=8, rank_quantum=1, allow_larger=True, merge="exact", decompose_pointwise=True)
    model = Tokens().eval()
    for x, capture in itertools.product((torch.randn(2, 8, 8), torch.randn(5, 8)), ("fx", "export")):
        gm = fxlrd.transform(model, LRDConfig(**config), example_inputs=x, capture=capture)  # 3-D: apart; 2-D: exact
        with torch.no_grad():
            torch.testing.assert_close(gm(x), model(x), rtol=1e-4, atol=1e-4)
        assert any(hasattr(m, "fxlrd_merge") for m in gm.modules()) == (x.dim() == 2)


def test_approximate_merge_of_a_training_model_keeps_a_norm_it_would_fold():
    class NoActivation(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.bn1, self.conv2 = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x):
            return self.conv2(self.bn1(self.conv1(x)))

    gm = fxlrd.transform(NoActivation().train(), LRDConfig(merge="approximate", rank_rule="fixed", rank=4, rank_quantum=1),
                         example_inputs=torch.randn(4, 8, 6, 6))  # fmt: skip
    assert isinstance(gm.bn1, nn.BatchNorm2d) and gm.bn1.training  # still there to fine-tune with
    assert not any(hasattr(m, "fxlrd_merge") for m in gm.modules())


def test_apply_of_a_merging_plan_reports_what_transform_did():
    class Block(nn.Module):  # the merged neighbours change what sits at a layer's name
        def __init__(self):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(16, 32, 1), nn.BatchNorm2d(32)
            self.conv2, self.bn2 = nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32)
            self.conv3 = nn.Conv2d(32, 16, 1)

        def forward(self, x):
            return self.conv3(self.bn2(self.conv2(self.bn1(self.conv1(x)))))

    model, x = Block().eval(), torch.randn(2, 16, 8, 8)
    gm = fxlrd.transform(model, LRDConfig(rank_rule="fixed", rank=8, rank_quantum=1, merge="exact"), example_inputs=x)
    applied = fxlrd.apply(model, gm.fxlrd_plan, example_inputs=x)
    assert fxlrd.count_params(applied) == fxlrd.count_params(gm)
    sizes = lambda plan: [(lp.name, lp.params_after, lp.macs_after) for lp in plan.decomposed]  # noqa: E731
    assert sizes(applied.fxlrd_plan) == sizes(gm.fxlrd_plan)


@pytest.mark.parametrize("merge", ["exact", "approximate"])
def test_a_merged_plan_reports_the_parameters_the_model_has(merge, tmp_path):
    """Merging changes the parameter count after the plan's layers were sized: the plan
    records the change (its model figure was 60 % too high after an approximate merge)."""
    torch.manual_seed(0)
    model = _bottleneck_model()
    x = torch.randn(1, 8, 8, 8)
    gm = fxlrd.transform(model, LRDConfig(rank_rule="fixed", rank=8, rank_quantum=1, merge=merge), example_inputs=x)
    assert gm.fxlrd_plan.params_after_model() == fxlrd.count_params(gm)
    fxlrd.save(gm, tmp_path / "s")
    loaded = fxlrd.load(_bottleneck_model(), tmp_path / "s")
    assert loaded.fxlrd_plan.params_after_model() == fxlrd.count_params(loaded) == fxlrd.count_params(gm)


class _InplaceBlock(nn.Module):
    def __init__(self, inplace):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(16, 16, 1, bias=False), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.conv3, self.relu = nn.Conv2d(16, 32, 1, bias=False), nn.ReLU(inplace=inplace)

    def forward(self, x):
        return self.conv3(self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))))


def test_export_capture_merges_through_in_place_activations():
    """torch.export keeps nn.ReLU(inplace=True) as aten.relu_ (the zoo ResNets use it): merging
    goes through it as through aten.relu, with the same result."""
    x = torch.randn(2, 16, 8, 8)
    cfg = LRDConfig(ratio=2, merge="approximate", rank_quantum=1)
    model = _InplaceBlock(False).eval()
    twin = copy.deepcopy(model)
    twin.relu.inplace = True
    plain = fxlrd.transform(model, cfg, example_inputs=x, capture="export")
    inplace = fxlrd.transform(twin, cfg, example_inputs=x, capture="export")
    merged = lambda gm: sum(hasattr(m, "fxlrd_merge") for m in gm.modules())  # noqa: E731
    assert merged(inplace) == merged(plain) > 0
    assert torch.allclose(inplace(x), plain(x), atol=1e-5)


@pytest.mark.parametrize("mode", ["fx", "export"])
def test_an_in_place_activation_moved_before_a_merged_layer_leaves_its_input(mode):
    """Merging puts the activation on the merged layer's input side; in place, it would then
    overwrite that input, which a residual also reads."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.act, self.fc2, self.fc3 = nn.Linear(8, 64), nn.ReLU(inplace=True), nn.Linear(64, 64), nn.Linear(64, 8)

        def forward(self, x):
            return self.fc3(self.fc2(self.act(self.fc1(x)))) + x

    x = torch.randn(4, 8)
    cfg = LRDConfig(rank_rule="fixed", rank=24, exclude=["fc1", "fc3"], merge="approximate", sensitivity=False,
                    decompose_pointwise=True)  # fmt: skip
    model = Block().eval()
    twin = copy.deepcopy(model)
    twin.act.inplace = False
    gm = fxlrd.transform(model, cfg, example_inputs=(x,), capture=mode)
    reference = fxlrd.transform(twin, cfg, example_inputs=(x,), capture=mode)
    given = x.clone()
    out = gm(given)
    assert torch.equal(given, x)
    assert torch.allclose(out, reference(x), atol=1e-6)


class _BudgetBlock(nn.Module):
    def __init__(self, c=32, m=40):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, m, 1, bias=False), nn.BatchNorm2d(m)
        self.conv2, self.bn2 = nn.Conv2d(m, m, 3, padding=1, bias=False), nn.BatchNorm2d(m)
        self.conv3, self.bn3 = nn.Conv2d(m, c, 1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        y = torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))
        return torch.relu(x + self.bn3(self.conv3(y)))


@pytest.mark.parametrize("extra", [{"merge": "approximate"}, {"branches": 2}])
def test_a_parameter_budget_merging_or_branching_leaves_unspent_is_warned_about(extra):
    """target_params is allocated on the sizes before merging and branching, which free more:
    the model ended at 61–72 % of its budget with nothing said."""
    from fxlrd.errors import FxlrdWarning

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), _BudgetBlock(32, 40), _BudgetBlock(32, 48)).eval()
    x = torch.randn(1, 3, 8, 8)
    with pytest.warns(FxlrdWarning, match=r"target_params=0\.6: the model has \d+ parameters, \d+% below the budget"):
        gm = fxlrd.transform(model, LRDConfig(rank_quantum=1, target_params=0.6, **extra), example_inputs=x)
    assert fxlrd.count_params(gm) < 0.9 * 0.6 * fxlrd.count_params(model)


@pytest.mark.parametrize("strides", [((2, 2), (2, 2)), ((1, 2), (2, 1)), ((1, 1), (3, 3))])
def test_composed_strided_pointwise_convs_are_the_two_applied_in_turn(strides):
    """Two 1×1 convs, each subsampling: the composed conv subsamples by the product of the
    strides, and computes exactly what the pair does (bias of the first carried through)."""
    from fxlrd.fusion import compose_pointwise

    first = nn.Conv2d(4, 3, 1, stride=strides[0]).double()
    second = nn.Conv2d(3, 5, 1, stride=strides[1]).double()
    x = torch.randn(2, 4, 12, 12, dtype=torch.float64)
    fused = compose_pointwise(first, second)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), second(first(x)))


@pytest.mark.parametrize("mode", ["approximate", "exact"])
def test_param_groups_put_merged_layers_with_the_trainable_factors(mode):
    """(mutation audit) `param_groups` groups by the paper's policy, under which a merged layer
    trains: its parameters are never in ``factors_frozen``; a merged layer in a factor slot is
    in ``factors_trainable``, exactly the factors ``freeze(gm, "paper")`` leaves trainable."""
    model = _Bottleneck(act=mode == "approximate").eval()
    x = torch.randn(2, 16, 9, 9)
    gm = fxlrd.transform(model, LRDConfig(ratio=1.5, rank_quantum=1, merge=mode), example_inputs=x)
    merged = {id(p) for m in gm.modules() if hasattr(m, "fxlrd_merge") for p in m.parameters()}
    assert merged
    groups = {g["name"]: {id(p) for p in g["params"]} for g in fxlrd.param_groups(gm)}
    assert not merged & groups.get("factors_frozen", set())  # a merge in a factor slot, or a plain layer's (other)
    assert merged <= groups["factors_trainable"] | groups["other"] and merged & groups["factors_trainable"]
    fxlrd.freeze(gm, "paper")
    factors = [m for m in gm.modules() if isinstance(m, fxlrd.Factorized)]
    trainable = {id(p) for m in factors for p in m.parameters() if p.requires_grad}
    assert groups["factors_trainable"] == trainable


def test_an_approximate_merge_keeps_the_norms_eps_and_momentum():
    """(mutation audit) the norm moved to the merged layer's narrow side is a new one, but of
    the same kind: the eps and momentum the model's norm had."""

    class WithEps(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(16, 64, 1)
            self.bn = nn.BatchNorm2d(64, eps=1e-2, momentum=0.3)
            self.act = nn.ReLU()
            self.b = nn.Conv2d(64, 48, 1)

        def forward(self, x):
            return self.b(self.act(self.bn(self.a(x))))

    gm = fxlrd.transform(WithEps().eval(), LRDConfig(include=["b"], rank_rule="fixed", rank=12, rank_quantum=1))
    gm = MergePass("approximate")(gm).graph_module
    bn = gm.get_submodule("bn")
    assert bn.num_features == 12 and getattr(bn, "fxlrd_moved", False)
    assert (bn.eps, bn.momentum) == (1e-2, 0.3)


def test_a_sequential_freezer_trains_merged_layers_in_every_phase():
    """(mutation audit) as under the paper's policy, a merged layer (a factor slot holding a
    neighbouring layer) trains in each phase of a `SequentialFreezer`; the other factors alternate."""
    model = _Bottleneck(act=True).eval()
    gm = fxlrd.transform(model, LRDConfig(ratio=1.5, rank_quantum=1, merge="approximate"),
                         example_inputs=torch.randn(2, 16, 9, 9))  # fmt: skip
    merged = [m for m in gm.modules() if hasattr(m, "fxlrd_merge")]
    assert merged
    freezer = fxlrd.SequentialFreezer(gm, period=1)
    flags = []
    for _ in range(2):
        assert all(p.requires_grad for m in merged for p in m.parameters())
        flags.append({n: p.requires_grad for n, p in gm.named_parameters()})
        freezer.step()
    assert flags[0] != flags[1]


def test_refit_merged_reads_a_strided_merged_layers_input_where_it_reads_it():
    """A strided 1×1 conv merged with the next factor: the merged layer takes its input at full
    resolution and writes every other position, which the reference's factor computes."""
    torch.manual_seed(0)
    model = _randomize_bn(nn.Sequential(
        nn.Conv2d(8, 16, 1, stride=2), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
        nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 8, 1))).eval()  # fmt: skip
    x = torch.randn(4, 8, 12, 12)
    gm = fxlrd.transform(model, LRDConfig(rank_rule="fixed", rank=8, merge="approximate"), example_inputs=x)
    reference = fxlrd.transform(model, LRDConfig(rank_rule="fixed", rank=8, decompose_pointwise=False), example_inputs=x)
    assert gm.get_submodule("0").stride == (2, 2)
    report = refit_merged(gm, reference, [x, torch.randn(4, 8, 12, 12)])
    assert set(report) == {"0", "3.out_proj"} and all(r["after"] < r["before"] for r in report.values())
