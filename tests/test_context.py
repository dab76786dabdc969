"""Timing layers in context: windows of neighbouring operations cut out of the graph."""

import dataclasses

import pytest
import torch
from torch import nn

import fxlrd
from fxlrd import ConfigError, LRDConfig, zoo
from fxlrd.capture import capture, normalize_inputs
from fxlrd.latency import LatencyConfig
from fxlrd.planner import input_shapes
from fxlrd.ranks.context import neighbourhood
from fxlrd.sites import find_sites

import test_rank_search as rank_search


def _captured(model, x, mode="fx"):
    inputs = normalize_inputs(x)
    gm = capture(model, inputs=inputs, mode=mode).gm
    input_shapes(gm, inputs)
    sites = find_sites(gm)
    return gm, sites, {n for s in sites.values() for n in s.nodes}


def test_windows_of_identical_blocks_share_a_key_and_compute_the_models_values():
    model = zoo.resnet50(num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    gm, sites, nodes = _captured(model, x)
    w11, w12 = (neighbourhood(gm, sites[f"layer1.{i}.conv3"], nodes) for i in (1, 2))
    w10 = neighbourhood(gm, sites["layer1.0.conv2"], nodes)
    assert w11.key == w12.key != w10.key
    assert w11.size == 5  # bn2, relu before; bn3, add, relu after
    assert [shape for shape, _ in w11.inputs] == [(1, 64, 16, 16), (1, 256, 16, 16)]

    # The window computes the block's output from the values that flow into it in the model.
    seen = {}
    block = model.layer1[1]
    block.conv2.register_forward_hook(lambda m, i, o: seen.__setitem__("conv2", o))
    block.register_forward_hook(lambda m, i, o: seen.update(block_in=i[0], block_out=o))
    with torch.no_grad():
        model(x)
        out = w11.with_site(block.conv3)(seen["conv2"], seen["block_in"])
    torch.testing.assert_close(out, seen["block_out"])
    assert isinstance(w11.graph_module.get_submodule("site"), nn.Identity)  # with_site left it alone


def test_windows_of_an_export_graph_run_attention_included():
    from transformers import BertConfig, BertModel

    config = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=50)
    model = BertModel(config).eval()
    ids = torch.randint(0, 50, (2, 7))
    gm, sites, nodes = _captured(model, {"input_ids": ids}, mode="export")  # dynamic batch and sequence
    shapes = {}
    for name, site in sites.items():
        window = neighbourhood(gm, site, nodes)
        assert window is not None, name  # sizes read off tensors became the example's constants
        with torch.no_grad():
            out = window.with_site(site.layer(gm, share=False))(*window.example())
        assert torch.isfinite(out).all(), name
        shapes[name.split("layer.0.")[-1]] = tuple(out.shape)
    assert shapes["intermediate.dense"] == (2, 7, 64)  # linear, then its GELU
    assert shapes["attention.self.query"] == (2, 2, 7, 16)  # through the heads' view to attention


class CostTimer(rank_search.CostTimer):
    """Time = parameters of whatever runs (layer or window, no cliff), counting windows too."""

    def __init__(self):
        super().__init__()
        self.windows = 0

    def time(self, module, input_shape):
        self.calls += 1
        return sum(p.numel() for p in module.parameters()) * 1e-9 + 1e-6

    def time_inputs(self, module, inputs):
        self.windows += 1
        assert "site" in dict(module.named_children())
        return self.time(module, None)


@pytest.fixture
def cost_timer(monkeypatch):
    return rank_search.install_timer(monkeypatch, CostTimer())


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 64, 3, padding=1)
        self.conv1 = nn.Conv2d(64, 64, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(64)
        self.conv2 = nn.Conv2d(64, 64, 1)
        self.bn2 = nn.BatchNorm2d(64)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)) + x)
        return self.head(y.mean((2, 3)))


