"""Transposed convolutions (``nn.ConvTranspose1d/2d/3d``, ``F.conv_transpose*``, export's
``aten.conv_transpose*`` and transposed ``aten.convolution``): decomposed like convolutions.

A transposed convolution is linear in its channels as a convolution is, so its channel modes
factor the same way; only the factor carrying the kernel is a transposed convolution (with
the layer's stride, padding, output padding and dilation), and its weight layout is
``(in, out, *k)``. These tests check the layouts by exactness (full rank, exactly low-rank
weights, inputs in a subspace) rather than by reading fxlrd's own helpers.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxlrd
from fxlrd import Factorized, LRDConfig
from fxlrd.factorized import conv_layout, to_module_layout

from conftest import rel_err

FULL = LRDConfig(rank_rule="fixed", rank=100_000, allow_larger=True, decompose_pointwise=True)
_CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


class Decoder(nn.Module):
    """A small decoder: a conv, two transposed convs (one with output padding), a strided 1×1
    transposed conv and a 1-d one on a pooled signal."""

    def __init__(self):
        super().__init__()
        self.down = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(32, 24, 4, stride=2, padding=1)
        self.up1 = nn.ConvTranspose2d(24, 16, 3, stride=2, padding=1, output_padding=1)
        self.point = nn.ConvTranspose2d(16, 20, 1, stride=2)
        self.wave = nn.ConvTranspose1d(16, 12, 5, stride=3, padding=2, output_padding=1, bias=False)

    def forward(self, x):
        h = self.up1(torch.relu(self.up(torch.relu(self.down(x)))))
        return self.point(h), self.wave(h.mean(-1))


class Functional(nn.Module):
    """A layer calling ``F.conv_transpose2d`` on its own parameters (a functional site)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(12, 10, 3, 3) / 10)
        self.bias = nn.Parameter(torch.randn(10))

    def forward(self, x):
        return F.conv_transpose2d(x, self.weight, self.bias, stride=2, padding=1, output_padding=1)


def _outputs(model, x):
    out = model(x)
    return out if isinstance(out, tuple) else (out,)


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_full_rank_reproduces_a_decoder(capture):
    torch.manual_seed(0)
    model, x = Decoder().double().eval(), torch.randn(2, 16, 12, 12, dtype=torch.float64)
    gm = fxlrd.transform(model, FULL, example_inputs=x, capture=capture)
    plan = gm.fxlrd_plan
    assert {lp.name for lp in plan.decomposed} == {"down", "up", "up1", "point", "wave"}
    assert isinstance(gm.get_submodule("up"), Factorized)
    for got, want in zip(_outputs(gm, x), _outputs(model, x)):
        assert got.shape == want.shape and rel_err(got, want) < 1e-10


