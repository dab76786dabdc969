"""Regressions in recovery and freezing: refused distillation steps and buffers, batch forms of
norm re-estimation, a freezer's optimizer during distillation, stable parameter groups, and
re-traced models."""

import copy

import pytest
import torch
from torch import fx, nn
from torch.utils.data import DataLoader, TensorDataset

import fxlrd
from fxlrd import LRDConfig, SequentialFreezer, param_groups
from fxlrd.recover import distill, reestimate_norms, refit_merged


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()  # fmt: skip


def _decomposed(model, x):
    return fxlrd.transform(model, LRDConfig(ratio=2, rank_quantum=1), example_inputs=x)


def _buffers(gm):
    return {k: v.clone() for k, v in gm.named_buffers()}


def _norm_stats(gm):
    return {n: (m.momentum, {k: v.clone() for k, v in m.named_buffers()})
            for n, m in gm.named_modules() if isinstance(m, nn.BatchNorm2d)}  # fmt: skip


def _same_stats(a, b):
    return a.keys() == b.keys() and all(
        a[n][0] == b[n][0] and all(torch.equal(a[n][1][k], b[n][1][k]) for k in a[n][1]) for n in a
    )


# --- 1. distill(train_mode=True) and a refused step ------------------------------------------------


def test_a_refused_train_mode_step_leaves_the_running_statistics():
    """The forward of a batch whose loss is NaN used to write NaN into the batch-norm statistics."""
    model = _cnn()
    x, y = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    gm = _decomposed(model, x)
    reestimate_norms(gm, [x], which="all")
    before = _buffers(gm)
    with pytest.raises(FloatingPointError, match="stopped before it reached the parameters"):
        distill(gm, model, [bad], steps=3, train_mode=True, progress=False)
    after = _buffers(gm)
    assert all(torch.equal(before[k], after[k]) for k in before)
    gm.eval()
    assert torch.isfinite(gm(x)).all()
    # at step k: the buffers (and parameters) of step k, as a run that stopped there has them
    done, refused = copy.deepcopy(gm), copy.deepcopy(gm)
    distill(done, model, [x, y], steps=2, train_mode=True, progress=False)
    with pytest.raises(FloatingPointError, match="at step 2"):
        distill(refused, model, [x, y, bad], steps=3, train_mode=True, progress=False)
    for (k, a), (_, b) in zip(done.named_buffers(), refused.named_buffers()):
        assert torch.equal(a, b), k
    for (k, a), (_, b) in zip(done.named_parameters(), refused.named_parameters()):
        assert torch.equal(a, b), k


# --- 2. reestimate_norms / refit_merged take every batch form --------------------------------------


def test_reestimate_norms_takes_loader_lists_and_dict_batches():
    model = _cnn()
    X = torch.randn(16, 3, 8, 8)
    gm = _decomposed(model, X[:2])
    reestimate_norms(gm, [X[:4], X[4:8], X[8:12], X[12:]], which="all")
    want = _norm_stats(gm)
    reestimate_norms(gm, [X[:8]], which="all")
    reestimate_norms(gm, DataLoader(TensorDataset(X), batch_size=4), which="all")  # batches are [tensor]
    assert all(torch.allclose(want[n][1][k].float(), got[1][k].float(), atol=1e-5)
               for n, got in _norm_stats(gm).items() for k in got[1])  # fmt: skip
    reestimate_norms(gm, [X[:8]], which="all")
    reestimate_norms(gm, [{"input": X[i : i + 4]} for i in range(0, 16, 4)], which="all")
    assert all(torch.allclose(want[n][1][k].float(), got[1][k].float(), atol=1e-5)
               for n, got in _norm_stats(gm).items() for k in got[1])  # fmt: skip


def test_a_failed_reestimation_leaves_the_norms_statistics():
    model = _cnn()
    x = torch.randn(8, 3, 8, 8)
    gm = _decomposed(model, x)
    reestimate_norms(gm, [x], which="all")
    gm.get_submodule("1").momentum = 0.3
    before = _norm_stats(gm)
    with pytest.raises(Exception):
        reestimate_norms(gm, [2 * x, torch.randn(8, 5, 8, 8)], which="all")  # the second batch does not fit
    assert _same_stats(before, _norm_stats(gm))
    assert not any(m.training for m in gm.modules())


