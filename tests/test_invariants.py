"""Invariants over random shapes and settings (hypothesis): what must hold exactly, or in one
direction, whatever the layer's hyper-parameters and the config.

Each example seeds torch from a value hypothesis draws, so a failure replays. Models run in
float64 where the invariant is exact, so "equal" can mean 1e-8 rather than float32 noise.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from torch import nn

import fxlrd
from fxlrd import Factorized, LRDConfig
from fxlrd.fusion import is_pointwise

from conftest import rel_err


def _examples(n: int) -> settings:
    """``n`` examples: each builds and decomposes a model or two, so fewer than the suite's
    default (40); the suite's variable sets them all alike (FXLRD_HYPOTHESIS_EXAMPLES=200 for a
    long search)."""
    return settings(max_examples=int(os.environ.get("FXLRD_HYPOTHESIS_EXAMPLES", n)), deadline=None)


FEW = _examples(15)


def _randomize_norms(model: nn.Module, g: torch.Generator) -> nn.Module:
    """Batch norms with statistics and affine parameters far from the identity (folding them is then visible)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g, dtype=m.running_mean.dtype) * 2 - 1)
                m.running_var.copy_(torch.rand(n, generator=g, dtype=m.running_var.dtype) * 1.5 + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(n, generator=g, dtype=m.weight.dtype) + 0.5)
                    m.bias.copy_(torch.rand(n, generator=g, dtype=m.bias.dtype) - 0.5)
    return model


