"""fxlrd.attention.MultiheadAttention equals torch's nn.MultiheadAttention, and its
projections are decomposable layer sites in both capture modes."""

import pytest
import torch
from torch import nn

import fxlrd
from fxlrd import Factorized, LRDConfig, zoo
from fxlrd.attention import MultiheadAttention, swap_attention
from fxlrd.zoo import VisionTransformer

from conftest import rel_err

E, H, L, S, N = 16, 4, 5, 7, 3


def _pair(batch_first: bool, layout: str, bias: bool = True):
    mha = nn.MultiheadAttention(E, H, batch_first=batch_first, bias=bias).eval()
    with torch.no_grad():  # torch initialises the biases to zero: make them matter
        if bias:
            mha.in_proj_bias.normal_()
            mha.out_proj.bias.normal_()
    ours = MultiheadAttention.from_torch(mha, layout).eval()
    return mha, ours


def _seq(batch_first: bool, length: int) -> torch.Tensor:
    return torch.randn(N, length, E) if batch_first else torch.randn(length, N, E)


def _check(mha, ours, q, k, v, **kwargs):
    with torch.no_grad():
        want_out, want_w = mha(q, k, v, **kwargs)
        got_out, got_w = ours(q, k, v, **kwargs)
    torch.testing.assert_close(got_out, want_out, rtol=1e-5, atol=1e-5)
    if want_w is None:
        assert got_w is None
    else:
        assert got_w is not None and got_w.shape == want_w.shape
        torch.testing.assert_close(got_w, want_w, rtol=1e-5, atol=1e-6)


LAYOUTS = ["packed", "separate"]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights, average", [(False, True), (True, True), (True, False)])
def test_self_attention_matches_torch(layout, batch_first, need_weights, average):
    mha, ours = _pair(batch_first, layout)
    x = _seq(batch_first, L)
    _check(mha, ours, x, x, x, need_weights=need_weights, average_attn_weights=average)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("same_kv", [True, False])
@pytest.mark.parametrize("need_weights", [True, False])
def test_cross_attention_matches_torch(layout, batch_first, same_kv, need_weights):
    mha, ours = _pair(batch_first, layout)
    q = _seq(batch_first, L)
    k = _seq(batch_first, S)
    v = k if same_kv else _seq(batch_first, S)
    _check(mha, ours, q, k, v, need_weights=need_weights)


def _masks():
    bool2 = torch.rand(L, L) < 0.3
    bool2.fill_diagonal_(False)  # every query keeps at least one key
    bool3 = torch.rand(N * H, L, L) < 0.3
    bool3[:, torch.arange(L), torch.arange(L)] = False
    return {
        "bool2d": bool2,
        "bool3d": bool3,
        "float2d": torch.randn(L, L),
        "float3d": torch.randn(N * H, L, L),
    }


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("mask_kind", ["bool2d", "bool3d", "float2d", "float3d"])
@pytest.mark.parametrize("need_weights", [True, False])
def test_attn_mask_matches_torch(layout, batch_first, mask_kind, need_weights):
    mha, ours = _pair(batch_first, layout)
    x = _seq(batch_first, L)
    _check(mha, ours, x, x, x, attn_mask=_masks()[mask_kind], need_weights=need_weights)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("with_attn_mask", [False, True])
def test_key_padding_mask_matches_torch(layout, batch_first, need_weights, with_attn_mask):
    mha, ours = _pair(batch_first, layout)
    q = _seq(batch_first, L)
    k = _seq(batch_first, S)
    pad = torch.zeros(N, S, dtype=torch.bool)
    pad[0, -2:] = True
    pad[2, -4:] = True
    attn_mask = None
    if with_attn_mask:  # bool like the padding mask (torch deprecates mixing the two); key 0 always visible
        attn_mask = torch.rand(L, S) < 0.3
        attn_mask[:, 0] = False
    _check(mha, ours, q, k, k, key_padding_mask=pad, attn_mask=attn_mask, need_weights=need_weights)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights", [True, False])
