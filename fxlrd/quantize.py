"""Int8 quantization of decomposed models: onnxruntime static or dynamic quantization, PyTorch PT2E.

LRD removes FLOPs and int8 makes each FLOP cheaper; the decomposed graph is an ordinary graph,
so both stock flows apply unchanged:

- **onnxruntime** (``fxlrd.export_onnx(..., quantize="int8", calibration=batches)``): the fp32
  export is quantized by ``onnxruntime.quantization.quantize_static`` in QDQ format, per-channel
  int8 weights and uint8 activations (calibrated min/max over the calibration batches), then
  checked against PyTorch with a *fidelity* check (`Fidelity`) instead of the float32 one.
  ``quantize="int8-dynamic"`` (no calibration) uses ``quantize_dynamic`` instead: int8 weights
  of the matrix products, their inputs scaled per call — for transformers, whose activation
  outliers static ranges cannot hold (all-MiniLM-L6-v2 fails the static check, see the README).
- **PyTorch PT2E** (`quantize_pt2e`): ``torch.export`` → ``prepare_pt2e`` with
  ``X86InductorQuantizer`` → calibration → ``convert_pt2e`` → ``torch.compile`` with inductor
  freezing (the step that turns the q/dq patterns into oneDNN int8 kernels). The PT2E API
  lives in torchao now (``pip install torchao``); older torch had it in ``torch.ao.quantization``.

Why uint8 activations with int8 weights: x86's int8 dot product multiplies unsigned by signed
bytes (``VPDPBUSD``, AVX-512 VNNI / AVX-VNNI), and onnxruntime's CPU graph transformers turn a
U8S8 QDQ model into int8 kernels end to end (QLinearConv, QLinearAdd, NHWC max-pool), while
with int8 activations some groups stay dequantize → float → quantize (decomposed ResNet-50:
20 of 122 convs left in float, plus 42 layout transposes). The grids are the same up to a
zero point shifted by 128, so the accuracy is the same. Measured on a 2-core Xeon with AVX-512
VNNI, decomposed ResNet-50 at 96², batch 1: float32 7.7 ms, U8S8 3.7 ms, S8S8 6.7 ms; on a
lone decomposed 3×3 conv the two int8 flavours tie (``benchmarks/int8_check.py``).

Which operators are quantized (`DEFAULT_OP_TYPES`): the compute layers LRD factorizes (Conv,
MatMul, Gemm) and the operators that pass int8 through without mixing ranges (pooling, ReLU,
clip, concat, resize, pad, shape operators). Add, Mul, normalizations, Softmax and Gather are
not quantized for their own sake: an Add whose output feeds a quantized operator still runs in
int8 (a ResNet's residual Add → ReLU becomes QLinearAdd), but the residual and embedding sums
before a transformer's LayerNorm stay in float. Those mix tensors of very different ranges (a
tiny BERT's output error went from 0.7 % to 11 % with every Add quantized) and quantizing them
blocks onnxruntime's transformer fusions (SkipLayerNormalization, BiasGelu). Only MatMuls with
a constant (weight) operand are quantized, so attention's activation × activation products stay
in float. ConvTranspose is not in the list: onnxruntime (1.32) has no int8 CPU kernel for it,
so a quantized one runs dequantize → float → quantize, slower than in float (the DCGAN
generator, batch 1, AMD EPYC: 2.6 ms quantized, 1.5 ms in float); a decomposed transposed
layer's 1×1 factors are quantized, its core stays in float.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from .errors import ConfigError, ExportMismatchError
from .modes import eval_mode

if TYPE_CHECKING:
    from .capture import Args

__all__ = [
    "QUANTIZE_MODES",
    "DEFAULT_QTOL",
    "DEFAULT_OP_TYPES",
    "DYNAMIC_OP_TYPES",
    "QuantizeConfig",
    "OutputFidelity",
    "Fidelity",
    "CalibrationReader",
    "prepare_quantization",
    "quantize_onnx_file",
    "measure_fidelity",
    "quantize_pt2e",
]

log = logging.getLogger("fxlrd")

QUANTIZE_MODES = ("int8", "int8-dynamic")
# max|int8 - fp32| / max|fp32| per output. Working int8 models measured 0.5-8.4 % here (decomposed
# ResNet-50 0.8 %, small BERTs 1-8.4 %, held-out batches included); calibrating a small CNN on
# inputs 10-100x too small gave 23 %. 0.25 leaves a 3x margin over
# the working models; QuantizeConfig(qtol=...) moves it.
DEFAULT_QTOL = 0.25
DEFAULT_OP_TYPES = (
    "Conv", "MatMul", "Gemm",
    "MaxPool", "AveragePool", "GlobalAveragePool", "Relu", "Clip", "LeakyRelu",
    "Concat", "Resize", "Pad", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Split", "Slice",
)  # fmt: skip
# Dynamic quantization: the matrix products with a weight operand. onnxruntime's dynamic Conv
# (ConvInteger) has no fast CPU kernel; CNNs want static quantization.
DYNAMIC_OP_TYPES = ("MatMul", "Gemm")
_ACTIVATIONS = ("uint8", "int8")
_CALIBRATE_METHODS = ("minmax", "entropy", "percentile")


@dataclass(frozen=True)
class QuantizeConfig:
    """Settings of onnxruntime int8 quantization (``export_onnx(quantize=...)``).

    Static (the default, ``quantize="int8"``): activation ranges are fixed by calibration data,
    and every quantized operator runs in int8 end to end — the fast choice for CNNs.
    Dynamic (``dynamic=True``, ``quantize="int8-dynamic"``): each matrix product's input is
    scaled by its own range at every call (``DynamicQuantizeLinear``), weights are int8 ahead of
    time, and no calibration data is used — the usual CPU recipe for transformers, whose
    activations have outliers that one fixed range per tensor cannot hold.

    Args:
        qtol: largest allowed ``max|int8 - torch| / max|torch|`` per output; beyond it the
            export is refused.
        activations: ``"uint8"`` (fastest on x86: U8S8 kernels) or ``"int8"``; dynamic
            quantization's activations are always uint8.
        op_types: ONNX operator types to quantize (default `DEFAULT_OP_TYPES`, dynamic:
            `DYNAMIC_OP_TYPES`).
        per_channel: per-output-channel weight scales (recommended: factors have uneven channels).
        calibrate_method: ``"minmax"``, ``"entropy"`` or ``"percentile"`` (onnxruntime's
            calibrators; static only).
        preprocess: run ``onnxruntime.quantization.shape_inference.quant_pre_process`` first.
            Off by default: the dynamo exporter already folds batch norms and infers shapes,
            and pre-processing changed neither the accuracy nor the speed of fxlrd's exports.
        dynamic: dynamic instead of static quantization.
    """

    qtol: float = DEFAULT_QTOL
    activations: str = "uint8"
    op_types: tuple[str, ...] | None = None
    per_channel: bool = True
    calibrate_method: str = "minmax"
    preprocess: bool = False
    dynamic: bool = False

    def __post_init__(self) -> None:
        if not (isinstance(self.qtol, (int, float)) and self.qtol > 0):
            raise ConfigError(f"qtol must be a positive number (a relative error, e.g. 0.5), got {self.qtol!r}")
        if self.activations not in _ACTIVATIONS:
            raise ConfigError(f"activations must be one of {_ACTIVATIONS}, got {self.activations!r}")
        if self.dynamic and self.activations != "uint8":
            raise ConfigError(
                "dynamic quantization's activations are uint8 (onnxruntime's DynamicQuantizeLinear); "
                "drop activations=... or use static quantization (dynamic=False)"
            )
        if self.calibrate_method not in _CALIBRATE_METHODS:
            raise ConfigError(f"calibrate_method must be one of {_CALIBRATE_METHODS}, got {self.calibrate_method!r}")
        op_types = self.op_types
        if op_types is None:
            op_types = DYNAMIC_OP_TYPES if self.dynamic else DEFAULT_OP_TYPES
        if isinstance(op_types, str) or not op_types:
            raise ConfigError(f"op_types must be a non-empty tuple of ONNX operator names, got {op_types!r}")
        object.__setattr__(self, "op_types", tuple(op_types))


@dataclass(frozen=True)
class OutputFidelity:
    """How close one quantized output is to PyTorch's.

    Attributes:
        name: the ONNX output name.
        relative_error: ``max|int8 - torch| / max|torch|``; for per-token outputs of inputs
            with a keyword ``attention_mask``, over the real tokens only (`padding_mask`).
        top1_agreement: for 2-D outputs (batch, classes): the share of rows whose argmax agrees;
            None for other outputs.
    """

    name: str
    relative_error: float
    top1_agreement: float | None = None

    def __str__(self) -> str:
        text = f"{self.name}: relative error {self.relative_error:.3g}"
        if self.top1_agreement is not None:
            text += f", top-1 agreement {self.top1_agreement:.0%}"
        return text


@dataclass(frozen=True)
class Fidelity:
    """The fidelity of a quantized model to PyTorch on some inputs, one entry per output."""

    outputs: tuple[OutputFidelity, ...]
    qtol: float = DEFAULT_QTOL

    @property
    def max_relative_error(self) -> float:
        """The largest relative error over the outputs (NaN if any output is not finite)."""
        errors = [o.relative_error for o in self.outputs]
        return float("nan") if any(np.isnan(errors)) else max(errors, default=0.0)

    @property
    def ok(self) -> bool:
        """True when every output is within ``qtol``."""
        return all(o.relative_error <= self.qtol for o in self.outputs)  # False for NaN

    def __str__(self) -> str:
        return "; ".join(str(o) for o in self.outputs)


# -- calibration ----------------------------------------------------------------------------------
def prepare_quantization(
    quantize: str | QuantizeConfig | None, calibration: Iterable[Any] | None
) -> tuple[QuantizeConfig, Iterator[Any] | None]:
    """Check ``export_onnx``'s ``quantize`` / ``calibration`` pair before anything is exported.

    The first calibration batch is read (and checked) now, so an empty or malformed calibration
    set fails fast; the batches are otherwise streamed, never held in memory together.

    Args:
        quantize: ``"int8"``, ``"int8-dynamic"`` or a `QuantizeConfig`.
        calibration: an iterable of batches, each like ``example_inputs`` (a tensor, a tuple of
            positional inputs or a dict of keyword inputs); static quantization needs it,
            dynamic quantization takes none.

    Returns:
        The config and an iterator over all the batches (the first one included), or None
        for dynamic quantization.

    Raises:
        ConfigError: unknown ``quantize``; calibration missing, empty or not iterable (static),
            or given (dynamic).
    """
    if quantize is None:
        raise ConfigError("calibration=... is only used with quantize='int8'; pass both or neither")
    if isinstance(quantize, str):
        if quantize not in QUANTIZE_MODES:
            raise ConfigError(f"quantize must be one of {QUANTIZE_MODES} or a QuantizeConfig, got {quantize!r}")
        config = QuantizeConfig(dynamic=quantize == "int8-dynamic")
    elif isinstance(quantize, QuantizeConfig):
        config = quantize
    else:
        raise ConfigError(
            f"quantize must be one of {QUANTIZE_MODES} or a QuantizeConfig, got {type(quantize).__name__}"
        )
    if config.dynamic:
        if calibration is not None:
            raise ConfigError(
                "dynamic int8 quantization scales activations at every call and uses no calibration data: "
                "drop calibration=..., or use static quantization (quantize='int8') to calibrate"
            )
        return config, None
    if calibration is None:
        raise ConfigError(
            "static int8 quantization needs calibration data to fix activation ranges: pass calibration=[batch, ...] "
            "(each batch like example_inputs; a few hundred samples of real data is typical), "
            "or quantize='int8-dynamic', which needs none"
        )
    batches = _iterate_batches(calibration)
    try:
        first = next(batches)
    except StopIteration:
        raise ConfigError("calibration is empty: pass at least one batch of inputs") from None
    _normalize_batch(first, 0)
    return config, itertools.chain([first], batches)


def _iterate_batches(calibration: Iterable[Any]) -> Iterator[Any]:
    if isinstance(calibration, (torch.Tensor, dict)):
        raise ConfigError(
            "calibration must be an iterable of batches (e.g. a list or a DataLoader of inputs), not a single "
            f"{type(calibration).__name__}; wrap one batch in a list: calibration=[batch]"
        )
    try:
        return iter(calibration)
    except TypeError:
        raise ConfigError(f"calibration must be an iterable of batches, got {type(calibration).__name__}") from None


def _normalize_batch(batch: Any, index: int) -> "Args":
    from .capture import normalize_inputs

    try:
        return normalize_inputs(batch)
    except TypeError as exc:
        raise ConfigError(f"calibration batch {index}: {exc}") from None


class CalibrationReader:
    """An onnxruntime ``CalibrationDataReader`` over batches given like ``example_inputs``.

    Feeds are matched to the model's inputs as `fxlrd.export.onnx_feed` matches them (by
    name, else in order). ``count`` is the number of batches read so far.

    Args:
        input_names: the ONNX model's input names.
        batches: an iterable of batches (tensor, tuple or dict each).
        input_shapes: the inputs' ONNX shapes (an int per fixed dimension, a name or None per
            dynamic one); a batch that does not fit a fixed dimension is a `ConfigError`.
    """

    _NUMPY = {"tensor(float)": "float32", "tensor(double)": "float64", "tensor(float16)": "float16",
              "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(bool)": "bool"}  # fmt: skip

    def __init__(self, input_names: Sequence[str], batches: Iterable[Any],
                 input_shapes: Sequence[Sequence[Any]] | None = None,
                 input_types: Sequence[str] | None = None):  # fmt: skip
        self._session = SimpleNamespace(get_inputs=lambda: [SimpleNamespace(name=n) for n in input_names])
        self._names = list(input_names)
        self._shapes = dict(zip(self._names, input_shapes)) if input_shapes is not None else {}
        self._types = dict(zip(self._names, input_types)) if input_types is not None else {}
        self._batches = iter(batches)
        self.count = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        """The next feed dict, or None at the end."""
        from .export import onnx_feed

        batch = next(self._batches, None)
        if batch is None:
            return None
        args, kwargs = _normalize_batch(batch, self.count)
        given = [f"input_{i}" for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
        given += [k for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
        if len(given) != len(self._names):
            raise ConfigError(
                f"calibration batch {self.count} gives {len(given)} tensor inputs {given}, the model takes "
                f"{len(self._names)} {self._names}; give each batch in the same form as example_inputs"
            )
        feed = onnx_feed(self._session, (args, kwargs))
        for name, array in feed.items():
            dtype = self._NUMPY.get(self._types.get(name, ""))
            if dtype is not None and array.dtype != np.dtype(dtype):
                raise ConfigError(
                    f"calibration batch {self.count}: input {name!r} is {array.dtype}, the exported model takes {dtype} "
                    f"(as example_inputs were): convert the batches (e.g. tensor.to(torch.{dtype}))"
                )
            want = self._shapes.get(name)
            if want is None:
                continue
            wrong = [i for i, (w, d) in enumerate(zip(want, array.shape)) if isinstance(w, int) and w != d]
            if len(want) != array.ndim or wrong:
                message = (f"calibration batch {self.count}: input {name!r} has shape {tuple(array.shape)}, but the "
                           f"exported model's is {tuple(want)}")  # fmt: skip
                if len(want) == array.ndim and wrong == [0]:  # only the batch size: the export fixed it
                    message += (" (an int is a fixed dimension: the export did not make the batch dynamic, e.g. torch's "
                                "nn.MultiheadAttention fixes it); give calibration batches of that size, or transform "
                                "the model with fxlrd first, whose captures have a dynamic batch dimension")  # fmt: skip
                else:
                    message += "; give calibration batches shaped like example_inputs"
                raise ConfigError(message)
        self.count += 1
        return feed

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return iter(self.get_next, None)


# -- onnxruntime --------------------------------------------------------------------------------
class _DropPreprocessAdvice(logging.Filter):
    """onnxruntime advises pre-processing through the root logger on every call; we measured
    that it does not help fxlrd's exports (see `QuantizeConfig.preprocess`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing" not in record.getMessage()