def _reinit(model: nn.Module, g: torch.Generator) -> nn.Module:
    """Draw the conv and linear parameters from ``g`` (modules built inside a strategy would
    take torch's global random state, which a replayed example does not restore)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)):
                w = m.weight
                w.copy_(torch.randn(w.shape, generator=g, dtype=w.dtype) / w[0].numel() ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g, dtype=m.bias.dtype) * 0.3)
    return model


def _merged(gm: nn.Module) -> list[str]:
    return [n for n, m in gm.named_modules() if hasattr(m, "fxlrd_merge")]


# --- merge="exact" -------------------------------------------------------------------------------
class _Chain(nn.Module):
    """``c(n2(b(n1(a(x)))))``: three layers, each pair with an optional batch norm between."""

    def __init__(self, a: nn.Module, n1: nn.Module, b: nn.Module, n2: nn.Module, c: nn.Module):
        super().__init__()
        self.a, self.n1, self.b, self.n2, self.c = a, n1, b, n2, c

    def forward(self, x):
        return self.c(self.n2(self.b(self.n1(self.a(x)))))


@st.composite
def conv_chains(draw):
    """A 1×1 conv, a k×k conv and a 1×1 conv (Conv1d or Conv2d) with random channels, strides,
    groups, biases and batch norms between, in float64 and eval mode, and an input."""
    nd = draw(st.sampled_from([1, 2]))
    conv, norm = (nn.Conv1d, nn.BatchNorm1d) if nd == 1 else (nn.Conv2d, nn.BatchNorm2d)
    ch = [draw(st.integers(2, 12)) for _ in range(4)]
    groups = [draw(st.sampled_from([1, 1, 1, 2])) for _ in range(2)]
    groups = [g if ch[i] % g == 0 and ch[i + 1] % g == 0 else 1 for g, i in zip(groups, (0, 2))]
    k = draw(st.sampled_from([1, 3]))
    a = conv(ch[0], ch[1], 1, stride=draw(st.integers(1, 2)), groups=groups[0], bias=draw(st.booleans()))
    b = conv(ch[1], ch[2], k, stride=draw(st.integers(1, 2)), padding=draw(st.integers(0, k // 2)),
             bias=draw(st.booleans()))  # fmt: skip
    c = conv(ch[2], ch[3], 1, stride=draw(st.integers(1, 2)), groups=groups[1], bias=draw(st.booleans()))
    n1 = norm(ch[1], affine=draw(st.booleans())) if draw(st.booleans()) else nn.Identity()
    n2 = norm(ch[2], affine=draw(st.booleans())) if draw(st.booleans()) else nn.Identity()
    size = tuple(draw(st.integers(6, 11)) for _ in range(nd))
    return _Chain(a, n1, b, n2, c), (draw(st.integers(1, 3)), ch[0], *size)


@st.composite
def linear_chains(draw):
    """Three linears with optional BatchNorm1d (affine or not) between for 2-D inputs, none
    for 3-D inputs (a BatchNorm1d there normalizes the tokens, not the features)."""
    ch = [draw(st.integers(2, 12)) for _ in range(4)]
    tokens = draw(st.sampled_from([False, False, True]))
    lin = [nn.Linear(ch[i], ch[i + 1], bias=draw(st.booleans())) for i in range(3)]
    norms = [nn.BatchNorm1d(ch[i + 1], affine=draw(st.booleans())) if not tokens and draw(st.integers(0, 3))
             else nn.Identity() for i in range(2)]  # fmt: skip
    shape = (draw(st.integers(1, 4)), draw(st.integers(1, 3)), ch[0]) if tokens else (draw(st.integers(1, 5)), ch[0])
    return _Chain(lin[0], norms[0], lin[1], norms[1], lin[2]), shape


@_examples(25)
@given(case=st.one_of(conv_chains(), linear_chains()), rank=st.integers(1, 8),
       pointwise=st.sampled_from([None, True, False]), seed=st.integers(0, 2**16))  # fmt: skip
def test_exact_merge_reproduces_the_unmerged_decomposition(case, rank, pointwise, seed):
    """merge="exact" folds a norm into a pair of pointwise layers (one of them a factor) and
    composes them, strides multiplied: the merged model must compute what the decomposed
    model before merging computes, for any channels, strides, groups, biases and norms.
    A pair that can merge (a 1×1 layer without groups before a factorized layer's in_proj)
    must merge, so the comparison is not vacuous."""
    torch.manual_seed(seed)
    model, shape = case
    g = torch.Generator().manual_seed(seed)
    model = _randomize_norms(_reinit(model.double(), g), g).eval()
    x = torch.randn(shape, dtype=torch.float64)
    if isinstance(model.a, nn.Linear):
        pointwise = True  # (otherwise nothing is decomposed)
    base = dict(rank_rule="fixed", rank=rank, rank_quantum=1, allow_larger=True)
    merged = fxlrd.transform(model, LRDConfig(**base, merge="exact", decompose_pointwise=pointwise), example_inputs=x)
    plain = fxlrd.transform(model, LRDConfig(**base, decompose_pointwise=bool(pointwise)), example_inputs=x)
    with torch.no_grad():
        want, got = plain(x), merged(x)
    assert got.shape == want.shape
    assert rel_err(got, want) < 1e-9
    b = plain.get_submodule("b")
    if isinstance(b, Factorized) and b.roles()[0] == "in_proj" and is_pointwise(model.a):
        assert _merged(merged), "a 1×1 layer before a factorized layer's in_proj was not merged"


@pytest.mark.parametrize("mode", ["exact", "approximate"])
def test_exact_merge_across_a_norm_without_affine_parameters_between_linears(mode):
    """A BatchNorm1d(affine=False) between two linears is a fixed affine map in eval mode: it
    folds like any other (torch's linear folding reads the norm's weight and bias, which such
    a norm has not: merging raised a TypeError)."""
    torch.manual_seed(0)
    model = _randomize_norms(nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6, affine=False), nn.Linear(6, 6)),
                             torch.Generator().manual_seed(0)).eval()  # fmt: skip
    x = torch.randn(5, 6)
    base = dict(rank_rule="fixed", rank=2, rank_quantum=1, decompose_pointwise=True)
    plain = fxlrd.transform(model, LRDConfig(**base), example_inputs=x)
    merged = fxlrd.transform(model, LRDConfig(**base, merge=mode), example_inputs=x)
    assert _merged(merged)
    with torch.no_grad():
        torch.testing.assert_close(merged(x), plain(x), rtol=1e-5, atol=1e-5)


# --- branches=N ----------------------------------------------------------------------------------
def _low_multilinear_rank(s: int, c: int, kernel: tuple[int, ...], t_out: int, t_in: int,
                          g: torch.Generator) -> torch.Tensor:  # fmt: skip
    """A float64 conv weight ``(s, c, *kernel)`` of multilinear rank at most ``(t_out, t_in)``
    in its output and input channel modes."""
    core = torch.randn(t_out, t_in, *kernel, generator=g, dtype=torch.float64)
    u = torch.randn(s, t_out, generator=g, dtype=torch.float64)
    v = torch.randn(c, t_in, generator=g, dtype=torch.float64)
    return torch.einsum("rq...,sr,cq->sc...", core, u, v)


@FEW
@given(data=st.data(), branches=st.integers(2, 3), init=st.sampled_from(["btd", "truncate"]),
       calibrated=st.sampled_from([None, False, True]), seed=st.integers(0, 2**16))  # fmt: skip
def test_branches_are_exact_where_one_block_holds_the_weight(data, branches, init, calibrated, seed):
    """With ranks ``(N·R1, N·R2)`` and a weight of multilinear rank at most ``(R1, R2)``, the
    Tucker core has one non-zero diagonal block, so the N-branched core (grouped conv)
    represents it exactly, by truncation and by block-term fitting, data-free or data-aware
    (``calibrated``: sensitivity off or on): the branched layer must equal the original. The
    plan must say what the branched model holds: its ranks and parameter counts."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    r1, r2 = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3))
    c = data.draw(st.integers(branches * r1 + 1, branches * r1 + 4))  # both channel modes keep a factor
    s = data.draw(st.integers(branches * r2 + 1, branches * r2 + 4))
    kernel = data.draw(st.sampled_from([(3, 3), (1, 3), (2, 2)]))
    conv = nn.Conv2d(c, s, kernel, stride=data.draw(st.integers(1, 2)), padding=data.draw(st.integers(0, 1)),
                     bias=data.draw(st.booleans())).double()  # fmt: skip
    true_ranks = data.draw(st.integers(1, r2)), data.draw(st.integers(1, r1))
    with torch.no_grad():
        conv.weight.copy_(_low_multilinear_rank(s, c, kernel, *true_ranks, g))
    model = nn.Sequential(conv).eval()
    size = data.draw(st.integers(5, 9))
    x = torch.randn(2, c, size, size, dtype=torch.float64, generator=g)
    mix = torch.randn(c, c, generator=g, dtype=torch.float64)  # correlated channels
    batches = [torch.einsum("nchw,dc->ndhw", torch.randn(8, c, size, size, generator=g, dtype=torch.float64), mix)
               for _ in range(3)] if calibrated is not None else None  # fmt: skip
    config = LRDConfig(rank_rule="fixed", rank=(branches * r1, branches * r2), rank_quantum=1, allow_larger=True,
                       branches=branches, branch_init=init, sensitivity=bool(calibrated))  # fmt: skip
    gm = fxlrd.transform(model, config, example_inputs=x, calibration=batches)
    fact = gm.get_submodule("0")
    assert fact.roles() == ["in_proj", "core", "out_proj"] and fact.core.groups == branches
    assert fact.ranks == (branches * r1, branches * r2)
    with torch.no_grad():
        assert rel_err(gm(x), model(x)) < 1e-8
    lp = gm.fxlrd_plan["0"]
    assert lp.ranks == fact.ranks and lp.params_after == fxlrd.count_params(fact)
    assert gm.fxlrd_plan.params_after_model() == fxlrd.count_params(gm)


# --- mlp="narrow" --------------------------------------------------------------------------------
class _MLP(nn.Module):
    def __init__(self, inp: int, hidden: int, out: int, act: nn.Module, bias: bool):
        super().__init__()
        self.up, self.act, self.down = nn.Linear(inp, hidden, bias=bias), act, nn.Linear(hidden, out, bias=bias)

    def forward(self, x):
        return self.down(self.act(self.up(x)))


@FEW
@given(inp=st.integers(2, 8), k=st.integers(1, 4), extra=st.integers(1, 8), out=st.integers(1, 6), bias=st.booleans(),
       act=st.sampled_from(["relu", "leaky_relu", "identity"]), sensitivity=st.booleans(),
       seed=st.integers(0, 2**16))  # fmt: skip
# linear units with k > inp span only inp dimensions: the kept neurons' Gram matrix is singular, which the
# refit without a ridge used to fail on (torch.linalg.solve); the least-norm refit is exact all the same
@example(inp=2, k=4, extra=1, out=1, bias=False, act="identity", sensitivity=False, seed=971)
def test_narrowing_hidden_units_that_span_k_dimensions_to_k_is_exact(inp, k, extra, out, bias, act, sensitivity, seed):
    """Hidden units that are functions of k of them — positive multiples of k neurons under a
    positively homogeneous activation (ReLU, leaky ReLU), or any linear combinations of k
    without one (``nn.Identity``) — in any order: narrowing to width k on the sample moments
    keeps k neurons that span them (one of each group), their ``up`` rows untouched, and the
    least-squares refit of ``down`` makes the block exact on any input (checked without the
    refit's ridge toward the layer's own weights). ``transform(mlp="narrow")`` at the ratio that
    gives width k narrows to k, ``up`` rows untouched (which neurons it keeps, on moments shrunk
    toward a scaled identity: `test_narrowing_through_transform_keeps_a_neuron_of_every_group`)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    hidden = k + extra
    model = _MLP(inp, hidden, out, {"relu": nn.ReLU(), "leaky_relu": nn.LeakyReLU(0.2), "identity": nn.Identity()}[act],
                 bias).double().eval()  # fmt: skip
    group = _span_k(model, k, act, g)
    cal = [torch.randn(64, inp, generator=g, dtype=torch.float64) + 0.3 for _ in range(3)]
    x = torch.randn(40, inp, generator=g, dtype=torch.float64) * 2
    with torch.no_grad():
        active = (model.up(torch.cat(cal)) > 0).double().mean(0)
    assume(act != "relu" or all(active[group == j].min() > 0.05 for j in range(k)))  # no neuron dead on the data
    gm, narrowed = _narrow_on_sample_moments(model, cal, k, sensitivity, ridge=0.0)
    assert gm.up.weight.shape == (k, inp) and gm.down.weight.shape == (out, k)
    assert torch.equal(gm.up.weight, model.up.weight[narrowed.keep])
    if act != "identity":
        assert sorted(int(group[i]) for i in narrowed.keep) == list(range(k)), "two neurons of one group kept"
    assert narrowed.error < 1e-9
    with torch.no_grad():
        assert rel_err(gm(x), model(x)) < 1e-7

    params = hidden * (inp + out + bias) + out * bias
    ratio = params / (k * (inp + bias + out) + out * bias + (inp + bias + out) / 2)  # width k, rounded down
    if ratio > 1:
        api = fxlrd.transform(model, LRDConfig(ratio=ratio, rank_quantum=1, mlp="narrow", sensitivity=sensitivity),
                              example_inputs=cal[0], calibration=cal)  # fmt: skip
        (record,) = api.fxlrd_plan.settings["narrowed"]
        assert record["width"] == k and api.up.weight.shape == (k, inp) and api.down.weight.shape == (out, k)
        assert torch.equal(api.up.weight, model.up.weight[record["keep"]])


def _span_k(model: _MLP, k: int, act: str, g: torch.Generator) -> torch.Tensor:
    """Make ``model``'s hidden units functions of k of them (see the test above); returns each
    unit's group (its base neuron) for the homogeneous activations."""
    hidden, inp = model.up.weight.shape
    group = torch.cat([torch.arange(k), torch.randint(0, k, (hidden - k,), generator=g)])
    group = group[torch.randperm(hidden, generator=g)]
    if act == "identity":
        mix = torch.randn(hidden, k, generator=g, dtype=torch.float64)  # any combinations (of at most min(k, inp) dims)
    else:
        mix = torch.zeros(hidden, k, dtype=torch.float64)
        mix[torch.arange(hidden), group] = torch.rand(hidden, generator=g, dtype=torch.float64) * 2 + 0.25
    with torch.no_grad():
        model.up.weight.copy_(mix @ torch.randn(k, inp, generator=g, dtype=torch.float64))
        if model.up.bias is not None:
            model.up.bias.copy_(mix @ torch.randn(k, generator=g, dtype=torch.float64))
    return group


def _narrow_on_sample_moments(model: nn.Module, cal, width: int, sensitivity: bool, ridge: float):
    """``model`` captured and its one block narrowed to ``width`` on the plain sample moments."""
    from fxlrd.calibrate import collect_stats
    from fxlrd.capture import capture
    from fxlrd.narrow import find_mlps, narrow_block

    gm = capture(model, cal[0], mode="fx").gm
    (block,) = find_mlps(gm)
    stats = collect_stats(gm, cal, names=[block.down], sensitivity=sensitivity, progress=False)[block.down]
    stats.inputs.shrink = False
    return gm, narrow_block(gm, block, stats, width, ridge=ridge)


def test_narrowing_through_transform_keeps_a_neuron_of_every_group():
    """Seven ReLU neurons, positive multiples of two (three of one, four of the other), 1 920
    calibration samples: narrowing to two neurons must keep one of each group (then the block
    is exact up to the shrinkage's bias), not two copies of one, which drops the other group's
    output altogether (its share of the output is small, but real)."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = _MLP(2, 7, 1, nn.ReLU(), bias=False).double().eval()
    group = _span_k(model, 2, "relu", g)
    cal = [torch.randn(640, 2, generator=g, dtype=torch.float64) + 0.3 for _ in range(3)]
    x = torch.randn(400, 2, generator=g, dtype=torch.float64) + 0.3
    exact, _ = _narrow_on_sample_moments(model, cal, 2, False, 1e-6)
    ratio = 7 * 3 / (2 * 3 + 1.5)  # width 2
    gm = fxlrd.transform(model, LRDConfig(ratio=ratio, rank_quantum=1, mlp="narrow", sensitivity=False),
                         example_inputs=cal[0], calibration=cal)  # fmt: skip
    (record,) = gm.fxlrd_plan.settings["narrowed"]
    with torch.no_grad():
        errors = rel_err(gm(x), model(x)), rel_err(exact(x), model(x))
    kept = sorted(int(group[i]) for i in record["keep"])
    assert kept == [0, 1], f"kept {record['keep']} of groups {group.tolist()}; errors (here, sample moments): {errors}"


# --- data-aware fitting --------------------------------------------------------------------------
@st.composite
def pointwise_layers(draw):
    """A Linear (2-D or 3-D input) or a 1×1 Conv1d/Conv2d (any stride and padding) in float64,
    a rank below full, and its input's kind and leading shape."""
    kind = draw(st.sampled_from(["linear", "conv1d", "conv2d"]))
    c, s = draw(st.integers(3, 12)), draw(st.integers(3, 12))
    bias = draw(st.booleans())
    if kind == "linear":
        layer, lead = nn.Linear(c, s, bias=bias), (draw(st.integers(8, 40)),) + ((3,) if draw(st.booleans()) else ())
    else:
        stride = draw(st.integers(1, 3))
        padding = draw(st.sampled_from([0, 1, "valid"] if stride > 1 else [0, 1, "valid", "same"]))
        layer = (nn.Conv1d if kind == "conv1d" else nn.Conv2d)(c, s, 1, stride=stride, padding=padding, bias=bias)
        lead = (draw(st.integers(2, 6)),)
    return layer.double(), kind, lead, draw(st.integers(1, min(c, s) - 1))


def _correlated_batches(kind: str, lead: tuple[int, ...], c: int, g: torch.Generator, n: int = 3) -> list[torch.Tensor]:
    """Correlated channels of unequal scales, with a mean; a conv's channel scales also differ
    from one position class (mod 6) to another, so statistics over positions the layer does
    not read would mislead the fit."""
    mix = torch.randn(c, c, generator=g, dtype=torch.float64) * torch.logspace(0, -2, c, dtype=torch.float64)
    spatial = {"linear": (), "conv1d": (9,), "conv2d": (8, 7)}[kind]
    classes = 10 ** (torch.rand(c, *[6] * len(spatial), generator=g, dtype=torch.float64) * 4 - 2)
    scale = classes.repeat(1, *[2] * len(spatial))[(slice(None), *(slice(0, n) for n in spatial))]
    out = []
    for _ in range(n):
        if kind == "linear":
            x = torch.randn(*lead, c, generator=g, dtype=torch.float64) @ mix.T
        else:
            x = torch.randn(*lead, c, *spatial, generator=g, dtype=torch.float64)
            x = torch.einsum("nc...,dc->nd...", x, mix) * scale
        shift = 0.5 * torch.randn(c, generator=g, dtype=torch.float64)  # (a mean, which whitening sees)
        out.append(x + (shift if kind == "linear" else shift.reshape(c, *[1] * len(spatial))))
    return out


def _read_samples(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The rows a linear or 1×1 conv multiplies its weight with: a conv's padded input at its
    stride (written out here, independently of fxlrd's statistics)."""
    c = layer.weight.shape[1]
    if isinstance(layer, nn.Linear):
        return x.reshape(-1, c)
    pad = (0,) * (x.dim() - 2) if isinstance(layer.padding, str) else layer.padding  # 'valid', or 'same' of a 1×1
    x = torch.nn.functional.pad(x, [p for p in reversed(pad) for _ in range(2)])
    x = x[(slice(None), slice(None), *(slice(None, None, s) for s in layer.stride))]
    return x.movedim(1, -1).reshape(-1, c)


@FEW
@given(case=pointwise_layers(), seed=st.integers(0, 2**16))
def test_whitened_truncation_is_the_output_optimum_and_never_worse_than_data_free(case, seed):
    """The data-aware SVD of a linear or 1×1 conv (any stride and padding) is fitted to the
    samples the layer reads — a conv's padded input at its stride: the statistics' Gram
    matrix is theirs — and minimises the output error on them at its rank, on their second
    moments shrunk toward a scaled identity (``G'``): ``tr(E G' Eᵀ)`` is the tail of the
    squared singular values of ``W G'^½``. As the shrinkage only mixes in the data-free
    objective, whose optimum is the plain SVD, the data-aware layer is also never worse than
    the data-free one on the calibration data."""
    from fxlrd.calibrate import collect_stats
    from fxlrd.capture import capture

    torch.manual_seed(seed)
    layer, kind, lead, rank = case
    g = torch.Generator().manual_seed(seed)
    model = _reinit(nn.Sequential(layer), g).eval()
    batches = _correlated_batches(kind, lead, layer.weight.shape[1], g)
    config = LRDConfig(rank_rule="fixed", rank=rank, rank_quantum=1, allow_larger=True, sensitivity=False)
    free = fxlrd.transform(model, config, example_inputs=batches[0])
    aware = fxlrd.transform(model, config, example_inputs=batches[0], calibration=batches)
    assert aware.get_submodule("0").ranks == free.get_submodule("0").ranks == (rank,)

    samples = torch.cat([_read_samples(layer, x) for x in batches])
    stats = collect_stats(capture(model, batches[0], mode="fx").gm, batches, names=["0"], progress=False)["0"].inputs
    torch.testing.assert_close(stats.gram, samples.T @ samples, rtol=1e-10, atol=1e-10 * float(stats.gram.abs().max()))
    shrunk = stats.regularized()
    vals, vecs = torch.linalg.eigh(shrunk)
    with torch.no_grad():
        w = layer.weight.reshape(layer.weight.shape[0], -1)
        fact = aware.get_submodule("0")
        e = w - fact.out_proj.weight.reshape(w.shape[0], -1) @ fact.in_proj.weight.reshape(rank, -1)
        optimum = float(torch.linalg.svdvals(w @ (vecs * vals.clamp_min(0).sqrt()) @ vecs.T)[rank:].pow(2).sum())
        assert float((e @ shrunk * e).sum()) <= optimum * (1 + 1e-6) + 1e-10 * float((w @ shrunk * w).sum())

    def error(gm):
        with torch.no_grad():
            return sum(float((gm(x) - model(x)).pow(2).sum()) for x in batches)

    with torch.no_grad():
        total = sum(float(model(x).pow(2).sum()) for x in batches)
    assert error(aware) <= error(free) * (1 + 1e-6) + 1e-12 * total


@pytest.mark.parametrize("padding, read", [(1, 1), ("valid", 0)])
def test_statistics_of_a_strided_pointwise_conv_are_over_the_positions_it_reads(padding, read):
    """A stride-2 1×1 conv reads every other position (the odd ones of the input when it pads
    by 1): there the first channels are large, elsewhere the last ones. Fitted to the positions
    it reads, the whitened SVD keeps the first channels and is the optimum; fitted to all (as
    it was when the conv pads), it keeps the last ones and loses to the data-free SVD (whose
    weight slightly favours the first) by a factor of 4."""
    c = 8
    conv = nn.Conv2d(c, c, 1, stride=2, padding=padding, bias=False).double()
    with torch.no_grad():
        conv.weight.copy_(torch.diag(torch.logspace(0, -0.2, c, dtype=torch.float64)).reshape(c, c, 1, 1))
    model = nn.Sequential(conv).eval()
    reads = torch.zeros(9, 9, dtype=torch.bool)
    reads[read::2, read::2] = True
    first, last = torch.logspace(0, -2, c, dtype=torch.float64), torch.logspace(-2, 0, c, dtype=torch.float64)
    scale = torch.where(reads, first[:, None, None], last[:, None, None])
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(4, c, 9, 9, generator=g, dtype=torch.float64) * scale for _ in range(3)]
    config = LRDConfig(rank_rule="fixed", rank=2, rank_quantum=1, sensitivity=False)
    free = fxlrd.transform(model, config, example_inputs=batches[0])
    aware = fxlrd.transform(model, config, example_inputs=batches[0], calibration=batches)
    with torch.no_grad():
        errors = [sum(float((gm(x) - model(x)).pow(2).sum()) for x in batches) for gm in (aware, free)]
    assert errors[0] <= errors[1] * (1 + 1e-6)


class _Deep(nn.Module):
    def __init__(self, widths: list[int], act: str, conv: bool):
        super().__init__()
        make = (lambda a, b: nn.Conv2d(a, b, 1)) if conv else nn.Linear
        self.layers = nn.ModuleList(make(a, b) for a, b in zip(widths, widths[1:]))
        self.act = {"tanh": nn.Tanh(), "relu": nn.ReLU(), "gelu": nn.GELU()}[act]

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == 0 else layer(self.act(x))
        return x


low_rank_models = dict(
    widths=st.lists(st.integers(3, 12), min_size=3, max_size=5), rank=st.integers(1, 3), conv=st.booleans(),
    act=st.sampled_from(["tanh", "relu", "gelu"]), sensitivity=st.booleans(), samples=st.sampled_from([6, 200]),
    seed=st.integers(0, 2**16),
)  # fmt: skip


def _check_low_rank_reproduced(widths, rank, conv, act, sensitivity, samples, seed, sequential):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = _Deep(widths, act, conv).double().eval()
    with torch.no_grad():
        for layer in model.layers:
            s, c = layer.weight.shape[:2]
            u, v = (torch.randn(n, rank, generator=g, dtype=torch.float64) for n in (s, c))
            layer.weight.copy_((u @ v.T).reshape(layer.weight.shape) / c**0.5)
    shape = lambda n: (n, widths[0], 2, 3) if conv else (n, widths[0])  # noqa: E731
    batches = [torch.randn(shape(samples), generator=g, dtype=torch.float64) for _ in range(2)]
    x = torch.randn(shape(5), generator=g, dtype=torch.float64) * 3
    config = LRDConfig(rank_rule="fixed", rank=rank, rank_quantum=1, allow_larger=True, sensitivity=sensitivity,
                       sequential=sequential)  # fmt: skip
    gm = fxlrd.transform(model, config, example_inputs=batches[0], calibration=batches)
    assert all(lp.decomposed and lp.data_aware for lp in gm.fxlrd_plan)
    with torch.no_grad():
        assert rel_err(gm(x), model(x)) < 1e-9


@FEW
@given(**low_rank_models, sequential=st.booleans())
def test_exactly_low_rank_weights_are_reproduced_data_aware(widths, rank, conv, act, sensitivity, samples, seed,
                                                            sequential):  # fmt: skip
    """Every layer's weight of rank at most r, decomposed at rank r from calibration data —
    whitened, with or without output sensitivity, from few samples (strong shrinkage, and
    ReLU channels that may be closed on all of them) or many, fitted sequentially or not —
    is reproduced, so the model is, on inputs the calibration never saw. Sequentially: where
    the earlier layers are reproduced, the compressed model's inputs are the original's
    (``C = G``), the compensated weight ``W C G̃⁻¹`` must be ``W`` (its ridge included: it
    pulled the map toward zero, 1e-7..1e-4 off), and its truncation at rank r is exact."""
    _check_low_rank_reproduced(widths, rank, conv, act, sensitivity, samples, seed, sequential)


def test_sequential_fit_keeps_a_layer_whose_calibration_inputs_are_all_zero():
    """A layer behind ReLUs that no calibration sample opens: the data says nothing about its
    weight, so at full rank it must stay as it is (the non-sequential fit keeps it), not become
    zero (the compensating map solved ``(G + dI) M = C`` with ``G = C = 0``) — on other inputs
    those ReLUs open."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)).eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(4))
        model[0].bias.fill_(-5.0)  # closed on the calibration data
    cal = [torch.randn(32, 4) for _ in range(2)]
    x = torch.full((1, 4), 10.0)
    config = dict(rank_rule="fixed", rank=4, rank_quantum=1, allow_larger=True)
    plain = fxlrd.transform(model, LRDConfig(**config), example_inputs=cal[0], calibration=cal)
    seq = fxlrd.transform(model, LRDConfig(**config, sequential=True), example_inputs=cal[0], calibration=cal)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), model(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(seq(x), model(x), rtol=1e-4, atol=1e-4)


# --- random configs: the plan's sizes, save → load --------------------------------------------------
class _Net(nn.Module):
    """A 3×3 stem, a bottleneck (1×1, strided 3×3, 1×1 with norms, activations optional) and an
    MLP head: every method, merge and narrowing has something to act on."""

    def __init__(self, act: bool):
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c1, self.n1 = nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16)
        self.c2, self.n2 = nn.Conv2d(16, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16)
        self.c3 = nn.Conv2d(16, 12, 1)
        self.act = nn.ReLU() if act else nn.Identity()
        self.fc1, self.fc2 = nn.Linear(12, 24), nn.Linear(24, 5)

    def forward(self, x):
        x = torch.relu(self.bn0(self.stem(x)))
        x = self.c3(self.act(self.n2(self.c2(self.act(self.n1(self.c1(x)))))))
        return self.fc2(torch.nn.functional.gelu(self.fc1(x.mean((2, 3)))))


def _net(act: bool, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return _randomize_norms(_Net(act), torch.Generator().manual_seed(seed)).eval()


@st.composite
def configs(draw, merge=st.sampled_from([None, "exact", "approximate"])):
    """Random settings of `LRDConfig` (method, ratio, quantum, pointwise layers, branches, merge)
    and of the data-aware fit (none, whitened, sequential, global allocation, narrowed MLPs)."""
    conv_method = draw(st.sampled_from(["tucker2", "cp"]))
    kw = dict(ratio=draw(st.floats(1.2, 3.0)), rank_quantum=draw(st.sampled_from([1, 2, 4])), conv_method=conv_method,
              cp_iters=10, decompose_pointwise=draw(st.sampled_from([None, True, False])),
              merge=draw(merge))  # fmt: skip
    if conv_method == "tucker2" and draw(st.booleans()):
        kw.update(branches=2, branch_init=draw(st.sampled_from(["btd", "truncate"])))
    data = draw(st.sampled_from([None, "plain", "sequential", "global", "narrow", "narrow"]))
    if data is not None:
        kw.update(sensitivity=draw(st.booleans()), sequential=data == "sequential",
                  allocation="global" if data == "global" else "uniform",
                  mlp="narrow" if data == "narrow" else "factorize")  # fmt: skip
    if data == "narrow":
        kw["decompose_pointwise"] = True  # (narrowing leaves the layers it would not decompose alone)
    return kw, data is not None


def _build(kw, calibrated, act, seed):
    model = _net(act, seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 12, 12, generator=g)
    batches = [torch.randn(8, 3, 12, 12, generator=g) for _ in range(2)] if calibrated else None
    return model, x, fxlrd.transform(model, LRDConfig(**kw), example_inputs=x, calibration=batches)


@FEW
@given(case=configs(), act=st.booleans(), seed=st.integers(0, 2**16))
def test_the_plan_counts_the_parameters_the_model_holds(case, act, seed):
    """Whatever the method, ratio, quantum, branching, merging or data-aware fit (narrowed MLP
    blocks included), ``params_after_model()`` is the model's parameter count; without a merge
    (which moves parameters between names) each decomposed layer's ``params_after`` is the
    count of the module at its name, and a narrowed block's that of its two layers."""
    kw, calibrated = case
    model, x, gm = _build(kw, calibrated, act, seed)
    plan = gm.fxlrd_plan
    assert plan.model_params == fxlrd.count_params(model)
    for lp in plan.decomposed if not _merged(gm) else ():
        assert lp.params_after == fxlrd.count_params(gm.get_submodule(lp.name)), lp.name
    for block in plan.settings.get("narrowed") or ():
        layers = fxlrd.count_params(gm.get_submodule(block["up"])) + fxlrd.count_params(gm.get_submodule(block["down"]))
        assert block["params_after"] == layers
    assert plan.params_after_model() == fxlrd.count_params(gm)


@FEW
@given(case=configs(), act=st.booleans(), seed=st.integers(0, 2**16))
def test_save_then_load_is_bitwise_for_any_config(case, act, seed):
    """Whatever the config, a decomposed (and then changed: fine-tuned) model saved and loaded
    onto a fresh model of the same architecture has the same state, bit for bit, the same plan
    and the same outputs; the loaded model needs no calibration data."""
    import tempfile

    kw, calibrated = case
    model, x, gm = _build(kw, calibrated, act, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in gm.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    with tempfile.TemporaryDirectory() as tmp:
        fxlrd.save(gm, os.path.join(tmp, "saved"))
        loaded = fxlrd.load(_net(act, seed + 7), os.path.join(tmp, "saved"))
    a, b = gm.state_dict(), loaded.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert loaded.fxlrd_plan.to_dict() == gm.fxlrd_plan.to_dict()
    with torch.no_grad():
        assert torch.equal(loaded(x), gm(x))
