"""Layer sites: functional F.linear / F.conv sites, their names, shared and tied weights."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import fx, nn

import fxlrd
from fxlrd import Factorized, LRDConfig
from fxlrd.capture import capture as capture_graph
from fxlrd.sites import find_sites

from conftest import rel_err

FULL = LRDConfig(rank_rule="fixed", rank=10**6, allow_larger=True)


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


# --- functional layers whose weights are module parameters ------------------------------------------


class FLinear(nn.Module):
    """A linear layer written functionally: the owner holds only weight and bias."""

    def __init__(self, c, s, bias=True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(s, c) / c**0.5)
        self.bias = nn.Parameter(torch.randn(s)) if bias else None

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class FConv(nn.Module):
    def __init__(self, c, s, k, stride=1, padding=0, dilation=1):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(s, c, k, k) / (c * k * k) ** 0.5)
        self.bias = nn.Parameter(torch.randn(s))
        self.stride, self.padding, self.dilation = stride, padding, dilation

    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation)


class Mixed(nn.Module):
    """An owner holding two functional layers and a scale: not only weight/bias."""

    def __init__(self):
        super().__init__()
        self.proj_weight = nn.Parameter(torch.randn(12, 8))
        self.proj_bias = nn.Parameter(torch.randn(12))
        self.weight = nn.Parameter(torch.randn(6, 12))
        self.scale = nn.Parameter(torch.ones(6))

    def forward(self, x):
        return F.linear(F.linear(x, self.proj_weight, self.proj_bias), self.weight) * self.scale


class FunctionalNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = FConv(3, 16, 3, stride=2, padding=1)
        self.fc = FLinear(16, 8)
        self.mixed = Mixed()

    def forward(self, x):
        return self.mixed(self.fc(self.conv(x).mean((2, 3))))


def test_functional_sites_are_found_with_their_parameters():
    gm = fx.symbolic_trace(FunctionalNet())
    sites = find_sites(gm)
    assert set(sites) == {"conv", "fc", "mixed.proj", "mixed.weight_lrd"}
    assert all(s.kind == "function" and not s.reason for s in sites.values())
    assert sites["conv"].weight_path == "conv.weight" and sites["conv"].bias_path == "conv.bias"
    assert sites["conv"].replace_owner and sites["fc"].replace_owner
    assert not sites["mixed.proj"].replace_owner and sites["mixed.proj"].bias_path == "mixed.proj_bias"
    assert sites["mixed.weight_lrd"].bias_path is None
    spec = sites["conv"].spec
    got = (spec.in_channels, spec.out_channels, spec.kernel_size, spec.stride, spec.padding)
    assert got == (3, 16, (3, 3), (2, 2), (1, 1))


def test_functional_sites_are_decomposed_and_full_rank_reproduces():
    model = FunctionalNet().eval()
    x = torch.randn(2, 3, 9, 9)
    gm = fxlrd.transform(model, FULL)
    plan = gm.fxlrd_plan
    assert {lp.name for lp in plan.decomposed} == {"conv", "fc", "mixed.proj", "mixed.weight_lrd"}
    assert all(lp.site == "function" for lp in plan)
    assert plan["conv"].method == "tucker2" and plan["fc"].method == "svd"
    # Named by the owner path when it holds only weight/bias; else owner.<stem>.
    for name in ("conv", "fc", "mixed.proj", "mixed.weight_lrd"):
        assert isinstance(gm.get_submodule(name), Factorized)
    keys = set(gm.state_dict())
    assert {"conv.core.weight", "fc.out_proj.bias", "mixed.proj.out_proj.weight", "mixed.scale"} <= keys
    assert not {"conv.weight", "fc.weight", "mixed.proj_weight", "mixed.proj_bias", "mixed.weight"} & keys
    # No functional conv/linear is left in the graph.
    targets = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert not targets & {F.linear, torch._C._nn.linear, F.conv2d, torch.conv2d}
    with torch.no_grad():
        assert rel_err(gm(x), model(x)) <= 1e-5


def test_functional_sites_at_low_rank_shrink_the_model():
    model = FunctionalNet().eval()
    gm = fxlrd.transform(model, LRDConfig(rank_rule="fixed", rank=2, rank_quantum=1))
    assert gm.get_submodule("fc").in_proj.out_features == 2
    assert fxlrd.count_params(gm) < fxlrd.count_params(model)
    with torch.no_grad():
        assert gm(torch.randn(2, 3, 9, 9)).shape == (2, 6)


def test_root_parameter_functional_site_gets_the_stem_as_name():
    class Root(nn.Module):
        def __init__(self):
            super().__init__()
            self.w_weight = nn.Parameter(torch.randn(8, 8))

        def forward(self, x):
            return F.linear(x, self.w_weight)

    model = Root().eval()
    gm = fxlrd.transform(model, FULL)
    assert list(gm.fxlrd_plan.layers) == ["w"] and isinstance(gm.get_submodule("w"), Factorized)
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert rel_err(gm(x), model(x)) <= 1e-5


def test_child_name_does_not_clash_with_an_existing_attribute():
    class Clash(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj_weight = nn.Parameter(torch.randn(8, 8))
            self.proj = nn.Identity()  # "proj" is taken

        def forward(self, x):
            return self.proj(F.linear(x, self.proj_weight))

    gm = fxlrd.transform(Clash().eval(), FULL)
    assert list(gm.fxlrd_plan.layers) == ["proj_lrd"]
    assert isinstance(gm.get_submodule("proj"), nn.Identity)


# --- shared and tied weights --------------------------------------------------------------------------


def test_functional_layer_called_twice_is_decomposed_once():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = FLinear(8, 8)

        def forward(self, x):
            return self.lin(torch.tanh(self.lin(x)))

    model = Twice().eval()
    gm = fxlrd.transform(model, LRDConfig(rank_rule="fixed", rank=8, allow_larger=True, rank_quantum=1))
    assert list(gm.fxlrd_plan.layers) == ["lin"]
    assert sum(isinstance(m, Factorized) for m in gm.modules()) == 1
    targets = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert targets.count("lin.out_proj") == 2
    x = torch.randn(4, 8)
    with torch.no_grad():
        assert rel_err(gm(x), model(x)) <= 1e-5


def test_shared_module_is_decomposed_once_and_both_calls_use_it():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x):
            return self.conv(torch.relu(self.conv(x)))

    model = Shared().eval()
    gm = fxlrd.transform(model, LRDConfig(rank_rule="fixed", rank=4, rank_quantum=1))
    fact = gm.get_submodule("conv")
    assert isinstance(fact, Factorized) and sum(isinstance(m, Factorized) for m in gm.modules()) == 1
    targets = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert targets.count("conv.core") == 2 and targets.count("conv.in_proj") == 2
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():  # both calls run the same factors: the same as the low-rank layer twice
        once = fact(x)
        torch.testing.assert_close(gm(x), fact(torch.relu(once)))


def test_same_parameter_in_two_modules_is_kept_as_tied():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(8, 8)
            self.b = nn.Linear(8, 8)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    model = Tied().eval()
    plan = fxlrd.plan(model, FULL)
    for name in ("a", "b"):
        assert plan[name].method == "keep" and "tied" in plan[name].reason
    assert "b.weight" in plan["a"].reason or "a.weight" in plan["b"].reason
    gm = fxlrd.apply(model, plan)
    assert gm.a.weight is gm.b.weight  # still tied
    x = torch.randn(2, 8)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))


def test_weight_also_read_elsewhere_is_kept_as_tied():
    class ReadTwice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)
            self.other = nn.Linear(8, 8)

        def forward(self, x):
            return self.other(self.lin(x) + self.lin.weight.sum())

    plan = fxlrd.plan(ReadTwice(), FULL)
    assert plan["lin"].method == "keep" and "tied weights" in plan["lin"].reason
    assert plan["other"].decomposed


def test_functional_weight_read_elsewhere_is_kept_as_tied():
    class Embed(nn.Module):
        """A tied embedding/unembedding, like a language model's lm_head."""

        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(20, 8)

        def forward(self, ids):
            return F.linear(self.emb(ids), self.emb.weight)

    model = Embed().eval()
    ids = torch.randint(0, 20, (2, 5))
    gm = fxlrd.transform(model, FULL)
    (lp,) = gm.fxlrd_plan
    assert lp.method == "keep" and "tied weights" in lp.reason
    assert gm.get_submodule("emb").weight is not None
    with torch.no_grad():
        torch.testing.assert_close(gm(ids), model(ids))


