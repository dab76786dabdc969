"""fxlrd.plan / apply / transform end to end, and the errors users meet."""

import copy
import json
import os
import warnings
from pathlib import Path

import pytest
import torch
from conftest import rel_err
from torch import fx, nn

import fxlrd
from fxlrd import CaptureError, ConfigError, LRDConfig, Plan, PlanMismatchError, zoo
from fxlrd.factorized import Factorized

FULL = LRDConfig(rank_rule="fixed", rank=100_000, allow_larger=True)


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(16, 32, 1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1, groups=4))
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.up = nn.ConvTranspose2d(32, 16, 2, stride=2)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = self.up(self.dw(self.body(self.stem(x))))
        return self.head(x.mean((2, 3)))


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


# --- the paper's numbers -------------------------------------------------------------------------


def test_paper_table2_ranks_on_resnet152():
    plan = fxlrd.plan(zoo.resnet152(), LRDConfig(ratio=2, rank_quantum=1))
    want = {
        "layer1.0.conv1": (16,), "layer1.0.conv2": (38, 38), "layer1.0.conv3": (25,),
        "layer4.2.conv1": (204,), "layer4.2.conv2": (309, 309), "layer4.2.conv3": (204,), "fc": (335,),
    }  # fmt: skip
    assert {name: plan[name].ranks for name in want} == want
    assert plan["layer1.0.conv2"].method == "tucker2" and plan["fc"].method == "svd"


def test_resnet50_at_ratio_2_has_half_the_parameters():
    model = zoo.resnet50()
    gm = fxlrd.transform(model, LRDConfig(ratio=2, rank_quantum=1))
    assert fxlrd.count_params(model) == 25_557_032
    assert abs(fxlrd.count_params(gm) - 25.557032e6 / 2) <= 0.01 * 25.557032e6 / 2
    assert gm.fxlrd_plan.params_after_model() == fxlrd.count_params(gm)


# --- full rank reproduces whole models ------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name, size", [("resnet50", 64), ("vit_b_16", 32)])
def test_full_rank_reproduces_zoo_models(name, size):
    model = zoo.get(name, **({"image_size": size} if name == "vit_b_16" else {})).eval()
    x = torch.randn(2, 3, size, size)
    gm = fxlrd.transform(model, FULL)
    assert len(gm.fxlrd_plan.decomposed) >= 5
    with torch.no_grad():
        assert rel_err(gm(x), model(x)) <= 1e-5


# --- structure: names, meta, state dict, passes -----------------------------------------------------


def test_hierarchy_names_and_meta_are_kept():
    model = zoo.resnet50()
    gm = fxlrd.transform(model)
    fact = gm.get_submodule("layer1.0.conv2")
    assert isinstance(fact, Factorized) and fact.method == "tucker2"
    keys = set(gm.state_dict())
    assert {"layer1.0.conv2.in_proj.weight", "layer1.0.conv2.core.weight", "layer1.0.conv2.out_proj.weight"} <= keys
    assert {"fc.in_proj.weight", "fc.out_proj.weight", "fc.out_proj.bias", "layer1.0.bn1.running_mean"} <= keys
    # Every key keeps the original module prefix.
    originals = {k.rsplit(".", 1)[0] for k in model.state_dict()}
    assert all(any(k.startswith(p + ".") for p in originals) for k in keys)
    nodes = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
    core = nodes["layer1.0.conv2.core"]
    assert core.meta["fxlrd"] == {"source": "layer1.0.conv2", "method": "tucker2", "role": "core", "ranks": fact.ranks}
    assert "nn_module_stack" in core.meta and "layer1.0.conv2" not in nodes


def test_transform_does_not_touch_the_input_model():
    model = zoo.resnet50()
    model.train()
    before = _snapshot(model)
    fxlrd.transform(model, example_inputs=torch.randn(2, 3, 64, 64))
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)  # bitwise, BN statistics included
    assert model.training and isinstance(model.layer1[0].conv2, nn.Conv2d)


def test_inplace_decomposes_the_model_itself():
    model = Small().eval()
    x = torch.randn(1, 3, 8, 8)
    gm = fxlrd.transform(model, FULL, inplace=True)
    assert isinstance(model.stem, Factorized) and isinstance(model.head, Factorized)
    with torch.no_grad():
        torch.testing.assert_close(model(x), gm(x))