@contextlib.contextmanager
def _quiet_quantizer():
    root = logging.getLogger()
    advice = _DropPreprocessAdvice()
    root.addFilter(advice)
    try:
        yield
    finally:
        root.removeFilter(advice)


def _preprocess(src: Path, dst: Path) -> Path:
    """``quant_pre_process`` with fallbacks: symbolic shape inference stops at some dynamic
    shapes of exported transformers (``Min(64, sequence)``), then only ONNX shape inference runs."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    for kwargs in ({"auto_merge": True}, {"skip_symbolic_shape": True}):
        try:
            quant_pre_process(str(src), str(dst), **kwargs)
            return dst
        except Exception as exc:  # noqa: BLE001  (onnxruntime raises bare Exceptions here)
            log.debug("quant_pre_process(%s) failed: %s", kwargs, exc)
    log.info("quant_pre_process failed; quantizing the model as exported")
    return src


def _token_mask(inputs: "Args") -> np.ndarray | None:
    """`fxlrd.capture.padding_mask` as a numpy array. Outputs at padding positions are computed
    but unused, and nothing constrains them: int8 can move them by as much as the largest real
    activation, so checks leave them out."""
    from .calibrate import TokenMasks

    masks = TokenMasks(inputs)
    # an encoder-decoder's outputs run over the decoder's tokens: the encoder's mask applies only where
    # the lengths tell the two apart (its shape then matches encoder outputs alone)
    mask = masks.encoder if masks.decoder_length is None or masks.told_apart() else None
    return None if mask is None else mask.cpu().numpy()


def _compare(got: Sequence[np.ndarray], expected: Sequence[np.ndarray], names: Sequence[str], qtol: float,
             mask: np.ndarray | None = None) -> Fidelity:  # fmt: skip
    """Per output, the relative error and (2-D outputs) top-1 agreement. ``mask`` (batch,
    tokens), True at real tokens: per-token outputs (at least 3-D, the first two dimensions
    (batch, tokens): hidden states, token logits) are compared at the real tokens only
    (`padding_mask`); 2-D outputs (pooled, logits) always whole."""
    from .export import max_relative_error

    outputs = []
    for name, g, e in zip(names, got, expected):
        g64, e64 = np.asarray(g, dtype=np.float64), np.asarray(e, dtype=np.float64)
        bad = ~np.isfinite(g64)  # int8 values that are not finite: a failure (NaN), even at padding,
        finite = g64.shape == e64.shape and bool(np.all((g64 == e64)[bad] | (np.isnan(g64) & np.isnan(e64))[bad]))
        finite = finite or not bad.any()  # unless the float model has the same there (masked logits at -inf)
        if mask is not None and mask.any() and e64.ndim >= 3 and e64.shape[:2] == mask.shape and g64.shape == e64.shape:
            g64, e64 = g64[mask], e64[mask]
        err = max_relative_error(g64, e64) if finite else float("nan")
        top1 = None
        if e64.ndim == 2 and e64.shape[1] > 1 and e64.shape[0] > 0 and np.ndim(g) == 2:
            top1 = float((g64.argmax(1) == e64.argmax(1)).mean())
        outputs.append(OutputFidelity(name, err, top1))
    return Fidelity(tuple(outputs), qtol)


def _check_something_quantized(source: Path, quantized: Path, config: QuantizeConfig, label: Any) -> None:
    """A `ConfigError` when the int8 file stores no weight in int8: ``op_types`` matched none
    of the model's operators (a misspelt name), and the "int8" model would be the float one."""
    import onnx

    weights = [t for t in onnx.load(str(quantized)).graph.initializer if len(t.dims) >= 2]
    if any(t.data_type == onnx.TensorProto.INT8 for t in weights):
        return
    present = sorted({n.op_type for n in onnx.load(str(source)).graph.node})
    raise ConfigError(
        f"int8 quantization with op_types {list(config.op_types)} quantized no weight of this model (its operators: "
        f"{', '.join(present)}); {label} was not written. Name operators it has (ONNX names, e.g. 'MatMul', 'Conv', "
        "'Gemm')" + ("" if not config.dynamic else "; dynamic int8 quantizes matrix products only: use static int8 "
                     "for a model of convolutions")
    )


