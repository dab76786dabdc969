"""ONNX export, checked against onnxruntime before the file is put in place."""

from __future__ import annotations

import collections
import contextlib
import inspect
import io
import logging
import os
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Collection, Iterable, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils import _pytree as pytree

from ._files import atomic_path
from .errors import ConfigError, ExportError, ExportMismatchError, FxlrdError
from .modes import eval_mode

if TYPE_CHECKING:
    from .capture import Args
    from .quantize import QuantizeConfig

__all__ = ["export_onnx", "export_onnx_file", "onnx_session", "onnx_feed", "max_relative_error"]


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
    """``max |a - e| / max |e|`` over the finite values: the error relative to the output's
    scale. Non-finite values (masked logits at -inf) must be the same in both; any that is
    not makes the error infinite."""
    a, e = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    finite = np.isfinite(e)
    same = (a == e) | (np.isnan(a) & np.isnan(e))
    if not np.all(same[~finite]) or not np.all(np.isfinite(a[finite])):
        return float("inf")
    if not finite.any():
        return 0.0
    scale = float(np.abs(e[finite]).max()) or 1.0
    return float(np.abs(a[finite] - e[finite]).max()) / scale


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


def _input_names(inputs: "Args") -> list[str]:
    """ONNX input names for the tensor inputs: keyword names, ``input`` / ``input_i`` for positional ones."""
    args, kwargs = inputs
    names = []
    positional = [a for a in args if isinstance(a, torch.Tensor)]
    for i, _ in enumerate(positional):
        names.append("input" if len(positional) == 1 and not kwargs else f"input_{i}")
    names += [k for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
    return names


def _in_signature_order(model: nn.Module, inputs: "Args") -> "Args":
    """``inputs`` with the keyword inputs in the order of ``model.forward``'s parameters: the
    exporter numbers a graph's inputs in that order, whatever order the dict was in (names
    given in the dict's order were attached to the wrong inputs)."""
    args, kwargs = inputs
    try:
        params = list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return inputs
    rank = {name: i for i, name in enumerate(params)}
    ordered = sorted(kwargs, key=lambda k: rank.get(k, len(rank)))  # stable: names **kwargs takes keep their order
    return args, {k: kwargs[k] for k in ordered}


def _has_other_than_tensors(inputs: "Args") -> bool:
    args, kwargs = inputs
    return any(not isinstance(v, torch.Tensor) for v in (*args, *kwargs.values()))


def _dynamic_shapes_by_name(model: nn.Module, inputs: "Args", batch: bool, sequence: bool) -> Any:
    """The dynamic dimensions as ``dynamic_shapes`` by parameter name (the batch, the token
    sequence as `fxlrd.capture.dynamic_spec` chooses it), for inputs that are not all
    tensors (a float flag): torch.onnx cannot turn ``dynamic_axes`` into them then."""
    from .capture import _batch_size, dynamic_spec, sequence_lengths

    args, kwargs = inputs
    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs)
    except (TypeError, ValueError):
        return None
    size = _batch_size(inputs) if batch else None
    seqs = sequence_lengths(inputs) if sequence else set()

    def spec(value: Any) -> Any:
        dims = dynamic_spec(value, size, seqs) or {}
        if not sequence:
            dims.pop(1, None)
        return dims or None

    return {name: spec(value) for name, value in bound.arguments.items()}


def _tensors(inputs: "Args") -> list[torch.Tensor]:
    args, kwargs = inputs
    return [a for a in args if isinstance(a, torch.Tensor)] + [v for v in kwargs.values() if isinstance(v, torch.Tensor)]


