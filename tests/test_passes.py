import pytest
import torch
from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassResult
from torch.fx.passes.infra.pass_manager import PassManager

import fxlrd
from fxlrd import LRDConfig, zoo
from fxlrd.passes import DecomposePass

from conftest import rel_err


def test_decompose_pass_in_pass_manager_is_idempotent():
    model = zoo.resnet50().eval()
    plan = fxlrd.plan(model, LRDConfig(rank_rule="fixed", rank=100_000, allow_larger=True))
    gm = fx.symbolic_trace(zoo.resnet50().eval())
    gm.load_state_dict(model.state_dict())
    result = PassManager(passes=[DecomposePass(plan)], run_checks_after_each_pass=True)(gm)
    assert isinstance(result, PassResult) and result.modified
    n_nodes = len(result.graph_module.graph.nodes)
    again = DecomposePass(plan)(result.graph_module)
    assert not again.modified and len(again.graph_module.graph.nodes) == n_nodes
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert rel_err(result.graph_module(x), model(x)) <= 1e-5


def test_pass_rejects_a_non_plan():
    with pytest.raises(TypeError, match="fxlrd.Plan"):
        DecomposePass({"fc": "svd"})


def test_graph_lints_and_recompiles():
    gm = fxlrd.transform(zoo.resnet50())
    gm.graph.lint()
    assert "layer1.0.conv2.core" in {n.target for n in gm.graph.nodes}
    assert "conv2.core" in gm.code


# The README's chaining example: fxlrd's passes, a PyTorch pass, then torch.compile.
def fuse_conv_bn(gm: fx.GraphModule) -> PassResult:
    """PyTorch's conv-BN folding (eval mode) as a pass."""
    from torch.fx.experimental.optimization import fuse

    return PassResult(fuse(gm, inplace=True), True)


@pytest.mark.slow
def test_chained_passes_then_torch_compile_match_eager():
    from fxlrd.passes import FreezePass, MergePass

    model = zoo.resnet50(num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    plan = fxlrd.plan(model, LRDConfig(ratio=2, merge="exact"), example_inputs=x)
    gm = fx.symbolic_trace(model)
    result = PassManager(passes=[DecomposePass(plan), MergePass("exact"), FreezePass("paper"), fuse_conv_bn])(gm)
    out = result.graph_module.eval()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in out.modules())  # folded
    frozen = [n for n, p in out.named_parameters() if not p.requires_grad and n.endswith(".weight")]
    assert frozen and all(".in_proj." in n or ".out_proj." in n for n in frozen)  # the freezing survived fuse's re-trace
    # (fuse itself makes the bias it adds to a bias-free conv a frozen parameter: PyTorch's doing, for eval)
    compiled = torch.compile(out)
    with torch.no_grad():
        eager = out(x)
        torch.testing.assert_close(compiled(x), eager, rtol=1e-4, atol=1e-4)
        unfused = fxlrd.apply(model, plan)
        torch.testing.assert_close(eager, unfused(x), rtol=1e-4, atol=1e-4)


def test_freezing_after_a_re_trace_says_the_roles_are_gone():
    """fx.symbolic_trace rebuilds fxlrd's containers as plain modules: freezing then raises
    instead of freezing nothing; frozen flags set before the re-trace survive it."""
    from fxlrd.errors import ConfigError

    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1)).eval()
    gm = fxlrd.transform(model, LRDConfig(ratio=2), example_inputs=torch.randn(1, 3, 8, 8))
    retraced = fx.symbolic_trace(gm)
    for call in (lambda: fxlrd.freeze(retraced, "paper"), lambda: fxlrd.SequentialFreezer(retraced)):
        with pytest.raises(ConfigError, match="re-traced by torch.fx .* Freeze .* before re-tracing"):
            call()
    assert fxlrd.param_groups(retraced)  # needs no roles: it groups the factors by their flags
    fxlrd.freeze(gm, "paper")
    again = fx.symbolic_trace(gm)
    assert {n for n, p in again.named_parameters() if not p.requires_grad} == \
        {n for n, p in gm.named_parameters() if not p.requires_grad} != set()  # fmt: skip


class _Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv, self.out_proj = nn.Linear(16, 48), nn.Linear(16, 16)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, -1)
        return self.out_proj(torch.softmax(q @ k.transpose(-1, -2), -1) @ v)


def test_a_captured_model_with_nothing_decomposed_is_not_taken_for_a_re_traced_one():
    """fx rebuilds every container of a captured model as a plain nn.Module: an attention with
    an out_proj beside its qkv is not a lost Factorized, so freezing and distillation work."""
    model = nn.Sequential(_Attn(), nn.Linear(16, 4)).eval()
    x = torch.randn(2, 5, 16)
    gm = fxlrd.transform(model, LRDConfig(exclude="*"), example_inputs=x)
    assert type(gm.get_submodule("0")) is nn.Module and not gm.fxlrd_plan.decomposed
    fxlrd.freeze(gm, "none")
    assert [g["name"] for g in fxlrd.param_groups(gm) if g["params"]] == ["other"]
    from fxlrd.recover import distill

    assert len(distill(gm, model, [x], steps=2, progress=False)) == 2