def test_search_in_context_times_windows_and_reuses_the_cache(cost_timer, tmp_path):
    x = torch.randn(1, 3, 8, 8)
    lat = LatencyConfig(cache_path=tmp_path / "c.json", progress=False, quantum=8, context="neighbours")
    plan = fxlrd.plan(Residual().eval(), LRDConfig(latency=lat), example_inputs=x)
    searched = [lp for lp in plan.layers.values() if lp.latency]
    assert searched and all("timed in a window" in lp.latency["note"] for lp in searched)
    assert cost_timer.windows == cost_timer.calls > 0
    calls = cost_timer.calls
    again = fxlrd.plan(Residual().eval(), LRDConfig(latency=lat), example_inputs=x)
    assert cost_timer.calls == calls and again.to_dict() == plan.to_dict()
    # Alone and in context are different measurements: different cache entries.
    fxlrd.plan(Residual().eval(), LRDConfig(latency=LatencyConfig(cache_path=tmp_path / "c.json", progress=False)),
               example_inputs=x)  # fmt: skip
    assert cost_timer.calls > calls and cost_timer.windows == calls


def test_global_mode_in_context_prices_options_by_their_windows(cost_timer, tmp_path):
    x = torch.randn(1, 3, 8, 8)
    lat = LatencyConfig(cache_path=tmp_path / "c.json", progress=False, quantum=8, context="neighbours")
    plan = fxlrd.plan(Residual().eval(), LRDConfig(target_speedup=1.3, latency=lat), example_inputs=x)
    g = plan.settings["global_search"]
    assert cost_timer.windows > 0 and g["met"] and g["measured_speedup"] >= 1.3
    # With this timer a window's time is its parameters, so an option's in-context cost is the
    # layer's own time plus what its factors change: the same as timing the layer alone.
    alone = fxlrd.plan(Residual().eval(), LRDConfig(target_speedup=1.3, latency=LatencyConfig(
        cache_path=tmp_path / "d.json", progress=False, quantum=8)), example_inputs=x)  # fmt: skip
    for name, lp in plan.layers.items():
        if lp.latency:
            ours = {tuple(r): t for r, t, _ in lp.latency["candidates_ms"]}
            theirs = {tuple(r): t for r, t, _ in alone[name].latency["candidates_ms"]}
            assert ours.keys() == theirs.keys()
            for r in ours:
                assert ours[r] == pytest.approx(theirs[r], rel=1e-6, abs=1e-9)


@pytest.mark.slow
def test_search_in_context_on_onnxruntime_builds_a_working_model(tmp_path):
    model = Residual().eval()
    x = torch.randn(1, 3, 16, 16)
    lat = LatencyConfig(cache_path=tmp_path / "c.json", progress=False, repeats=2, warmup=1, context="neighbours")
    gm = fxlrd.transform(model, LRDConfig(ratio=1.5, latency=lat), example_inputs=x)
    notes = [lp.latency["note"] for lp in gm.fxlrd_plan.layers.values() if lp.latency]
    assert notes and all("window" in note for note in notes)
    assert gm(x).shape == (1, 10)


@pytest.mark.parametrize("kwargs", [{"context": "model"}, {"depth": -1}, {"depth": 1.5}])
def test_bad_context_settings(kwargs):
    with pytest.raises(ConfigError):
        LatencyConfig(**kwargs)


class Bottleneck(nn.Module):
    """A pointwise layer, a k×k conv, a pointwise layer: with ``act`` a ReLU after each norm."""

    def __init__(self, act=True):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.conv1, self.bn1 = nn.Conv2d(32, 64, 1), nn.BatchNorm2d(64)
        self.conv2, self.bn2 = nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64)
        self.conv3 = nn.Conv2d(64, 32, 1)
        self.act = nn.ReLU() if act else None
        self.head = nn.Linear(32, 10)
        for bn in (self.bn1, self.bn2):  # (statistics that are not the identity: folding them is tested)
            bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.data.uniform_(0.5, 2)

    def forward(self, x):
        act = self.act or (lambda t: t)
        y = act(self.bn1(self.conv1(torch.relu(self.stem(x)))))
        y = self.conv3(act(self.bn2(self.conv2(y))))
        return self.head(y.mean((2, 3)))