def test_refit_merged_takes_a_loader():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 32, 1), nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1),
                          nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 16, 1)).eval()  # fmt: skip
    reference = fxlrd.transform(model, LRDConfig(rank_rule="fixed", rank=8, decompose_pointwise=False))
    gm = fxlrd.transform(model, LRDConfig(rank_rule="fixed", rank=8, merge="approximate"))
    X = torch.randn(16, 8, 6, 6)
    gm_list = copy.deepcopy(gm)
    want = refit_merged(gm_list, reference, [X[:8], X[8:]])
    got = refit_merged(gm, reference, DataLoader(TensorDataset(X), batch_size=8))
    assert want and got.keys() == want.keys()
    for name in want:
        assert got[name] == pytest.approx(want[name], rel=1e-6, abs=1e-9)


# --- 3. a SequentialFreezer with its own optimizer inside distill ----------------------------------


def test_distill_drops_newly_frozen_state_from_its_own_optimizer(monkeypatch):
    model = _cnn()
    xs = [torch.randn(4, 3, 8, 8) for _ in range(3)]
    gm = _decomposed(model, xs[0])
    user_opt = torch.optim.SGD(param_groups(gm), lr=0.01, momentum=0.9)
    freezer = SequentialFreezer(gm, period=1, optimizer=user_opt)
    made = []
    init = torch.optim.Adam.__init__

    def recording(self, *a, **k):
        init(self, *a, **k)
        made.append(self)

    monkeypatch.setattr(torch.optim.Adam, "__init__", recording)
    distill(gm, model, xs, steps=3, lr=1e-3, freeze=freezer, progress=False)
    frozen = [p for p in gm.parameters() if not p.requires_grad]
    assert made and frozen
    assert not any(p in made[0].state for p in frozen)
    assert freezer.optimizer is user_opt  # given back after the run


# --- 4. param_groups do not depend on the current flags ---------------------------------------------


def test_param_groups_are_the_same_in_every_phase():
    model = _cnn()
    x = torch.randn(4, 3, 8, 8)
    gm = _decomposed(model, x)
    fxlrd.freeze(gm, "paper")
    layout = lambda: [(g["name"], [id(p) for p in g["params"]]) for g in param_groups(gm)]  # noqa: E731
    paper = layout()
    groups = param_groups(gm)
    assert [g["name"] for g in groups] == ["factors_trainable", "factors_frozen", "other"]
    assert all(p.requires_grad for p in groups[0]["params"]) and not any(p.requires_grad for p in groups[1]["params"])
    freezer = SequentialFreezer(gm, period=1)
    freezer.step()  # phase 1: the other factors train
    assert layout() == paper
    fxlrd.freeze(gm, "none")
    assert layout() == paper


def test_resuming_in_a_later_phase_puts_momentum_on_the_same_parameters(tmp_path):
    model = _cnn()
    x = torch.randn(4, 3, 8, 8)
    gm = _decomposed(model, x)
    fxlrd.freeze(gm, "paper")
    opt = torch.optim.SGD(param_groups(gm), lr=0.01, momentum=0.9)
    freezer = SequentialFreezer(gm, period=1, optimizer=opt)
    gm.train()
    for switch in (True, False):
        opt.zero_grad()
        gm(x).pow(2).mean().backward()
        opt.step()
        if switch:
            freezer.step()  # phase 1
    names = {id(p): n for n, p in gm.named_parameters()}
    truth = {names[id(p)]: s["momentum_buffer"] for p, s in opt.state.items()}
    fxlrd.save(gm, tmp_path / "ck")
    state = opt.state_dict()
    loaded = fxlrd.load(_cnn(), tmp_path / "ck")
    opt2 = torch.optim.SGD(param_groups(loaded), lr=0.01, momentum=0.9)
    opt2.load_state_dict(state)
    names2 = {id(p): n for n, p in loaded.named_parameters()}
    got = {names2[id(p)]: s["momentum_buffer"] for p, s in opt2.state.items()}
    assert got.keys() == truth.keys()
    assert all(torch.equal(got[n], truth[n]) for n in truth)


# --- 5. a model re-traced after freezing ------------------------------------------------------------