def test_inplace_replaces_a_module_under_every_name_it_has():
    """One layer registered twice (``self.l2 = self.l1``) is one layer: both names get the
    factors (the second used to stay dense, the model half decomposed and larger)."""

    class Aliased(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1 = nn.Linear(64, 64)
            self.l2 = self.l1

        def forward(self, x):
            return self.l2(torch.relu(self.l1(x)))

    torch.manual_seed(0)
    model, x = Aliased().eval(), torch.randn(4, 64)
    gm = fxlrd.transform(model, LRDConfig(ratio=2), example_inputs=x, inplace=True)
    assert model.l1 is model.l2 and isinstance(model.l2, Factorized)
    assert fxlrd.count_params(model) == fxlrd.count_params(gm)
    with torch.no_grad():
        torch.testing.assert_close(model(x), gm(x))


class _WithAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.att = nn.MultiheadAttention(32, 4, batch_first=True)
        self.fc = nn.Linear(32, 32)

    def forward(self, x):
        return self.fc(self.att(x, x, x)[0])


class _Branching(nn.Module):  # fx cannot trace a branch on the input's rank; export captures it
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x):
        return self.fc(x) if x.dim() == 2 else self.fc(x.flatten(1))


class _BranchingOnDevice(_Branching):  # and its export capture notes the device it ran on
    def forward(self, x):
        x = x + torch.arange(x.shape[-1], device=x.device)
        return super().forward(x)


@pytest.mark.parametrize("make,x,why", [
    (_WithAttention, torch.randn(2, 5, 32), "nn.MultiheadAttention swapped"),
    (_Branching, torch.ones(2, 16), "torch.fx cannot trace it"),
    (_BranchingOnDevice, torch.ones(2, 16), r"\(torch.fx cannot trace it, it needs torch.export\)"),
])  # fmt: skip
def test_inplace_refused_before_the_model_is_touched(make, x, why):
    """A model that fx cannot capture as it is would be rewritten by the capture itself
    (attention swapped, export's settings): inplace=True refuses before any of that."""
    model = make().eval()
    before, modules = _snapshot(model), [(n, type(m)) for n, m in model.named_modules()]
    with pytest.raises(ConfigError, match=why) as info:
        fxlrd.transform(model, LRDConfig(rank_quantum=1), example_inputs=x, inplace=True)
    assert "your model is unchanged" in str(info.value)
    assert [(n, type(m)) for n, m in model.named_modules()] == modules
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and before.keys() == model.state_dict().keys()
    gm = fxlrd.transform(model, LRDConfig(rank_quantum=1), example_inputs=x)  # the way out the message gives
    with pytest.raises(ConfigError, match=why):
        fxlrd.apply(model, gm.fxlrd_plan, example_inputs=x, inplace=True)
    assert [(n, type(m)) for n, m in model.named_modules()] == modules


def test_graph_module_input_is_accepted():
    model = Small().eval()
    traced = fx.symbolic_trace(model)
    gm = fxlrd.transform(traced, FULL)
    assert isinstance(gm.get_submodule("stem"), Factorized)
    assert not isinstance(traced.get_submodule("stem"), Factorized)


def test_kept_layers_say_why():
    plan = fxlrd.plan(Small(), LRDConfig(exclude=["head"]))
    assert plan["body.2"].method == "keep" and "grouped convolution (groups=4)" in plan["body.2"].reason
    assert "depthwise" in plan["dw"].reason
    assert plan["up"].method == "tucker2" and plan["up"].layer_type == "ConvTranspose2d"  # decomposed like a conv
    assert plan["head"].reason == "matched by exclude"
    table = plan.table()
    assert "depthwise" in table and "stem" in table


def test_layer_that_would_not_shrink_is_kept():
    plan = fxlrd.plan(nn.Sequential(nn.Linear(4, 64)), LRDConfig(rank_rule="fixed", rank=4))
    assert plan["0"].method == "keep" and "would not shrink" in plan["0"].reason


class _TwoConvs(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.c2(torch.relu(self.c1(x)))).mean((2, 3)))