def test_is_causal_matches_torch(layout, batch_first, need_weights):
    mha, ours = _pair(batch_first, layout)
    x = _seq(batch_first, L)
    causal = nn.Transformer.generate_square_subsequent_mask(L)
    # torch needs the mask with the hint; ours takes either.
    _check(mha, ours, x, x, x, attn_mask=causal, is_causal=True, need_weights=need_weights)
    with torch.no_grad():
        want, _ = mha(x, x, x, attn_mask=causal, need_weights=False)
        got, _ = ours(x, x, x, is_causal=True, need_weights=need_weights)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_without_bias_matches_torch(layout):
    mha, ours = _pair(True, layout, bias=False)
    x = _seq(True, L)
    _check(mha, ours, x, x, x)


def test_packed_layout_shares_torchs_parameters_and_separate_copies_them():
    mha, packed = _pair(True, "packed")
    assert packed.in_proj_weight is mha.in_proj_weight and packed.out_proj is mha.out_proj
    separate = MultiheadAttention.from_torch(mha, "separate")
    assert {"q_proj.weight", "k_proj.weight", "v_proj.weight", "out_proj.weight"} <= set(separate.state_dict())
    assert "in_proj_weight" not in separate.state_dict()
    torch.testing.assert_close(torch.cat([separate.q_proj.weight, separate.k_proj.weight, separate.v_proj.weight]),
                               mha.in_proj_weight)  # fmt: skip


def test_bad_layout_is_rejected():
    mha = nn.MultiheadAttention(E, H)
    with pytest.raises(ValueError, match="layout"):
        MultiheadAttention.from_torch(mha, "fused")
    with pytest.raises(ValueError, match="attention"):
        swap_attention(nn.Sequential(mha), "fused")


def test_unsupported_attention_is_left_alone():
    model = nn.Sequential(nn.MultiheadAttention(E, H, kdim=8, vdim=8))
    assert swap_attention(model) == 0 and type(model[0]) is nn.MultiheadAttention


# --- zoo ViT: attention projections become sites ---------------------------------------------------

FULL = LRDConfig(rank_rule="fixed", rank=10**6, allow_larger=True)


def _small_vit():
    """The zoo's VisionTransformer at test size (vit_b_16's code, hidden 32, two blocks)."""
    return VisionTransformer(32, 8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64, num_classes=10).eval()


def _attention_sites(plan, block):
    return plan[f"{block}.in_proj"], plan[f"{block}.out_proj"]


def _vit_b_16():
    model = zoo.vit_b_16(image_size=32, num_classes=10).eval()
    model.encoder.layers = model.encoder.layers[:1]  # the blocks are identical: one is enough (and fast)
    return model


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_vit_b_16_attention_projections_are_planned(capture):
    plan = fxlrd.plan(_vit_b_16(), example_inputs=torch.randn(2, 3, 32, 32), capture=capture)
    assert plan.settings["capture"]["mode"] == capture
    in_proj, out_proj = _attention_sites(plan, "encoder.layers.encoder_layer_0.self_attention")
    assert in_proj.decomposed and out_proj.decomposed, plan.table()
    assert (in_proj.in_channels, in_proj.out_channels) == (768, 3 * 768)
    assert (out_proj.in_channels, out_proj.out_channels) == (768, 768)
    # Every linear and conv layer of the model is a site (nothing is hidden in a fused op).
    assert {"conv_proj", "encoder.layers.encoder_layer_0.mlp.0", "encoder.layers.encoder_layer_0.mlp.3",
            "heads.head"} <= set(plan.layers)  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("capture", ["fx", "export"])
