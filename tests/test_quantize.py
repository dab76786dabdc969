"""Int8: onnxruntime static quantization through export_onnx, and the PT2E flow."""

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import fxlrd
from fxlrd import ConfigError, ExportMismatchError, LRDConfig
from fxlrd.capture import padding_mask
from fxlrd.export import export_onnx_file, onnx_feed, onnx_session
from fxlrd.quantize import (DEFAULT_OP_TYPES, DYNAMIC_OP_TYPES, Fidelity, OutputFidelity, QuantizeConfig, _compare,
                            measure_fidelity, quantize_onnx_file, quantize_pt2e)  # fmt: skip

from conftest import rel_err


def _cnn():
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )  # fmt: skip
    for m in model.modules():  # non-trivial folded norms
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture(scope="module")
def decomposed_cnn():
    torch.manual_seed(0)
    gm = fxlrd.transform(_cnn(), LRDConfig(ratio=1.5, rank_quantum=1))
    assert isinstance(gm.get_submodule("6"), fxlrd.Factorized)
    return gm


def _images(batch):
    return torch.randn(batch, 3, 16, 16)


def _calibration(n=4, batch=4):
    return [_images(batch) for _ in range(n)]


def _op_counts(path):
    model = onnx.load(str(path))
    counts = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return model, counts


def _zero_point_types(model):
    inits = {i.name: i for i in model.graph.initializer}
    return {
        onnx.TensorProto.DataType.Name(inits[n.input[2]].data_type)
        for n in model.graph.node
        if n.op_type == "QuantizeLinear" and len(n.input) > 2 and n.input[2] in inits
    }


def test_int8_export_of_decomposed_cnn(decomposed_cnn, tmp_path):
    gm = decomposed_cnn
    path = fxlrd.export_onnx(gm, _images(2), tmp_path / "cnn.onnx", quantize="int8", calibration=_calibration())
    assert [p.name for p in tmp_path.iterdir()] == ["cnn.onnx"]  # no temporary files left
    model, counts = _op_counts(path)
    assert counts.get("QuantizeLinear", 0) >= 4 and counts.get("DequantizeLinear", 0) >= 4
    assert _zero_point_types(model) == {"UINT8"}  # U8S8: the fast kernels on x86
    int8_weights = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 4]
    assert len(int8_weights) >= 5  # every conv factor's weight is int8 (per channel)
    assert gm.training is False

    fidelity = measure_fidelity(path, gm, _images(32))  # another batch size, held-out data
    assert isinstance(fidelity, Fidelity) and fidelity.ok
    (out,) = fidelity.outputs
    assert out.relative_error < 0.15
    assert out.top1_agreement is not None and out.top1_agreement >= 0.8

    session = onnx_session(path)
    (got,) = session.run(None, {"input": _images(5).numpy()})
    assert got.shape == (5, 10)


def test_int8_activations_can_be_chosen(decomposed_cnn, tmp_path):
    path = fxlrd.export_onnx(decomposed_cnn, _images(2), tmp_path / "s8.onnx",
                             quantize=QuantizeConfig(activations="int8"), calibration=_calibration(2))  # fmt: skip
    model, _ = _op_counts(path)
    assert _zero_point_types(model) == {"INT8"}


def test_preprocessing_can_be_asked_for(decomposed_cnn, tmp_path):
    path = fxlrd.export_onnx(decomposed_cnn, _images(2), tmp_path / "pre.onnx",
                             quantize=QuantizeConfig(preprocess=True), calibration=_calibration(2))  # fmt: skip
    model, counts = _op_counts(path)
    assert counts.get("QuantizeLinear", 0) > 0
    assert any(p.key == "onnx.quant.pre_process" for p in model.metadata_props)
    assert measure_fidelity(path, decomposed_cnn, _images(8)).ok


def test_calibration_may_be_a_generator_of_tuples(decomposed_cnn, tmp_path):
    batches = ((_images(3),) for _ in range(2))
    path = fxlrd.export_onnx(decomposed_cnn, (_images(2),), tmp_path / "m.onnx", quantize="int8", calibration=batches)
    assert measure_fidelity(path, decomposed_cnn, (_images(4),)).ok