@pytest.mark.parametrize("options", [{"branches": 2}, {"merge": "approximate"}])
def test_plan_says_what_transform_builds_with_branches_and_merging(options):
    # plan() reported c2 at ranks (13, 13) and 6 956 parameters; branching builds (12, 12) and 6 035
    torch.manual_seed(0)
    model, x = _TwoConvs().eval(), torch.randn(2, 3, 8, 8)
    config = LRDConfig(rank_quantum=1, **options)
    planned, gm = fxlrd.plan(model, config, example_inputs=x), fxlrd.transform(model, config, example_inputs=x)
    assert planned.params_after_model() == gm.fxlrd_plan.params_after_model() == fxlrd.count_params(gm)
    assert [(lp.name, lp.ranks) for lp in planned] == [(lp.name, lp.ranks) for lp in gm.fxlrd_plan]


def test_plan_to_json_is_atomic(tmp_path, monkeypatch):
    # a write that fails half-way leaves the earlier plan whole, and no temporary file behind
    model = Small().eval()
    plan = fxlrd.plan(model, FULL, example_inputs=torch.randn(1, 3, 8, 8))
    path = tmp_path / "plan.json"
    path.write_text("earlier plan\n")
    real = Path.write_text

    def fail_half_way(self, text, *args, **kwargs):
        real(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_text", fail_half_way)
    with pytest.raises(OSError, match="disk full"):
        plan.to_json(path)
    monkeypatch.undo()
    assert path.read_text() == "earlier plan\n"
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]
    plan.to_json(path)
    assert Plan.from_json(path).to_dict() == plan.to_dict()


def test_an_atomic_write_keeps_a_link_a_link_and_a_files_permissions(tmp_path):
    """Writing through a symbolic link replaces the file it points to (the link became a
    regular file, and its target was never updated); a file written over keeps its mode (a
    private 0600 report became 0644)."""
    import stat

    from fxlrd._files import write_text

    target = tmp_path / "results" / "real.json"
    target.parent.mkdir()
    target.write_text("old\n")
    target.chmod(0o600)
    link = tmp_path / "link.json"
    link.symlink_to(target)
    write_text(link, "new\n")
    assert link.is_symlink() and target.read_text() == "new\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert sorted(p.name for p in target.parent.iterdir()) == ["real.json"]  # no temporary file left
    fresh = tmp_path / "fresh.json"
    write_text(fresh, "x")
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o666 & ~mask


def test_include_filter_fn_and_layer_types():
    model = zoo.resnet50()
    plan = fxlrd.plan(model, LRDConfig(include=["layer4.*"], filter_fn=lambda m, n: not n.endswith("conv3")))
    done = {lp.name for lp in plan.decomposed}
    assert done and all(n.startswith("layer4.") and not n.endswith("conv3") for n in done)
    plan = fxlrd.plan(model, LRDConfig(layer_types=[nn.Linear]))
    assert [lp.name for lp in plan.decomposed] == ["fc"]


def test_plan_json_round_trip_and_apply(tmp_path):
    model = Small().eval()
    plan = fxlrd.plan(model, FULL, example_inputs=torch.randn(1, 3, 8, 8))
    path = tmp_path / "plan.json"
    plan.to_json(path)
    again = Plan.from_json(path)
    assert again.to_dict() == plan.to_dict()
    assert Plan.from_json(plan.to_json()).to_dict() == plan.to_dict()
    gm = fxlrd.apply(model, again)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert rel_err(gm(x), model(x)) <= 1e-5


def test_edited_plan_is_applied():
    model = zoo.resnet50()
    plan = fxlrd.plan(model)
    plan["fc"].ranks = (64,)
    plan["layer1.0.conv2"].method, plan["layer1.0.conv2"].ranks = "keep", ()
    gm = fxlrd.apply(model, plan)
    assert gm.fc.in_proj.out_features == 64
    assert isinstance(gm.get_submodule("layer1.0.conv2"), nn.Conv2d)


def test_plan_records_macs_with_example_inputs():
    plan = fxlrd.plan(zoo.resnet50(), example_inputs=torch.randn(1, 3, 224, 224))
    lp = plan["layer1.0.conv2"]  # 64→64 3×3 at 56×56
    assert lp.input_shape == (1, 64, 56, 56)
    assert lp.macs_before == 56 * 56 * 64 * 64 * 9
    assert 0 < lp.macs_after < lp.macs_before
    assert plan["fc"].macs_before == 2048 * 1000


def test_shared_module_called_twice_is_replaced_at_both_calls():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, x):
            return self.lin(torch.relu(self.lin(x)))

    model = Twice().eval()
    gm = fxlrd.transform(model, FULL)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert targets.count("lin.out_proj") == 2
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert rel_err(gm(x), model(x)) <= 1e-5