def test_a_merging_window_takes_in_the_pointwise_layers_and_times_candidates_merged():
    from fxlrd.factorized import decompose_weight

    model = Bottleneck(act=False).eval()
    x = torch.randn(1, 3, 8, 8)
    gm, sites, nodes = _captured(model, x)
    site = sites["conv2"]
    through = frozenset(n for name in ("conv1", "conv3") for n in sites[name].nodes)
    plain = neighbourhood(gm, site, nodes)
    merging = neighbourhood(gm, site, nodes, merge="exact", through=through)
    assert plain.size == 2 and plain.merge is None  # bn1 | bn2: stops at the other layers
    assert merging.size == 4 and merging.merge == "exact"  # conv1, bn1 | bn2, conv3
    assert merging.key != neighbourhood(gm, site, nodes, merge=None, through=through).key  # merged is timed apart
    fact, _ = decompose_weight(model.conv2.weight, model.conv2.bias, site.spec, "tucker2", (24, 24))
    merged = merging.with_site(fact)
    convs = [m for m in merged.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 3 and any(getattr(m, "fxlrd_merge", None) for m in convs)  # in_proj and out_proj merged away
    unmerged = dataclasses.replace(merging, merge=None).with_site(fact)  # the same window and factors, not merged
    assert len([m for m in unmerged.modules() if isinstance(m, nn.Conv2d)]) == 5
    with torch.no_grad():
        inputs = merging.example()
        torch.testing.assert_close(merged(*inputs), unmerged(*inputs), rtol=1e-4, atol=1e-5)  # an exact merge computes the same
    assert isinstance(merging.graph_module.get_submodule("site"), nn.Identity)  # the window itself is unchanged
    original = merging.with_site(model.conv2)  # the original layer: nothing to merge, timed as it runs
    assert not any(getattr(m, "fxlrd_merge", None) for m in original.modules())
    assert len([m for m in original.modules() if isinstance(m, nn.Conv2d)]) == 3
    assert merging.absorbs(fact) == ("m0", "m4")  # conv1 and conv3, by their places in the window


def test_a_merging_window_merges_a_candidate_where_its_neighbours_are():
    """Candidates are made on the CPU; a window whose neighbours are elsewhere (a model on a
    GPU; here the meta device) merges the candidate there instead of mixing devices."""
    from fxlrd.factorized import decompose_weight

    model = Bottleneck(act=False).eval()
    gm, sites, nodes = _captured(model, torch.randn(1, 3, 8, 8))
    through = frozenset(n for name in ("conv1", "conv3") for n in sites[name].nodes)
    window = neighbourhood(gm, sites["conv2"], nodes, merge="exact", through=through)
    window.graph_module.to("meta")
    fact, _ = decompose_weight(model.conv2.weight, model.conv2.bias, sites["conv2"].spec, "tucker2", (24, 24))
    assert window.absorbs(fact) == ("m0", "m4")
    assert all(p.is_meta for p in window.with_site(fact).parameters())


def test_a_merging_windows_key_says_its_norms_mode():
    """What merging builds depends on the norms' mode (an approximate merge keeps a training
    norm it would fold): a cached merged price of one mode is not the other's."""
    keys = {}
    for mode in ("train", "eval"):
        model = Bottleneck(act=True).train(mode == "train")
        gm, sites, nodes = _captured(model, torch.randn(2, 3, 8, 8))
        through = frozenset(n for name in ("conv1", "conv3") for n in sites[name].nodes)
        keys[mode] = neighbourhood(gm, sites["conv2"], nodes, merge="approximate", through=through).key
    assert keys["train"] != keys["eval"]


class MLP(nn.Module):
    """Linear layers with batch norms between (2-D inputs: a norm folds into a linear layer)."""

    def __init__(self):
        super().__init__()
        self.up, self.bn1 = nn.Linear(16, 64), nn.BatchNorm1d(64)
        self.mid, self.bn2 = nn.Linear(64, 64), nn.BatchNorm1d(64)
        self.down = nn.Linear(64, 16)

    def forward(self, x):
        return self.down(torch.relu(self.bn2(self.mid(torch.relu(self.bn1(self.up(x)))))))


def test_a_window_of_linear_layers_merges_across_batch_norms_as_the_model_does(monkeypatch, tmp_path):
    """A linear layer merges across a batch norm only on 2-D inputs, which MergePass reads off
    the graph's shapes: the window carries them, so its candidates merge as the model's do."""
    timer = rank_search.install_timer(monkeypatch, MergeSeeingTimer())
    x = torch.randn(4, 16)
    lat = LatencyConfig(cache_path=tmp_path / "c.json", progress=False, quantum=8, context="neighbours")
    config = LRDConfig(target_speedup=1.1, merge="approximate", decompose_pointwise=True, exclude=["up", "down"],
                       latency=lat)  # fmt: skip
    plan = fxlrd.plan(MLP().eval(), config, example_inputs=x)
    assert plan["mid"].latency["merged_into"] == ["up", "down"] and timer.merged > 0
    built = fxlrd.transform(MLP().eval(), config, example_inputs=x)
    merged = {n for m in built.modules() for n in (getattr(m, "fxlrd_merge", None) or {}).get("merged_from", ())}
    assert {"up", "down"} <= merged  # what the plan priced merged, the model merged


class MergeSeeingTimer(CostTimer):
    """Time = parameters exactly (no per-call constant: a merged price adds one more layer's time)."""

    def __init__(self):
        super().__init__()
        self.merged = 0

    def time(self, module, input_shape):
        self.calls += 1
        return sum(p.numel() for p in module.parameters()) * 1e-9

    def time_inputs(self, module, inputs):
        merged = any(getattr(m, "fxlrd_merge", None) for m in module.modules())
        self.merged += merged
        if merged:  # (a site whose every factor merged away is gone from the window)
            self.windows += 1
            return self.time(module, None)
        return super().time_inputs(module, inputs)


@pytest.mark.parametrize("target", [None, 1.3])
def test_search_in_context_with_merge_prices_candidates_merged(monkeypatch, tmp_path, target):
    timer = rank_search.install_timer(monkeypatch, MergeSeeingTimer())
    x = torch.randn(1, 3, 8, 8)
    lat = LatencyConfig(cache_path=tmp_path / "c.json", progress=False, quantum=8, context="neighbours")
    config = dict(ratio=2, merge="approximate", latency=lat, target_speedup=target)
    plan = fxlrd.plan(Bottleneck().eval(), LRDConfig(**config), example_inputs=x)
    assert timer.merged > 0
    lp = plan["conv2"]
    if target is None:  # conv1 sits between the stem and conv2: the stem's window takes it (MergePass merges it there first)
        assert "window of 2 " in plan["stem"].latency["note"]  # relu, conv1
        assert "window of 5 " in lp.latency["note"]  # relu, bn1 | bn2, relu, conv3
    # Time = parameters: each candidate costs its merged window, where conv1 and conv3 absorb the
    # factors (fewer parameters than the factors beside them), so the merged prices are lower.
    unmerged = fxlrd.plan(Bottleneck().eval(), LRDConfig(**{**config, "merge": None, "decompose_pointwise": False}),
                          example_inputs=x)  # fmt: skip
    ours = {tuple(c[0]): c[1] for c in lp.latency["candidates_ms"]}
    theirs = {tuple(c[0]): c[1] for c in unmerged["conv2"].latency["candidates_ms"]}
    common = ours.keys() & theirs.keys()
    common = {r for r in common if r[0] >= 16}  # (global mode floors a price at 5 % of the layer's time: rank 8 is there)
    assert common and all(ours[r] < theirs[r] for r in common)


def test_a_window_takes_in_only_what_merging_will_absorb():
    """The window takes a pointwise layer where `MergePass` merges across what lies between:
    not across a ReLU under an exact merge, nor a layer that runs twice; exact and approximate
    windows are timed apart."""
    model = Bottleneck(act=True).eval()
    gm, sites, nodes = _captured(model, torch.randn(1, 3, 8, 8))
    through = frozenset(n for name in ("conv1", "conv3") for n in sites[name].nodes)
    exact = neighbourhood(gm, sites["conv2"], nodes, merge="exact", through=through)
    approximate = neighbourhood(gm, sites["conv2"], nodes, merge="approximate", through=through)
    assert exact.merge is None and exact.through == () and exact.size == 4  # relu, bn1 | bn2, relu: stops at the layers
    assert approximate.merge == "approximate" and [s for _, s in approximate.through] == [(1, 32, 8, 8), (1, 64, 8, 8)]
    assert approximate.key != exact.key


class Shared(nn.Module):
    """A pointwise layer run twice (``proj``) and a k×k conv run twice (``conv``)."""

    def __init__(self):
        super().__init__()
        self.proj, self.conv, self.head = nn.Conv2d(16, 16, 1), nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 16, 1)

    def forward(self, x):
        x = self.conv(torch.relu(self.proj(x)))
        x = self.conv(torch.relu(self.proj(x)))
        return self.head(torch.relu(x))