def test_a_functional_transposed_conv_is_a_site():
    torch.manual_seed(0)
    model, x = Functional().double(), torch.randn(2, 12, 5, 5, dtype=torch.float64)
    for capture in ("fx", "export"):
        gm = fxlrd.transform(model, FULL, example_inputs=x, capture=capture)
        lp = gm.fxlrd_plan.decomposed[0]
        assert lp.method == "tucker2" and lp.layer_type in ("F.conv_transpose2d", "aten.conv_transpose2d")
        assert rel_err(gm(x), model(x)) < 1e-10
        gm = fxlrd.transform(model, LRDConfig(rank_rule="fixed", rank=(4, 5)), example_inputs=x, capture=capture)
        (fact,) = [m for m in gm.modules() if isinstance(m, Factorized)]
        assert fact.ranks == (4, 5) and isinstance(fact.core, nn.ConvTranspose2d) and fact.core.output_padding == (1, 1)


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_exactly_low_rank_weights_are_reproduced(capture):
    """A transposed conv whose weight is exactly Tucker rank (3, 5) over its channel modes
    (built in its own layout, (in, out, k, k)) is reproduced at those ranks."""
    torch.manual_seed(1)
    layer = nn.ConvTranspose2d(16, 24, 3, stride=2, padding=1, output_padding=1).double()
    core, a, b = torch.randn(3, 5, 3, 3, dtype=torch.float64), torch.randn(16, 3, dtype=torch.float64), torch.randn(24, 5, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(torch.einsum("ci,io...,so->cs...", a, core, b))
    model, x = nn.Sequential(layer).eval(), torch.randn(2, 16, 7, 7, dtype=torch.float64)
    gm = fxlrd.transform(model, LRDConfig(rank_rule="fixed", rank=(3, 5)), example_inputs=x, capture=capture)
    fact = gm.get_submodule("0")
    assert fact.ranks == (3, 5) and isinstance(fact.core, nn.ConvTranspose2d)
    assert isinstance(fact.in_proj, nn.Conv2d) and isinstance(fact.out_proj, nn.Conv2d)  # plain 1×1 convs
    assert rel_err(gm(x), model(x)) < 1e-10


def test_a_strided_pointwise_transposed_conv_takes_svd_with_the_stride_last():
    """SVD of a strided 1×1 transposed conv: ``in_proj`` is an ordinary 1×1 conv at the input's
    resolution, ``out_proj`` the transposed one (fewer MACs than the layer); exact at rank 4
    for a rank-4 weight."""
    torch.manual_seed(2)
    layer = nn.ConvTranspose2d(32, 40, 1, stride=2, output_padding=1).double()
    with torch.no_grad():
        layer.weight.copy_((torch.randn(32, 4, dtype=torch.float64) @ torch.randn(4, 40, dtype=torch.float64))[..., None, None])
    model, x = nn.Sequential(layer).eval(), torch.randn(2, 32, 6, 6, dtype=torch.float64)
    cfg = LRDConfig(rank_rule="fixed", rank=4, decompose_pointwise=True)
    plan = fxlrd.plan(model, cfg, example_inputs=x)
    assert plan["0"].method == "svd" and plan["0"].macs_after < plan["0"].macs_before / 4
    gm = fxlrd.transform(model, cfg, example_inputs=x)
    fact = gm.get_submodule("0")
    assert type(fact.in_proj) is nn.Conv2d and isinstance(fact.out_proj, nn.ConvTranspose2d)
    assert fact.out_proj.stride == (2, 2) and fact.out_proj.output_padding == (1, 1)
    assert rel_err(gm(x), model(x)) < 1e-10


@settings(max_examples=int(os.environ.get("FXLRD_HYPOTHESIS_EXAMPLES", 20)), deadline=None)
@given(
    dims=st.sampled_from([1, 2, 3]),
    c=st.integers(2, 9),
    s=st.integers(2, 9),
    k=st.integers(1, 4),
    stride=st.integers(1, 3),
    dilation=st.integers(1, 2),
    pad=st.integers(0, 2),
    extra=st.integers(0, 2),
    bias=st.booleans(),
    capture=st.sampled_from(["fx", "export"]),
    seed=st.integers(0, 2**16),
)
def test_full_rank_reproduces_any_transposed_conv(dims, c, s, k, stride, dilation, pad, extra, bias, capture, seed):
    """Any transposed conv (kernel, stride, dilation, padding, output padding, 1–3 spatial
    dimensions, with or without bias) decomposed at full rank computes what it did."""
    pad = min(pad, dilation * (k - 1))  # torch refuses more padding than the kernel's reach
    extra = min(extra, max(stride, dilation) - 1)  # output padding must be below the stride or the dilation
    g = torch.Generator().manual_seed(seed)
    layer = _CONV_T[dims](c, s, k, stride=stride, padding=pad, output_padding=extra, dilation=dilation, bias=bias).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    x = torch.randn(2, c, *([4] * dims), generator=g, dtype=torch.float64)
    model = nn.Sequential(layer).eval()
    cfg = LRDConfig(rank_rule="fixed", rank=100, allow_larger=True, decompose_pointwise=True, layer_types=_TYPES)
    gm = fxlrd.transform(model, cfg, example_inputs=x, capture=capture)
    assert gm.fxlrd_plan["0"].decomposed
    assert rel_err(gm(x), model(x)) < 1e-9


@settings(max_examples=int(os.environ.get("FXLRD_HYPOTHESIS_EXAMPLES", 30)), deadline=None)
@given(groups=st.integers(1, 4), cin=st.integers(1, 4), cout=st.integers(1, 4), k=st.integers(1, 3), dims=st.integers(1, 3))
def test_layouts_round_trip_against_torch(groups, cin, cout, k, dims):
    """`conv_layout` reads a (grouped) transposed conv's weight as the convolution that, its
    kernel flipped, computes the same on the input padded by k − 1 (the textbook identity,
    checked against torch), and `to_module_layout` writes it back."""
    layer = _CONV_T[dims](cin * groups, cout * groups, k, groups=groups, bias=False).double()
    w = conv_layout(layer.weight, groups)
    assert w.shape == (cout * groups, cin, *([k] * dims))
    x = torch.randn(2, cin * groups, *([3] * dims), dtype=torch.float64)
    padded = F.pad(x, [k - 1] * (2 * dims))
    conv = getattr(F, f"conv{dims}d")
    torch.testing.assert_close(conv(padded, w.flip(list(range(2, 2 + dims))), groups=groups), layer(x))
    assert torch.equal(to_module_layout(w, layer), layer.weight)


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_whitening_reproduces_outputs_of_inputs_in_a_subspace(capture):
    """Inputs that span 4 of 24 channels: the whitened Tucker-2 at input rank 4 (output mode
    whole) reproduces the layer's output on them up to the whitening's shrinkage (as for an
    ordinary conv: 6e-4 and 7e-4 here), where data-free truncation loses most of it."""
    torch.manual_seed(3)
    basis = torch.randn(24, 4, dtype=torch.float64)

    def batch():
        return torch.einsum("ca,na...->nc...", basis, torch.randn(4, 4, 6, 6, dtype=torch.float64))

    model = nn.Sequential(nn.ConvTranspose2d(24, 16, 4, stride=2, padding=1)).double().eval()
    cfg = LRDConfig(rank_rule="fixed", rank=(4, 16))
    x = batch()
    aware = fxlrd.transform(model, cfg, example_inputs=x, calibration=[batch() for _ in range(3)], capture=capture)
    free = fxlrd.transform(model, cfg, example_inputs=x, capture=capture)
    assert rel_err(aware(x), model(x)) < 2e-3
    assert rel_err(free(x), model(x)) > 0.1
    seq = fxlrd.transform(model, LRDConfig(rank_rule="fixed", rank=(4, 16), sequential=True), example_inputs=x,
                          calibration=[batch() for _ in range(3)], capture=capture)  # fmt: skip
    assert rel_err(seq(x), model(x)) < 2e-3


def test_data_aware_factors_are_balanced_across_the_transposed_core():
    """Data-aware factors are balanced channel by channel (the unwhitening would otherwise
    leave all the scale in one factor): across the transposed core too, read in its layout."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.ConvTranspose2d(32, 24, 3, stride=2, padding=1)).eval()
    scales = torch.logspace(-2, 1, 32)
    cal = [torch.randn(4, 32, 6, 6) * scales[:, None, None] for _ in range(3)]
    gm = fxlrd.transform(model, LRDConfig(rank_rule="fixed", rank=(8, 8)), example_inputs=cal[0], calibration=cal)
    fact = gm.get_submodule("0")
    rows = fact.in_proj.weight.reshape(8, -1).norm(dim=1)  # in_proj's output channel i
    cols = fact.core.weight.reshape(8, -1).norm(dim=1)  # the transposed core's input channel i: (in, out, k, k)
    torch.testing.assert_close(rows, cols, rtol=2e-3, atol=0)
    out_cols = fact.out_proj.weight.reshape(24, 8).norm(dim=0)
    core_rows = fact.core.weight.transpose(0, 1).reshape(8, -1).norm(dim=1)  # the core's output channel j
    torch.testing.assert_close(core_rows, out_cols, rtol=2e-3, atol=0)


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_save_load_onnx_and_compile(tmp_path, capture):
    torch.manual_seed(5)
    model, x = Decoder().eval(), torch.randn(2, 16, 12, 12)
    gm = fxlrd.transform(model, LRDConfig(ratio=2), example_inputs=x, capture=capture)
    fxlrd.save(gm, tmp_path / "m")
    fresh = Decoder().eval()
    fresh.load_state_dict(model.state_dict())
    back = fxlrd.load(fresh, tmp_path / "m")
    for a, b in zip(_outputs(back, x), _outputs(gm, x)):
        assert torch.equal(a, b)
    fxlrd.export_onnx(gm, x, tmp_path / "m.onnx")  # checked against the model by onnxruntime
    compiled = torch.compile(gm)
    for a, b in zip(_outputs(compiled, x), _outputs(gm, x)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_branched_transposed_core_is_a_grouped_transposed_conv():
    """``branches=2``: the transposed core becomes a grouped transposed conv whose output is
    the sum of two Tucker blocks (checked against the blocks composed by hand), and the plan's
    error is that of what the model holds."""
    torch.manual_seed(6)
    model, x = nn.Sequential(nn.ConvTranspose2d(32, 24, 4, stride=2, padding=1)).double().eval(), torch.randn(2, 32, 5, 5).double()
    gm = fxlrd.transform(model, LRDConfig(rank_rule="fixed", rank=(8, 8), branches=2), example_inputs=x)
    fact = gm.get_submodule("0")
    core = fact.core
    assert isinstance(core, nn.ConvTranspose2d) and core.groups == 2 and core.stride == (2, 2)
    v = fact.in_proj.weight.reshape(8, 32)  # (n·r1, C)
    u = fact.out_proj.weight.reshape(24, 8)  # (S, n·r2)
    dense = torch.zeros(32, 24, 4, 4, dtype=torch.float64)  # in the transposed layout (in, out, k, k)
    for g in range(2):
        block = core.weight[g * 4 : (g + 1) * 4]  # (r1, r2, k, k) of group g
        dense += torch.einsum("ac,ab...,sb->cs...", v[g * 4 : (g + 1) * 4], block, u[:, g * 4 : (g + 1) * 4])
    want = F.conv_transpose2d(x, dense, fact.out_proj.bias, stride=2, padding=1)
    assert rel_err(gm(x), want) < 1e-10
    err = ((dense - model[0].weight) ** 2).sum() / (model[0].weight ** 2).sum()
    assert gm.fxlrd_plan["0"].error is None or abs(gm.fxlrd_plan["0"].error - float(err)) < 1e-6


def test_exact_merge_across_a_transposed_layer():
    """A 1×1 conv → batch norm → transposed conv → batch norm → 1×1 conv, nothing non-linear
    between: the exact merge folds the norms and the pointwise layers into the transposed
    layer's factors and computes what the decomposed model computes."""
    torch.manual_seed(7)
    model = nn.Sequential(nn.Conv2d(32, 32, 1), nn.BatchNorm2d(32), nn.ConvTranspose2d(32, 32, 4, stride=2, padding=1),
                          nn.BatchNorm2d(32), nn.Conv2d(32, 16, 1)).eval()  # fmt: skip
    with torch.no_grad():
        for bn in (model[1], model[3]):
            bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 32, 8, 8)
    plain = fxlrd.transform(model, LRDConfig(rank_rule="fixed", rank=(8, 8), include="2"), example_inputs=x)
    merged = fxlrd.transform(model, LRDConfig(rank_rule="fixed", rank=(8, 8), include="2", merge="exact"), example_inputs=x)
    assert sum(p.numel() for p in merged.parameters()) < sum(p.numel() for p in plain.parameters())
    assert rel_err(merged(x), plain(x)) < 1e-4


