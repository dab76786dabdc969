"""Freezing: policies, parameter groups, the sequential schedule, and DDP."""

import gc
import os
import tempfile

import pytest
import torch
from torch import nn
from torch.fx.passes.infra.pass_manager import PassManager

import fxlrd
from fxlrd import SequentialFreezer, param_groups, zoo
from fxlrd.freeze import factor_nodes
from fxlrd.passes import FreezePass


def _factors(gm):
    return {node.target: (node.meta["fxlrd"], module) for node, module in factor_nodes(gm)}


def _grad_flags(gm):
    return {name: all(p.requires_grad for p in m.parameters()) for name, (_, m) in _factors(gm).items()}


@pytest.fixture(scope="module")
def resnet():
    return fxlrd.transform(zoo.resnet50())


def test_paper_policy(resnet):
    gm = fxlrd.freeze(resnet, "paper")
    flags = _grad_flags(gm)
    assert flags["layer1.0.conv1.in_proj"] is False and flags["layer1.0.conv1.out_proj"] is True
    assert flags["layer1.0.conv2.core"] is True
    assert flags["layer1.0.conv2.in_proj"] is False and flags["layer1.0.conv2.out_proj"] is False
    assert flags["conv1.core"] is True and flags["conv1.out_proj"] is False  # Tucker-1 stem
    assert flags["fc.out_proj"] is True and flags["fc.in_proj"] is False
    assert all(p.requires_grad for p in gm.get_submodule("layer1.0.bn1").parameters())  # not a factor: untouched
    for name, (info, _) in _factors(gm).items():
        assert info["trainable"] == flags[name]
    fxlrd.freeze(gm, "none")
    assert all(_grad_flags(gm).values())


def test_mapping_policy_patterns_win_over_roles(resnet):
    gm = fxlrd.freeze(resnet, {"core": False, "in_proj": True, "layer4.*.core": True})
    flags = _grad_flags(gm)
    assert flags["layer1.0.conv2.core"] is False and flags["layer4.0.conv2.core"] is True
    assert flags["layer1.0.conv2.in_proj"] is True and flags["layer1.0.conv2.out_proj"] is True


def test_freeze_pass_is_idempotent_in_pass_manager(resnet):
    fxlrd.freeze(resnet, "none")
    result = PassManager(passes=[FreezePass("paper")])(resnet)
    assert result.modified
    assert not FreezePass("paper")(result.graph_module).modified


@pytest.mark.parametrize("policy", ["some", {"core": "yes"}, 3])
def test_bad_policy(policy):
    with pytest.raises(ValueError, match="freeze policy"):
        FreezePass(policy)


@pytest.mark.parametrize("key", ["inproj", "fc", "layr4.*"])
def test_a_policy_key_that_matches_no_factor_is_refused(resnet, key):
    """A typo (or a layer's name where factors are '<layer>.<role>') used to freeze nothing, silently."""
    fxlrd.freeze(resnet, "none")
    with pytest.raises(fxlrd.ConfigError, match=f"key '{key}' is neither a role .* 'layer4.\\*'"):
        fxlrd.freeze(resnet, {key: False, "core": False})
    assert all(_grad_flags(resnet).values())  # refused before anything changed
    fxlrd.freeze(resnet, {"fc.*": False})  # a pattern that matches factors is fine
    assert not _grad_flags(resnet)["fc.in_proj"]
    fxlrd.freeze(resnet, "none")


@pytest.mark.parametrize("order", [[{"SVD": ["out_proj"]}], [{"svd": ["outproj"]}], [{"svd": "out_proj"}], [["svd"]]])
def test_a_freezer_order_naming_no_method_or_role_is_refused(resnet, order):
    with pytest.raises(fxlrd.ConfigError, match=r"order\[0\]"):
        SequentialFreezer(resnet, order=order)


def test_param_groups_partition_the_parameters(resnet):
    gm = fxlrd.freeze(resnet, "paper")
    groups = param_groups(gm, lr=0.1)
    assert [g["name"] for g in groups] == ["factors_trainable", "factors_frozen", "other"]
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(gm.parameters()))
    assert all(p.requires_grad for p in groups[0]["params"]) and not any(p.requires_grad for p in groups[1]["params"])
    assert all(g["lr"] == 0.1 for g in groups)
    torch.optim.SGD(groups, momentum=0.9)  # usable as is


def _small():
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 32, 1),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))  # fmt: skip
    return fxlrd.transform(model, fxlrd.LRDConfig(ratio=1.5, rank_quantum=1))


def _train_step(gm, opt):
    opt.zero_grad()
    gm(torch.randn(4, 3, 8, 8)).square().mean().backward()
    opt.step()