def quantize_onnx_file(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    calibration: Iterable[Any] | None,
    config: str | QuantizeConfig = "int8",
    *,
    inputs: "Args | None" = None,
    expected: Sequence[torch.Tensor] | None = None,
    label: str | os.PathLike | None = None,
    require_quantized: bool = True,
) -> Fidelity | None:
    """Quantize the float ONNX model ``src`` to int8 (QDQ) at ``dst``, checked before it is written.

    ``dst`` may be ``src``: the model is quantized into a temporary file beside ``dst`` and moved
    into place only when the check passes; on any failure ``dst`` is left as it was.

    Args:
        src: the float32 ONNX model.
        dst: where the int8 model goes.
        calibration: an iterable of batches, each like the model's example inputs (static);
            None for dynamic quantization.
        config: ``"int8"``, ``"int8-dynamic"`` or a `QuantizeConfig`.
        inputs: ``(args, kwargs)`` to check fidelity on (None: no check).
        expected: PyTorch's outputs (flattened tensors) for ``inputs``.
        label: how to name the destination in error messages (default ``dst``).
        require_quantized: a model none of whose weights ``config.op_types`` reaches is an error
            (the default: a misspelt operator name); False writes what the quantizer made of it,
            its weights in float (layer timing: the deployed model leaves such an operator, a
            transposed conv, in float too).

    Returns:
        The `Fidelity` on ``inputs``, or None when no check was asked for.

    Raises:
        ConfigError: bad ``config``, missing, empty or malformed calibration.
        ExportMismatchError: the int8 model is further from PyTorch than ``config.qtol``.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    from .export import onnx_feed, onnx_session

    config, batches = prepare_quantization(config, calibration)
    src, dst = Path(src), Path(dst)
    label = label if label is not None else dst
    with tempfile.TemporaryDirectory(prefix=f".{dst.stem}.int8.", dir=dst.parent) as work:
        source = _preprocess(src, Path(work) / "pre.onnx") if config.preprocess else src
        session = onnx_session(source)
        input_names = [i.name for i in session.get_inputs()]
        input_shapes = [list(i.shape) for i in session.get_inputs()]
        input_types = [i.type for i in session.get_inputs()]
        output_names = [o.name for o in session.get_outputs()]
        del session
        quantized = Path(work) / "int8.onnx"
        with _quiet_quantizer():
            if config.dynamic:
                quantize_dynamic(
                    str(source), str(quantized), per_channel=config.per_channel, weight_type=QuantType.QInt8,
                    op_types_to_quantize=list(config.op_types), extra_options={"MatMulConstBOnly": True},
                )  # fmt: skip
            else:
                reader = CalibrationReader(input_names, batches, input_shapes, input_types)
                activation = QuantType.QUInt8 if config.activations == "uint8" else QuantType.QInt8
                method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                          "percentile": CalibrationMethod.Percentile}[config.calibrate_method]  # fmt: skip
                quantize_static(
                    str(source), str(quantized), reader, quant_format=QuantFormat.QDQ, per_channel=config.per_channel,
                    activation_type=activation, weight_type=QuantType.QInt8, op_types_to_quantize=list(config.op_types),
                    calibrate_method=method, extra_options={"MatMulConstBOnly": True},
                )  # fmt: skip
        if require_quantized:
            _check_something_quantized(source, quantized, config, label)
        fidelity = None
        if inputs is not None and expected is not None:
            session = onnx_session(quantized)
            got = session.run(None, onnx_feed(session, inputs))
            want = [e.detach().float().cpu().numpy() for e in expected]
            if len(got) != len(want):
                raise ExportMismatchError(
                    f"the int8 model gives {len(got)} outputs, PyTorch {len(want)}; {label} was not written"
                )
            fidelity = _compare(got, want, output_names, config.qtol, _token_mask(inputs))
            if not fidelity.ok:
                fix = ("exclude sensitive operators with QuantizeConfig(dynamic=True, op_types=...)" if config.dynamic else
                       "check that the calibration batches are real inputs like example_inputs, exclude sensitive "
                       "operators with QuantizeConfig(op_types=...)")  # fmt: skip
                raise ExportMismatchError(
                    f"the int8 model is too far from PyTorch ({fidelity}; qtol {config.qtol:g}); "
                    f"{label} was not written. {fix[0].upper() + fix[1:]}, or accept more with QuantizeConfig(qtol=...)"
                )
            how = "dynamic" if config.dynamic else f"calibrated on {reader.count} batches"
            log.info("int8 %s (%s): %s", label, how, fidelity)
        os.replace(quantized, dst)
    return fidelity


def measure_fidelity(path: str | os.PathLike, model: nn.Module, inputs: Any, *, qtol: float = DEFAULT_QTOL) -> Fidelity:
    """How close the (quantized) ONNX model at ``path`` is to ``model`` on ``inputs``.

    For a check on held-out data after ``export_onnx(..., quantize="int8")``, which checks only
    on its example inputs.

    Args:
        path: the ONNX file.
        model: the PyTorch model it was exported from (run in eval mode, its flag restored).
        inputs: a tensor, a tuple of positional inputs or a dict of keyword inputs.
        qtol: the bound `Fidelity.ok` tests against.

    Returns:
        Per output: relative error (per-token outputs at the real tokens only when ``inputs``
        has a keyword ``attention_mask``) and, for 2-D outputs, top-1 agreement.
    """
    from torch.utils import _pytree as pytree

    from .export import onnx_feed, onnx_session

    args, kwargs = _normalize_batch(inputs, 0)
    with eval_mode(model), torch.no_grad():
        out = model(*args, **kwargs)
    expected = [t.float().cpu().numpy() for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
    session = onnx_session(path)
    got = session.run(None, onnx_feed(session, (args, kwargs)))
    return _compare(got, expected, [o.name for o in session.get_outputs()], qtol, _token_mask((args, kwargs)))


# -- PyTorch PT2E ---------------------------------------------------------------------------------
def _pt2e_api():
    """``prepare_pt2e``, ``convert_pt2e`` and the x86 quantizer module, from torchao (current)
    or torch.ao (torch before the move)."""
    try:
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86
    except ImportError:
        try:
            from torch.ao.quantization.quantize_pt2e import convert_pt2e, prepare_pt2e
            from torch.ao.quantization.quantizer import x86_inductor_quantizer as x86
        except ImportError:
            raise ImportError(
                f"PT2E quantization needs torchao with torch {torch.__version__} (the API moved out of "
                "torch.ao.quantization): pip install torchao"
            ) from None
    return prepare_pt2e, convert_pt2e, x86


def _export_for_pt2e(model: nn.Module, inputs: "Args") -> Any:
    """``torch.export.export`` with a dynamic batch (and token sequence) dimension, as
    fxlrd's export capture does."""
    from .capture import dynamic_export_inputs

    args, kwargs, dynamic_shapes, _ = dynamic_export_inputs(model, inputs)
    return torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)


