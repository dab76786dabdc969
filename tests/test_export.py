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


def test_max_relative_error():
    assert max_relative_error(np.array([1.0, 2.0]), np.array([1.0, 2.5])) == pytest.approx(0.2)