def test_frozen_factors_are_not_updated():
    gm = fxlrd.freeze(_small(), "paper")
    opt = torch.optim.SGD(param_groups(gm), lr=0.1, momentum=0.9)
    frozen = {n: m.weight.clone() for n, (_, m) in _factors(gm).items() if not m.weight.requires_grad}
    for _ in range(3):
        _train_step(gm, opt)
    assert frozen
    for name, w in frozen.items():
        assert torch.equal(_factors(gm)[name][1].weight, w)


def test_sequential_phases_switch_every_period():
    gm = _small()
    freezer = SequentialFreezer(gm, period=2)
    phase0 = _grad_flags(gm)
    assert phase0["3.out_proj"] and not phase0["3.in_proj"] and phase0["0.core"] and not phase0["0.out_proj"]
    assert [freezer.step() for _ in range(5)] == [False, True, False, True, False]
    freezer.steps = 2
    freezer._apply(freezer.phase)
    phase1 = _grad_flags(gm)
    assert phase1["3.in_proj"] and not phase1["3.out_proj"] and phase1["0.out_proj"] and not phase1["0.core"]


def test_switch_leaves_no_stale_gradient_or_optimizer_state():
    gm = _small()
    opt = torch.optim.Adam(param_groups(gm), lr=0.01)
    freezer = SequentialFreezer(gm, period=1, optimizer=opt)
    _train_step(gm, opt)
    trained = [m.weight for _, (_, m) in _factors(gm).items() if m.weight.requires_grad]
    assert all(w.grad is not None and w in opt.state for w in trained)
    assert freezer.step()
    for w in trained:
        assert not w.requires_grad and w.grad is None and w not in opt.state
    before = [w.clone() for w in trained]
    _train_step(gm, opt)
    assert all(torch.equal(w, b) for w, b in zip(trained, before))


def test_resume_continues_the_same_phase():
    gm = _small()
    freezer = SequentialFreezer(gm, period=3)
    for _ in range(4):
        freezer.step()
    state = freezer.state_dict()
    flags = _grad_flags(gm)
    gm2 = _small()
    resumed = SequentialFreezer(gm2, period=3)
    resumed.load_state_dict(state)
    assert resumed.phase == freezer.phase == 1 and _grad_flags(gm2) == flags
    with pytest.raises(ValueError, match="period"):
        SequentialFreezer(_small(), period=2).load_state_dict(state)


def test_freezer_needs_a_decomposed_model():
    with pytest.raises(ValueError, match="no decomposed factors"):
        SequentialFreezer(torch.fx.symbolic_trace(nn.Linear(3, 3)))
    with pytest.raises(ValueError, match="period"):
        SequentialFreezer(_small(), period=0)


# --- DistributedDataParallel ---------------------------------------------------------------------


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    gm = _small()
    freezer = SequentialFreezer(gm, period=2)
    model = DDP(gm)
    opt = torch.optim.SGD(param_groups(gm), lr=0.05, momentum=0.9)
    torch.manual_seed(100 + rank)  # each rank sees different data
    switches = 0
    for _ in range(7):
        opt.zero_grad()
        model(torch.randn(4, 3, 8, 8)).square().mean().backward()
        opt.step()
        if freezer.step():
            switches += 1
            # Re-wrap: DDP hooks only parameters that require grad when built. Drop the old
            # wrapper first so its reducer's hooks are gone before the new one's are set.
            del model
            gc.collect()
            model = DDP(gm)
    # Parameters only: batch-norm buffers legitimately differ (each rank's last forward updates its own).
    params = {n: p.detach().clone() for n, p in gm.named_parameters()}
    torch.save({"state": params, "switches": switches}, os.path.join(out_dir, f"rank{rank}.pt"))
    del model
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_sequential_freezing_under_ddp_keeps_ranks_identical():
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        init = os.path.join(tmp, "init")
        mp.spawn(_ddp_worker, args=(2, init, tmp), nprocs=2, join=True)
        r0, r1 = (torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in (0, 1))
    assert r0["switches"] == r1["switches"] == 3
    start = _small_state()
    for key, value in r0["state"].items():
        torch.testing.assert_close(value, r1["state"][key], rtol=0, atol=0)
    changed = [k for k, v in r0["state"].items() if not torch.equal(v, start[k])]
    assert any(k.endswith("in_proj.weight") for k in changed) and any(k.endswith("out_proj.weight") for k in changed)


def _small_state():
    torch.manual_seed(0)
    return _small().state_dict()


