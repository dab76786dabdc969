import pytest
import torch
from torch import fx
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
