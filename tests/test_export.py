import numpy as np
import pytest
import torch
from torch import nn

import fxlrd
from fxlrd import ExportMismatchError, LRDConfig
from fxlrd.export import max_relative_error, onnx_session


def _model():
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    ).eval()  # fmt: skip


def test_export_matches_onnxruntime_with_dynamic_batch(tmp_path):
    gm = fxlrd.transform(_model(), LRDConfig(ratio=1.5, rank_quantum=1))
    x = torch.randn(2, 3, 16, 16)
    path = fxlrd.export_onnx(gm, x, tmp_path / "m.onnx")
    assert path.exists()
    session = onnx_session(path)
    x5 = torch.randn(5, 3, 16, 16)
    (got,) = session.run(None, {"input": x5.numpy()})
    with torch.no_grad():
        want = gm(x5).numpy()
    assert got.shape == (5, 10)
    assert max_relative_error(got, want) <= 1e-4
    assert gm.training is False


def test_export_keeps_training_flag(tmp_path):
    gm = fxlrd.transform(_model()).train()
    fxlrd.export_onnx(gm, torch.randn(1, 3, 16, 16), tmp_path / "m.onnx", dynamic_batch=False)
    assert gm.training


def test_export_restores_each_modules_own_mode(tmp_path):
    """A training model with a batch norm frozen in eval mode comes back as it was (not with
    one flag for every module), after a float export and after an int8 one."""
    gm = fxlrd.transform(_model(), LRDConfig(ratio=1.5, rank_quantum=1)).train()
    bn = next(m for m in gm.modules() if isinstance(m, nn.BatchNorm2d))
    bn.eval()
    modes = {n: m.training for n, m in gm.named_modules()}
    x = torch.randn(2, 3, 16, 16)
    fxlrd.export_onnx(gm, x, tmp_path / "m.onnx")
    assert {n: m.training for n, m in gm.named_modules()} == modes and not bn.training and gm.training
    fxlrd.export_onnx(gm, x, tmp_path / "q.onnx", quantize="int8", calibration=[torch.randn(4, 3, 16, 16)] * 2)
    assert {n: m.training for n, m in gm.named_modules()} == modes


def test_an_export_capture_made_in_training_mode_is_named_and_not_exported(tmp_path):
    # its dropout and batch norm run as in training whatever gm.eval() says: export_onnx failed with a bare
    # mismatch, after its reference forward had updated the batch-norm statistics
    model = nn.Sequential(*_model()[:-1], nn.Dropout(0.1), _model()[-1]).train()
    x = torch.randn(2, 3, 16, 16)
    with pytest.warns(fxlrd.FxlrdWarning, match="captured with torch.export in training mode: 2 dropout/batch-norm"):
        gm = fxlrd.transform(model, LRDConfig(rank_quantum=1), example_inputs=x, capture="export")
    assert any("training mode" in note for note in gm.fxlrd_capture["notes"])
    state = {k: v.clone() for k, v in gm.state_dict().items()}
    with pytest.raises(fxlrd.ConfigError, match="captured with torch.export in training mode.*model.eval()"):
        fxlrd.export_onnx(gm.eval(), x, tmp_path / "m.onnx")
    assert all(torch.equal(v, state[k]) for k, v in gm.state_dict().items()) and not (tmp_path / "m.onnx").exists()
    again = fxlrd.transform(model.eval(), LRDConfig(rank_quantum=1), example_inputs=x, capture="export")
    assert not any("training mode" in note for note in again.fxlrd_capture["notes"])
    fxlrd.export_onnx(again, x, tmp_path / "m.onnx")  # the way out the error names


def test_export_to_a_directory_is_refused_before_any_work(tmp_path):
    with pytest.raises(fxlrd.ConfigError, match="is a directory: give the ONNX file's path, e.g. .*model.onnx"):
        fxlrd.export_onnx(_model(), torch.randn(1, 3, 16, 16), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_failed_check_leaves_existing_file_alone(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"precious")
    with pytest.raises(ExportMismatchError, match="was not written"):
        fxlrd.export_onnx(_model(), torch.randn(1, 3, 16, 16), path, rtol=-1.0)  # no error can pass
    assert path.read_bytes() == b"precious"
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]  # no temporary file left behind