# --- bad input: a clear error, the model untouched -----------------------------------------------------


def test_non_module_is_rejected():
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        fxlrd.transform(zoo.resnet50().state_dict())
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        fxlrd.plan("resnet50.pt")


def test_wrong_config_type_is_rejected():
    with pytest.raises(ConfigError, match="LRDConfig"):
        fxlrd.transform(Small(), {"ratio": 2})


def test_nan_weights_are_named():
    model = Small()
    with torch.no_grad():
        model.body[0].weight[0, 0] = float("nan")
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"'body.0' has NaN or infinite weights.*exclude"):
        fxlrd.transform(model)
    assert all(torch.equal(before[k], v) or torch.isnan(v).any() for k, v in model.state_dict().items())
    # Excluding it is the way out.
    fxlrd.transform(model, LRDConfig(exclude=["body.0"]))


def test_include_matching_nothing_is_an_error():
    with pytest.raises(ConfigError, match=r"include pattern 'layer9\.\*' matches no conv/linear layer"):
        fxlrd.plan(zoo.resnet50(), LRDConfig(include=["layer9.*"]))


def test_exclude_and_sibling_patterns_matching_nothing_are_warned_about():
    """A typo in an exclude or siblings pattern excluded or fused nothing, silently."""
    from fxlrd.errors import FxlrdWarning

    model, x = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).eval(), torch.randn(2, 8)
    with pytest.warns(FxlrdWarning, match=r"exclude pattern 'b1\.conv' matches no conv/linear layer"):
        fxlrd.plan(model, LRDConfig(exclude=["b1.conv"]))
    with pytest.warns(FxlrdWarning, match=r"siblings pattern '\*\.querry' matches no linear layer"):
        fxlrd.transform(model, LRDConfig(siblings=["*.querry"]), example_inputs=x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FxlrdWarning)
        fxlrd.transform(model, LRDConfig(exclude=["2"], siblings=["0"]), example_inputs=x)  # both match: no warning


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.gate = Gate()

    def forward(self, x):
        return self.gate(self.conv(x))


class Gate(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace this
            return x
        return -x


def test_untraceable_model_names_the_code_and_the_way_out():
    model = Untraceable()
    before = _snapshot(model)
    with pytest.raises(CaptureError) as info:
        fxlrd.transform(model)
    msg = str(info.value)
    assert "test_api.py" in msg and "if x.sum() > 0" in msg and "leaf_modules" in msg
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_leaf_modules_get_an_untraceable_model_through():
    model = Untraceable().eval()
    gm = fxlrd.transform(model, LRDConfig(leaf_modules=[Gate], rank_rule="fixed", rank=100, allow_larger=True))
    assert isinstance(gm.get_submodule("conv"), Factorized)
    assert isinstance(gm.get_submodule("gate.lin"), nn.Linear)  # inside the leaf: untouched
    gm2 = fxlrd.transform(model, LRDConfig(leaf_modules=["gate"]))
    assert "gate.lin" not in gm2.fxlrd_plan.layers


def test_plan_from_another_model_is_rejected_and_model_untouched():
    plan = fxlrd.plan(zoo.resnet50())
    other = Small()
    before = _snapshot(other)
    with pytest.raises(PlanMismatchError, match="the plan decomposes 'conv1'"):
        fxlrd.apply(other, plan, inplace=True)
    assert not any(isinstance(m, Factorized) for m in other.modules())
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())


def test_plan_with_other_shapes_is_rejected():
    plan = fxlrd.plan(nn.Sequential(nn.Linear(16, 32)))
    with pytest.raises(PlanMismatchError, match=r"plan does not match the model at '0'.*16->32.*8->32"):
        fxlrd.apply(nn.Sequential(nn.Linear(8, 32)), plan)


@pytest.mark.parametrize(
    "text", ['{"format": "other"}', "{not json", json.dumps({"format": "fxlrd.plan/1", "layers": [{"name": "x"}]})]
)
def test_bad_plan_json_is_reported(text):
    with pytest.raises(PlanMismatchError):
        Plan.from_json(text)


def test_rank_zero_in_an_edited_plan_is_rejected():
    plan = fxlrd.plan(nn.Sequential(nn.Linear(16, 32)))
    d = plan.to_dict()
    d["layers"][0]["ranks"] = [0]
    with pytest.raises(PlanMismatchError, match="rank"):
        Plan.from_dict(d)