def test_freezing_trains_the_transposed_core():
    model, x = Decoder().eval(), torch.randn(1, 16, 12, 12)
    gm = fxlrd.freeze(fxlrd.transform(model, LRDConfig(ratio=2), example_inputs=x), "paper")
    trainable = {n for n, p in gm.named_parameters() if p.requires_grad}
    assert "up.core.weight" in trainable and "up.in_proj.weight" not in trainable


def test_transposed_convs_kept_say_why():
    class Kept(nn.Module):
        def __init__(self):
            super().__init__()
            self.grouped = nn.ConvTranspose2d(16, 16, 3, groups=2)
            self.sized = nn.ConvTranspose2d(16, 16, 3, stride=2)
            self.deep = nn.ConvTranspose3d(16, 16, 3)

        def forward(self, x):
            h = self.sized(self.grouped(x), output_size=[23, 23])
            return h, self.deep(h[:, :, None])

    plan = fxlrd.plan(Kept(), LRDConfig(ratio=2), example_inputs=torch.randn(1, 16, 9, 9), capture="fx")
    assert "grouped convolution (groups=2)" in plan["grouped"].reason
    assert plan["sized"].reason == "called with other than one positional input"
    assert plan["deep"].reason == "ConvTranspose3d not in layer_types"
    cp = fxlrd.plan(nn.Sequential(nn.ConvTranspose2d(16, 16, 3)), LRDConfig(conv_method="cp"), example_inputs=torch.randn(1, 16, 9, 9))
    assert "transposed" in cp["0"].reason and "tucker2" in cp["0"].reason