def test_int8_export_of_bert_with_dict_inputs(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64)  # fmt: skip
    model = transformers.BertModel(cfg).eval()

    def tokens(batch, seq):
        mask = torch.ones(batch, seq, dtype=torch.long)
        mask[0, seq - 2 :] = 0  # padding: the additive mask's huge negatives must not wreck the scales
        return {"input_ids": torch.randint(0, 100, (batch, seq)), "attention_mask": mask}

    example = tokens(2, 8)
    gm = fxlrd.transform(model, LRDConfig(ratio=1.5), example_inputs=example)
    assert any(isinstance(m, fxlrd.Factorized) for m in gm.modules())
    calibration = [tokens(4, n) for n in (6, 10, 12)]
    path = fxlrd.export_onnx(gm, example, tmp_path / "bert.onnx", quantize="int8", calibration=calibration)
    _, counts = _op_counts(path)
    assert counts.get("QuantizeLinear", 0) >= 6  # the attention and FFN projections (and their factors)

    other = tokens(3, 11)  # another batch size and sequence length
    session = onnx_session(path)
    got = session.run(None, onnx_feed(session, ((), other)))
    with torch.no_grad():
        want = gm(**other)
    assert got[0].shape == (3, 11, 32) and got[1].shape == (3, 32)
    assert rel_err(torch.from_numpy(got[0]), want.last_hidden_state) < 0.2
    assert rel_err(torch.from_numpy(got[1]), want.pooler_output) < 0.2
    assert measure_fidelity(path, gm, other).ok


def _tiny_bert():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64)  # fmt: skip
    return transformers.BertModel(cfg).eval()


def test_dynamic_int8_export_of_bert_needs_no_calibration(tmp_path):
    torch.manual_seed(0)
    model = _tiny_bert()

    def tokens(batch, seq):
        mask = torch.ones(batch, seq, dtype=torch.long)
        mask[0, seq - 2 :] = 0
        return {"input_ids": torch.randint(0, 100, (batch, seq)), "attention_mask": mask}

    example = tokens(2, 8)
    gm = fxlrd.transform(model, LRDConfig(ratio=1.5), example_inputs=example)
    factor_linears = sum(isinstance(m, nn.Linear) for m in gm.modules())
    path = fxlrd.export_onnx(gm, example, tmp_path / "bert.onnx", quantize="int8-dynamic")
    assert [p.name for p in tmp_path.iterdir()] == ["bert.onnx"]
    onnx_model, counts = _op_counts(path)
    assert counts.get("QuantizeLinear", 0) == 0  # no fixed activation ranges
    assert counts.get("DynamicQuantizeLinear", 0) >= 1 and counts.get("MatMulInteger", 0) >= 1
    int8_weights = [i for i in onnx_model.graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 2]
    assert len(int8_weights) >= factor_linears - 1  # every factor's weight (the pooler's Gemm may stay float)

    other = tokens(3, 11)  # another batch size and sequence length
    session = onnx_session(path)
    got = session.run(None, onnx_feed(session, ((), other)))
    with torch.no_grad():
        want = gm(**other)
    assert rel_err(torch.from_numpy(got[0]), want.last_hidden_state) < 0.1
    fidelity = measure_fidelity(path, gm, other)
    assert fidelity.ok and fidelity.max_relative_error > 0  # quantized, not the float model