def test_deepcopy_and_rerun_of_result():
    gm = fxlrd.transform(Small())
    gm2 = copy.deepcopy(gm)
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), gm2(x))


@pytest.mark.parametrize("cfg", [LRDConfig(rank_rule="energy", energy=0.9, rank_quantum=8), LRDConfig(rank_rule="fixed", rank=(4, 8))])
def test_energy_and_fixed_rules_end_to_end(cfg):
    model = Small().eval()
    plan = fxlrd.plan(model, cfg)
    done = {lp.name for lp in plan.decomposed}
    assert done and done <= {"stem", "body.0", "up", "head"}
    gm = fxlrd.apply(model, plan)
    with torch.no_grad():
        assert gm(torch.randn(1, 3, 8, 8)).shape == (1, 10)


def test_vbmf_keeps_noise_and_finds_the_rank_of_a_low_rank_layer():
    noise = fxlrd.plan(nn.Sequential(nn.Linear(64, 96)), LRDConfig(rank_rule="vbmf"))
    assert noise["0"].method == "keep" and "rank 0 < min_rank" in noise["0"].reason
    layer = nn.Linear(64, 96)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(96, 6) @ torch.randn(6, 64) + 0.01 * torch.randn(96, 64))
    plan = fxlrd.plan(nn.Sequential(layer), LRDConfig(rank_rule="vbmf", rank_quantum=1))
    assert plan["0"].method == "svd" and plan["0"].ranks == (6,)


def test_example_inputs_that_do_not_fit_the_model_are_named():
    model = zoo.resnet50()
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"example_inputs \(float32\[1, 4, 64, 64\]\) do not run through ResNet: "
                                         r".*to have 3 channels, but got 4"):
        fxlrd.plan(model, example_inputs=torch.randn(1, 4, 64, 64))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_inputs_that_do_not_fit_log_no_traceback_of_torchs(caplog):
    import logging

    with caplog.at_level(logging.DEBUG), pytest.raises(ValueError, match="do not run through Sequential"):
        fxlrd.plan(nn.Sequential(nn.Linear(64, 8)), example_inputs=torch.randn(2, 32))
    assert not [r for r in caplog.records if r.name.startswith("torch._subclasses") and r.levelno >= logging.ERROR]


def test_macs_count_attention_in_every_form():
    """torch's FLOP counter reads 0 for MultiheadAttention's eval fast path and for SDPA's CPU
    kernel; count_macs must count the projections and the attention matmuls all the same."""
    from fxlrd import count_macs

    e, n, heads = 64, 10, 4
    mha = nn.MultiheadAttention(e, heads, batch_first=True).eval()

    class SelfAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = mha

        def forward(self, x):
            return self.mha(x, x, x, need_weights=False)[0]

    expected = 4 * n * e * e + 2 * n * n * e  # q, k, v, out projections + QKᵀ and AV
    x = torch.randn(1, n, e)
    assert count_macs(SelfAttention(), x) == expected
    q = torch.randn(1, heads, n, e // heads)
    sdpa = count_macs(lambda t: torch.nn.functional.scaled_dot_product_attention(t, t, t), q)
    assert sdpa == 2 * n * n * e
    assert torch.backends.mha.get_fastpath_enabled()  # restored


@pytest.mark.parametrize("text,error,match", [
    ("[1, 2]", PlanMismatchError, "not an fxlrd plan"),
    ("null", PlanMismatchError, "not an fxlrd plan"),
    ("", PlanMismatchError, "not valid JSON"),
    ('{"format": "fxlrd.plan/1", "layers": 5}', PlanMismatchError, "'layers' must be a list"),
    ('{"format": "fxlrd.plan/1", "layers": [5]}', PlanMismatchError, "layer entry must be a JSON object"),
    ("no_such_plan.json", FileNotFoundError, "no plan file no_such_plan.json"),
])  # fmt: skip
def test_malformed_plan_text_gets_a_clear_error(text, error, match):
    with pytest.raises(error, match=match):
        Plan.from_json(text)


def test_a_plan_edited_into_nonsense_is_refused_before_any_work():
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1)).eval()
    data = fxlrd.plan(model, LRDConfig(ratio=2), example_inputs=torch.randn(1, 3, 8, 8)).to_dict()
    for ranks in (["a", 2], [2.7, 3]):
        bad = json.loads(json.dumps(data))
        bad["layers"][1]["ranks"] = ranks
        with pytest.raises(PlanMismatchError, match="ranks must be a list of ints"):
            Plan.from_dict(bad)
    twice = json.loads(json.dumps(data))
    twice["layers"].append(twice["layers"][0])
    with pytest.raises(PlanMismatchError, match="names layer '0' twice"):
        Plan.from_dict(twice)
    svd = json.loads(json.dumps(data))
    svd["layers"][1]["method"], svd["layers"][1]["ranks"] = "svd", [5]
    with pytest.raises(PlanMismatchError, match="decomposes '2' with svd, which does not apply: svd needs a Linear"):
        fxlrd.apply(model, Plan.from_dict(svd))