def test_vit_b_16_attention_projections_are_decomposed(capture):
    model = _vit_b_16()
    x = torch.randn(2, 3, 32, 32)
    cfg = LRDConfig(include=["*self_attention*"], rank_rule="fixed", rank=64)
    gm = fxlrd.transform(model, cfg, example_inputs=x, capture=capture)
    assert gm.fxlrd_capture["mode"] == capture
    block = "encoder.layers.encoder_layer_0.self_attention"
    in_proj, out_proj = _attention_sites(gm.fxlrd_plan, block)
    assert in_proj.decomposed and out_proj.decomposed, gm.fxlrd_plan.table()
    assert in_proj.ranks == out_proj.ranks == (64,)
    assert isinstance(gm.get_submodule(f"{block}.in_proj"), Factorized)
    assert isinstance(gm.get_submodule(f"{block}.out_proj"), Factorized)
    assert {f"{block}.in_proj.in_proj.weight", f"{block}.out_proj.out_proj.bias"} <= set(gm.state_dict())
    assert f"{block}.in_proj_weight" not in gm.state_dict()
    with torch.no_grad():
        assert gm(x).shape == (2, 10)
        assert torch.isfinite(gm(torch.randn(3, 3, 32, 32))).all()


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_vit_attention_sites_full_rank_reproduces(capture):
    model = _small_vit()
    x = torch.randn(2, 3, 32, 32)
    gm = fxlrd.transform(model, FULL, example_inputs=x, capture=capture)
    assert gm.fxlrd_capture["mode"] == capture
    for i in range(2):
        in_proj, out_proj = _attention_sites(gm.fxlrd_plan, f"encoder.layers.encoder_layer_{i}.self_attention")
        assert in_proj.decomposed and out_proj.decomposed
    assert gm.fxlrd_plan["encoder.layers.encoder_layer_0.self_attention.in_proj"].site == "function"
    with torch.no_grad():
        assert rel_err(gm(x), model(x)) <= 1e-5
        x3 = torch.randn(3, 3, 32, 32)
        assert rel_err(gm(x3), model(x3)) <= 1e-5


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_vit_separate_attention_layout_gives_q_k_v_sites(capture):
    model = _small_vit()
    x = torch.randn(2, 3, 32, 32)
    cfg = LRDConfig(attention="separate", rank_rule="fixed", rank=10**6, allow_larger=True)
    gm = fxlrd.transform(model, cfg, example_inputs=x, capture=capture)
    plan = gm.fxlrd_plan
    block = "encoder.layers.encoder_layer_0.self_attention"
    projections = ("q_proj", "k_proj", "v_proj", "out_proj")
    assert all(plan[f"{block}.{p}"].decomposed for p in projections)
    assert all((plan[f"{block}.{p}"].in_channels, plan[f"{block}.{p}"].out_channels) == (32, 32) for p in projections)
    assert f"{block}.in_proj" not in plan.layers
    assert f"{block}.q_proj.out_proj.weight" in gm.state_dict()
    with torch.no_grad():
        assert rel_err(gm(x), model(x)) <= 1e-5