class _Cummax(nn.Module):  # aten.cummax: an operation torch.onnx has no conversion for
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return torch.cummax(self.fc(x), 1).values


def test_an_operation_the_exporter_cannot_convert_is_a_clear_error_and_the_file_survives(tmp_path):
    """torch.onnx's own failure (pages of advice about filing a PyTorch issue) becomes an
    `ExportError` naming the operation and the way out; the file at ``path`` is left alone."""
    path = tmp_path / "m.onnx"
    path.write_bytes(b"precious")
    with pytest.raises(fxlrd.ExportError, match=r"torch.onnx could not export _Cummax to ONNX \(.*aten\.cummax.*\); "
                                                r".*m\.onnx was not written.*original model fails the same way") as err:
        fxlrd.export_onnx(_Cummax().eval(), torch.randn(2, 8, 8), path)
    assert "\x1b[" not in str(err.value) and len(str(err.value)) < 1000  # one paragraph, no colour codes
    assert isinstance(err.value.__cause__, Exception) and not isinstance(err.value.__cause__, fxlrd.FxlrdError)
    assert path.read_bytes() == b"precious"
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


def test_exporter_failure_is_one_line_whatever_the_message():
    from fxlrd.export import exporter_failure

    assert exporter_failure(RuntimeError("")) == "RuntimeError"
    assert exporter_failure(RuntimeError("first\nsecond")) == "RuntimeError: first"
    assert exporter_failure(RuntimeError("Failed.\n\n## Exception summary\n")) == "RuntimeError: Failed."
    summary = "Failed \x1b[96mstep 3\x1b[0m.\n## Exception summary\n<class 'torch.onnx.X.DispatchError'>: No function"
    assert exporter_failure(RuntimeError(summary)) == "DispatchError: No function"
    assert len(exporter_failure(RuntimeError("x" * 1000))) == 300


def test_max_relative_error():
    assert max_relative_error(np.array([1.0, 2.0]), np.array([1.0, 2.5])) == pytest.approx(0.2)


def test_max_relative_error_of_non_finite_outputs():
    inf, nan = float("inf"), float("nan")
    assert max_relative_error(np.array([-inf, 1.0, 2.0]), np.array([-inf, 1.0, 2.5])) == pytest.approx(0.2)
    assert max_relative_error(np.array([nan, 1.0]), np.array([nan, 1.0])) == 0.0
    assert max_relative_error(np.array([0.0, 1.0]), np.array([-inf, 1.0])) == inf  # a mask the export lost
    assert max_relative_error(np.array([nan, 1.0]), np.array([3.0, 1.0])) == inf


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 4), nn.Linear(8, 4)

    def forward(self, a, b):
        return self.a(a) + 2 * self.b(b)


class Masked(TwoInputs):
    def forward(self, a, b, mask):
        return super().forward(a, b).masked_fill(mask, float("-inf"))


@pytest.mark.parametrize("capture", [None, "fx", "export"])
def test_keyword_inputs_are_named_whatever_their_order(tmp_path, capture):
    model = TwoInputs().eval()
    a, b = torch.randn(3, 8), 10 * torch.randn(3, 8)
    given = {"b": b, "a": a}  # not forward's order
    gm = model if capture is None else fxlrd.transform(model, LRDConfig(ratio=1.2, rank_quantum=1),
                                                       example_inputs=given, capture=capture)  # fmt: skip
    session = onnx_session(fxlrd.export_onnx(gm, given, tmp_path / "m.onnx"))
    (got,) = session.run(None, {"a": a.numpy(), "b": b.numpy()})
    with torch.no_grad():
        assert max_relative_error(got, gm(a=a, b=b).numpy()) <= 1e-4