def test_an_edited_plan_reports_what_was_built_and_ranks_past_the_layer_are_named():
    model = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 10)).eval()
    x = torch.randn(2, 32)
    data = fxlrd.plan(model, LRDConfig(ratio=2, rank_quantum=1), example_inputs=x).to_dict()
    data["layers"][0]["ranks"] = [20]  # (the plan said 9)
    gm = fxlrd.apply(model, Plan.from_dict(data), example_inputs=x)
    lp = gm.fxlrd_plan["0"]
    assert lp.ranks == (20,) and lp.params_after == fxlrd.count_params(gm.get_submodule("0"))
    assert gm.fxlrd_plan.params_after_model() == fxlrd.count_params(gm)
    assert lp.macs_after == 2 * (32 * 20 + 20 * 48)
    data["layers"][0]["ranks"] = [40]  # past min(32, 48)
    with pytest.raises(PlanMismatchError, match=r"'0' ranks \(40,\), outside what its svd takes \(1 rank, 1 to 32 for this"):
        fxlrd.apply(model, Plan.from_dict(data), example_inputs=x)


def test_count_macs_leaves_a_training_model_as_it_was():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(288, 4)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert fxlrd.count_macs(model, torch.randn(2, 3, 8, 8)) > 0
    assert model.training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # BN stats too
    with pytest.raises(ConfigError, match="count_macs needs example_inputs"):
        fxlrd.count_macs(model, None)


def test_a_plan_file_that_is_not_text_is_named(tmp_path):
    path = tmp_path / "plan.json"
    path.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(PlanMismatchError, match="plan.json is not a plan: it is not UTF-8 text"):
        Plan.from_json(path)


def test_macs_and_parameters_are_the_textbook_counts():
    """(mutation audit) a multiply-accumulate is one, not two FLOPs; a tied weight counts once."""
    from fxlrd.metrics import layer_macs

    conv, fc = nn.Conv2d(4, 8, 3, padding=1, stride=2), nn.Linear(10, 6)
    assert layer_macs(conv, (2, 4, 6, 6)) == 2 * 8 * 3 * 3 * (4 * 3 * 3)  # batch · out · positions · (in · k · k)
    assert layer_macs(fc, (5, 10)) == 5 * 6 * 10
    assert layer_macs(nn.Conv2d(4, 8, 3, groups=2), (1, 4, 5, 5)) == 8 * 9 * (2 * 3 * 3)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 10))
    assert fxlrd.count_macs(model, torch.randn(3, 3, 4)) == 3 * 10 * 12
    a, b = nn.Linear(8, 8), nn.Linear(8, 8)
    b.weight = a.weight
    assert fxlrd.count_params(nn.Sequential(a, b)) == 64 + 8 + 8


def test_a_torch_compiled_model_is_taken_as_its_module(tmp_path):
    # the compiled wrapper ran under fxlrd's fake tensors and inductor's code crashed the process (SIGSEGV)
    model = nn.Sequential(nn.Conv2d(4, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1)).eval()
    compiled, x = torch.compile(model), torch.randn(2, 4, 8, 8)
    assert [lp.name for lp in fxlrd.plan(compiled, LRDConfig(ratio=2), example_inputs=x)] == ["0", "2"]
    gm = fxlrd.transform(compiled, LRDConfig(ratio=2), example_inputs=x)
    assert isinstance(gm.get_submodule("2"), Factorized)
    fxlrd.save(gm, tmp_path / "m")
    assert torch.equal(fxlrd.load(compiled, tmp_path / "m")(x), gm(x))