def test_a_model_re_traced_after_freezing_still_trains():
    """freeze, then fx.symbolic_trace (the documented order): param_groups and distill work;
    a policy, which needs the factor roles, is still refused."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32), nn.GELU(), nn.Linear(32, 10)).eval()
    x = torch.randn(8, 32)
    gm = fxlrd.transform(model, LRDConfig(ratio=2, rank_quantum=1), example_inputs=x)
    fxlrd.freeze(gm, "paper")
    retraced = fx.symbolic_trace(gm)
    groups = {g["name"]: g["params"] for g in param_groups(retraced)}
    assert groups["factors_trainable"] and groups["factors_frozen"]
    assert all(p.requires_grad for p in groups["factors_trainable"])
    assert not any(p.requires_grad for p in groups["factors_frozen"])
    ids = [id(p) for ps in groups.values() for p in ps]
    assert len(ids) == len(set(ids)) == len(list(retraced.parameters()))
    frozen = {n: p.clone() for n, p in retraced.named_parameters() if not p.requires_grad}
    assert len(distill(retraced, model, [x], steps=2, progress=False)) == 2
    assert all(torch.equal(p, frozen[n]) for n, p in retraced.named_parameters() if n in frozen)
    with pytest.raises(fxlrd.ConfigError, match="re-traced by torch.fx"):
        fxlrd.freeze(retraced, "paper")
    with pytest.raises(fxlrd.ConfigError, match="re-traced by torch.fx"):
        distill(retraced, model, [x], steps=1, freeze="paper", progress=False)


def test_a_norm_called_twice_is_saved_and_restored_once():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.bn, self.fc2 = nn.Linear(8, 8), nn.BatchNorm1d(8, momentum=0.3), nn.Linear(8, 8)

        def forward(self, x):
            return self.fc2(self.bn(self.fc(self.bn(x))))

    torch.manual_seed(0)
    model = Twice().eval()
    model.bn.running_mean.fill_(5.0)
    model.bn.running_var.fill_(2.0)
    gm = fxlrd.transform(model, LRDConfig(sensitivity=False), example_inputs=(torch.randn(4, 8),), capture="fx")
    with pytest.raises(Exception):
        reestimate_norms(gm, [torch.randn(4, 8), torch.randn(4, 3)], which="all")  # the second batch does not fit
    assert gm.bn.momentum == 0.3 and torch.all(gm.bn.running_mean == 5.0) and torch.all(gm.bn.running_var == 2.0)
    reestimate_norms(gm, [torch.randn(4, 8)], which="all")
    assert gm.bn.momentum == 0.3


# --- mutation audit: the distillation losses against their textbook formulas -------------------------
def _kl_rows(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher ‖ student) of the softmaxes at ``temperature``, one value per row, written out."""
    q = torch.softmax(teacher.double() / temperature, -1)
    p = torch.softmax(student.double() / temperature, -1)
    return (q * (q.log() - p.log())).sum(-1)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_kl_output_loss_is_the_teachers_kl_times_t_squared_per_sample(temperature):
    from fxlrd.recover import output_loss

    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 6, generator=g, dtype=torch.float64), torch.randn(4, 6, generator=g, dtype=torch.float64)
    want = temperature**2 * _kl_rows(s, t, temperature).sum() / 4
    torch.testing.assert_close(output_loss(s, t, "kl", temperature), want)


def test_kl_output_loss_of_per_token_logits_is_per_sample_with_or_without_a_mask():
    """(batch, sequence, vocabulary) logits: the KL summed over the real tokens, divided by the
    batch size (not the token count), so a mask changes which tokens count and not the scale:
    an all-ones mask gives the unmasked loss."""
    from fxlrd.recover import output_loss

    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 3, 5, generator=g, dtype=torch.float64), torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    kl = _kl_rows(s, t, 1.0)  # (2, 3)
    torch.testing.assert_close(output_loss(s, t, "kl"), kl.sum() / 2)
    torch.testing.assert_close(output_loss(s, t, "kl", mask=torch.ones(2, 3)), kl.sum() / 2)
    torch.testing.assert_close(output_loss(s, t, "kl", mask=mask), (kl * mask).sum() / 2)


def test_feature_loss_is_relative_to_the_teachers_mean_square_on_real_tokens():
    """A decomposed layer's feature term is its mean squared error over the original layer's
    mean square (scale-free: a layer of large activations does not outweigh the others)."""
    from fxlrd.recover import _feature_loss

    g = torch.Generator().manual_seed(2)
    t = 30 * torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    s = t + torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    keep = torch.tensor([[True, True, False], [True, False, False]])
    d, tk = (s - t)[keep], t[keep]
    torch.testing.assert_close(_feature_loss(s, t, None, "x"), (s - t).pow(2).mean() / t.pow(2).mean())
    torch.testing.assert_close(_feature_loss(s, t, keep, "x"), d.pow(2).mean() / tk.pow(2).mean())
    torch.testing.assert_close(_feature_loss(10 * s, 10 * t, keep, "x"), _feature_loss(s, t, keep, "x"))