def test_outputs_with_the_same_infinities_pass_the_check(tmp_path):
    model = Masked().eval()
    mask = torch.zeros(3, 4, dtype=torch.bool)
    mask[:, 0] = True
    fxlrd.export_onnx(model, {"a": torch.randn(3, 8), "b": torch.randn(3, 8), "mask": mask}, tmp_path / "m.onnx",
                      dynamic_batch=False, dynamic_sequence=False)  # fmt: skip


def test_an_opset_the_exporter_cannot_write_is_refused_and_nothing_written(tmp_path):
    from fxlrd import ConfigError

    with pytest.raises(ConfigError, match="opset_version=11 was asked, but torch.onnx wrote opset"):
        fxlrd.export_onnx(_model(), torch.randn(1, 3, 16, 16), tmp_path / "m.onnx", opset_version=11)
    assert list(tmp_path.iterdir()) == []
    fxlrd.export_onnx(_model(), torch.randn(1, 3, 16, 16), tmp_path / "m.onnx", opset_version=18)


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 8)

    def forward(self, x, scale: float = 1.0):
        return self.fc(x) * scale


@pytest.mark.parametrize("given", ["positional", "keyword"])
def test_an_input_that_is_not_a_tensor_exports_with_a_dynamic_batch(tmp_path, given):
    model, x = Scaled().eval(), torch.randn(4, 16)
    inputs = (x, 2.0) if given == "positional" else {"x": x, "scale": 2.0}
    session = onnx_session(fxlrd.export_onnx(model, inputs, tmp_path / "m.onnx"))
    other = torch.randn(7, 16)
    (got,) = session.run(None, {session.get_inputs()[0].name: other.numpy()})
    with torch.no_grad():
        assert got.shape == (7, 8) and max_relative_error(got, model(other, 2.0).numpy()) <= 1e-4


@pytest.mark.parametrize("shape", [(1, 1), (1, 8), (2, 1)])
def test_a_size_1_example_exports_a_file_that_runs_at_other_sizes(tmp_path, shape):
    # the exporter specializes dimensions of size 1: a 1x1 example wrote a file declaring dynamic axes that ran at
    # 1x1 only, and its check (at the example) passed
    from conftest import tiny_bert

    model = tiny_bert()
    ids = torch.randint(0, 100, shape)
    example = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    session = onnx_session(fxlrd.export_onnx(model, example, tmp_path / "m.onnx"))
    other = {"input_ids": torch.randint(0, 100, (3, 5)), "attention_mask": torch.ones(3, 5, dtype=torch.long)}
    got = session.run(None, {k: v.numpy() for k, v in other.items()})[0]
    with torch.no_grad():
        assert max_relative_error(got, model(**other).last_hidden_state.numpy()) <= 1e-4


def test_a_model_that_runs_at_batch_1_only_still_exports(tmp_path):
    # the size-2 check ran the model at a batch it cannot take: a bare RuntimeError, where the file used to be written
    class BatchOne(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.lin = nn.Conv2d(3, 16, 3), nn.Linear(16 * 6 * 6, 32)

        def forward(self, x):
            return self.lin(self.conv(x).view(1, -1))

    model, x = BatchOne().eval(), torch.randn(1, 3, 8, 8)
    with pytest.warns(UserWarning, match="does not run at .* keeps the example's size 1"):
        path = fxlrd.export_onnx(model, x, tmp_path / "m.onnx")
    session = onnx_session(path)
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        assert max_relative_error(got, model(x).numpy()) <= 1e-4


def test_a_half_precision_model_passes_the_check_and_int8_needs_float32(tmp_path):
    from fxlrd import ConfigError

    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval().half()
    x = torch.randn(4, 16).half()
    fxlrd.export_onnx(model, x, tmp_path / "m.onnx")  # float16 rounding alone is past the float32 default
    with pytest.raises(ConfigError, match="int8 quantization starts from a float32 model, this one holds float16"):
        fxlrd.export_onnx(model, x, tmp_path / "q.onnx", quantize="int8-dynamic")


def test_token_inputs_of_different_lengths_get_their_own_dynamic_sequence(tmp_path):
    """An encoder-decoder's two token inputs vary apart (they shared one "sequence" name, so
    the export failed, or ran at equal lengths only); a bool mask beside float inputs is not
    a token input (its sequence alone was dynamic, which export refused)."""
    import onnxruntime as ort

    from fxlrd.export import _dynamic_axes

    ids, dec = torch.randint(0, 9, (2, 8)), torch.randint(0, 9, (2, 5))
    inputs = ((), {"input_ids": ids, "attention_mask": torch.ones(2, 8), "decoder_input_ids": dec})
    axes = _dynamic_axes(inputs, ["input_ids", "attention_mask", "decoder_input_ids"], True, True)
    assert axes == {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
                    "decoder_input_ids": {0: "batch", 1: "sequence_2"}}  # fmt: skip

    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(16, 2, batch_first=True)

        def forward(self, x, padding):
            return self.mha(x, x, x, key_padding_mask=padding, need_weights=False)[0]

    padding = torch.zeros(2, 6, dtype=torch.bool)
    padding[1, 4:] = True
    x = (torch.randn(2, 6, 16), padding)
    gm = fxlrd.transform(Masked().eval(), LRDConfig(ratio=2), example_inputs=x)
    fxlrd.export_onnx(gm, x, tmp_path / "m.onnx")
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), options)
    feed = [torch.randn(3, 6, 16).numpy(), torch.zeros(3, 6, dtype=torch.bool).numpy()]  # another batch
    assert session.run(None, dict(zip([i.name for i in session.get_inputs()], feed)))[0].shape == (3, 6, 16)