def _dynamic_axes(inputs: "Args", names: list[str], batch: bool, sequence: bool) -> dict[str, dict[int, str]] | None:
    """The dynamic dimensions as torch.onnx's ``dynamic_axes``: the batch of every input whose
    dimension 0 is the batch (the inputs' common size there, else the commonest among inputs
    of 2 or more dimensions: a lookup table or a per-channel scale beside the batch is not
    batched), and dimension 1 where `fxlrd.capture.dynamic_spec` keeps it dynamic (token inputs and the
    inputs beside them of the same length, not a lone bool mask), one name per distinct token
    length (an encoder-decoder's two sequences vary apart)."""
    from .capture import _batch_size, _is_tokens, dynamic_spec

    if not (batch or sequence):
        return None
    tensors = _tensors(inputs)
    size = _batch_size(inputs)
    if size is None:  # the commonest size among inputs of 2 or more dimensions (a 1-D scale or table is rarely batched)
        sizes = [t.shape[0] for t in tensors if t.dim() >= 2] or [t.shape[0] for t in tensors if t.dim() > 0]
        size = collections.Counter(sizes).most_common(1)[0][0] if sizes else None
    lengths = list(dict.fromkeys(t.shape[1] for t in tensors if _is_tokens(t))) if sequence else []
    axes: dict[str, dict[int, str]] = {}
    for name, t in zip(names, tensors):
        dims: dict[int, str] = {}
        spec = dynamic_spec(t, size, lengths) or {}
        if batch and t.dim() > 0 and t.shape[0] == size:
            dims[0] = "batch"
        if sequence and 1 in spec and t.shape[1] in lengths:
            index = lengths.index(t.shape[1])
            dims[1] = "sequence" if index == 0 else f"sequence_{index + 1}"
        if dims:
            axes[name] = dims
    return axes


def onnx_feed(session, inputs: "Args") -> dict[str, np.ndarray]:
    """The feed dict of an onnxruntime session for ``inputs`` (tensor inputs matched by name,
    else in order)."""
    tensors = _tensors(inputs)
    names = [i.name for i in session.get_inputs()]
    by_name = dict(zip(_input_names(inputs), tensors))
    if set(names) <= set(by_name):
        return {n: by_name[n].detach().cpu().numpy() for n in names}
    return {n: t.detach().cpu().numpy() for n, t in zip(names, tensors)}


def _shapes(inputs: "Args") -> list[tuple[int, ...]]:
    return [tuple(t.shape) for t in pytree.tree_leaves(inputs) if isinstance(t, torch.Tensor)]


def _widened(inputs: "Args", dynamic_batch: bool, dynamic_sequence: bool) -> "Args":
    """``inputs`` with a batch or token sequence of size 1 repeated to 2 where it is to stay
    dynamic: the exporter specializes dimensions of size 1, so a 1×1 example wrote a file that
    declared dynamic axes and ran at 1×1 only."""
    from .capture import _batch_size, _widen, sequence_lengths

    batch = _batch_size(inputs)
    if dynamic_batch and batch == 1:
        inputs, batch = _widen(inputs, 0, 1, None), 2
    if dynamic_sequence and 1 in sequence_lengths(inputs):
        inputs = _widen(inputs, 1, 1, batch)
    return inputs


def _runs_at(model: nn.Module, inputs: "Args") -> bool:
    """Whether ``model`` runs on ``inputs`` (a model written for batch 1 may not run at 2)."""
    try:
        with torch.no_grad():
            model(*inputs[0], **inputs[1])
    except Exception:  # noqa: BLE001  (any failure: the size is not one the model takes)
        return False
    return True