def test_user_model_keeps_torch_attention():
    model = _small_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fxlrd.transform(model, LRDConfig(rank_rule="fixed", rank=4), example_inputs=torch.randn(1, 3, 32, 32))
    assert type(model.encoder.layers[0].self_attention) is nn.MultiheadAttention
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("norm_first", [False, True])
def test_torch_transformer_encoder_layers_are_decomposed(batch_first, norm_first):
    """nn.TransformerEncoder(Layer) reads private attributes of its self_attn to choose a fused
    fast path: the swapped attention must keep it on the path fxlrd captures."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=batch_first, norm_first=norm_first)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    x = torch.randn(3, 5, 32)
    mask = torch.zeros(3 if batch_first else 5, 5 if batch_first else 3, dtype=torch.bool)  # (batch, sequence)
    mask[0, 2:] = True
    inputs = {"src": x, "src_key_padding_mask": mask}
    with torch.no_grad():
        want = model(**inputs)
        gm = fxlrd.transform(model, FULL, example_inputs=inputs)
        torch.testing.assert_close(gm(**inputs), want, rtol=1e-4, atol=1e-4)
        low = fxlrd.transform(model, LRDConfig(ratio=2.0), example_inputs=inputs)
        assert sum(isinstance(m, Factorized) for m in low.modules()) >= 6  # in_proj, out_proj, linear1/2 (some kept)
        assert low(**inputs).shape == want.shape
    assert isinstance(model.layers[0].self_attn, nn.MultiheadAttention)  # the user's model keeps torch's


class _Encoder(nn.Module):  # a torch.nn transformer inside the user's model, padding mask given
    def __init__(self):
        super().__init__()
        self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, dropout=0.0), 2)
        self.head = nn.Linear(32, 8)

    def forward(self, x, padding):
        return self.head(self.enc(x, src_key_padding_mask=padding))


def test_a_torch_transformer_inside_a_model_is_decomposed_and_runs_under_no_grad():
    """fx keeps torch.nn modules whole, so the encoder's 8 linears were left out silently; and
    its nested-tensor path fed the swapped attention a tensor it cannot take (under no_grad)."""
    torch.manual_seed(0)
    model = _Encoder().eval()
    x, padding = torch.randn(2, 6, 32), torch.zeros(2, 6, dtype=torch.bool)
    padding[1, 4:] = True
    gm = fxlrd.transform(model, FULL, example_inputs=(x, padding))
    assert len(gm.fxlrd_plan.decomposed) == 9
    with torch.no_grad():
        got, want = gm(x, padding), model(x, padding)
    real = ~padding
    assert rel_err(got[real], want[real]) <= 1e-5
    # torch's inference path zeroes the encoder's padded positions, the captured graph computes
    # them (as torch does in training, compiled or exported): a capture note says so
    assert any("runs without nested tensors" in n and "'enc'" in n for n in gm.fxlrd_capture["notes"])


@pytest.mark.parametrize("make", ["mha", "transformer"])
def test_packed_cross_attention_is_captured_with_separate_projections(make, tmp_path):
    """The packed layout is self-attention only: a cross-attention's projections used to be
    neither decomposed nor listed. It is captured again in the separate layout."""
    torch.manual_seed(0)
    if make == "mha":
        class Cross(nn.Module):
            def __init__(self):
                super().__init__()
                self.mha = nn.MultiheadAttention(32, 4, batch_first=True)

            def forward(self, x, memory):
                return self.mha(x, memory, memory, need_weights=False)[0]

        make_model, names = Cross, {"mha.q_proj", "mha.k_proj", "mha.v_proj", "mha.out_proj"}
    else:
        class Cross(nn.Module):
            def __init__(self):
                super().__init__()
                self.t = nn.Transformer(32, 4, 1, 1, 64, dropout=0.0, batch_first=True)

            def forward(self, x, memory):
                return self.t(x, memory)

        make_model, names = Cross, {"t.decoder.layers.0.multihead_attn.q_proj", "t.decoder.layers.0.multihead_attn.k_proj"}
    model, inputs = make_model().eval(), (torch.randn(2, 5, 32), torch.randn(2, 7, 32))
    gm = fxlrd.transform(model, FULL, example_inputs=inputs)
    assert names <= {lp.name for lp in gm.fxlrd_plan.decomposed}
    assert any("ran as cross-attention" in n for n in gm.fxlrd_capture["notes"])
    with torch.no_grad():
        assert rel_err(gm(*inputs), model(*inputs)) <= 1e-5
        fxlrd.save(gm, tmp_path / "s")
        assert torch.equal(fxlrd.load(make_model().eval(), tmp_path / "s")(*inputs), gm(*inputs))


# --- unbatched (L, E) inputs, optional masks ------------------------------------------------------


def _unbatched_masks(length, source):
    pad = torch.zeros(source, dtype=torch.bool)
    pad[-2:] = True
    bool2 = torch.rand(length, source) < 0.3
    bool2[:, 0] = False  # key 0 always visible
    return {"none": {}, "key_padding": {"key_padding_mask": pad}, "bool2d": {"attn_mask": bool2},
            "float3d": {"attn_mask": torch.randn(H, length, source)},  # (H, L, S): torch's unbatched 3-D mask
            "both": {"key_padding_mask": pad, "attn_mask": bool2}}  # fmt: skip


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("masks", ["none", "key_padding", "bool2d", "float3d", "both"])
@pytest.mark.parametrize("need_weights, average", [(False, True), (True, True), (True, False)])
def test_unbatched_matches_torch(layout, batch_first, masks, need_weights, average):
    """A 2-D query is one unbatched (L, E) sequence whatever batch_first says: it was read as
    (N, L) or transposed, the output silently wrong."""
    mha, ours = _pair(batch_first, layout)
    q, kv = torch.randn(L, E), torch.randn(S, E)
    kwargs = {"need_weights": need_weights, "average_attn_weights": average}
    _check(mha, ours, q, kv, kv, **kwargs, **_unbatched_masks(L, S)[masks])
    x = torch.randn(L, E)  # self-attention
    _check(mha, ours, x, x, x, **kwargs, **_unbatched_masks(L, L)[masks])


def test_unbatched_inputs_of_mixed_ranks_are_rejected():
    _, ours = _pair(True, "packed")
    with pytest.raises(ValueError, match="3-D"):
        ours(torch.randn(N, L, E), torch.randn(S, E), torch.randn(S, E))
    with pytest.raises(ValueError, match="key_padding_mask"):
        kv = torch.randn(S, E)
        ours(torch.randn(L, E), kv, kv, key_padding_mask=torch.zeros(1, S, dtype=torch.bool))


class _OptionalMasks(nn.Module):
    """Self-attention whose masks are optional inputs (None unless given)."""

    def __init__(self, batch_first=True, need_weights=True):
        super().__init__()
        self.mha = nn.MultiheadAttention(E, H, batch_first=batch_first)
        self.need_weights = need_weights
        with torch.no_grad():
            self.mha.in_proj_bias.normal_()

    def forward(self, x, pad=None, attn_mask=None):
        return self.mha(x, x, x, key_padding_mask=pad, attn_mask=attn_mask, need_weights=self.need_weights)[0]


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("with_masks", [False, True])
def test_unbatched_attention_full_rank_reproduces(capture, batch_first, with_masks):
    torch.manual_seed(0)
    model = _OptionalMasks(batch_first).eval()
    x, pad = torch.randn(L, E), torch.zeros(L, dtype=torch.bool)
    pad[-2:] = True
    attn_mask = torch.randn(H, L, L)
    inputs = (x, pad, attn_mask) if with_masks else (x,)
    gm = fxlrd.transform(model, FULL, example_inputs=inputs, capture=capture)
    assert gm.fxlrd_capture["mode"] == capture
    assert gm.fxlrd_plan["mha.in_proj"].decomposed and gm.fxlrd_plan["mha.out_proj"].decomposed
    with torch.no_grad():
        assert rel_err(gm(*inputs), model(*inputs)) <= 1e-5
        if capture == "fx" or not with_masks:  # (export keeps the masks' shapes static)
            x16 = torch.randn(E, E)  # L = E: a transposed (L, E) used to run, wrong
            masks16 = (torch.zeros(E, dtype=torch.bool), torch.randn(H, E, E)) if with_masks else ()
            assert rel_err(gm(x16, *masks16), model(x16, *masks16)) <= 1e-5


@pytest.mark.parametrize("capture", ["auto", "fx"])
@pytest.mark.parametrize("need_weights", [True, False])
def test_optional_masks_given_as_none_are_captured_and_reproduce(capture, need_weights):
    """fx traces an optional mask input as a tensor: the forward added it to the scores even
    when it was None at run time (a TypeError, reported as inputs that do not run through)."""
    torch.manual_seed(0)
    model = _OptionalMasks(need_weights=need_weights).eval()
    x = torch.randn(N, L, E)
    pad = torch.zeros(N, L, dtype=torch.bool)
    pad[0, -2:] = True
    attn_mask = torch.rand(L, L) < 0.3
    attn_mask.fill_diagonal_(False)
    gm = fxlrd.transform(model, FULL, example_inputs=(x,), capture=capture)
    assert gm.fxlrd_capture["mode"] == "fx"
    assert gm.fxlrd_plan["mha.in_proj"].decomposed
    with torch.no_grad():
        for args in [(x,), (x, pad), (x, None, attn_mask), (x, pad, attn_mask)]:
            assert rel_err(gm(*args), model(*args)) <= 1e-5


@pytest.mark.parametrize("need_weights", [True, False])
def test_is_causal_with_only_a_padding_mask_is_causal(need_weights):
    """is_causal without attn_mask (torch needs the mask, ours takes either) used to be dropped
    when a key_padding_mask was given."""
    mha, ours = _pair(True, "packed")
    x = _seq(True, L)
    pad = torch.zeros(N, L, dtype=torch.bool)
    pad[0, -2:] = True
    causal = nn.Transformer.generate_square_subsequent_mask(L)
    with torch.no_grad():
        want, _ = mha(x, x, x, key_padding_mask=pad, attn_mask=causal, need_weights=False)
        got, _ = ours(x, x, x, key_padding_mask=pad, is_causal=True, need_weights=need_weights)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("need_weights", [True, False])
def test_dropout_acts_in_training_mode_only(layout, need_weights):
    """(mutation audit) an attention with dropout computes torch's eval-mode result in eval
    mode (no dropout, on either path: the explicit softmax or scaled_dot_product_attention),
    and drops attention weights in training mode."""
    mha = nn.MultiheadAttention(E, H, dropout=0.5, batch_first=True).eval()
    ours = MultiheadAttention.from_torch(mha, layout).eval()
    x = torch.randn(N, L, E)
    _check(mha, ours, x, x, x, need_weights=need_weights)
    ours.train()
    with torch.no_grad():
        a, _ = ours(x, x, x, need_weights=need_weights)
        b, _ = ours(x, x, x, need_weights=need_weights)
    assert not torch.allclose(a, b)