def test_latency_search_times_transposed_layers(tmp_path):
    from fxlrd.latency import LatencyConfig

    model, x = nn.Sequential(nn.ConvTranspose2d(64, 64, 4, stride=2, padding=1)).eval(), torch.randn(1, 64, 8, 8)
    latency = LatencyConfig(backend="onnxruntime", repeats=3, warmup=1, cache_path=tmp_path / "cache.json")
    plan = fxlrd.plan(model, LRDConfig(ratio=2, latency=latency), example_inputs=x)
    lp = plan["0"]
    assert lp.method == "tucker2" and lp.latency is not None
    assert "ConvTranspose2d" in (tmp_path / "cache.json").read_text()


def test_narrowing_leaves_transposed_convs_to_factorization():
    """``mlp="narrow"`` takes 1×1 conv → activation → 1×1 conv blocks; a 1×1 transposed conv
    (weight laid out (in, out)) is not one of them: it is factorized like any layer, and the
    model computes what it did at full rank."""
    torch.manual_seed(8)
    model = nn.Sequential(nn.ConvTranspose2d(16, 64, 1), nn.ReLU(), nn.ConvTranspose2d(64, 16, 1)).double().eval()
    x = torch.randn(2, 16, 5, 5, dtype=torch.float64)
    gm = fxlrd.transform(model, LRDConfig(ratio=2, mlp="narrow"), example_inputs=x, calibration=[x])
    assert not gm.fxlrd_plan.settings.get("narrowed")
    assert rel_err(fxlrd.transform(model, LRDConfig(rank_rule="fixed", rank=100, allow_larger=True, mlp="narrow",
                                                    decompose_pointwise=True),
                                   example_inputs=x, calibration=[x])(x), model(x)) < 1e-10  # fmt: skip