# --- (mutation audit) distill's held-out checks and the freezer's schedule -------------------------


def test_distill_checks_the_held_out_loss_in_eval_mode_even_when_training_in_train_mode():
    """The held-out loss is the deployed model's (eval mode: no dropout), whatever
    ``train_mode`` is: the start check equals the eval-mode loss exactly, and the student is
    left in train mode as asked."""
    from fxlrd.recover import output_loss

    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 5)).eval()
    gm = fxlrd.transform(teacher, LRDConfig(rank_rule="fixed", rank=3, rank_quantum=1))
    held = torch.randn(32, 16)
    with torch.no_grad():
        start = float(output_loss(gm.eval()(held), teacher(held)))
    curve = distill(gm, teacher, [torch.randn(8, 16)], steps=2, lr=1e-12, train_mode=True, validation=[held],
                    check_every=1, progress=False)  # fmt: skip
    assert [s for s, _ in curve.validation] == [0, 1, 2]
    assert all(loss == pytest.approx(start, rel=1e-6) for _, loss in curve.validation)  # lr ~0: nothing changes
    assert gm.training is False  # given back in the mode it came in (eval)


def test_distill_steps_a_sequential_freezer_once_per_step():
    model = _cnn()
    xs = [torch.randn(4, 3, 8, 8) for _ in range(2)]
    gm = _decomposed(model, xs[0])
    freezer = SequentialFreezer(gm, period=2)
    phase0 = {n: p.requires_grad for n, p in gm.named_parameters()}
    distill(gm, model, xs, steps=3, lr=1e-3, freeze=freezer, progress=False)
    assert freezer.steps == 3 and freezer.phase == 1
    phase1 = {n: p.requires_grad for n, p in gm.named_parameters()}
    assert phase1 != phase0


class _TrainsAtCapture(nn.Module):
    """A conv, its batch norm, a dropout and an MLP block, exported in training mode (as a model
    straight from its constructor is): torch.export bakes the training-mode ops in."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.drop = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.Dropout(0.5)
        self.up, self.act, self.down, self.head = nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16), nn.Linear(16, 4)
        with torch.no_grad():
            self.bn.running_mean.normal_(), self.bn.running_var.uniform_(0.5, 2)

    def forward(self, x):
        h = self.drop(torch.relu(self.bn(self.conv(x))).mean((2, 3)))
        return self.head(self.down(self.act(self.up(h))))


@pytest.mark.parametrize("how", ["distill", "reconstruct_mlps"])
def test_recovery_of_a_graph_exported_in_training_mode_runs_it_as_in_eval_mode(how):
    """Outside ``train_mode`` the student runs without dropout noise and its batch norms keep
    their statistics, as the docstrings say, also where torch.export baked training in."""
    from fxlrd.capture import training_ops
    from fxlrd.recover import reconstruct_mlps

    torch.manual_seed(0)
    model = _TrainsAtCapture().train()
    batches = [torch.randn(8, 3, 6, 6) for _ in range(4)]
    settings = LRDConfig(ratio=2, mlp="narrow", exclude=["conv", "head"]) if how == "reconstruct_mlps" else LRDConfig(ratio=2)
    with pytest.warns(UserWarning, match="training mode"):
        gm = fxlrd.transform(model, settings, example_inputs=batches[0], calibration=batches, capture="export")
    assert training_ops(gm) == 2  # the batch norm and the dropout
    statistics = {k: v.clone() for k, v in gm.named_buffers() if k.startswith("bn.")}
    assert len(statistics) == 3  # running mean and variance, step counter
    teacher = copy.deepcopy(model).eval()
    if how == "distill":
        curve = distill(gm, teacher, [batches[0]] * 3, steps=3, lr=1e-12, progress=False)
        assert curve[0] > 0 and curve == pytest.approx([curve[0]] * 3, rel=1e-6)  # one batch, no dropout noise
    else:
        reconstruct_mlps(gm, teacher, batches, steps=6, progress=False)
    assert all(torch.equal(v, gm.state_dict()[k]) for k, v in statistics.items())