def exporter_failure(exc: BaseException) -> str:
    """One line saying why torch.onnx failed: its exception summary's first cause when it
    gives one (``No ONNX function found for aten.cummax ...``), else its first line; colour
    codes stripped, at most 300 characters."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    summary = lines[lines.index("## Exception summary") + 1 :] if "## Exception summary" in lines else []
    if summary:
        line = re.sub(r"^<class '[\w.]*?(\w+)'>: ", r"\1: ", summary[0])
    else:
        line = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return line if len(line) <= 300 else line[:297] + "..."


def output_names(outputs: Any, taken: Collection[str] = ()) -> list[str] | None:
    """Names for a model's tensor outputs, in their flattened order, from where each sits:
    ``output`` for a lone tensor, the keys of a dict or Hugging Face output
    (``last_hidden_state``, ``logits``), ``output_0``... for a tuple; None when the outputs
    hold anything but tensors, two would share a name or one would take a name in ``taken``
    (the inputs': an ONNX graph names each value once; a diffusers UNet takes and returns
    ``sample``), or a type in them cannot say its keys (the exporter then names them)."""
    try:
        leaves = pytree.tree_flatten_with_path(outputs)[0]
    except ValueError:  # a pytree node registered without flatten_with_keys_fn
        return None
    if not leaves or not all(isinstance(v, torch.Tensor) for _, v in leaves):
        return None
    if isinstance(outputs, torch.Tensor):
        return ["output"]
    names = []
    for path, _ in leaves:
        parts = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
        name = re.sub(r"\W+", "_", "_".join(parts)).strip("_")
        names.append(name if name and not name[0].isdigit() else f"output_{name}")
    return names if len(set(names)) == len(names) and not set(names) & set(taken) else None


def export_onnx_file(model: nn.Module, inputs: "Args", path: str | os.PathLike, *, dynamic_batch: bool = True,
                     dynamic_sequence: bool = True, opset_version: int | None = None,
                     dynamic_shapes=None, widen: bool | None = None, names: list[str] | None = None) -> None:  # fmt: skip
    """Export without checking (the model as it is, eval mode is the caller's business); a
    batch or token sequence of 1 meant to stay dynamic is exported at 2 (`_widened`) where the
    model runs at 2 (``widen``: already decided by the caller). ``names``: the outputs'
    (`output_names`), else the exporter's own."""
    if dynamic_shapes is None and widen is not False:
        widened = _widened(inputs, dynamic_batch, dynamic_sequence)
        if _shapes(widened) != _shapes(inputs) and (widen or _runs_at(model, widened)):
            inputs = widened
    inputs = _in_signature_order(model, inputs)
    args, kwargs = inputs
    input_names = _input_names(inputs)
    extra = {}
    if dynamic_shapes is None and (dynamic_batch or dynamic_sequence) and _has_other_than_tensors(inputs):
        dynamic_shapes = _dynamic_shapes_by_name(model, inputs, dynamic_batch, dynamic_sequence)
    if dynamic_shapes is not None:
        extra["dynamic_shapes"] = dynamic_shapes
    else:
        extra["dynamic_axes"] = _dynamic_axes(inputs, input_names, dynamic_batch, dynamic_sequence)
    with _quiet():
        torch.onnx.export(
            model, args, str(path), kwargs=kwargs or None, input_names=input_names, output_names=names,
            opset_version=opset_version,
            external_data=False, dynamo=True, verbose=False, **extra,
        )  # fmt: skip


def export_onnx(
    gm: nn.Module,
    example_inputs: Any,
    path: str | os.PathLike,
    *,
    dynamic_batch: bool = True,
    dynamic_sequence: bool = True,
    dynamic_shapes: Any = None,
    opset_version: int | None = None,
    check: bool = True,
    rtol: float | None = None,
    quantize: "str | QuantizeConfig | None" = None,
    calibration: Iterable[Any] | None = None,
) -> Path:
    """Export ``gm`` to ONNX at ``path`` and check it with onnxruntime.

    The model is exported in eval mode (its training flag is restored after); a graph
    torch.export captured in training mode is refused (its dropout runs whatever the flag). The file is
    written beside ``path`` first and moved into place only once the check passes, so an
    existing file at ``path`` survives a failed export.

    Args:
        gm: the model (a decomposed GraphModule or any module torch.onnx can export).
        example_inputs: a tensor, a tuple of positional inputs or a dict of keyword inputs
            (e.g. ``{"input_ids": ..., "attention_mask": ...}``); their shapes fix the graph's
            other shapes.
        path: where the ``.onnx`` file goes (weights inside the file).
        dynamic_batch: make dimension 0 of every batched input dynamic (named ``batch``): of
            every input when all share that size, else of those whose size there is the
            commonest among inputs of 2 or more dimensions (the others are side inputs, kept at
            their size).
        dynamic_sequence: make dimension 1 of integer (token) inputs dynamic (``sequence``);
            where the model fixes that size (integer features reshaped to a fixed width), the
            export is made again without it, with a warning.
        dynamic_shapes: torch.export dynamic shapes, instead of the two flags above.
        opset_version: ONNX opset; the exporter's default when None.
        check: run onnxruntime on ``example_inputs`` and compare with PyTorch.
        rtol: largest allowed ``max|ort - torch| / max|torch|`` per output (default 1e-4 for
            float32 outputs, 1e-2 for float16 and bfloat16 ones: their rounding alone is ~1e-3).
        quantize: ``"int8"`` (or a `fxlrd.quantize.QuantizeConfig`): write an int8 model instead,
            made by onnxruntime static quantization (QDQ, per-channel int8 weights, uint8
            activations) of the checked float32 export; ``"int8-dynamic"``: dynamic quantization
            of the matrix products (no calibration). It is then checked for *fidelity*: each
            output's relative error ``max|int8 - torch| / max|torch|`` must be within ``qtol``
            (0.25), per-token outputs at the real tokens only when the inputs carry a keyword
            ``attention_mask`` (padding tokens' outputs are unused, and int8 moves them freely);
            the error and, for 2-D outputs, top-1 agreement are logged on the ``fxlrd`` logger.
        calibration: with ``quantize``: an iterable of batches, each like ``example_inputs``,
            that fix the activation ranges (use real data).

    Returns:
        ``path`` as a ``Path``.

    Raises:
        ExportError: torch.onnx cannot convert the model (an operation it has no conversion for).
        ExportMismatchError: onnxruntime's outputs differ from PyTorch's by more than ``rtol``
            (or, quantized, by more than ``qtol``).
        ConfigError: ``quantize`` unknown, or calibration missing or empty; an export capture
            made in training mode.
    """
    if quantize is not None or calibration is not None:  # (once: a one-shot calibration iterable is read here)
        from .quantize import prepare_quantization

        quantize, calibration = prepare_quantization(quantize, calibration)
    options = dict(dynamic_batch=dynamic_batch, dynamic_shapes=dynamic_shapes, opset_version=opset_version, check=check,
                   rtol=rtol, quantize=quantize, calibration=calibration)  # fmt: skip
    try:
        return _export_onnx(gm, example_inputs, path, dynamic_sequence=dynamic_sequence, **options)
    except _SizeFixed as fixed:
        written = _export_onnx(gm, example_inputs, path, dynamic_sequence=False, **options)  # (its own errors, if any)
        warnings.warn(f"export_onnx: {type(gm).__name__} fixes the size of dimension 1 of its integer inputs, so it "
                      f"cannot export with that dimension dynamic ({fixed}); exported with dynamic_sequence=False (pass "
                      "it to say so)", stacklevel=2)  # fmt: skip
        return written


def _check_flat(inputs: "Args") -> None:
    """A `ConfigError` for an input holding tensors inside a container: the check feeds, and
    the dynamic sizes name, the file's inputs as tensors (positional or keyword), each on its own."""
    args, kwargs = inputs
    for name, value in [*((f"input {i}", a) for i, a in enumerate(args)), *((repr(k), v) for k, v in kwargs.items())]:
        if not isinstance(value, torch.Tensor) and any(isinstance(t, torch.Tensor) for t in pytree.tree_leaves(value)):
            raise ConfigError(
                f"export_onnx: {name} is a {type(value).__name__} holding tensors, which fxlrd's check with "
                "onnxruntime and its dynamic sizes cannot feed: pass them as inputs of their own (a wrapper module "
                "whose forward takes them one by one and calls the model) and export that, or export unchecked at "
                "the example's sizes (check=False, dynamic_batch=False, dynamic_sequence=False)"
            )


_TEXT_FORMATS = (".json", ".textproto", ".txtpb", ".onnxtxt", ".txt")


class _SizeFixed(Exception):
    """torch.export found the model fixing a size that ``dynamic_sequence`` made dynamic."""


_FIXED_SIZE = re.compile(r"[Cc]onstraints? violated|conflicts between user-specified ranges|specialized|"
                         r"ConstraintViolation|inferred to be a constant")  # fmt: skip


def _export_onnx(gm: nn.Module, example_inputs: Any, path: str | os.PathLike, *, dynamic_batch: bool,
                 dynamic_sequence: bool, dynamic_shapes: Any, opset_version: int | None, check: bool, rtol: float | None,
                 quantize: Any, calibration: Any) -> Path:  # fmt: skip
    from .capture import normalize_inputs, training_ops

    inputs = normalize_inputs(example_inputs)
    args, kwargs = inputs
    static_int8 = quantize is not None and not getattr(quantize, "dynamic", False)  # (its calibration reader feeds tensors)
    if check or static_int8 or (dynamic_shapes is None and (dynamic_batch or dynamic_sequence)):  # (what cannot take nesting)
        _check_flat(inputs)
    trained = training_ops(gm) if isinstance(gm, torch.fx.GraphModule) else 0
    if trained:  # (its reference forward would also update the batch-norm statistics)
        raise ConfigError(
            f"this graph was captured with torch.export in training mode: {trained} dropout/batch-norm operations "
            "run as in training whatever gm.eval() says, so it cannot be exported for inference. Capture in eval mode "
            "(fxlrd.transform(model.eval(), ...), or fxlrd.apply(model.eval(), gm.fxlrd_plan, ...) and "
            "load_state_dict(gm.state_dict()) to keep trained weights)"
        )
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path} is a directory: give the ONNX file's path, e.g. {path / 'model.onnx'}")
    if path.suffix.lower() in _TEXT_FORMATS:
        raise ConfigError(f"{path}: onnx writes a {path.suffix} file as text, which onnxruntime cannot load; name the "
                          f"file {path.with_suffix('.onnx').name}")  # fmt: skip
    if quantize is not None:
        dtypes = sorted({str(p.dtype).replace("torch.", "") for p in gm.parameters() if p.is_floating_point()} - {"float32"})
        if dtypes:
            raise ConfigError(f"int8 quantization starts from a float32 model, this one holds {', '.join(dtypes)} "
                              "weights: export gm.float() (onnxruntime quantizes float32 graphs only)")  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    widened = _widened(inputs, dynamic_batch, dynamic_sequence) if dynamic_shapes is None else inputs
    checks = [inputs] + ([widened] if _shapes(widened) != _shapes(inputs) else [])  # a size-1 example, and size 2
    with eval_mode(gm):
        with torch.no_grad():
            expected = [gm(*args, **kwargs)]
            if len(checks) > 1 and _runs_at(gm, widened):
                expected.append(gm(*widened[0], **widened[1]))
            elif len(checks) > 1:  # the model takes size 1 only there: the file stays at the example's size
                checks = checks[:1]
                warnings.warn(f"export_onnx: {type(gm).__name__} does not run at {_shapes(widened)}, so the exported "
                              "file keeps the example's size 1 where it was asked to be dynamic (pass "
                              "dynamic_batch=False or dynamic_sequence=False to say so)", stacklevel=2)  # fmt: skip
        outputs = [t for t in pytree.tree_leaves(expected[0]) if isinstance(t, torch.Tensor)]
        with atomic_path(path) as tmp:
            try:
                export_onnx_file(gm, inputs, tmp, dynamic_batch=dynamic_batch, dynamic_sequence=dynamic_sequence,
                                 opset_version=opset_version, dynamic_shapes=dynamic_shapes, widen=len(checks) > 1,
                                 names=output_names(expected[0], _input_names(inputs)))  # fmt: skip
            except FxlrdError:
                raise
            except Exception as exc:  # noqa: BLE001  (torch.onnx's own error types)
                integers = any(not t.is_floating_point() and t.dim() >= 2 for t in _tensors(inputs))
                text = str(exc)
                if dynamic_shapes is None and dynamic_sequence and integers and _FIXED_SIZE.search(text) \
                        and re.search(r"(\.shape|\.size\(\))\[1\]", text):  # fmt: skip
                    raise _SizeFixed(exporter_failure(exc)[:160]) from exc
                raise ExportError(
                    f"torch.onnx could not export {type(gm).__name__} to ONNX ({exporter_failure(exc)}); {path} was not "
                    "written. An operation the exporter cannot convert is a limit of torch.onnx, not of the "
                    "decomposition: if the original model fails the same way (torch.onnx.export(model, ..., dynamo=True)), "
                    "run the compressed model in PyTorch (eager or torch.compile) instead; a shape it cannot take "
                    "dynamic may export with dynamic_batch=False / dynamic_sequence=False"
                ) from exc
            if opset_version is not None:
                written = _opset(tmp)
                if written != opset_version:
                    raise ConfigError(
                        f"opset_version={opset_version} was asked, but torch.onnx wrote opset {written} (it could not "
                        f"convert this model to {opset_version}); {path} was not written. Use opset {written}, or leave "
                        "opset_version unset"
                    )
            if check:
                try:
                    session = onnx_session(tmp)
                except Exception as exc:  # noqa: BLE001  (onnxruntime's own error types)
                    bf16 = any(p.dtype == torch.bfloat16 for p in gm.parameters())
                    hint = (" onnxruntime's CPU kernels do not take bfloat16: export gm.float() (or float16), or pass "
                            "check=False to write the file unchecked" if bf16 else " pass check=False to write the file "
                            "unchecked")  # fmt: skip
                    raise ExportMismatchError(f"onnxruntime cannot load the exported file: {type(exc).__name__}: "
                                              f"{str(exc)[:300]};{hint}; {path} was not written") from exc
                for shown, want in zip(checks, expected):
                    want = [t for t in pytree.tree_leaves(want) if isinstance(t, torch.Tensor)]
                    at = "" if shown is inputs else f" at {_shapes(shown)} (the dynamic sizes, beyond the example's 1)"
                    try:
                        got = session.run(None, onnx_feed(session, shown))
                    except Exception as exc:  # noqa: BLE001  (onnxruntime's own error types)
                        raise ExportMismatchError(f"onnxruntime cannot run the exported file{at}: "
                                                  f"{type(exc).__name__}: {str(exc)[:300]}; {path} was not written") from exc
                    if len(got) != len(want):
                        raise ExportMismatchError(
                            f"onnxruntime gives {len(got)} outputs, PyTorch {len(want)}{at}; {path} was not written"
                        )
                    for i, (g, e) in enumerate(zip(got, want)):
                        err = max_relative_error(g, e.detach().float().cpu().numpy())
                        tol = rtol if rtol is not None else (1e-2 if e.dtype in (torch.float16, torch.bfloat16) else 1e-4)
                        if not err <= tol:
                            raise ExportMismatchError(
                                f"onnxruntime output {i} differs from PyTorch{at}: relative error {err:.3g} > rtol "
                                f"{tol:g}; {path} was not written"
                            )
            if quantize is not None:
                from .quantize import quantize_onnx_file

                quantize_onnx_file(tmp, tmp, calibration, quantize, inputs=inputs if check else None, expected=outputs,
                                   label=path)  # fmt: skip
    return path


def _opset(path: str | os.PathLike) -> int | None:
    """The default-domain ONNX opset of the model file at ``path``."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