class _FrozenCompiled(nn.Module):
    """A ``torch.compile``d int8 module run with inductor freezing and without autograd.

    Freezing turns the converted graph's q/dq patterns and constant int8 weights into oneDNN
    int8 kernels; it must be on whenever inductor compiles (first call, and a recompile for a
    new shape). Passing it as ``torch.compile(options={"freezing": True})`` does not reach the
    whole compile with torch 2.13 + torchao 0.18 (``onednn.qconv_prepack`` then reaches fake
    tensor propagation and fails), so the global flag is patched around each call instead.
    """

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module
        # not a second submodule (one copy in state_dict); static shapes: a dynamic recompile of a 1-channel int8
        # conv (a rank-1 factor) fails in inductor (torch 2.13), so each new batch size compiles its own graph
        self.__dict__["_compiled"] = torch.compile(module, dynamic=False)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        import torch._inductor.config as inductor_config

        with torch.no_grad(), inductor_config.patch(freezing=True):
            return self._compiled(*args, **kwargs)


def quantize_pt2e(gm: nn.Module, example_inputs: Any, calibration: Iterable[Any], *, compile: bool = True) -> nn.Module:
    """Int8-quantize ``gm`` with PyTorch's PT2E flow for x86 CPUs.

    ``torch.export.export`` (dynamic batch, and sequence for token inputs) → ``prepare_pt2e``
    with ``X86InductorQuantizer`` and ``get_default_x86_inductor_quantization_config()`` (static,
    per-channel int8 weights, uint8 activations) → one forward pass per calibration batch →
    ``convert_pt2e`` → ``torch.compile`` with inductor freezing. ``gm`` itself is not changed.

    Args:
        gm: the (decomposed) model; exported in eval mode.
        example_inputs: a tensor, a tuple of positional inputs or a dict of keyword inputs.
        calibration: an iterable of batches like ``example_inputs`` (observers record their ranges).
        compile: compile the converted model (the int8 kernels need it); False returns the
            converted module, which runs q/dq in float (for checking accuracy, not speed).

    Returns:
        A module called like ``gm`` (inference only: it runs without autograd when compiled).

    Raises:
        ImportError: torchao is not installed (torch >= 2.10 has no PT2E quantization of its own).
        ConfigError: empty or malformed calibration.
    """
    from .capture import check_module

    check_module(gm, "gm")
    prepare_pt2e, convert_pt2e, x86 = _pt2e_api()
    inputs = _normalize_batch(example_inputs, 0)
    _, batches = prepare_quantization("int8", calibration)
    with eval_mode(gm):
        exported = _export_for_pt2e(gm, inputs)
    module = exported.module()
    quantizer = x86.X86InductorQuantizer().set_global(x86.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(module, quantizer)
    with torch.no_grad():
        for i, batch in enumerate(batches):
            args, kwargs = _normalize_batch(batch, i)
            try:
                prepared(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001  (the exported graph's guards: a shape it does not take)
                from .capture import describe_inputs

                raise ConfigError(
                    f"calibration batch {i} ({describe_inputs((args, kwargs))}) does not run through the exported "
                    f"model, captured at {describe_inputs(inputs)}: {type(exc).__name__}: {str(exc).splitlines()[0]}; "
                    "give calibration batches shaped like example_inputs"
                ) from exc
    converted = convert_pt2e(prepared)
    return _FrozenCompiled(converted) if compile else converted