# --- a conv subclass with its own forward (EfficientNet's static same padding) ------------------------


class Conv2dStaticSamePadding(nn.Conv2d):
    """As in efficientnet_pytorch: pad, then F.conv2d with padding 0."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, **kwargs):
        super().__init__(in_channels, out_channels, kernel_size, stride, **kwargs)
        self.stride = self.stride if len(self.stride) == 2 else [self.stride[0]] * 2
        ih = iw = 9
        kh, kw = self.weight.size()[-2:]
        sh, sw = self.stride
        oh, ow = -(-ih // sh), -(-iw // sw)
        pad_h = max((oh - 1) * self.stride[0] + (kh - 1) * self.dilation[0] + 1 - ih, 0)
        pad_w = max((ow - 1) * self.stride[1] + (kw - 1) * self.dilation[1] + 1 - iw, 0)
        self.static_padding = nn.ZeroPad2d((pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))

    def forward(self, x):
        x = self.static_padding(x)
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class EffStem(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_stem = Conv2dStaticSamePadding(3, 16, 3, stride=2, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.conv_head = Conv2dStaticSamePadding(16, 24, 3, stride=1)

    def forward(self, x):
        return self.conv_head(torch.relu(self.bn(self.conv_stem(x))))


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_conv_subclass_with_its_own_forward_is_decomposed(capture):
    model = EffStem().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1), model.bn.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 9, 9)
    gm = fxlrd.transform(model, FULL, example_inputs=x, capture=capture)
    decomposed = {lp.name for lp in gm.fxlrd_plan.decomposed}
    assert len(decomposed) == 2, gm.fxlrd_plan.table()
    assert all(lp.site == "function" for lp in gm.fxlrd_plan.decomposed)
    assert all(n.startswith(("conv_stem", "conv_head")) for n in decomposed)
    lp = gm.fxlrd_plan[next(n for n in decomposed if n.startswith("conv_head"))]
    assert (lp.in_channels, lp.out_channels, lp.kernel_size) == (16, 24, (3, 3))
    with torch.no_grad():
        assert rel_err(gm(x), model(x)) <= 1e-5


def test_conv_subclass_with_its_own_forward_at_low_rank_keeps_padding_and_stride():
    model = EffStem().eval()
    gm = fxlrd.transform(model, LRDConfig(rank_rule="fixed", rank=4, rank_quantum=1))
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        assert gm(x).shape == model(x).shape == (2, 24, 5, 5)


def test_conv_subclass_kept_as_leaf_says_why():
    plan = fxlrd.plan(EffStem(), LRDConfig(leaf_modules=[Conv2dStaticSamePadding]))
    assert plan["conv_stem"].method == "keep" and "own forward" in plan["conv_stem"].reason


# --- property: any functional layer shape, full rank reproduces ---------------------------------------


class FunctionalLayer(nn.Module):
    def __init__(self, weight, bias, fn, **kwargs):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.bias = None if bias is None else nn.Parameter(bias)
        self.fn, self.kwargs = fn, kwargs

    def forward(self, x):
        return self.fn(x, self.weight, self.bias, **self.kwargs)


@st.composite
def functional_layers(draw):
    kind = draw(st.sampled_from(["linear", "conv1d", "conv2d"]))
    c, s = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    bias = torch.randn(s) if draw(st.booleans()) else None
    batch = draw(st.integers(1, 3))
    if kind == "linear":
        lead = draw(st.lists(st.integers(1, 3), max_size=2))
        return FunctionalLayer(torch.randn(s, c), bias, F.linear), torch.randn(batch, *lead, c)
    nd = 1 if kind == "conv1d" else 2
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(nd))
    stride, dilation, padding = draw(st.integers(1, 3)), draw(st.integers(1, 2)), draw(st.integers(0, 2))
    span = max(dilation * (k - 1) + 1 for k in kernel)
    size = tuple(draw(st.integers(span, span + 5)) for _ in range(nd))
    fn = F.conv1d if nd == 1 else F.conv2d
    layer = FunctionalLayer(torch.randn(s, c, *kernel), bias, fn, stride=stride, padding=padding, dilation=dilation)
    return layer, torch.randn(batch, c, *size)


@given(functional_layers())
def test_any_functional_layer_full_rank_reproduces(case):
    layer, x = case
    model = nn.Sequential(layer).eval()
    gm = fxlrd.transform(model, FULL)
    lp = gm.fxlrd_plan["0"]
    assert lp.site == "function" and lp.decomposed
    assert isinstance(gm.get_submodule("0"), Factorized)
    with torch.no_grad():
        assert rel_err(gm(x), model(x)) <= 1e-5


def test_model_is_untouched_by_functional_decomposition():
    model = FunctionalNet()
    before = _snapshot(model)
    fxlrd.transform(model, LRDConfig(rank_rule="fixed", rank=2))
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert isinstance(model.fc, FLinear)


# --- layers written as matrix products (Falcon's FalconLinear: x @ self.weight.T) ---------------------------------
class _MatmulT(nn.Linear):
    def forward(self, x):
        return x @ self.weight.T  # FalconLinear without its bias


class _MatmulMethodT(nn.Linear):
    def forward(self, x):
        return torch.matmul(x, self.weight.t()) + self.bias


class _MatmulInOut(nn.Module):
    def __init__(self, i, o):
        super().__init__()
        self.w = nn.Parameter(torch.randn(i, o) / i**0.5)  # stored (in, out): x @ w

    def forward(self, x):
        return x @ self.w


class _LeftParam(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.mix = nn.Parameter(torch.randn(n, n))

    def forward(self, x):  # mixes the tokens, not the channels: no layer of x's last dimension
        return self.mix @ x


def _matmul_model():
    torch.manual_seed(0)
    return nn.Sequential(_MatmulT(16, 24), nn.ReLU(), _MatmulMethodT(24, 16), nn.ReLU(), _MatmulInOut(16, 12),
                         _LeftParam(5)).eval()  # fmt: skip


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_matrix_product_layers_are_sites_and_truncate_like_the_weights_svd(capture):
    model, x = _matmul_model(), torch.randn(3, 5, 16)
    sites = find_sites(capture_graph(model, x, mode=capture).gm)
    found = {s.weight_path: s for s in sites.values()}
    assert set(found) == {"0.weight", "2.weight", "4.w"}  # not 5.mix: a parameter on the left is no layer
    assert (found["0.weight"].spec.in_channels, found["0.weight"].spec.out_channels) == (16, 24)
    assert (found["4.w"].spec.in_channels, found["4.w"].spec.out_channels) == (16, 12)
    assert found["4.w"].transposed_weight and not found["0.weight"].transposed_weight

    full = fxlrd.transform(model, LRDConfig(rank_rule="fixed", rank=10**6, allow_larger=True), example_inputs=x,
                           capture=capture)  # fmt: skip
    with torch.no_grad():
        torch.testing.assert_close(full(x), model(x), rtol=1e-5, atol=1e-6)
    # at rank 4, each layer is its weight's rank-4 SVD truncation (computed here independently)
    gm = fxlrd.transform(model, LRDConfig(rank_rule="fixed", rank=4, rank_quantum=1), example_inputs=x, capture=capture)
    assert len(gm.fxlrd_plan.decomposed) == 3

    def truncated(w):  # (out, in)
        u, s, vh = torch.linalg.svd(w.detach().double())
        return (u[:, :4] * s[:4] @ vh[:4]).float()

    w0, w2, w4 = truncated(model[0].weight), truncated(model[2].weight), truncated(model[4].w.T)
    h = torch.relu(torch.relu(x @ w0.T) @ w2.T + model[2].bias) @ w4.T
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model[5].mix @ h, rtol=1e-4, atol=1e-5)
    assert all(not isinstance(m, Factorized) for m in model.modules())  # the user's model is untouched


class _Einsum(nn.Linear):
    def forward(self, x):  # a layer fxlrd cannot read as one
        return torch.einsum("...i,oi->...o", x, self.weight) + self.bias


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_a_layer_module_whose_weight_no_site_reads_is_named_not_silently_kept(capture):
    """A Linear subclass computing with its weight in a form that is no layer site (an einsum)
    used to be kept whole without a word (Falcon's matmuls were, the whole model at 1.00x)."""
    from fxlrd.sites import unseen_layers

    model, x = nn.Sequential(_Einsum(16, 16), nn.ReLU(), nn.Linear(16, 8), _MatmulT(8, 8)).eval(), torch.randn(2, 16)
    with pytest.warns(fxlrd.FxlrdWarning, match=r"1 Linear/conv module's weight is read by operations fxlrd does not "
                                                 r"take as layers: 0\.weight \(read by .*einsum.*\); kept whole"):
        gm = fxlrd.transform(model, LRDConfig(ratio=2, rank_quantum=1), example_inputs=x, capture=capture)
    assert any("0.weight (read by" in note for note in gm.fxlrd_capture["notes"])
    assert [lp.name for lp in gm.fxlrd_plan.decomposed] == ["2", "3.weight_lrd" if capture == "export" else "3"]
    with pytest.warns(fxlrd.FxlrdWarning):
        captured = capture_graph(model.eval(), x, mode=capture)
    assert unseen_layers(model, captured.gm) == [
        ("0.weight", "einsum" if capture == "fx" else "aten.einsum.default")]  # fmt: skip


def test_a_layer_module_no_site_reads_does_not_stop_inplace():
    """The unseen-layer note is information, not a rewrite: inplace=True used to be refused."""
    model = nn.Sequential(_Einsum(16, 16), nn.ReLU(), nn.Linear(16, 8)).eval()
    with pytest.warns(fxlrd.FxlrdWarning, match="read by einsum"):
        gm = fxlrd.transform(model, LRDConfig(ratio=2, rank_quantum=1), example_inputs=torch.randn(2, 16), capture="fx",
                             inplace=True)  # fmt: skip
    assert isinstance(model[2], fxlrd.Factorized) and [lp.name for lp in gm.fxlrd_plan.decomposed] == ["2"]


class _TransposeAsInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.B = nn.Linear(8, 8), nn.Parameter(torch.randn(8, 8))
        self.W = nn.Parameter(torch.randn(8, 8))

    def forward(self, x):  # fc's weight, transposed, is the *input* of a product; W's Gram matrix
        return self.fc(x) + (self.fc.weight.T @ self.B).sum() + (self.W.T @ self.W).trace()


class _MatmulForms(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Parameter(torch.randn(8, 8)), nn.Parameter(torch.randn(8, 8))
        self.register_buffer("rot", torch.linalg.qr(torch.randn(8, 8))[0])  # a fixed transform, no layer

    def forward(self, x):
        return ((x @ self.a.mT) @ self.b.permute(1, 0)) @ self.rot


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_matrix_product_sites_only_where_a_parameter_is_the_weight_operand(capture):
    """A weight transposed as the *input* of a product is read outside its layer (kept as tied;
    the model used to crash once its parameter was gone); `.mT` and `.permute(1, 0)` are
    transposes in both capture modes; a buffer on the right stays a buffer."""
    x = torch.randn(3, 8)
    model = _TransposeAsInput().eval()
    gm = fxlrd.transform(model, LRDConfig(ratio=2, rank_quantum=1), example_inputs=x, capture=capture)
    assert "tied" in gm.fxlrd_plan.layers["fc"].reason
    with torch.no_grad():
        assert torch.isfinite(gm(x)).all()

    model = _MatmulForms().eval()
    full = fxlrd.transform(model, LRDConfig(rank_rule="fixed", rank=10**6, allow_larger=True), example_inputs=x,
                           capture=capture)  # fmt: skip
    assert sorted(lp.name for lp in full.fxlrd_plan.decomposed) == ["a_lrd", "b_lrd"]
    assert "rot" in dict(full.named_buffers())
    with torch.no_grad():
        torch.testing.assert_close(full(x), model(x), rtol=1e-5, atol=1e-5)


class _ReadsDtype(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(x.to(self.fc.weight.dtype))  # fx records the attribute read: no computation with the weight


def test_unseen_layer_warning_fires_on_computation_only_and_stays_a_warning():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", fxlrd.FxlrdWarning)
        fxlrd.transform(_ReadsDtype().eval(), LRDConfig(ratio=2), example_inputs=torch.randn(2, 8), capture="fx")
        # turned into an error, the warning is itself, not a failed trace (a CaptureError, or a fall back to export)
        model = nn.Sequential(_Einsum(16, 16)).eval()
        with pytest.raises(fxlrd.FxlrdWarning, match="read by einsum"):
            fxlrd.transform(model, LRDConfig(ratio=2), example_inputs=torch.randn(2, 16), capture="auto")


# --- (mutation audit) convolution arguments read from the graph -------------------------------------


class AtenConvolution(nn.Module):
    """A conv written as ``aten.convolution`` (what some decompositions leave): padding and
    dilation are separate positional arguments of different effect."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(6, 4, 3, 3) / 6)
        self.bias = nn.Parameter(torch.randn(6))

    def forward(self, x):
        return torch.ops.aten.convolution.default(x, self.weight, self.bias, [2, 1], [1, 3], [2, 3], False, [0, 0], 1)


def test_aten_convolution_site_reads_stride_padding_and_dilation_in_place():
    model = nn.Sequential(AtenConvolution()).eval()
    spec = find_sites(fx.symbolic_trace(model))["0"].spec
    assert (spec.stride, spec.padding, spec.dilation) == ((2, 1), (1, 3), (2, 3))
    x = torch.randn(2, 4, 11, 12)
    gm = fxlrd.transform(model, FULL)
    assert gm.fxlrd_plan["0"].decomposed
    with torch.no_grad():
        assert rel_err(gm(x), model(x)) <= 1e-5


def test_functional_grouped_conv_with_keyword_arguments_reproduces():
    """``F.conv2d(x, w, b, groups=2, dilation=2, padding=2)``: keyword arguments count as positional ones."""
    layer = FunctionalLayer(torch.randn(8, 3, 3, 3), torch.randn(8), F.conv2d, groups=2, dilation=2, padding=2)
    model = nn.Sequential(layer).eval()
    spec = find_sites(fx.symbolic_trace(model))["0"].spec
    assert (spec.in_channels, spec.out_channels, spec.groups, spec.dilation, spec.padding) == (6, 8, 2, (2, 2), (2, 2))
    x = torch.randn(2, 6, 9, 9)
    gm = fxlrd.transform(model, FULL)
    with torch.no_grad():
        assert rel_err(gm(x), model(x)) <= 1e-5


class ScaledAddmm(nn.Module):
    """``addmm`` with a weight stored (in, out), as GPT-2's ``Conv1D``; with ``alpha``/``beta``
    it is not a linear layer's ``x @ W + b``."""

    def __init__(self, **scales):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(5, 6))
        self.bias = nn.Parameter(torch.randn(6))
        self.scales = scales

    def forward(self, x):
        return torch.addmm(self.bias, x, self.weight, **self.scales)


@pytest.mark.parametrize("scales", [{}, {"alpha": 2.0}, {"beta": 0.5}])
def test_scaled_addmm_is_no_linear_site_and_the_model_is_unchanged(scales):
    model = nn.Sequential(ScaledAddmm(**scales)).eval()
    x = torch.randn(3, 5)
    gm = fxlrd.transform(model, LRDConfig(rank_rule="fixed", rank=2))
    assert any(isinstance(m, Factorized) for m in gm.modules()) == (not scales)  # unscaled: a linear site
    if scales:
        with torch.no_grad():
            assert rel_err(gm(x), model(x)) <= 1e-6


@pytest.mark.parametrize("mode", ["fx", "export"])
def test_a_weight_held_as_a_buffer_is_kept_with_the_reason(mode):
    """A buffer is a tensor the model does not train (a fixed projection): decomposed, its
    factors became trainable parameters, which freezing policies then trained."""

    class FixedProjection(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(32, 32)
            self.register_buffer("proj", torch.randn(32, 32))

        def forward(self, x):
            return F.linear(self.lin(x), self.proj)

    model, x = FixedProjection().eval(), torch.randn(4, 32)
    gm = fxlrd.transform(model, LRDConfig(ratio=1.5, rank_quantum=1), example_inputs=x, capture=mode)
    lp = gm.fxlrd_plan["proj_lrd"]  # (a functional site on a weight its owner holds with others)
    assert not lp.decomposed and "the weight is a buffer" in lp.reason
    assert gm.fxlrd_plan["lin"].decomposed
    assert "proj" in dict(gm.named_buffers()) and not any(n.startswith("proj") for n, _ in gm.named_parameters())