def test_a_side_input_of_another_size_is_not_named_batch(tmp_path):
    """Only batched inputs get the dynamic ``batch`` dimension: a per-feature scale beside the
    batch kept its own size in the file (it was declared ``batch`` too, as if both varied
    together)."""
    import onnxruntime as ort

    from fxlrd.export import _dynamic_axes

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x, scale):
            return self.fc(x) * scale.sum()

    x = (torch.randn(2, 8), torch.randn(5))
    assert _dynamic_axes((x, {}), ["x", "scale"], True, True) == {"x": {0: "batch"}}
    assert _dynamic_axes(((x[1], x[0]), {}), ["scale", "x"], True, True) == {"x": {0: "batch"}}  # in any order
    same = (torch.randn(2, 8), torch.randn(2))
    assert _dynamic_axes((same, {}), ["x", "scale"], True, True) == {"x": {0: "batch"}, "scale": {0: "batch"}}
    gm = fxlrd.transform(Scaled().eval(), LRDConfig(ratio=2), example_inputs=x)
    fxlrd.export_onnx(gm, x, tmp_path / "m.onnx")
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), options)
    shapes = [i.shape for i in session.get_inputs()]
    assert shapes == [["batch", 8], [5]]
    feed = dict(zip([i.name for i in session.get_inputs()], [torch.randn(3, 8).numpy(), torch.randn(5).numpy()]))
    assert session.run(None, feed)[0].shape == (3, 8)


def test_onnx_outputs_are_named_after_the_models_outputs(tmp_path):
    """A Hugging Face model's outputs keep their names in the file (they were the exporter's
    node names, layer_norm_4, tanh); a tuple's are output_0..., a dict's by key, a lone
    tensor's output."""
    import onnxruntime as ort

    from fxlrd.export import output_names

    assert output_names(torch.ones(1)) == ["output"]
    assert output_names((torch.ones(1), {"sum": torch.ones(1), "b": [torch.ones(1)]})) == ["output_0", "output_1_sum", "output_1_b_0"]
    assert output_names((torch.ones(1), 3)) is None  # not all tensors: the exporter names them

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            y = self.fc(x)
            return {"hidden": y, "pooled": y.mean(-1)}

    x = torch.randn(2, 8)
    gm = fxlrd.transform(Two().eval(), LRDConfig(ratio=2), example_inputs=x)
    for quantize in (None, "int8-dynamic"):
        path = tmp_path / f"{quantize}.onnx"
        fxlrd.export_onnx(gm, x, path, quantize=quantize)
        options = ort.SessionOptions()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(str(path), options)
        assert [o.name for o in session.get_outputs()] == ["hidden", "pooled"]