def test_freezing_drops_the_gradients_of_the_factors_it_freezes():
    """(mutation audit) a factor frozen by a policy loses its ``.grad``: an optimizer stepping
    its groups would otherwise keep applying that stale gradient (momentum, weight decay)."""
    gm = _small()
    gm(torch.randn(2, 3, 8, 8)).square().mean().backward()
    assert all(p.grad is not None for p in gm.parameters())
    fxlrd.freeze(gm, "paper")
    frozen = [p for _, (_, m) in _factors(gm).items() for p in m.parameters() if not p.requires_grad]
    trainable = [p for _, (_, m) in _factors(gm).items() for p in m.parameters() if p.requires_grad]
    assert frozen and trainable
    assert all(p.grad is None for p in frozen)
    assert all(p.grad is not None for p in trainable)  # only the frozen ones lose theirs


class _Frozen(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(8, 32, 3, padding=1)
        self.b = nn.Conv2d(32, 32, 3, padding=1)
        self.fc = nn.Linear(32, 32)
        self.w = nn.Parameter(torch.randn(32, 32))

    def forward(self, x):
        y = self.b(torch.relu(self.a(x))).mean((2, 3))
        return self.fc(y) @ self.w.T


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("extra", [{}, {"branches": 2}, {"merge": "exact"}])
def test_a_layer_the_user_froze_stays_frozen(capture, extra):
    """transform keeps the user's requires_grad: a frozen layer's factors (and its bias, by
    the bias's own flag) come back frozen, branched cores too; a merged layer is frozen when
    both its sources were. (Every factor came back trainable: a frozen backbone trained.)"""
    model = _Frozen().eval()
    model.a.requires_grad_(False)
    model.w.requires_grad_(False)
    model.fc.bias.requires_grad_(False)
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    gm = fxlrd.transform(model, fxlrd.LRDConfig(ratio=2, **extra), example_inputs=torch.randn(2, 8, 8, 8),
                         capture=capture)  # fmt: skip
    flags = {n: p.requires_grad for n, p in gm.named_parameters()}
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before  # the user's model untouched
    assert any(n.startswith("a.") for n in flags) and not any(v for n, v in flags.items() if n.startswith("a."))
    if "merge" in extra:  # merging decomposes the k×k convs only: fc and w are kept, flags and all
        assert flags["w"] is False and flags["fc.bias"] is False and flags["fc.weight"] is True
    else:
        assert flags["fc.out_proj.bias"] is False and flags["fc.out_proj.weight"] is True
        assert any(n.startswith("w") for n in flags) and not any(v for n, v in flags.items() if n.startswith("w"))
    assert all(v for n, v in flags.items() if n.startswith("b."))


def test_a_merged_layer_is_trainable_when_either_source_was():
    model = zoo.resnet50().eval()
    model.layer1.requires_grad_(False)
    model.layer2[0].conv1.requires_grad_(False)
    gm = fxlrd.transform(model, fxlrd.LRDConfig(ratio=2, merge="approximate"), example_inputs=torch.randn(1, 3, 32, 32))
    frozen = {n.rsplit(".", 1)[0] for n, p in gm.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith("layer1.") for n in frozen)  # layer2.0.conv1 merged with a trainable layer
    assert all(not p.requires_grad for p in gm.get_submodule("layer1").parameters())


def test_fused_siblings_keep_the_members_requires_grad():
    # siblings="fuse" stacked frozen q/k/v into a fresh, trainable nn.Linear: their factors trained
    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v, self.o = (nn.Linear(64, 64) for _ in range(4))

        def forward(self, x):
            return self.o(self.q(x) * self.k(x) + self.v(x))

    model = Attention().eval()
    for layer in (model.q, model.k, model.v):
        layer.requires_grad_(False)
    gm = fxlrd.transform(model, fxlrd.LRDConfig(ratio=2, siblings="fuse"), example_inputs=torch.randn(2, 64))
    flags = {n: p.requires_grad for n, p in gm.named_parameters()}
    assert any(n.startswith("q_k_v.") for n in flags), flags
    assert not any(v for n, v in flags.items() if n.startswith("q_k_v.")) and all(v for n, v in flags.items() if n.startswith("o."))


def test_freezing_a_model_that_was_never_decomposed_is_refused():
    """A plain model has no factors: freeze changed nothing without a word (the freezer refused)."""
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(fxlrd.ConfigError, match="this Sequential has no decomposed factors to freeze; freeze the model"):
        fxlrd.freeze(model, "paper")
    assert all(p.requires_grad for p in model.parameters())
    kept = fxlrd.transform(model, fxlrd.LRDConfig(exclude=["0", "2"]), example_inputs=torch.randn(2, 8))  # nothing decomposed
    assert not kept.fxlrd_plan.decomposed and fxlrd.freeze(kept, "paper") is kept  # what transform returned: a no-op