def test_dynamic_int8_of_a_model_it_cannot_keep_close_writes_nothing(tmp_path):
    model = _tiny_bert()
    example = {"input_ids": torch.randint(0, 100, (2, 8))}
    path = tmp_path / "m.onnx"
    path.write_bytes(b"precious")
    with pytest.raises(ExportMismatchError, match=r"int8 model is too far.*dynamic=True, op_types"):
        fxlrd.export_onnx(model, example, path, quantize=QuantizeConfig(dynamic=True, qtol=1e-9))
    assert path.read_bytes() == b"precious" and [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


def test_quantize_config_op_types_default_by_mode():
    assert QuantizeConfig().op_types == DEFAULT_OP_TYPES
    assert QuantizeConfig(dynamic=True).op_types == DYNAMIC_OP_TYPES == ("MatMul", "Gemm")
    assert QuantizeConfig(dynamic=True, op_types=["MatMul"]).op_types == ("MatMul",)


def test_failed_fidelity_leaves_existing_file_alone(decomposed_cnn, tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"precious")
    with pytest.raises(ExportMismatchError, match=r"int8 model is too far.*relative error.*was not written"):
        fxlrd.export_onnx(decomposed_cnn, _images(2), path, quantize=QuantizeConfig(qtol=1e-9),
                          calibration=_calibration(2))  # fmt: skip
    assert path.read_bytes() == b"precious"
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


def test_failed_fidelity_writes_nothing(decomposed_cnn, tmp_path):
    with pytest.raises(ExportMismatchError):
        fxlrd.export_onnx(decomposed_cnn, _images(2), tmp_path / "m.onnx", quantize=QuantizeConfig(qtol=1e-9),
                          calibration=_calibration(1))  # fmt: skip
    assert list(tmp_path.iterdir()) == []


def test_check_false_skips_the_fidelity_check(decomposed_cnn, tmp_path):
    path = fxlrd.export_onnx(decomposed_cnn, _images(2), tmp_path / "m.onnx", check=False,
                             quantize=QuantizeConfig(qtol=1e-9), calibration=_calibration(1))  # fmt: skip
    _, counts = _op_counts(path)
    assert counts.get("QuantizeLinear", 0) > 0


@pytest.mark.parametrize(
    "quantize, calibration, match",
    [
        ("int4", [torch.randn(1, 3, 16, 16)], "quantize must be one of"),
        ("INT8", [torch.randn(1, 3, 16, 16)], "quantize must be one of"),
        (8, [torch.randn(1, 3, 16, 16)], "quantize must be one of"),
        ("int8", None, "needs calibration data.*int8-dynamic"),
        ("int8-dynamic", [torch.randn(1, 3, 16, 16)], "uses no calibration data"),
        (QuantizeConfig(dynamic=True), [torch.randn(1, 3, 16, 16)], "uses no calibration data"),
        ("int8", [], "calibration is empty"),
        ("int8", iter(()), "calibration is empty"),
        ("int8", torch.randn(4, 3, 16, 16), "iterable of batches"),
        ("int8", 3, "iterable of batches"),
        ("int8", [object()], "calibration batch 0"),
        (None, [torch.randn(1, 3, 16, 16)], "only used with quantize"),
    ],
)
def test_bad_quantize_arguments_fail_before_export(decomposed_cnn, tmp_path, quantize, calibration, match):
    with pytest.raises(ConfigError, match=match):
        fxlrd.export_onnx(decomposed_cnn, _images(2), tmp_path / "m.onnx", quantize=quantize, calibration=calibration)
    assert list(tmp_path.iterdir()) == []


def test_calibration_batch_of_the_wrong_form(decomposed_cnn, tmp_path):
    batches = [_images(2), (_images(2), _images(2))]
    with pytest.raises(ConfigError, match=r"calibration batch 1 gives 2 tensor inputs.*the model takes 1"):
        fxlrd.export_onnx(decomposed_cnn, _images(2), tmp_path / "m.onnx", quantize="int8", calibration=batches)
    assert list(tmp_path.iterdir()) == []


def test_calibration_batch_that_does_not_fit_a_fixed_dimension():
    from fxlrd.quantize import CalibrationReader

    reader = CalibrationReader(["x"], [torch.zeros(1, 3), torch.zeros(4, 3)], [[1, 3]])
    assert reader.get_next()["x"].shape == (1, 3)
    with pytest.raises(ConfigError, match=r"calibration batch 1: input 'x' has shape \(4, 3\).*is \(1, 3\)"):
        reader.get_next()
    dynamic = CalibrationReader(["x"], [torch.zeros(4, 3)], [["batch", 3]])
    assert dynamic.get_next()["x"].shape == (4, 3)
    with pytest.raises(ConfigError, match="the export did not make the batch dynamic"):  # only the batch differs
        CalibrationReader(["x"], [torch.zeros(4, 3)], [[1, 3]]).get_next()
    with pytest.raises(ConfigError, match=r"has shape \(2, 4\), but the exported model's is \('batch', 3\); give "
                                          r"calibration batches shaped like example_inputs$"):  # fmt: skip
        CalibrationReader(["x"], [torch.zeros(2, 4)], [["batch", 3]]).get_next()  # the channels: no hint about batches


@pytest.mark.parametrize(
    "kwargs, match",
    [({"qtol": 0}, "qtol"), ({"qtol": -1.0}, "qtol"), ({"activations": "fp8"}, "activations"),
     ({"calibrate_method": "mse"}, "calibrate_method"), ({"op_types": "Conv"}, "op_types"),
     ({"op_types": ()}, "op_types"), ({"dynamic": True, "activations": "int8"}, "activations are uint8")],
)  # fmt: skip
def test_quantize_config_validates_itself(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        QuantizeConfig(**kwargs)


def test_fidelity_measures():
    logits = np.array([[0.0, 1.0, 0.2], [2.0, 0.0, 0.0]])
    swapped = np.array([[0.0, 1.0, 0.2], [0.0, 2.0, 0.0]])
    hidden = np.ones((2, 3, 4))
    fid = _compare([swapped, hidden * 1.1], [logits, hidden], ["logits", "hidden"], qtol=0.5)
    assert fid.outputs[0] == OutputFidelity("logits", pytest.approx(1.0), 0.5)
    assert fid.outputs[1].top1_agreement is None and fid.outputs[1].relative_error == pytest.approx(0.1)
    assert fid.max_relative_error == pytest.approx(1.0) and not fid.ok
    assert "top-1 agreement 50%" in str(fid)
    nan = _compare([np.full((2, 3), np.nan)], [logits], ["logits"], qtol=0.5)
    assert not nan.ok and np.isnan(nan.max_relative_error)
    masked = np.where(np.arange(3) == 2, -np.inf, logits)  # masked logits: -inf in the float model too
    same = _compare([masked + 0.01 * np.isfinite(masked)], [masked], ["logits"], qtol=0.5)
    assert same.ok and same.outputs[0].relative_error == pytest.approx(0.005)
    lost = _compare([np.where(np.arange(3) == 1, -np.inf, logits)], [logits], ["logits"], qtol=0.5)
    assert not lost.ok


def test_fidelity_leaves_padding_tokens_out():
    hidden = np.ones((2, 3, 4))
    mask = np.array([[True, True, False], [True, True, True]])
    at_padding = hidden.copy()
    at_padding[0, 2] = 50.0  # a padding token's output: computed, unused, unconstrained
    assert _compare([at_padding], [hidden], ["h"], qtol=0.5, mask=mask).ok
    assert not _compare([at_padding], [hidden], ["h"], qtol=0.5).ok  # without the mask it counts
    at_token = hidden.copy()
    at_token[1, 2] = 50.0  # a real token's: still counts
    assert not _compare([at_token], [hidden], ["h"], qtol=0.5, mask=mask).ok
    pooled = np.ones((2, 3))  # 2-D, even one shaped like the mask (hidden size = tokens): compared whole
    pooled_off = pooled.copy()
    pooled_off[0, 2] = 1.2
    assert _compare([pooled_off], [pooled], ["p"], qtol=0.5, mask=mask).outputs[0].relative_error == pytest.approx(0.2)
    no_tokens = np.zeros_like(mask)  # an all-padding mask: compared whole, not an empty comparison
    assert not _compare([at_padding], [hidden], ["h"], qtol=0.5, mask=no_tokens).ok
    nan_at_padding = hidden.copy()
    nan_at_padding[0, 2] = np.nan  # not finite anywhere is a failure
    assert not _compare([nan_at_padding], [hidden], ["h"], qtol=0.5, mask=mask).ok


def test_padding_mask_comes_from_attention_mask():
    ids = torch.zeros(2, 3, dtype=torch.long)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert padding_mask(((), {"input_ids": ids, "attention_mask": mask})).tolist() == [[True, True, False], [True] * 3]
    assert padding_mask(((), {"input_ids": ids})) is None
    assert padding_mask(((ids,), {})) is None
    assert padding_mask(((), {"attention_mask": mask[0]})) is None  # not (batch, tokens)


class _Tokens(nn.Module):
    """Token states zeroed at padding; ``junk`` writes a value there instead (a model whose
    padding outputs differ, the way int8 moves them), ``scale`` scales the real tokens'."""

    def __init__(self, junk: float = 0.0, scale: float = 1.0):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.proj, self.junk, self.scale = nn.Embedding(50, 8), nn.Linear(8, 8), junk, scale

    def forward(self, input_ids, attention_mask):
        m = attention_mask[..., None].float()
        return self.proj(self.emb(input_ids)) * m * self.scale + self.junk * (1 - m)


def test_int8_checks_ignore_padding_tokens(tmp_path):
    inputs = {"input_ids": torch.randint(0, 50, (2, 6)), "attention_mask": torch.tensor([[1] * 6, [1] * 4 + [0] * 2])}
    src = tmp_path / "tokens.onnx"
    export_onnx_file(_Tokens(), ((), inputs), src)
    junk = _Tokens(junk=100.0)  # what PyTorch says differs from the ONNX file at padding only
    assert measure_fidelity(src, junk, inputs).ok
    with torch.no_grad():
        expected = [junk(**inputs)]
    dst = tmp_path / "tokens.int8.onnx"
    fid = quantize_onnx_file(src, dst, None, "int8-dynamic", inputs=((), inputs), expected=expected)
    assert fid.ok and dst.exists()
    assert not measure_fidelity(src, _Tokens(scale=2.0), inputs).ok  # a difference at real tokens fails


# -- PT2E -------------------------------------------------------------------------------------------
def _require_torchao():
    pytest.importorskip("torchao", reason="PT2E quantization lives in torchao with this torch (pip install torchao)")


def test_pt2e_int8_is_close_to_float(decomposed_cnn):
    _require_torchao()
    gm = decomposed_cnn
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    qmodel = quantize_pt2e(gm, _images(1), _calibration(), compile=False)  # batch 1: still dynamic
    weighted_ops = (torch.ops.aten.conv2d.default, torch.ops.aten.linear.default)
    weighted = [n for n in qmodel.graph.nodes if n.target in weighted_ops]
    assert len(weighted) == sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in gm.modules())
    for node in weighted:  # every factor, not only each layer's last one, has int8 weights and inputs
        assert "dequantize_per_channel" in str(node.args[1].target), node
        assert "dequantize_per_tensor" in str(node.args[0].target), node
    x = _images(5)
    with torch.no_grad():
        got, want = qmodel(x), gm(x)
    assert got.shape == (5, 10)
    assert rel_err(got, want) < 0.15
    torch.testing.assert_close(gm.state_dict(), before, rtol=0, atol=0)  # gm is not changed


@pytest.mark.slow
def test_pt2e_compiled_with_freezing(decomposed_cnn):
    _require_torchao()
    gm = decomposed_cnn
    qmodel = quantize_pt2e(gm, _images(2), _calibration(2))
    x = _images(4)
    got = qmodel(x)
    with torch.no_grad():
        want = gm(x)
    assert not got.requires_grad
    assert rel_err(got, want) < 0.15


@pytest.mark.slow
def test_pt2e_compiled_runs_at_a_second_batch_size_with_a_rank_1_factor():
    # a 3 -> 32 1x1 conv at ratio 2 gets rank 1: inductor's dynamic recompile of that 1-channel int8 conv failed
    _require_torchao()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()  # fmt: skip
    gm = fxlrd.transform(model, LRDConfig(ratio=2, rank_quantum=1), example_inputs=_images(2))
    assert 1 in gm.fxlrd_plan["0"].ranks
    qmodel = quantize_pt2e(gm, _images(2), _calibration(2))
    for batch in (2, 5):
        x = _images(batch)
        with torch.no_grad():
            assert rel_err(qmodel(x), gm(x)) < 0.15


def test_pt2e_needs_calibration(decomposed_cnn):
    _require_torchao()
    with pytest.raises(ConfigError, match="calibration is empty"):
        quantize_pt2e(decomposed_cnn, _images(2), [])


def test_op_types_that_match_no_operator_are_an_error_not_a_float_file(tmp_path):
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8)).eval()
    x = torch.randn(4, 16)
    with pytest.raises(ConfigError, match=r"op_types \['Matmul'\] quantized no weight of this model .*Gemm"):
        fxlrd.export_onnx(model, x, tmp_path / "m.onnx", quantize=QuantizeConfig(dynamic=True, op_types=("Matmul",)))
    assert not (tmp_path / "m.onnx").exists()


def test_calibration_of_another_dtype_is_named(tmp_path):
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    batches = [torch.randn(4, 16, dtype=torch.float64) for _ in range(2)]  # numpy's default, through from_numpy
    with pytest.raises(ConfigError, match="calibration batch 0: input 'input' is float64, the exported model takes float32"):
        fxlrd.export_onnx(model, torch.randn(4, 16), tmp_path / "m.onnx", quantize="int8", calibration=batches)


def test_pt2e_calibration_that_does_not_fit_is_named():
    pytest.importorskip("torchao")
    from fxlrd.quantize import quantize_pt2e

    model = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    with pytest.raises(ConfigError, match=r"calibration batch 0 \(float32\[4, 31\]\) does not run through the exported"):
        quantize_pt2e(model, torch.randn(4, 32), [torch.randn(4, 31)], compile=False)