def test_layers_called_twice_are_not_timed_merged(monkeypatch, tmp_path):
    timer = rank_search.install_timer(monkeypatch, MergeSeeingTimer())
    lat = LatencyConfig(cache_path=tmp_path / "c.json", progress=False, quantum=8, context="neighbours")
    fxlrd.plan(Shared().eval(), LRDConfig(ratio=1.5, merge="approximate", latency=lat), example_inputs=torch.randn(1, 16, 8, 8))
    assert timer.windows > 0 and timer.merged == 0  # MergePass merges neither: the windows do not either


class TwoConvs(nn.Module):
    """Two k×k convs with a pointwise layer between them that both could merge into."""

    def __init__(self, width=8):
        super().__init__()
        self.a, self.bn_a = nn.Conv2d(width, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.mid, self.bn_mid = nn.Conv2d(32, 32, 1), nn.BatchNorm2d(32)
        self.b = nn.Conv2d(32, 32, 3, padding=1)

    def forward(self, x):
        x = torch.relu(self.bn_mid(self.mid(torch.relu(self.bn_a(self.a(x))))))
        return self.b(x).mean((2, 3))


def test_global_mode_prices_a_shared_pointwise_layer_once(monkeypatch, tmp_path):
    """``mid`` between two searched convs is priced as the first one's, which MergePass merges
    it with first; the second's window stops at it (when both are decomposed, MergePass goes on
    to merge the result into the second's first factor: a saving priced low, never twice)."""
    timer = rank_search.install_timer(monkeypatch, MergeSeeingTimer())
    x = torch.randn(1, 8, 8, 8)
    lat = LatencyConfig(cache_path=tmp_path / "c.json", progress=False, quantum=8, context="neighbours")
    plan = fxlrd.plan(TwoConvs().eval(), LRDConfig(target_speedup=1.2, merge="approximate", latency=lat), example_inputs=x)
    assert plan["a"].latency["merged_into"] == ["mid"] and "merged_into" not in plan["b"].latency
    mid = sum(p.numel() for p in TwoConvs().mid.parameters()) * 1e-9
    alone = {name: sum(p.numel() for p in getattr(TwoConvs(), name).parameters()) * 1e-9 for name in ("a", "b")}
    assert plan["a"].latency["original_ms"] == pytest.approx((alone["a"] + mid) * 1e3)  # its time, and mid's
    assert plan["b"].latency["original_ms"] == pytest.approx(alone["b"] * 1e3)
    assert timer.merged > 0
    gm, sites, nodes = _captured(TwoConvs().eval(), x)
    alone = neighbourhood(gm, sites["b"], nodes, merge="approximate", through=frozenset(sites["mid"].nodes))
    assert alone.size == 4 and alone.through  # relu, bn_mid, mid | mean: alone, b's window would take mid in
    searched = fxlrd.plan(TwoConvs().eval(), LRDConfig(merge="approximate", latency=lat), example_inputs=x)
    assert "window of 3 " in searched["a"].latency["note"]  # bn_a, relu, mid
    assert "window of 3 " in searched["b"].latency["note"]  # relu, bn_mid | mean: beside a, not
    built = fxlrd.transform(TwoConvs().eval(), LRDConfig(ratio=2, merge="approximate"), example_inputs=x)
    (merge,) = [m.fxlrd_merge for m in built.modules() if getattr(m, "fxlrd_merge", None)]
    assert merge["sources"] == ["a", "b"] and "mid" not in dict(built.named_modules())  # merged with a's, then b's


def test_an_export_capture_with_merge_is_timed_in_plain_windows(monkeypatch, tmp_path):
    timer = rank_search.install_timer(monkeypatch, MergeSeeingTimer())
    lat = LatencyConfig(cache_path=tmp_path / "c.json", progress=False, quantum=8, context="neighbours")
    plan = fxlrd.plan(Bottleneck().eval(), LRDConfig(ratio=2, merge="approximate", latency=lat),
                      example_inputs=torch.randn(1, 3, 8, 8), capture="export")  # fmt: skip
    assert timer.windows > 0 and timer.merged == 0  # functional convs: not taken in (module layers only)
    assert plan.decomposed
