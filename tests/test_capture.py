"""Capture: any model in (torch.fx or torch.export), the result called like the model,
saved and reloaded, and a clear error with the model untouched when it cannot be done."""

import io
import logging
import os
import re
import warnings
from pathlib import Path

import pytest
import torch
from torch import fx, nn

import fxlrd
from fxlrd import CaptureError, ConfigError, Factorized, FxlrdWarning, LRDConfig, PlanMismatchError

from conftest import rel_err

transformers = pytest.importorskip("transformers")

FULL = LRDConfig(rank_rule="fixed", rank=10**6, allow_larger=True)
LOW = LRDConfig(rank_rule="fixed", rank=4, rank_quantum=1)


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_untouched(model, before):
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)  # bitwise


class Net(nn.Module):
    """Traceable by torch.fx."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


class TwoInputs(nn.Module):
    """Two inputs, one optional; a dict output."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(4, 16)
        self.out = nn.Linear(16, 6)

    def forward(self, x, y=None):
        h = self.a(x)
        if y is not None:
            h = h + self.b(y)
        return {"logits": self.out(torch.relu(h)), "hidden": (h,)}


class DataDependent(nn.Module):
    """Python control flow on a tensor value: neither torch.fx nor torch.export takes it."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        x = self.lin(x)
        if x.sum() > 0:  # the line the error must name
            return x
        return -x


DATA_DEPENDENT_LINE = next(
    i for i, line in enumerate(Path(__file__).read_text().splitlines(), 1) if "if x.sum() > 0:  # the line" in line
)


def _bert(layers=1, **kw):
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64, **kw)  # fmt: skip
    return transformers.BertModel(cfg).eval()


def _tokens(batch, seq):
    ids = torch.randint(0, 100, (batch, seq))
    return {"input_ids": ids, "attention_mask": torch.ones(batch, seq, dtype=torch.long)}


# --- capture modes and what the plan records --------------------------------------------------------


@pytest.mark.parametrize("mode, want, reason", [
    ("auto", "fx", "symbolic_trace succeeded"),
    ("fx", "fx", "symbolic_trace succeeded"),
    ("export", "export", "requested"),
])  # fmt: skip
def test_capture_mode_and_reason_are_recorded(mode, want, reason):
    model = Net().eval()
    x = torch.randn(2, 3, 8, 8)
    plan = fxlrd.plan(model, FULL, example_inputs=x, capture=mode)
    assert plan.settings["capture"]["mode"] == want and plan.settings["capture"]["reason"] == reason
    gm = fxlrd.transform(model, FULL, example_inputs=x, capture=mode)
    assert gm.fxlrd_capture["mode"] == want and gm.fxlrd_capture["reason"] == reason
    assert gm.fxlrd_plan.settings["capture"] == gm.fxlrd_capture
    assert {lp.name for lp in gm.fxlrd_plan.decomposed} == {"conv", "fc"}
    assert {lp.site for lp in gm.fxlrd_plan} == ({"module"} if want == "fx" else {"function"})
    assert isinstance(gm.get_submodule("conv"), Factorized) and isinstance(gm.get_submodule("fc"), Factorized)
    with torch.no_grad():
        assert rel_err(gm(x), model(x)) <= 1e-5


def test_auto_falls_back_to_export_and_says_why():
    model = _bert()
    plan = fxlrd.plan(model, FULL, example_inputs=_tokens(2, 8))
    record = plan.settings["capture"]
    assert record["mode"] == "export"
    assert record["reason"].startswith("symbolic_trace failed (")
    assert len(record["reason"]) > len("symbolic_trace failed ()")  # with the cause


def test_export_capture_is_a_plain_graph_module_with_aten_sites():
    gm = fxlrd.transform(Net().eval(), LOW, example_inputs=torch.randn(2, 3, 8, 8), capture="export")
    assert isinstance(gm, fx.GraphModule)
    assert {lp.layer_type for lp in gm.fxlrd_plan} <= {"aten.conv2d", "aten.linear", "aten.convolution"}
    # The state dict keeps the owners' names.
    assert {"conv.core.weight", "fc.in_proj.weight", "fc.out_proj.bias", "bn.running_mean"} <= set(gm.state_dict())


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("form", ["tensor", "tuple", "list", "dict"])
def test_example_inputs_as_tensor_tuple_or_dict(capture, form):
    model = Net().eval()
    x = torch.randn(2, 3, 8, 8)
    example = {"tensor": x, "tuple": (x,), "list": [x], "dict": {"x": x}}[form]
    gm = fxlrd.transform(model, FULL, example_inputs=example, capture=capture)
    assert gm.fxlrd_plan["conv"].input_shape == (2, 3, 8, 8)
    assert gm.fxlrd_plan["fc"].macs_before == 2 * 16 * 10
    with torch.no_grad():
        assert rel_err(gm(x), model(x)) <= 1e-5
        assert rel_err(gm(x=x), model(x)) <= 1e-5


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_two_inputs_positional_and_keyword_with_dict_output(capture):
    model = TwoInputs().eval()
    x, y = torch.randn(3, 8), torch.randn(3, 4)
    gm = fxlrd.transform(model, FULL, example_inputs=(x, y), capture=capture)
    with torch.no_grad():
        want = model(x, y)
        for got in (gm(x, y), gm(x, y=y), gm(x=x, y=y)):
            assert set(got) == {"logits", "hidden"} and isinstance(got["hidden"], tuple)
            assert rel_err(got["logits"], want["logits"]) <= 1e-5
            assert rel_err(got["hidden"][0], want["hidden"][0]) <= 1e-5


def test_dict_example_inputs_with_keyword_only_use():
    model = TwoInputs().eval()
    x, y = torch.randn(3, 8), torch.randn(3, 4)
    gm = fxlrd.transform(model, FULL, example_inputs={"x": x, "y": y}, capture="export")
    assert gm.fxlrd_capture["mode"] == "export"
    with torch.no_grad():
        assert rel_err(gm(x=x, y=y)["logits"], model(x, y)["logits"]) <= 1e-5
        x5, y5 = torch.randn(5, 8), torch.randn(5, 4)  # dynamic batch
        assert rel_err(gm(x=x5, y=y5)["logits"], model(x5, y5)["logits"]) <= 1e-5


# --- export: dynamic dimensions, output structure ---------------------------------------------------


def test_export_runs_at_other_batch_and_sequence_lengths():
    model = _bert(layers=2)
    gm = fxlrd.transform(model, LOW, example_inputs=_tokens(2, 8))
    assert gm.fxlrd_capture["mode"] == "export"
    for batch, seq in [(1, 5), (3, 11), (4, 16)]:
        inputs = _tokens(batch, seq)
        with torch.no_grad():
            out = gm(**inputs)
        assert out.last_hidden_state.shape == (batch, seq, 32)
        assert out.pooler_output.shape == (batch, 32)


def test_export_at_batch_one_stays_dynamic():
    model = Net().eval()
    gm = fxlrd.transform(model, FULL, example_inputs=torch.randn(1, 3, 8, 8), capture="export")
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        assert rel_err(gm(x), model(x)) <= 1e-5


@pytest.mark.parametrize("example", ["length one", "float mask", "batch and length one"])
def test_export_keeps_the_sequence_dynamic(example):
    model = _bert()
    inputs = {"length one": _tokens(2, 1), "batch and length one": _tokens(1, 1),
              "float mask": {**_tokens(2, 8), "attention_mask": torch.ones(2, 8)}}[example]  # fmt: skip
    gm = fxlrd.transform(model, FULL, example_inputs=inputs, capture="export")
    assert not any("fixed" in note for note in gm.fxlrd_capture["notes"])
    other = _tokens(3, 7)
    if example == "float mask":
        other["attention_mask"] = other["attention_mask"].float()
    with torch.no_grad():
        torch.testing.assert_close(gm(**other).last_hidden_state, model(**other).last_hidden_state, rtol=1e-4, atol=1e-4)


def test_export_that_fixes_the_sequence_length_says_so():
    class Flattens(nn.Module):  # the sequence length is baked into a reshape
        def __init__(self):
            super().__init__()
            self.emb, self.lin = nn.Embedding(50, 4), nn.Linear(32, 8)

        def forward(self, input_ids):
            h = self.emb(input_ids)
            return self.lin(h.reshape(h.shape[0], 32))

    gm = fxlrd.transform(Flattens(), LOW, example_inputs={"input_ids": torch.randint(0, 50, (3, 8))}, capture="export")
    assert any("export fixed the sequence size" in note for note in gm.fxlrd_capture["notes"])
    assert gm(input_ids=torch.randint(0, 50, (5, 8))).shape == (5, 8)  # the batch stays dynamic


class _BranchesOnBatch(nn.Module):  # fx cannot trace the branch; export takes it for the example's batch
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 32)

    def forward(self, x):
        h = self.a(x)
        return self.b(h) if x.shape[0] > 4 else self.c(h)


def test_a_size_export_specialized_is_checked_at_run_time(tmp_path):
    """torch.export bounds the batch to > 4 (it took that branch); the graph used to drop the
    guard and run the same branch at batch 2, silently wrong."""
    torch.manual_seed(0)
    model = _BranchesOnBatch().eval()
    gm = fxlrd.transform(model, FULL, example_inputs=torch.randn(8, 32))
    assert any("dimension 0 to sizes of at least 5" in n for n in gm.fxlrd_capture["notes"])
    x = torch.randn(6, 32)
    assert rel_err(gm(x), model(x)) <= 1e-5
    with pytest.raises(ValueError, match="input 'x' has size 2 in dimension 0; this captured graph holds for sizes of at least 5"):
        gm(torch.randn(2, 32))
    fxlrd.save(gm, tmp_path / "s")
    loaded = fxlrd.load(_BranchesOnBatch().eval(), tmp_path / "s")
    buffer = io.BytesIO()
    torch.save(gm, buffer)  # unpickling re-traces the graph: the check stays a node
    buffer.seek(0)
    retraced = fx.symbolic_trace(gm)  # a plain fx tracer (a user's own pass) keeps the check as well
    for copy in (loaded, torch.load(buffer, weights_only=False), retraced):
        with pytest.raises(ValueError, match="holds for sizes of at least 5"):
            copy(torch.randn(2, 32))
    assert rel_err(retraced(x), model(x)) <= 1e-5


def test_hugging_face_model_output_stays_one():
    model = _bert()
    inputs = _tokens(2, 8)
    gm = fxlrd.transform(model, FULL, example_inputs=inputs)
    with torch.no_grad():
        got, want = gm(**inputs), model(**inputs)
    assert type(got) is type(want)
    assert isinstance(got, transformers.utils.ModelOutput)
    assert list(got.keys()) == list(want.keys())
    assert rel_err(got.last_hidden_state, want.last_hidden_state) <= 1e-5
    assert rel_err(got["pooler_output"], want["pooler_output"]) <= 1e-5
    assert rel_err(got[0], want[0]) <= 1e-5  # indexable like a tuple too


def test_apply_reuses_the_recorded_export_capture():
    model = _bert()
    inputs = _tokens(2, 8)
    plan = fxlrd.plan(model, LOW, example_inputs=inputs)
    assert plan.settings["inputs"]["kwargs"]["input_ids"] == {"shape": [2, 8], "dtype": "int64"}
    again = fxlrd.Plan.from_json(plan.to_json())
    gm = fxlrd.apply(model, again)  # no example inputs: zeros of the recorded shapes
    assert gm.fxlrd_capture["mode"] == "export"
    ref = fxlrd.transform(model, LOW, example_inputs=inputs)
    other = _tokens(3, 6)
    with torch.no_grad():
        torch.testing.assert_close(gm(**other).last_hidden_state, ref(**other).last_hidden_state)


# --- saving and loading a transformed GraphModule ------------------------------------------------------


def _round_trip(gm):
    buf = io.BytesIO()
    torch.save(gm, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def _train_step_checks(loaded, run, out_of):
    """Freeze by the paper, take one SGD step; frozen factors stay, trainable ones move."""
    for node in loaded.graph.nodes:  # roles must come from the Factorized modules, not node meta
        node.meta.pop("fxlrd", None)
    fxlrd.freeze(loaded, "paper")
    facts = {n: m for n, m in loaded.named_modules() if isinstance(m, Factorized)}
    assert facts
    for name, fact in facts.items():
        if fact.method == "svd" and "in_proj" in fact.roles():
            assert not any(p.requires_grad for p in fact.in_proj.parameters()), name
            assert all(p.requires_grad for p in fact.out_proj.parameters()), name
        if fact.method == "tucker2" and len(fact.roles()) > 1:
            assert all(p.requires_grad for p in fact.core.parameters()), name
            assert not any(p.requires_grad for roles in ("in_proj", "out_proj") if roles in fact.roles()
                           for p in getattr(fact, roles).parameters()), name  # fmt: skip
    groups = fxlrd.param_groups(loaded, lr=0.5)
    names = {g["name"]: g for g in groups}
    assert {"factors_trainable", "factors_frozen"} <= set(names)
    assert all(not p.requires_grad for p in names["factors_frozen"]["params"])
    opt = torch.optim.SGD(groups, lr=0.5)
    before = {k: v.clone() for k, v in loaded.named_parameters()}
    loaded.train()
    out = out_of(run(loaded))
    (out * torch.randn_like(out)).sum().backward()
    opt.step()
    after = dict(loaded.named_parameters())
    frozen = [k for k, p in after.items() if not p.requires_grad]
    moved = [k for k, p in after.items() if p.requires_grad and not torch.equal(before[k], p)]
    assert frozen and all(torch.equal(before[k], after[k]) and after[k].grad is None for k in frozen)
    assert any(".out_proj." in k for k in moved)


def test_save_load_round_trip_fx_capture():
    model = Net().eval()
    x = torch.randn(2, 3, 8, 8)
    gm = fxlrd.transform(model, LOW, capture="fx")
    loaded = _round_trip(gm)
    assert loaded.fxlrd_capture["mode"] == "fx"
    assert isinstance(loaded.get_submodule("conv"), Factorized) and loaded.get_submodule("conv").method == "tucker2"
    with torch.no_grad():
        assert torch.equal(loaded(x), gm(x))
    _train_step_checks(loaded, lambda m: m(x), lambda out: out)


def test_save_load_round_trip_export_capture():
    model = _bert(layers=2)
    inputs = _tokens(2, 8)
    gm = fxlrd.transform(model, LOW, example_inputs=inputs)
    assert gm.fxlrd_capture["mode"] == "export"
    loaded = _round_trip(gm)
    assert loaded.fxlrd_capture == gm.fxlrd_capture
    assert loaded.fxlrd_plan.to_dict() == gm.fxlrd_plan.to_dict()
    assert set(gm.state_dict()) <= set(loaded.state_dict())
    other = _tokens(3, 5)
    with torch.no_grad():
        a, b = gm(**inputs), loaded(**inputs)
        assert type(b) is type(a)
        assert torch.equal(a.last_hidden_state, b.last_hidden_state) and torch.equal(a.pooler_output, b.pooler_output)
        torch.testing.assert_close(loaded(**other).last_hidden_state, gm(**other).last_hidden_state, rtol=0, atol=0)
    _train_step_checks(loaded, lambda m: m(**inputs), lambda out: out.last_hidden_state)


class WithBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.register_buffer("offset", torch.ones(8))

    def forward(self, x):
        return self.lin(x) + self.offset * 2


def test_save_load_of_export_capture_keeps_state_dict_keys_and_buffer_reads():
    cfg = LRDConfig(rank_rule="fixed", rank=2, rank_quantum=1)
    gm = fxlrd.transform(WithBuffer().eval(), cfg, example_inputs=torch.randn(2, 8), capture="export")
    assert isinstance(gm.get_submodule("lin"), Factorized)
    loaded = _round_trip(gm)
    x = torch.randn(3, 8)
    with torch.no_grad():
        for m in (gm, loaded):
            m.offset.fill_(5.0)
        torch.testing.assert_close(loaded(x), gm(x))
    assert loaded.state_dict().keys() == gm.state_dict().keys()
    loaded.load_state_dict(gm.state_dict())  # strict


# --- bad input: a clear error, the model untouched ---------------------------------------------------


class OneInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        return self.lin(x)


@pytest.mark.parametrize("capture", ["auto", "fx", "export"])
@pytest.mark.parametrize("verb", ["plan", "transform"])
def test_dict_inputs_the_forward_does_not_take(capture, verb):
    model = OneInput()
    before = _snapshot(model)
    with pytest.raises(ConfigError) as info:
        getattr(fxlrd, verb)(model, LOW, example_inputs={"inputs": torch.randn(2, 8)}, capture=capture)
    msg = str(info.value)
    assert "OneInput.forward(x)" in msg and "'x'" in msg
    _assert_untouched(model, before)
    assert isinstance(model.lin, nn.Linear)


def test_too_many_positional_inputs():
    model = OneInput()
    before = _snapshot(model)
    with pytest.raises(ConfigError, match=r"do not fit OneInput.forward\(x\)"):
        fxlrd.transform(model, LOW, example_inputs=(torch.randn(2, 8), torch.randn(2, 8)), capture="export")
    _assert_untouched(model, before)


@pytest.mark.parametrize("capture", ["auto", "export"])
def test_float_token_ids_are_named(capture):
    model = _bert()
    before = _snapshot(model)
    with pytest.raises(ValueError) as info:
        fxlrd.transform(model, LOW, example_inputs={"input_ids": torch.rand(2, 8) * 10}, capture=capture)
    msg = str(info.value)
    assert "input_ids=float32[2, 8]" in msg and "BertModel" in msg
    assert "int64" in msg and re.search(r"Long|int", msg)
    _assert_untouched(model, before)


def test_wrong_shape_is_named():
    model = Net()
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"float32\[2, 5, 8, 8\].*do not run through Net"):
        fxlrd.transform(model, LOW, example_inputs=torch.randn(2, 5, 8, 8), capture="export")
    _assert_untouched(model, before)
    fake_log, records = logging.getLogger("torch._subclasses.fake_tensor"), []
    handler = logging.Handler()
    handler.emit = records.append
    fake_log.addHandler(handler)
    try:
        with pytest.raises(ValueError, match=r"float32\[2, 7\]\) do not run through Linear: .*mat1 and mat2 shapes cannot be multiplied"):
            fxlrd.transform(nn.Linear(16, 4), LOW, example_inputs=torch.randn(2, 7), capture="export")
    finally:
        fake_log.removeHandler(handler)
    assert not records  # torch's traceback of the failing op (20 lines) is not logged before the one-line error
    assert fake_log.level == logging.NOTSET  # and the logger's level is back


def test_data_dependent_control_flow_names_the_failure_and_the_users_line():
    model = DataDependent()
    before = _snapshot(model)
    with pytest.raises(CaptureError) as info:
        fxlrd.transform(model, LOW, example_inputs=torch.randn(2, 8), capture="export")
    msg = str(info.value)
    assert "torch.export" in msg and re.search(r"data-dependent|GuardOnDataDependent", msg)
    assert f"test_capture.py:{DATA_DEPENDENT_LINE}" in msg and "if x.sum() > 0" in msg
    assert "torch.cond" in msg  # a way out
    _assert_untouched(model, before)


def test_data_dependent_control_flow_in_auto_reports_both_captures():
    model = DataDependent()
    before = _snapshot(model)
    with pytest.raises(CaptureError) as info:
        fxlrd.plan(model, LOW, example_inputs=torch.randn(2, 8))
    msg = str(info.value)
    assert "torch.fx.symbolic_trace" in msg and "torch.export.export" in msg
    assert msg.count(f"test_capture.py:{DATA_DEPENDENT_LINE}") == 2
    _assert_untouched(model, before)


@pytest.mark.parametrize("verb", ["plan", "transform"])
def test_bogus_capture_mode_is_a_config_error(verb):
    model = Net()
    before = _snapshot(model)
    with pytest.raises(ConfigError, match=r"capture must be one of \('auto', 'fx', 'export'\), got 'bogus'"):
        getattr(fxlrd, verb)(model, LOW, example_inputs=torch.randn(1, 3, 8, 8), capture="bogus")
    _assert_untouched(model, before)


def test_export_without_example_inputs_says_what_is_missing():
    model = Net()
    with pytest.raises((CaptureError, ConfigError)) as info:
        fxlrd.transform(model, LOW, capture="export")
    msg = str(info.value)
    assert "example_inputs" in msg
    assert "could not trace" not in msg


def test_plan_from_an_fx_capture_applied_to_another_model():
    plan = fxlrd.plan(Net(), LOW, capture="fx")
    assert plan.settings["capture"]["mode"] == "fx"
    other = OneInput()
    before = _snapshot(other)
    with pytest.raises(PlanMismatchError, match=r"the plan decomposes '(conv|fc)'"):
        fxlrd.apply(other, plan)
    _assert_untouched(other, before)
    assert isinstance(other.lin, nn.Linear)


def test_plan_applied_to_a_model_of_other_shapes():
    plan = fxlrd.plan(Net(), LOW)

    class Wider(Net):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(16, 12)

    other = Wider()
    before = _snapshot(other)
    with pytest.raises(PlanMismatchError, match=r"'fc'.*16->10.*16->12"):
        fxlrd.apply(other, plan)
    _assert_untouched(other, before)


def test_user_model_untouched_by_export_capture():
    model = _bert(layers=2)
    model.train()
    before = _snapshot(model)
    fxlrd.transform(model, LOW, example_inputs=_tokens(2, 8))
    _assert_untouched(model, before)
    assert model.training
    assert isinstance(model.encoder.layer[0].attention.self.query, nn.Linear)


def test_user_code_in_a_folder_named_fxlrd_is_still_the_users():
    """Only frames of this package are skipped, not every path with an ``fxlrd`` folder (a
    checkout named so lost the user's line from every capture error)."""
    from fxlrd.capture import _user_frame

    namespace: dict = {}
    path = os.path.join(os.sep, "home", "someone", "fxlrd", "model.py")
    exec(compile("def forward():\n    raise ValueError('no')\n", path, "exec"), namespace)
    try:
        namespace["forward"]()
    except ValueError as exc:
        frame = _user_frame(exc)
    assert frame.startswith(f"at {path}:2 in forward")


class TakesKwargs(nn.Module):
    """forward(x, **kwargs) that ignores its keyword inputs, as many model zoos' forwards do."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x, **kwargs):
        return self.b(torch.relu(self.a(x)))


class ReadsKwargs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 16)

    def forward(self, x, **kwargs):
        return self.a(x) + kwargs["shift"]


class TakesVarargs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x, *rest):
        return self.b(torch.relu(self.a(x))) + rest[0] * rest[1]


@pytest.mark.parametrize("sequential", [False, True])
def test_forward_with_unused_kwargs_is_captured_by_fx_and_calibrates(sequential):
    torch.manual_seed(0)
    model, x = TakesKwargs().eval(), torch.randn(8, 16)
    calibration = [torch.randn(32, 16), {"x": torch.randn(32, 16), "ignored": 1}]
    config = LRDConfig(rank_rule="fixed", rank=16, rank_quantum=1, allow_larger=True, sequential=sequential)
    gm = fxlrd.transform(model, config, example_inputs=x, calibration=calibration)
    assert gm.fxlrd_capture["mode"] == "fx"
    torch.testing.assert_close(gm(x, ignored=2), model(x), rtol=1e-4, atol=1e-4)  # full rank: the original


@pytest.mark.parametrize("sequential", [False, True])
def test_forward_with_varargs_calibrates_with_every_positional_input(sequential):
    torch.manual_seed(0)
    model = TakesVarargs().eval()
    x, y, z = torch.randn(8, 16), torch.randn(8, 16), torch.randn(8, 16)
    calibration = [(torch.randn(32, 16), torch.randn(32, 16), torch.randn(32, 16)) for _ in range(2)]
    config = LRDConfig(rank_rule="fixed", rank=16, rank_quantum=1, allow_larger=True, sequential=sequential)
    gm = fxlrd.transform(model, config, example_inputs=(x, y, z), calibration=calibration)
    assert gm.fxlrd_capture["mode"] == "fx"
    torch.testing.assert_close(gm(x, y, z), model(x, y, z), rtol=1e-4, atol=1e-4)


def test_forward_reading_kwargs_is_captured_by_export():
    model, x, shift = ReadsKwargs().eval(), torch.randn(4, 16), torch.randn(4, 16)
    with pytest.raises(CaptureError, match=r"reads its \*\*kwargs"):
        fxlrd.transform(model, FULL, example_inputs={"x": x, "shift": shift}, capture="fx")
    gm = fxlrd.transform(model, FULL, example_inputs={"x": x, "shift": shift})
    assert gm.fxlrd_capture["mode"] == "export"
    assert any("static shapes" in note for note in gm.fxlrd_capture["notes"])  # torch cannot export **kwargs dynamic
    torch.testing.assert_close(gm(x=x, shift=shift), model(x, shift=shift), rtol=1e-4, atol=1e-4)


def test_hook_based_weight_norm_is_folded_on_the_copy_only(tmp_path):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch deprecates the hook-based form, models still use it
        model = nn.Sequential(nn.utils.weight_norm(nn.Conv1d(16, 16, 3, padding=1)), nn.ReLU(), nn.Conv1d(16, 8, 1))
    x = torch.randn(2, 16, 9)
    want = model(x)  # with grad: the hook leaves a weight with a history, which torch cannot deepcopy
    before = _snapshot(model)
    gm = fxlrd.transform(model, FULL, example_inputs=x)
    assert any("weight_norm" in note for note in gm.fxlrd_capture["notes"])
    assert isinstance(gm.get_submodule("0"), Factorized)
    torch.testing.assert_close(gm(x), want, rtol=1e-4, atol=1e-4)
    _assert_untouched(model, before)
    assert model[0].weight.device.type == "cpu" and model[0]._forward_pre_hooks  # the user's hook is still there
    with pytest.raises(ConfigError, match="weight_norm"):
        fxlrd.transform(model, FULL, example_inputs=x, inplace=True)
    _assert_untouched(model, before)
    fxlrd.save(gm, tmp_path / "m")
    torch.testing.assert_close(fxlrd.load(model, tmp_path / "m")(x), gm(x))


def test_hook_based_spectral_norm_is_folded_on_the_copy_only(tmp_path):
    # the hook keeps the weight in a plain attribute: it broke on the meta device while the MACs
    # were counted, and (that fixed) the raw weight read before any forward gave wrong outputs
    torch.manual_seed(0)
    model = nn.Sequential(nn.utils.spectral_norm(nn.Conv2d(4, 16, 3)), nn.ReLU(), nn.Conv2d(16, 16, 3)).eval()
    x = torch.randn(2, 4, 8, 8)
    before = _snapshot(model)
    gm = fxlrd.transform(model, FULL, example_inputs=x)  # before the model's first forward
    assert any("spectral_norm" in note for note in gm.fxlrd_capture["notes"])
    assert isinstance(gm.get_submodule("0"), Factorized)
    _assert_untouched(model, before)
    want = model(x)
    torch.testing.assert_close(gm(x), want, rtol=1e-4, atol=1e-4)
    assert model[0].weight.device.type == "cpu" and model[0]._forward_pre_hooks  # the user's hook is still there
    small = fxlrd.transform(model, LRDConfig(ratio=2), example_inputs=x)
    fxlrd.save(small, tmp_path / "m")
    torch.testing.assert_close(fxlrd.load(model, tmp_path / "m")(x), small(x), rtol=0, atol=0)
    _assert_untouched(model, before)


def test_user_forward_hooks_never_see_the_mac_counters_meta_tensors():
    # planning counted a layer's MACs by calling it, hooks included, on the meta device:
    # a hook reading a value (.item()) raised "cannot be called on meta tensors"
    seen = []
    model = nn.Sequential(nn.Conv2d(4, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3)).eval()
    model[0].register_forward_hook(lambda mod, args, out: seen.append(out.abs().max().item()))
    gm = fxlrd.transform(model, LRDConfig(ratio=2), example_inputs=torch.randn(2, 4, 8, 8))
    assert isinstance(gm.get_submodule("0"), Factorized) and gm.fxlrd_plan["0"].macs_before == 2 * 16 * 4 * 9 * 36


class _Hooked(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.head = nn.Linear(16, 2)

    def forward(self, x):
        return self.head(self.fc(x))


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_hooks_the_returned_graph_does_not_call_are_named(capture):
    """A decomposed layer's hooks are gone (fx: a hook changing its output too), and an export
    capture ran every hook once, while tracing: a warning and a capture note name the modules;
    a hook on a layer fx keeps as a module still runs, and no hooks, no warning."""
    model = _Hooked().eval()
    seen = []
    model.fc.register_forward_hook(lambda mod, args, out: out * 0)  # changes fc's output
    model.head.register_forward_pre_hook(lambda mod, args: seen.append("head"))
    x = torch.randn(2, 16)
    config = LRDConfig(ratio=2, include=["fc"])
    with pytest.warns(FxlrdWarning, match="hooked module") as record:
        gm = fxlrd.transform(model, config, example_inputs=x, capture=capture)
    message = str(next(w.message for w in record if "hooked module" in str(w.message)))
    assert message in gm.fxlrd_capture["notes"] and "fc (forward hook)" in message
    seen.clear()
    gm(x)
    if capture == "fx":
        assert "decomposed, each runs as its factors" in message and "head" not in message and seen == ["head"]
    else:
        assert "traced into by the capture" in message and "head (forward pre-hook)" in message and seen == []
        torch.testing.assert_close(gm(x), model(x))  # fc's hook (zeroing its output) is in the graph
    with pytest.warns(FxlrdWarning, match="hooked module"):
        fxlrd.apply(model, gm.fxlrd_plan, example_inputs=x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FxlrdWarning)
        fxlrd.transform(_Hooked().eval(), config, example_inputs=x, capture=capture)


class _CentredWhenBatched(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16, bias=False)  # zeros in, zeros out: both sides of the branch agree on zeros

    def forward(self, x):
        x = self.fc(x)
        if x.shape[0] > 1:  # a branch on the batch size
            x = x - x.mean(0, keepdim=True)
        return x


def _saved_and_loaded(gm, model):
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        fxlrd.save(gm, Path(tmp) / "m")
        return fxlrd.load(model, Path(tmp) / "m")


def test_a_graph_exported_at_a_widened_size_is_checked_at_the_examples_own():
    """A batch of 1 is exported at 2 (export fixes sizes of 1); a model branching on the batch
    size then gave a graph that took the batched side, silently wrong at the user's own
    example (relative error 1 at full rank). It is now captured at 1, static, with a note;
    a model that does not branch keeps its dynamic batch."""
    model, x1 = _CentredWhenBatched().eval(), torch.randn(1, 16)
    full = LRDConfig(rank_rule="fixed", rank=10**6, allow_larger=True)
    gm = fxlrd.transform(model, full, example_inputs=x1, capture="export")
    torch.testing.assert_close(gm(x1), model(x1))
    assert any("captured at the example's batch of 1, with static shapes" in n for n in gm.fxlrd_capture["notes"])
    # apply and load capture it so again, without the check: from the recorded zeros, which cannot tell
    for again in (fxlrd.apply(model, gm.fxlrd_plan), _saved_and_loaded(gm, model)):
        torch.testing.assert_close(again(x1), model(x1))
        assert again.fxlrd_capture["notes"] == gm.fxlrd_capture["notes"]
    plain = nn.Sequential(nn.Linear(16, 16)).eval()
    gm = fxlrd.transform(plain, full, example_inputs=x1, capture="export")
    x3 = torch.randn(3, 16)
    torch.testing.assert_close(gm(x3), plain(x3))
    assert not any("static shapes" in n for n in gm.fxlrd_capture["notes"])


class _ChunksByLength(nn.Module):  # export bakes length // 4 in as a constant; the model itself takes any length
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 8)

    def forward(self, x):
        return self.lin(x.reshape(x.shape[0], x.shape[1] // 4, 4)).sum(1)


def test_a_length_export_fixed_is_noted_and_named_when_another_length_fails():
    # a waveform length fixed at capture: another length failed deep inside, with an error blaming the inputs
    model, x = _ChunksByLength().eval(), torch.randn(2, 16)
    gm = fxlrd.transform(model, FULL, example_inputs=x, capture="export")
    assert any("export fixed input 'x' at the example's size in dimension 1 (16)" in n for n in gm.fxlrd_capture["notes"])
    with pytest.raises(ValueError, match="input 'x' has size 20 in dimension 1, where the capture fixed 16\nThe graph"):
        fxlrd.transform(model, LRDConfig(ratio=2), example_inputs=x, capture="export", calibration=[torch.randn(2, 20)])


def test_fixed_size_notes_name_lengths_not_features_or_channels():
    mlp = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()  # 16 is a feature size, not a length
    gm = fxlrd.transform(mlp, LOW, example_inputs=torch.randn(4, 16), capture="export")
    assert not any("export fixed input" in n for n in gm.fxlrd_capture["notes"])
    conv = nn.Sequential(nn.Conv1d(1, 8, 5), nn.ReLU(), nn.Conv1d(8, 8, 5)).eval()  # (batch, channels, samples)
    gm = fxlrd.transform(conv, LOW, example_inputs=torch.randn(2, 1, 400), capture="export")
    notes = [n for n in gm.fxlrd_capture["notes"] if "export fixed input" in n]
    assert len(notes) == 1 and "dimension 2 (400)" in notes[0]


def test_an_export_capture_counts_the_layers_whose_weight_the_graph_computes():
    # a parametrization's weight is computed in the graph: no parameter to factorize, and the plan did not say
    model = nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(16, 16)), nn.ReLU(), nn.Linear(16, 8)).eval()
    x = torch.randn(2, 16)
    gm = fxlrd.transform(model, FULL, example_inputs=x, capture="export")
    assert any(note.startswith("1 linear/conv operations compute their weight") for note in gm.fxlrd_capture["notes"])
    assert list(gm.fxlrd_plan.layers) == ["2"]
    torch.testing.assert_close(gm(x), model(x), rtol=1e-4, atol=1e-5)
    plain = fxlrd.transform(model[1:], FULL, example_inputs=x, capture="export")
    assert not any("compute their weight" in note for note in plain.fxlrd_capture["notes"])


@pytest.mark.parametrize("training", [False, True])
def test_an_export_capture_says_the_mode_it_was_captured_in(training):
    model = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5), nn.Linear(8, 8)).train(training)
    gm = fxlrd.transform(model, LOW, example_inputs=torch.randn(2, 8), capture="export")
    assert gm.training == training and model.training == training


def test_parameters_the_forward_never_uses_are_named_in_the_capture_notes():
    class WithAux(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.aux = nn.Linear(8, 8), nn.Linear(8, 100)

        def forward(self, x):
            return self.a(x)

    gm = fxlrd.transform(WithAux(), LOW, example_inputs=torch.randn(2, 8), capture="fx")
    assert any("900 parameters the forward never uses" in n and "aux" in n for n in gm.fxlrd_capture["notes"])
    clean = fxlrd.transform(OneInput(), LOW, example_inputs=torch.randn(2, 8), capture="fx")
    assert not any("never uses" in n for n in clean.fxlrd_capture["notes"])


def test_token_inputs_of_different_lengths_each_stay_dynamic():
    class EncoderDecoder(nn.Module):  # reshapes by each sequence's length
        def __init__(self):
            super().__init__()
            self.emb, self.lin = nn.Embedding(20, 8), nn.Linear(8, 8)

        def forward(self, input_ids, decoder_input_ids):
            enc = self.lin(self.emb(input_ids))
            dec = self.lin(self.emb(decoder_input_ids))
            return dec.reshape(dec.shape[0], dec.shape[1], 2, 4).flatten(2) + enc.mean(1, keepdim=True)

    model = EncoderDecoder().eval()
    example = {"input_ids": torch.randint(0, 20, (2, 7)), "decoder_input_ids": torch.randint(0, 20, (2, 3))}
    gm = fxlrd.transform(model, FULL, example_inputs=example, capture="export")
    for s, t in [(9, 5), (4, 1)]:
        other = {"input_ids": torch.randint(0, 20, (3, s)), "decoder_input_ids": torch.randint(0, 20, (3, t))}
        with torch.no_grad():
            torch.testing.assert_close(gm(**other), model(**other), rtol=1e-5, atol=1e-5)


def test_export_names_layers_it_cannot_see_and_lists_transposed_convs():
    """A layer inside a torch.no_grad() region of an export graph is in a subgraph fxlrd does
    not decompose: a note says so (it vanished from the plan silently); a transposed conv is
    listed under export as under fx (it was missing), and planned as one (too small to shrink)."""

    class Regions(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.up = nn.Linear(32, 64), nn.Linear(64, 64), nn.ConvTranspose2d(4, 4, 2, stride=2)

        def forward(self, x, image):
            h = torch.relu(self.a(x))
            with torch.no_grad():
                g = self.b(h)
            return h + g, self.up(image)

    inputs = (torch.randn(8, 32), torch.randn(1, 4, 4, 4))
    gm = fxlrd.transform(Regions(), LRDConfig(ratio=2), example_inputs=inputs, capture="export")
    assert any(n.startswith("1 linear/conv operations run inside torch.no_grad()") for n in gm.fxlrd_capture["notes"])
    assert gm.fxlrd_plan["up"].layer_type == "aten.conv_transpose2d" and "not supported" not in gm.fxlrd_plan["up"].reason


def test_an_export_retried_without_the_cache_reports_its_own_failure():
    """A model whose export fails on its KV cache is exported again with ``use_cache=False``;
    when that fails too, the error names the second failure (it named the cache)."""

    class Config:
        use_cache = True

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.config, self.fc = Config(), nn.Linear(4, 4)

        def forward(self, x):
            if torch.compiler.is_exporting():
                if self.config.use_cache:
                    raise RuntimeError("DynamicCache is not a known type of output")
                raise ValueError("the second failure")
            return self.fc(x)

    with pytest.raises(CaptureError, match="ValueError: the second failure") as info:
        fxlrd.transform(Net().eval(), example_inputs=torch.randn(2, 4), capture="export")
    assert "DynamicCache" not in str(info.value)


def test_a_size_check_admits_both_bounds_of_its_range():
    """(mutation audit) the range a size check holds for is closed: sizes at either bound run."""
    from fxlrd.capture import check_size

    for size in (2, 3, 4):
        check_size(torch.zeros(size, 3), 0, 2, 4, "x")
    check_size(torch.zeros(3, 1000), 1, 3, None, "x")
    for size in (1, 5):
        with pytest.raises(ValueError, match=f"input 'x' has size {size} in dimension 0"):
            check_size(torch.zeros(size, 3), 0, 2, 4, "x")


class _SmallBatchesOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x):
        h = self.a(x)
        return self.b(h) if x.shape[0] <= 4 else self.c(h)


def test_an_upper_size_bound_export_took_runs_at_the_bound_and_refuses_beyond():
    """(mutation audit) export bounds the batch to at most 4 (the branch it took): batch 4 runs
    the captured graph, batch 5 is refused."""
    torch.manual_seed(0)
    model = _SmallBatchesOnly().eval()
    gm = fxlrd.transform(model, FULL, example_inputs=torch.randn(3, 16))
    x = torch.randn(4, 16)
    assert rel_err(gm(x), model(x)) <= 1e-5
    with pytest.raises(ValueError, match="input 'x' has size 5 in dimension 0"):
        gm(torch.randn(5, 16))


def test_only_inputs_of_the_batch_get_a_dynamic_sequence_beside_the_tokens():
    """(mutation audit) dimension 1 of a float input is the sequence when it has a token
    length and the input is one of the batch's (batch, sequence, ...) inputs; a table of
    another first size that happens to be as long as the tokens (a (5, 8) bias) stays static."""
    from torch.export import Dim

    from fxlrd.capture import dynamic_spec

    assert dynamic_spec(torch.zeros(2, 8, dtype=torch.long), 2, {8}) == {0: Dim.AUTO, 1: Dim.AUTO}
    assert dynamic_spec(torch.zeros(2, 8, 16), 2, {8}) == {0: Dim.AUTO, 1: Dim.AUTO}
    assert dynamic_spec(torch.zeros(2, 3, 16), 2, {8}) == {0: Dim.AUTO}
    assert dynamic_spec(torch.zeros(5, 8), 2, {8}) is None
    assert dynamic_spec(torch.zeros(5, 8), None, {8}) == {1: Dim.AUTO}  # no batch known: any (., L) input


def test_widening_a_sequence_of_one_leaves_inputs_of_another_batch_alone():
    """(mutation audit) export specializes size-1 dimensions, so a token sequence of length 1
    is repeated to 2; only the batch's inputs are widened, not a (3, 1) table beside them."""
    from fxlrd.capture import _widen

    ids, mask, table = torch.tensor([[5], [7]]), torch.ones(2, 1), torch.arange(3.0)[:, None]
    (args, kwargs) = _widen(((ids, table), {"attention_mask": mask}), 1, 1, 2)
    assert torch.equal(args[0], torch.tensor([[5, 5], [7, 7]]))
    assert torch.equal(kwargs["attention_mask"], torch.ones(2, 2))
    assert torch.equal(args[1], table)
    (args, _) = _widen(((torch.zeros(1, 4), table), {}), 0, 1, None)  # the batch: every input of batch 1
    assert args[0].shape == (2, 4) and torch.equal(args[1], table)


class _ScalesInPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        x.mul_(2)  # preprocessing in place
        return self.fc(x)


class _Noisy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        h = self.fc(x)
        return h + torch.randn_like(h)  # a sample, in eval mode too (a VAE's)


@pytest.mark.parametrize("model_type", [_ScalesInPlace, _Noisy])
def test_the_widened_capture_check_neither_changes_the_example_nor_blames_randomness(model_type):
    """The check of a graph exported at 2 ran the model and the graph on the user's own
    example: an in-place model changed it (twice) and then saw other inputs, and a model
    sampling noise differed from its graph; both were captured again at 1, static, with a
    note saying the model branches on the batch size."""
    from fxlrd.capture import capture

    x = torch.ones(1, 8)
    captured = capture(model_type().eval(), inputs=((x,), {}), mode="export")
    assert torch.equal(x, torch.ones(1, 8))
    assert not any("static shapes" in n for n in captured.notes), captured.notes


def test_a_root_hook_under_fx_is_not_said_to_be_in_the_graph():
    """torch.fx traces the model's forward, not its call: the root's hooks never ran, so the
    warning must not say their change to the output is in the graph."""
    model = _Hooked().eval()
    model.register_forward_hook(lambda mod, args, out: out * 2)
    with pytest.warns(FxlrdWarning, match="hooked module") as record:
        fxlrd.transform(model, LRDConfig(ratio=2, include=["fc"]), example_inputs=torch.randn(2, 16), capture="fx")
    message = str(next(w.message for w in record if "hooked module" in str(w.message)))
    assert "never run by the torch.fx capture" in message and "traced into" not in message, message


@pytest.mark.parametrize("wrap", [nn.utils.weight_norm, nn.utils.spectral_norm])
def test_a_frozen_hook_normed_layer_stays_frozen(wrap):
    # folding registered a fresh, trainable weight: a frozen weight_norm/spectral_norm layer came back trainable
    model = nn.Sequential(wrap(nn.Conv2d(4, 16, 3)), nn.ReLU(), nn.Conv2d(16, 16, 3)).eval()
    model.requires_grad_(False)
    gm = fxlrd.transform(model, LRDConfig(ratio=2), example_inputs=torch.randn(2, 4, 8, 8))
    assert isinstance(gm.get_submodule("0"), Factorized)
    assert not any(p.requires_grad for p in gm.parameters())


@torch.library.custom_op("fxlrd_test::picky", mutates_args=())
def _picky(x: torch.Tensor) -> torch.Tensor:
    if x.shape[0] == 3:
        raise RuntimeError("the real picky kernel refuses a batch of 3")
    return x * 2


@_picky.register_fake
def _(x):
    if x.dtype == torch.float32:
        raise RuntimeError("picky's fake kernel takes bfloat16 only")
    return torch.empty_like(x)


class _UsesPicky(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.bn, self.drop = nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Dropout(0.5)

    def forward(self, x):
        return _picky(self.drop(self.bn(self.fc(x))))


def test_a_model_that_runs_but_not_on_fake_tensors_is_not_blamed_on_its_inputs():
    """An operation whose fake kernel refuses what its real kernel takes used to be reported
    as "example_inputs do not run through the model", which they do."""
    model, x = _UsesPicky().train(), torch.randn(4, 8)
    model(x)  # it runs
    with pytest.raises(fxlrd.CaptureError, match=r"(?s)_UsesPicky: it runs on the inputs given, but not on the fake "
                                                   r"tensors torch.export traces it with: RuntimeError: picky's fake "
                                                   r"kernel takes bfloat16 only.*another dtype, or capture=\"fx\""):
        fxlrd.transform(model, LRDConfig(ratio=2), example_inputs=x, capture="export")
    # inputs that fail for real are the inputs' error, with the real run's reason
    with pytest.raises(ValueError, match="do not run through _UsesPicky: RuntimeError: the real picky kernel refuses"):
        fxlrd.transform(model, LRDConfig(ratio=2), example_inputs=torch.randn(3, 8), capture="export")
    with pytest.raises(ValueError, match="do not run through _UsesPicky: RuntimeError: mat1 and mat2 shapes"):
        fxlrd.transform(model, LRDConfig(ratio=2), example_inputs=torch.randn(4, 5), capture="export")


def test_the_real_run_restores_the_buffers_and_random_state_it_changes():
    from fxlrd.capture import _real_run_error

    model, x = _UsesPicky().train(), torch.randn(4, 8)
    mean, rng = model.bn.running_mean.clone(), torch.get_rng_state()
    assert _real_run_error(model, ((x,), {})) is None
    assert torch.equal(model.bn.running_mean, mean) and torch.equal(torch.get_rng_state(), rng)
    assert "refuses a batch of 3" in str(_real_run_error(model, ((torch.randn(3, 8),), {})))


def test_an_fx_captured_model_whose_fake_kernel_refuses_its_dtype_is_planned_from_a_real_run():
    """fx needs no fake tensors to capture, only to record the layers' input shapes: those come
    from one real forward instead (eval mode, nothing of the model changed), and inputs that
    fail for real are still the inputs' error."""
    model, x = _UsesPicky().train(), torch.randn(4, 8)
    model(x)
    mean, rng = model.bn.running_mean.clone(), torch.get_rng_state()
    plan = fxlrd.plan(model, LRDConfig(ratio=2, rank_quantum=1), example_inputs=x)
    assert plan.settings["capture"]["mode"] == "fx" and plan.layers["fc"].input_shape == (4, 8)
    assert model.training and torch.equal(model.bn.running_mean, mean) and torch.equal(torch.get_rng_state(), rng)
    gm = fxlrd.transform(model, LRDConfig(ratio=2, rank_quantum=1), example_inputs=x, capture="fx", inplace=True)
    assert isinstance(model.fc, Factorized) and gm.fxlrd_plan.decomposed and model.training
    assert torch.equal(model.bn.running_mean, mean)
    with pytest.raises(ValueError, match="do not run through .*: RuntimeError: the real picky kernel refuses a batch of 3"):
        fxlrd.plan(_UsesPicky(), LRDConfig(ratio=2), example_inputs=torch.randn(3, 8), capture="fx")


def test_leaf_modules_naming_no_submodule_are_refused_and_ignored_by_export_with_a_warning():
    model, x = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)), torch.randn(2, 8)
    with pytest.raises(ConfigError, match=r"leaf_modules: 'nope' is no submodule of this Sequential: give qualified names"):
        fxlrd.transform(model, LRDConfig(leaf_modules=["nope"]), example_inputs=x)
    with pytest.warns(FxlrdWarning, match="leaf_modules apply to fx tracing; capture='export' traces into every module"):
        gm = fxlrd.transform(model, LRDConfig(leaf_modules=["0"]), example_inputs=x, capture="export")
    assert gm.fxlrd_plan.decomposed
    assert fxlrd.transform(model, LRDConfig(leaf_modules=["0"]), example_inputs=x, capture="fx").fxlrd_plan.decomposed


def test_dynamic_shapes_given_to_an_fx_capture_are_ignored_with_a_warning():
    model, x = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)), torch.randn(2, 8)
    with pytest.warns(FxlrdWarning, match="dynamic_shapes apply to torch.export; capture='fx' traces no shapes"):
        gm = fxlrd.transform(model, LRDConfig(), example_inputs=x, capture="fx",
                             dynamic_shapes={"input": {0: torch.export.Dim("batch")}})  # fmt: skip
    assert gm(torch.randn(5, 8)).shape == (5, 4)


def test_a_leaf_named_by_the_second_name_of_a_module_registered_twice():
    """fx names a module registered under two names by its first one: a leaf given by the
    other name is the same module (it was accepted, then traced into)."""

    class Branchy(nn.Module):  # data-dependent control flow: fx traces it only as a leaf
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else -self.fc(x)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.first = Branchy()
            self.second = self.first
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            return self.head(self.second(x))

    x = torch.randn(2, 8).abs()
    gm = fxlrd.transform(Twice().eval(), LRDConfig(leaf_modules=["second"]), example_inputs=x, capture="fx")
    assert gm.fxlrd_capture["mode"] == "fx" and "head" in gm.fxlrd_plan.layers