def test_a_bfloat16_model_onnxruntime_cannot_load_gets_a_clear_error(tmp_path):
    """onnxruntime's CPU kernels do not take bfloat16: the check says so and what to do, and the
    file is not written (its raw NotImplemented error escaped from the session's creation)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).eval().to(torch.bfloat16)
    x = torch.randn(2, 8, dtype=torch.bfloat16)
    gm = fxlrd.transform(model, LRDConfig(ratio=2, rank_quantum=1), example_inputs=x)
    path = tmp_path / "m.onnx"
    with pytest.raises(ExportMismatchError, match=r"do not take bfloat16: export gm\.float\(\)"):
        fxlrd.export_onnx(gm, x, path)
    assert not path.exists()
    fxlrd.export_onnx(gm.float(), x.float(), path)
    assert path.exists()


def test_onnx_feed_matches_inputs_by_name_whatever_their_order():
    """(mutation audit) a session's inputs are fed by name when the names are the inputs'
    (a dict of keyword inputs in another order than the file's), else in order."""
    from types import SimpleNamespace

    from fxlrd.export import onnx_feed

    session = SimpleNamespace(get_inputs=lambda: [SimpleNamespace(name=n) for n in ("input_ids", "attention_mask")])
    ids, mask = torch.arange(6).reshape(2, 3), torch.ones(2, 3, dtype=torch.long)
    feed = onnx_feed(session, ((), {"attention_mask": mask, "input_ids": ids}))
    assert list(feed) == ["input_ids", "attention_mask"]
    assert np.array_equal(feed["input_ids"], ids.numpy()) and np.array_equal(feed["attention_mask"], mask.numpy())
    renamed = SimpleNamespace(get_inputs=lambda: [SimpleNamespace(name=n) for n in ("x", "y")])
    feed = onnx_feed(renamed, ((ids, mask), {}))  # names the file chose: in order
    assert np.array_equal(feed["x"], ids.numpy()) and np.array_equal(feed["y"], mask.numpy())


def test_max_relative_error_is_relative_to_the_expected_outputs_scale():
    """(mutation audit) ``max|a - e| / max|e|`` over the finite values; -inf where both are -inf
    is agreement, -inf in one only is an infinite error."""
    e = np.array([[1.0, -4.0], [2.0, -np.inf]])
    a = np.array([[1.0, -4.0], [10.0, -np.inf]])
    assert max_relative_error(a, e) == pytest.approx(8.0 / 4.0)
    assert max_relative_error(e, a) == pytest.approx(8.0 / 10.0)
    assert max_relative_error(np.where(np.isinf(e), 0.0, e), e) == float("inf")
    assert max_relative_error(np.array([1.0, np.inf]), np.array([1.0, 2.0])) == float("inf")
    assert max_relative_error(np.zeros(3), np.zeros(3)) == 0.0


def test_onnx_input_names_are_input_alone_else_numbered_and_keyword_names():
    """(mutation audit) the file's input names: ``input`` for a lone positional tensor,
    ``input_i`` for positional tensors beside others (keyword ones included), keyword names as given."""
    from fxlrd.export import _input_names

    x, m = torch.zeros(2, 3), torch.ones(2, 3)
    assert _input_names(((x,), {})) == ["input"]
    assert _input_names(((x, m), {})) == ["input_0", "input_1"]
    assert _input_names(((x,), {"attention_mask": m})) == ["input_0", "attention_mask"]
    assert _input_names(((x, 0.5), {"flag": True, "mask": m})) == ["input_0", "mask"]  # tensors only
    assert _input_names(((), {"input_ids": x, "attention_mask": m})) == ["input_ids", "attention_mask"]


def test_outputs_named_like_an_input_or_of_keyless_types_still_export(tmp_path):
    """An output named after an input (a diffusers UNet takes and returns ``sample``) made an
    invalid file (a value named twice); an output type registered without keys made the naming
    raise, reported as the exporter's failure. The exporter's own names are kept then."""
    import torch.utils._pytree as pytree

    from fxlrd.export import output_names

    class Unet(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, sample, timestep):
            return {"sample": self.fc(sample) * timestep}

    x = {"sample": torch.randn(2, 8), "timestep": torch.ones(2, 1)}
    fxlrd.export_onnx(Unet().eval(), x, tmp_path / "unet.onnx")
    assert output_names({"sample": torch.ones(1)}, ["sample", "timestep"]) is None

    class Pair:
        def __init__(self, a, b):
            self.a, self.b = a, b

    pytree.register_pytree_node(Pair, lambda p: ([p.a, p.b], None), lambda v, c: Pair(*v))
    try:
        assert output_names(Pair(torch.ones(1), torch.ones(1))) is None
    finally:
        pytree._deregister_pytree_node(Pair)


class _Categorical(nn.Module):
    """Integer features of a fixed width (not a token sequence): dimension 1 cannot be dynamic."""

    def __init__(self):
        super().__init__()
        self.embed, self.a, self.b = nn.Embedding(20, 8), nn.Linear(24, 32), nn.Linear(32, 4)

    def forward(self, cats):
        return self.b(torch.relu(self.a(self.embed(cats).reshape(cats.shape[0], 24))))


def test_integer_inputs_of_a_fixed_width_export_with_that_size_static(tmp_path):
    torch.manual_seed(0)
    model, x = _Categorical().eval(), torch.randint(0, 20, (4, 3))
    gm = fxlrd.transform(model, LRDConfig(ratio=1.5), example_inputs=x)
    with pytest.warns(UserWarning, match="fixes the size of dimension 1 .* exported with dynamic_sequence=False"):
        path = fxlrd.export_onnx(gm, x, tmp_path / "c.onnx")
    session = onnx_session(path)
    assert [i.shape for i in session.get_inputs()] == [["batch", 3]]
    more = torch.randint(0, 20, (7, 3))
    (out,) = session.run(None, {session.get_inputs()[0].name: more.numpy()})
    assert max_relative_error(out, gm(more).detach().numpy()) < 1e-4


@pytest.mark.parametrize("suffix", [".json", ".textproto"])
def test_an_onnx_path_onnx_would_write_as_text_is_refused(tmp_path, suffix):
    model = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(fxlrd.ConfigError, match=rf"onnx writes a \{suffix} file as text.*name the file m\.onnx"):
        fxlrd.export_onnx(model, torch.randn(2, 8), tmp_path / f"m{suffix}")
    assert not any(tmp_path.iterdir())


def test_inputs_nested_in_a_container_are_refused_naming_the_input(tmp_path):
    class WithExtra(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(16, 32), nn.Linear(32, 8)

        def forward(self, x, extra=None):
            return self.b(torch.relu(self.a(x)) + extra["bias"])

    model, x, extra = WithExtra().eval(), torch.randn(3, 16), {"bias": torch.randn(3, 32)}
    with pytest.raises(fxlrd.ConfigError, match="'extra' is a dict holding tensors, which .* cannot feed: pass them"):
        fxlrd.export_onnx(model, {"x": x, "extra": extra}, tmp_path / "m.onnx")
    assert not any(tmp_path.iterdir())
    unchecked = dict(check=False, dynamic_batch=False, dynamic_sequence=False)  # what the exporter alone can write
    path = fxlrd.export_onnx(model, {"x": x, "extra": extra}, tmp_path / "m.onnx", **unchecked)
    session = onnx_session(path)
    (out,) = session.run(None, dict(zip([i.name for i in session.get_inputs()], [x.numpy(), extra["bias"].numpy()])))
    assert max_relative_error(out, model(x, extra).detach().numpy()) < 1e-5
    with pytest.raises(fxlrd.ConfigError, match="'extra' is a dict holding tensors"):  # int8's calibration feeds tensors too
        fxlrd.export_onnx(model, {"x": x, "extra": extra}, tmp_path / "q.onnx", quantize="int8",
                          calibration=[{"x": x, "extra": extra}], **unchecked)  # fmt: skip
    assert not (tmp_path / "q.onnx").exists()
