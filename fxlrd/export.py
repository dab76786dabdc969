"""ONNX export, checked against onnxruntime before the file is put in place."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from .errors import ExportMismatchError

__all__ = ["export_onnx", "onnx_session", "max_relative_error"]


def onnx_session(path: str | os.PathLike | bytes, *, threads: int | None = None, providers: Sequence[str] | None = None):
    """An onnxruntime ``InferenceSession`` of a file or of model bytes (CPU unless ``providers``
    says otherwise), with ``threads`` intra-op threads and no spinning between runs."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    # Idle sessions' spinning worker threads steal the cores from the one running: with two
    # sessions alive on 2 cores a model ran 2x slower. Off, so sessions can be compared.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    model = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(model, options, providers=list(providers or ["CPUExecutionProvider"]))


def max_relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """``max |a - e| / max |e|``: the error relative to the output's scale."""
    scale = float(np.abs(expected).max()) or 1.0
    return float(np.abs(actual.astype(np.float64) - expected.astype(np.float64)).max()) / scale


@contextlib.contextmanager
def _quiet():
    """The exporter logs progress and warnings about optional torchvision ops; keep them out."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def export_onnx(
    gm: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    path: str | os.PathLike,
    *,
    dynamic_batch: bool = True,
    opset_version: int | None = None,
    check: bool = True,
    rtol: float = 1e-4,
) -> Path:
    """Export ``gm`` to ONNX at ``path`` and check it with onnxruntime.

    The model is exported in eval mode (its training flag is restored after). The file is
    written beside ``path`` first and moved into place only once the check passes, so an
    existing file at ``path`` survives a failed export.

    Args:
        gm: the model (a decomposed GraphModule or any module torch.onnx can export).
        example_inputs: a tensor or tuple of tensors; their shapes fix the graph's shapes.
        path: where the ``.onnx`` file goes (weights inside the file).
        dynamic_batch: make dimension 0 of every input and output dynamic.
        opset_version: ONNX opset; the exporter's default when None.
        check: run onnxruntime on ``example_inputs`` and compare with PyTorch.
        rtol: largest allowed ``max|ort - torch| / max|torch|`` (float32 default 1e-4).

    Returns:
        ``path`` as a ``Path``.

    Raises:
        ExportMismatchError: onnxruntime's outputs differ from PyTorch's by more than ``rtol``.
    """
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    input_names = [f"input_{i}" if len(inputs) > 1 else "input" for i in range(len(inputs))]
    was_training = gm.training
    gm.eval()
    try:
        with torch.no_grad():
            expected = gm(*inputs)
        outputs = expected if isinstance(expected, (tuple, list)) else (expected,)
        output_names = [f"output_{i}" if len(outputs) > 1 else "output" for i in range(len(outputs))]
        dynamic_axes = {n: {0: "batch"} for n in input_names + output_names} if dynamic_batch else None
        fd, tmp = tempfile.mkstemp(suffix=".onnx", dir=path.parent, prefix=f".{path.stem}.")
        os.close(fd)
        try:
            with _quiet():
                torch.onnx.export(
                    gm, inputs, tmp, input_names=input_names, output_names=output_names,
                    dynamic_axes=dynamic_axes, opset_version=opset_version, external_data=False,
                    dynamo=True, verbose=False,
                )  # fmt: skip
            if check:
                session = onnx_session(tmp)
                got = session.run(None, {n: t.detach().cpu().numpy() for n, t in zip(input_names, inputs)})
                for i, (g, e) in enumerate(zip(got, outputs)):
                    err = max_relative_error(g, e.detach().float().cpu().numpy())
                    if not err <= rtol:
                        raise ExportMismatchError(
                            f"onnxruntime output {i} differs from PyTorch: relative error {err:.3g} > rtol {rtol:g}; "
                            f"{path} was not written"
                        )
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    finally:
        gm.train(was_training)
    return path