def test_a_functional_transposed_conv_made_a_module_keeps_its_parameter():
    """`materialize` turns an ``F.conv_transpose2d`` site into an ``nn.ConvTranspose2d`` holding
    the very same parameter (an optimizer's reference stays valid), computing the same."""
    from fxlrd.sites import find_sites, materialize

    model, x = Functional(), torch.randn(2, 12, 5, 5)
    gm = torch.fx.symbolic_trace(model)
    (site,) = find_sites(gm).values()
    want = gm(x)
    materialize(gm, site)
    gm.recompile()
    layer = gm.get_submodule(site.name)
    assert isinstance(layer, nn.ConvTranspose2d) and layer.weight is model.weight and layer.bias is model.bias
    assert layer.output_padding == (1, 1) and torch.equal(gm(x), want)


def test_settings_computed_in_the_graph_keep_the_layer_with_the_reason():
    """An output padding computed from a shape (a U-Net matching its skip connection) is a
    graph value, not a number: the layer is kept with the reason (the capture crashed, or was
    blamed), under fx for a functional call and under export with a dynamic size."""
    from torch.export import Dim

    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(16, 12, 3, 3) / 10)
            self.conv = nn.Conv2d(16, 16, 3, padding=1)

        def forward(self, x, skip):
            extra = skip.shape[-1] - (2 * x.shape[-1] - 1)
            return F.conv_transpose2d(self.conv(x), self.weight, stride=2, padding=1, output_padding=extra) + skip[:, :12]

    class Up(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.ConvTranspose2d(16, 8, 3, stride=2, padding=1)

        def forward(self, x, skip):
            return self.up(x, output_size=skip.shape[-2:]) + skip

    why = ("settings computed in the graph (from a tensor's shape): not supported; capture='export' fixes them where the "
           "shapes they come from are static")  # fmt: skip
    plan = fxlrd.plan(Functional(), LRDConfig(ratio=2), example_inputs=(torch.randn(1, 16, 5, 5), torch.randn(1, 16, 10, 10)))
    assert plan["weight_lrd"].reason == why and plan["conv"].method == "tucker2"
    h = Dim("h", min=2, max=64)
    inputs = (torch.randn(2, 16, 5, 5), torch.randn(2, 8, 10, 10))
    model = Up().eval()
    gm = fxlrd.transform(model, LRDConfig(ratio=2), example_inputs=inputs, capture="export",
                         dynamic_shapes={"x": {2: h}, "skip": {2: 2 * h}})  # fmt: skip
    assert gm.fxlrd_plan["up"].reason == why
    other = (torch.randn(2, 16, 7, 7), torch.randn(2, 8, 14, 14))
    torch.testing.assert_close(gm(*other), model(*other))
    # with static shapes export fixes the output padding at capture: decomposed, and exact at full rank
    gm = fxlrd.transform(model.double(), FULL, example_inputs=tuple(t.double() for t in inputs), capture="export")
    assert gm.fxlrd_plan["up"].decomposed
    assert rel_err(gm(*(t.double() for t in inputs)), model(*(t.double() for t in inputs))) < 1e-10


def test_branching_a_functional_layer_fits_its_original_weight():
    """``branches=2`` fits the blocks to the layer's original weight and reports that error,
    for a module holding its weight and calling ``F.conv2d`` / ``F.conv_transpose2d`` on it as
    for a conv module (its weight was taken for unknown: the blocks were fitted to the Tucker
    approximation, the plan's error None)."""

    class Holder(nn.Module):
        def __init__(self, transposed):
            super().__init__()
            self.transposed = transposed
            self.weight = nn.Parameter(torch.randn(24 if transposed else 32, 32 if transposed else 24, 3, 3) / 10)

        def forward(self, x):
            return (F.conv_transpose2d if self.transposed else F.conv2d)(x, self.weight, padding=1)

    class ConvT(nn.Module):  # the same layer as a module
        def __init__(self, weight):
            super().__init__()
            self.layer = nn.ConvTranspose2d(24, 32, 3, padding=1, bias=False)
            with torch.no_grad():
                self.layer.weight.copy_(weight)

        def forward(self, x):
            return self.layer(x)

    torch.manual_seed(9)
    x = torch.randn(2, 24, 8, 8, dtype=torch.float64)
    cfg = LRDConfig(branches=2, allocation="global", ratio=2.5)  # (data-free errors are reported by allocation)
    plain = fxlrd.transform(nn.Sequential(Holder(False)).double().eval(), cfg, example_inputs=x)
    assert plain.fxlrd_plan.decomposed[0].error is not None and plain.get_submodule("0").core.groups == 2
    holder = nn.Sequential(Holder(True)).double().eval()
    module = ConvT(holder[0].weight.detach()).double().eval()
    as_module = fxlrd.transform(module, cfg, example_inputs=x)
    as_function = fxlrd.transform(holder, cfg, example_inputs=x)
    assert as_function.get_submodule("0").core.groups == 2
    assert as_function.fxlrd_plan["0"].error == pytest.approx(as_module.fxlrd_plan["layer"].error, rel=1e-6)
    assert rel_err(as_function(x), as_module(x)) < 1e-8


def test_capture_notes_count_transposed_convs():
    """Under export, transposed convs count among the layers whose weight the graph computes
    (weight_norm: a vocoder's upsampling) and among those inside no_grad regions."""
    from torch.nn.utils.parametrizations import weight_norm

    class Vocoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.pre = weight_norm(nn.Conv1d(16, 16, 7, padding=3))
            self.up = weight_norm(nn.ConvTranspose1d(16, 8, 16, stride=8, padding=4))

        def forward(self, x):
            return self.up(torch.relu(self.pre(x)))

    class Regions(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.c = nn.ConvTranspose2d(16, 16, 3, stride=2), nn.Conv2d(16, 16, 3, padding="same")

        def forward(self, x):
            with torch.no_grad():
                y = self.up(x)
            with torch.no_grad():
                z = self.c(x)
            return y, z

    gm = fxlrd.transform(Vocoder().eval(), LRDConfig(ratio=2), example_inputs=torch.randn(1, 16, 20), capture="export")
    assert any(n.startswith("2 linear/conv operations compute their weight") for n in gm.fxlrd_capture["notes"])
    gm = fxlrd.transform(Regions().eval(), LRDConfig(ratio=2), example_inputs=torch.randn(1, 16, 6, 6), capture="export")
    assert any(n.startswith("2 linear/conv operations run inside torch.no_grad()") for n in gm.fxlrd_capture["notes"])


def test_a_decomposed_export_graph_of_transposed_aten_convolution():
    """A graph from ``run_decompositions()`` runs every conv as ``aten.convolution`` (transposed
    or not): given to fxlrd as a GraphModule, its transposed convs are sites, exact at full rank."""
    torch.manual_seed(10)
    model, x = Decoder().double().eval(), torch.randn(2, 16, 12, 12, dtype=torch.float64)
    graph = torch.export.export(model, (x,)).run_decompositions().module()
    assert any(n.target is torch.ops.aten.convolution.default and n.args[6] for n in graph.graph.nodes)
    gm = fxlrd.transform(graph, FULL, example_inputs=x)
    assert sum(lp.layer_type == "aten.convolution" for lp in gm.fxlrd_plan.decomposed) == 5
    for got, want in zip(_outputs(gm, x), _outputs(model, x)):
        assert rel_err(got, want) < 1e-10


def test_a_padded_pointwise_transposed_conv_calibrates_on_the_positions_it_keeps():
    """A 1×1 transposed conv with padding crops its output: the input's border positions never
    reach it. Calibration leaves them out, so inputs whose inner positions span 2 channels are
    reproduced at rank 2 whatever the border holds."""
    torch.manual_seed(11)
    basis = torch.randn(12, 2, dtype=torch.float64)

    def batch():
        x = torch.randn(4, 12, 7, 7, dtype=torch.float64) * 5  # the border: anything
        x[:, :, 1:-1, 1:-1] = torch.einsum("ca,nahw->nchw", basis, torch.randn(4, 2, 5, 5, dtype=torch.float64))
        return x

    model = nn.Sequential(nn.ConvTranspose2d(12, 16, 1, stride=2, padding=1)).double().eval()
    x = batch()
    gm = fxlrd.transform(model, LRDConfig(rank_rule="fixed", rank=2, decompose_pointwise=True), example_inputs=x,
                         calibration=[batch() for _ in range(3)])  # fmt: skip
    assert rel_err(gm(x), model(x)) < 2e-3
