"""Capture: an ``nn.Module`` becomes a ``torch.fx.GraphModule``, or a clear error says why not.

Two ways in, tried in this order by ``capture="auto"``:

- ``"fx"``: ``torch.fx.symbolic_trace`` (with fxlrd's tracer). Keeps the model's modules, so
  conv and linear layers are ``call_module`` nodes. Needs no example inputs.
- ``"export"``: ``torch.export.export(..., strict=False)`` on the example inputs, for models fx
  cannot trace (Hugging Face transformers and most models with Python control flow). Layers
  become ``aten`` calls on ``get_attr`` weights with the owners' qualified names; the batch
  dimension (and the sequence dimension of integer token inputs) is dynamic where the model
  allows. The result is a plain ``GraphModule`` called like the original: same argument
  names, keyword arguments, and the same output structure (a Hugging Face ``ModelOutput``
  stays one).

``nn.MultiheadAttention`` modules are first swapped for `fxlrd.attention.MultiheadAttention`
(same parameters, same results) so both capture modes see their projections as layers.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import io
import itertools
import logging
import os
import sys
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Iterator, Mapping, Sequence

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from .errors import CaptureError, ConfigError, FxlrdWarning, caller_stacklevel

__all__ = ["capture", "check_module", "Captured", "FxlrdTracer", "normalize_inputs", "flat_inputs", "CAPTURE_MODES",
           "input_signature", "inputs_from_signature"]  # fmt: skip

log = logging.getLogger("fxlrd")
_TORCH_DIR = os.path.dirname(torch.__file__)
_FXLRD_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep  # this package, not any folder named fxlrd
CAPTURE_MODES = ("auto", "fx", "export")
Args = tuple[tuple[Any, ...], dict[str, Any]]


def check_module(model: object, what: str = "model") -> nn.Module:
    """Raise a TypeError unless ``model`` is an ``nn.Module``."""
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"{what} must be a torch.nn.Module (or a torch.fx.GraphModule), got {type(model).__name__}; "
            "pass the model object itself, not its state_dict or a path"
        )
    return model


def normalize_inputs(example_inputs: Any) -> Args | None:
    """``(args, kwargs)`` from a tensor, a tuple/list of positional inputs or a dict of
    keyword inputs (None stays None)."""
    if example_inputs is None:
        return None
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    if isinstance(example_inputs, Mapping):
        if not all(isinstance(k, str) for k in example_inputs):
            raise TypeError("a dict of example_inputs must have the forward's argument names as keys")
        return (), dict(example_inputs)
    raise TypeError(
        "example_inputs must be a tensor, a tuple of positional inputs or a dict of keyword inputs, "
        f"got {type(example_inputs).__name__}"
    )


def _forward_signature(model: nn.Module) -> inspect.Signature | None:
    try:
        return inspect.signature(model.forward)
    except (TypeError, ValueError):  # pragma: no cover  (builtins)
        return None


def bind_inputs(model: nn.Module, inputs: Args) -> inspect.BoundArguments | None:
    """Check the inputs against ``model.forward``'s signature; a clear error if they do not fit."""
    sig = _forward_signature(model)
    if sig is None:
        return None
    args, kwargs = inputs
    try:
        return sig.bind(*args, **kwargs)
    except TypeError as exc:
        names = [n for n, p in sig.parameters.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        raise ConfigError(
            f"example_inputs do not fit {type(model).__name__}.forward({', '.join(names)}): {exc}. "
            "Pass a tensor, a tuple in the forward's order, or a dict keyed by its argument names"
        ) from exc


def flat_inputs(gm: fx.GraphModule, inputs: Args, what: str = "example_inputs") -> list[Any]:
    """The values of ``gm``'s placeholders, in order, for ``inputs`` given as the original
    model takes them (an export capture flattens them by its input spec). Inputs the graph
    does not take are an error, not dropped (``what``: how the user passed them)."""
    args, kwargs = inputs
    in_spec = getattr(gm, "_in_spec", None)
    if in_spec is not None:
        import torch.fx._pytree as fx_pytree

        with warnings.catch_warnings():  # torch's own pytree deprecation notices
            warnings.simplefilter("ignore", FutureWarning)
            bound = _bind_for_spec(gm, args, kwargs, what)
            return list(fx_pytree.tree_flatten_spec(bound, in_spec))
    everything = [n for n in gm.graph.nodes if n.op == "placeholder"]
    var_kw = next((n for n in everything if n.target.startswith("**")), None)
    var_pos = next((n for n in everything if n.target.startswith("*") and n is not var_kw), None)
    if var_kw is not None and var_kw.users:
        raise ConfigError(
            f"the model's forward reads its **{var_kw.target[2:]}, which a torch.fx capture cannot be given inputs "
            "through: name those inputs in forward's signature, or capture with capture='export'"
        )
    plain = [n for n in everything if not n.target.startswith("*")]
    if var_pos is not None:  # forward(self, x, *args): an Interpreter gives *args every remaining positional value
        before = plain[: everything.index(var_pos)]
        after = [n.target for n in plain[len(before) :] if n.target in kwargs]
        if after:
            raise ConfigError(
                f"{what} gives {after}, keyword-only inputs after the model's *{var_pos.target[1:]}, which a torch.fx "
                "capture cannot be given: leave them to their defaults, or capture with capture='export'"
            )
        values = _named_values(before, args[: len(before)], kwargs, what, check_extra=var_kw is None)
        return values + list(args[len(before) :])
    if len(args) > len(plain):  # (they were dropped, and the model ran on the first ones alone)
        raise ConfigError(
            f"{what} gives {len(args)} positional inputs; the model takes {len(plain)} "
            f"({', '.join(n.target for n in plain) or 'none'}): pass one batch as the model's forward takes it"
        )
    values = _named_values(plain, args[: len(plain)], kwargs, what, check_extra=var_kw is None)
    return values


def _named_values(placeholders: list[fx.Node], args: Sequence[Any], kwargs: Mapping[str, Any], what: str,
                  check_extra: bool) -> list[Any]:  # fmt: skip
    """The values of ``placeholders``: ``args`` by position, then by name from ``kwargs``, then
    their defaults. ``check_extra``: keyword inputs none of them takes are an error (a forward
    with ``**kwargs`` ignores them, and so do we)."""
    values: list[Any] = list(args)
    if check_extra:
        _no_extra(kwargs, [n.target for n in placeholders[len(values) :]], what)
    for n in placeholders[len(values) :]:
        if n.target in kwargs:
            values.append(kwargs[n.target])
        elif n.args:
            values.append(n.args[0])  # the default
        else:
            raise ConfigError(f"input {n.target!r} of the model is missing from {what}")
    return values


def padding_mask(inputs: Args) -> torch.Tensor | None:
    """The real-token positions of a text batch: its keyword ``attention_mask`` as a (batch,
    sequence) bool tensor (True: a real token, the Hugging Face convention); None when there is
    none (a mask passed positionally is not recognised)."""
    mask = inputs[1].get("attention_mask") if len(inputs) > 1 and isinstance(inputs[1], Mapping) else None
    return mask.detach() != 0 if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None


def placeholder_values(gm: fx.GraphModule, flat: Sequence[Any]) -> dict[fx.Node, Any]:
    """Each placeholder's value when ``gm`` runs on ``flat`` (from :func:`flat_inputs`), as an
    ``fx.Interpreter`` binds them: ``*args`` takes every remaining value, ``**kwargs`` none."""
    rest = iter(flat)
    out: dict[fx.Node, Any] = {}
    for n in gm.graph.nodes:
        if n.op != "placeholder":
            continue
        if n.target.startswith("**"):
            out[n] = {}
        elif n.target.startswith("*"):
            out[n] = list(rest)
        else:
            out[n] = next(rest, n.args[0] if n.args else None)
    return out


def _no_extra(kwargs: Mapping[str, Any], names: Sequence[str], what: str) -> None:
    extra = [k for k in kwargs if k not in names]
    if extra:
        raise ConfigError(
            f"{what} has inputs the captured model does not take: {extra} (it takes {list(names)}); leave them out, "
            "or capture the model with them in example_inputs"
        )


def _bind_for_spec(gm: fx.GraphModule, args: tuple, kwargs: dict, what: str = "example_inputs") -> tuple:
    """Arrange ``(args, kwargs)`` as the export capture's input spec expects them."""
    spec = gm._in_spec
    try:
        arg_spec, kw_spec = spec.children_specs if hasattr(spec, "children_specs") else spec.children()
        kw_names = list(kw_spec.context) if kw_spec.context is not None else []
    except Exception:  # noqa: BLE001  (an unusual spec: pass through as given)
        return (args, kwargs)
    n_args = arg_spec.num_children if hasattr(arg_spec, "num_children") else len(args)
    names = getattr(gm, "_fxlrd_arg_names", [])
    if len(args) > n_args:  # positional inputs the capture took by keyword
        kwargs = {**dict(zip(names[n_args:], args[n_args:])), **kwargs}
        args = args[:n_args]
    elif len(args) < n_args and all(n in kwargs for n in names[len(args) : n_args]):  # keyword inputs it took by position
        kwargs = dict(kwargs)
        args = (*args, *(kwargs.pop(n) for n in names[len(args) : n_args]))
    missing = [k for k in kw_names if k not in kwargs]
    if missing:
        raise ConfigError(f"inputs {missing} were given at capture and are missing from {what}; pass them as keyword inputs")
    _no_extra(kwargs, kw_names, what)
    return (args, {k: kwargs[k] for k in kw_names})


# -- the tracer --------------------------------------------------------------------------------
_TORCH_CONTAINERS = (nn.Transformer, nn.TransformerEncoder, nn.TransformerDecoder, nn.TransformerEncoderLayer,
                     nn.TransformerDecoderLayer)  # fmt: skip


class FxlrdTracer(fx.Tracer):
    """fx tracing with leaf modules chosen by type or qualified name.

    Also the tracer unpickling re-traces a GraphModule with: for an export capture it puts
    back the pytree calling convention (keyword inputs, ``ModelOutput`` results).
    """

    def __init__(self, leaf_modules: Sequence[type[nn.Module] | str] = (), **kwargs: Any):
        # check_size stays one node (its body branches on a size, which fx cannot trace)
        kwargs["autowrap_functions"] = (*kwargs.get("autowrap_functions", ()), check_size)
        super().__init__(**kwargs)
        # Buffers read in forward become get_attr nodes, not constants baked at trace time
        # (unpickling re-traces: a computation on a buffer must stay a computation).
        self.proxy_buffer_attributes = True
        self.leaf_types = tuple(t for t in leaf_modules if isinstance(t, type))
        self.leaf_names = {n for n in leaf_modules if isinstance(n, str)}

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaf_names or (self.leaf_types and isinstance(m, self.leaf_types)):
            return True
        if isinstance(m, _TORCH_CONTAINERS):  # torch.nn modules holding layers: traced into (fx's default keeps
            return False  # every torch.nn module whole, and their layers would be left out silently)
        return super().is_leaf_module(m, module_qualified_name)

    def trace(self, root, concrete_args=None):  # noqa: ANN001
        graph = super().trace(root, concrete_args)
        in_spec, out_spec = getattr(root, "_in_spec", None), getattr(root, "_out_spec", None)
        if in_spec is not None and out_spec is not None and isinstance(root, nn.Module):
            _restore_pytree_codegen(graph, in_spec, out_spec)
        return graph


def _restore_pytree_codegen(graph: fx.Graph, in_spec, out_spec) -> None:
    """After re-tracing generated pytree code, the output is the unflattened structure:
    flatten it again and let the graph's codegen unflatten it, as export made it."""
    from torch.fx.graph import _PyTreeCodeGen, _PyTreeInfo

    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    leaves = pytree.tree_leaves(output.args[0])
    output.args = (tuple(leaves),)
    names = [n.target for n in graph.nodes if n.op == "placeholder"]
    graph._codegen = _PyTreeCodeGen(_PyTreeInfo(names, in_spec, out_spec))


# -- errors ------------------------------------------------------------------------------------
def _user_frame(exc: BaseException) -> str:
    """The innermost frame of the failing trace that is not inside torch or fxlrd: the user's code."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith(_TORCH_DIR)]
    frames = [f for f in frames if not os.path.abspath(f.filename).startswith(_FXLRD_DIR)]
    if not frames:
        return ""
    f = frames[-1]
    return f"at {f.filename}:{f.lineno} in {f.name}: {(f.line or '').strip()}"


def _innermost(exc: BaseException) -> BaseException:
    root = exc
    while root.__cause__ is not None or (root.__context__ is not None and not root.__suppress_context__):
        root = root.__cause__ or root.__context__
    return root


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"[:400]


def inputs_error(model: nn.Module, inputs: Args, exc: BaseException, what: str = "example_inputs") -> ValueError:
    """The error for inputs the model cannot run (``what``: how the user passed them)."""
    frame = _user_frame(exc)
    verb = "do" if what.endswith("s") else "does"
    fixed = fixed_sizes(model, inputs)
    hint = "; ".join(f"input {name!r} has size {given} in dimension {dim}, where the capture fixed {size}"
                     for name, dim, size, given in fixed)  # fmt: skip
    fix = ("\nThe graph was captured at the example's sizes: capture with an example of these sizes, or with "
           "dynamic_shapes=... that make those dimensions dynamic") if fixed else \
        "\nPass inputs the model accepts, e.g. one real batch (right shapes and dtypes: token ids are int64)"  # fmt: skip
    return ValueError(
        f"{what} ({describe_inputs(inputs)}) {verb} not run through {type(model).__name__}: "
        f"{_one_line(_innermost(exc))}" + (f"\n  {frame}" if frame else "") + (f"\n{hint}" if hint else "") + fix
    )


def describe_inputs(inputs: Args) -> str:
    """``(args, kwargs)`` as dtypes and shapes, for messages: ``input_ids=int64[2, 8], ...``."""
    args, kwargs = inputs
    return ", ".join([f"{k}={_describe(v)}" for k, v in kwargs.items()] + [_describe(a) for a in args])


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"{str(value.dtype).replace('torch.', '')}{list(value.shape)}"
    return type(value).__name__


def _check_runs(model: nn.Module, inputs: Args, fx_error: BaseException | None = None) -> None:
    """Run the model once on fake copies of the inputs (no compute, nothing of the model
    changes); a model that cannot take them gets `inputs_error`. One that fails on fake
    tensors but runs on the real inputs (an operation whose fake kernel refuses what the real
    one takes) gets a `CaptureError` saying so, not a blame on the inputs."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    unsupported = []
    for name in ("DataDependentOutputException", "DynamicOutputShapeException", "UnsupportedOperatorException"):
        import torch._subclasses.fake_tensor as ft

        if hasattr(ft, name):
            unsupported.append(getattr(ft, name))
    try:
        from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

        unsupported.append(GuardOnDataDependentSymNode)
    except ImportError:  # pragma: no cover
        pass
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    args, kwargs = pytree.tree_map_only(torch.Tensor, mode.from_tensor, inputs)
    # A tensor a forward stores on its modules (a rotary embedding's frequencies, recomputed for
    # the length it sees) would be a fake tensor afterwards: each is put back as it was.
    saved = [(m, dict(vars(m)), dict(m._parameters), dict(m._buffers)) for m in model.modules()]
    failed: Exception | None = None
    try:
        with quiet_fake_tensors(), mode, torch.no_grad():
            model(*args, **kwargs)
    except tuple(unsupported):
        return  # fake tensors cannot say; capture will
    except Exception as exc:  # noqa: BLE001
        failed = exc
    finally:  # tensors put back (flags a forward sets, such as the swapped attention's cross_attention, stay)
        _put_back(saved)
    if failed is None:
        return
    real = _real_run_error(model, inputs)
    if real is None:
        raise CaptureError(_fake_message(model, fx_error, failed)) from failed
    raise inputs_error(model, inputs, real) from real


def _put_back(saved: list[tuple[nn.Module, dict, dict, dict]]) -> None:
    """The tensors of ``saved`` (module, attributes, parameters, buffers) put back in place."""
    for m, attributes, parameters, buffers in saved:
        for kept, now in ((attributes, vars(m)), (parameters, m._parameters), (buffers, m._buffers)):
            for key in [k for k, v in now.items() if isinstance(v, torch.Tensor) and kept.get(k) is not v]:
                if key in kept:
                    now[key] = kept[key]
                else:
                    del now[key]


@contextlib.contextmanager
def state_kept(model: nn.Module, inputs: Any = ()) -> Iterator[None]:
    """Run real forwards of ``model`` inside and have nothing of it change: its modules'
    modes, the tensors its forward stores on them, its buffers' values (batch-norm statistics)
    and the random state (CPU, and the CUDA devices of ``model`` and ``inputs``) are put back
    on exit. Objects among the inputs that a forward changes (a KV cache) are not."""
    modes = [(m, m.training) for m in model.modules()]
    saved = [(m, dict(vars(m)), dict(m._parameters), dict(m._buffers)) for m in model.modules()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    tensors = [*model.parameters(), *model.buffers(), *(t for t in pytree.tree_leaves(inputs) if isinstance(t, torch.Tensor))]
    cuda = sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=cuda), torch.no_grad():
            yield
    finally:
        _put_back(saved)
        for module, training in modes:
            module.training = training
        with torch.no_grad():
            for buffer, value in buffers:
                buffer.copy_(value)


def _real_run_error(model: nn.Module, inputs: Args) -> Exception | None:
    """What ``model`` raises on ``inputs``, None when it runs: a real forward without
    gradients (`state_kept`), run only after a fake run failed (it costs one forward)."""
    args, kwargs = inputs
    try:
        with state_kept(model, inputs):
            model(*args, **kwargs)
        return None
    except Exception as exc:  # noqa: BLE001  (any failure is the inputs' error)
        return exc


def _fake_message(model: nn.Module, fx_error: BaseException | None, exc: BaseException) -> str:
    """`_check_runs`'s message for a model that runs for real but not on fake tensors."""
    frame = _user_frame(exc)
    lines = [f"fxlrd could not capture {type(model).__name__}: it runs on the inputs given, but not on the fake "
             f"tensors torch.export traces it with: {_one_line(_innermost(exc))}" + (f"\n    {frame}" if frame else "")]  # fmt: skip
    if fx_error is not None:
        lines.append(f"torch.fx.symbolic_trace failed before it: {_one_line(fx_error)}")
    lines.append("An operation's fake (shape-only) kernel refuses what its real kernel takes, often a dtype. Ways out: "
                 "another implementation of that operation, or another dtype"
                 + (', or capture="fx" if the model traces.' if fx_error is None else "."))  # fmt: skip
    trace = "".join(traceback.format_exception(exc))
    return "\n".join(lines + (_experts_hint(model, "grouped_mm") if "grouped_mm" in trace else []))


@contextlib.contextmanager
def quiet_fake_tensors() -> Iterator[None]:
    """torch's fake tensors log a failing op's traceback as an error before raising: keep it
    off the terminal (fxlrd's error that follows says it in one line)."""
    fake_log = logging.getLogger("torch._subclasses.fake_tensor")
    level = fake_log.level
    fake_log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        fake_log.setLevel(level)


# -- capture -----------------------------------------------------------------------------------
@dataclass
class Captured:
    """A captured model: the graph, how it was captured and why."""

    gm: fx.GraphModule
    mode: str  # "fx" or "export"
    reason: str = ""
    notes: list[str] = field(default_factory=list)
    training: bool | None = None  # an export capture: the mode its graph was traced in
    dynamic_shapes_given: bool = False  # an export capture made with the caller's dynamic_shapes

    def record(self) -> dict[str, Any]:
        out = {"mode": self.mode, "reason": self.reason, "notes": list(self.notes)}
        if self.training is not None:
            out["training"] = self.training
        if self.dynamic_shapes_given:
            out["dynamic_shapes"] = "given"
        return out


def _trace_fx(model: nn.Module, leaf_modules: Sequence[type[nn.Module] | str]) -> fx.GraphModule:
    tracer = FxlrdTracer(leaf_modules)
    graph = tracer.trace(model)
    for node in graph.nodes:
        if node.op == "placeholder" and node.target.startswith("**") and node.users:
            raise CaptureError(
                f"forward reads its **{node.target[2:]}: a torch.fx graph cannot be given keyword inputs that "
                "forward's signature does not name"
            )
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def _is_tokens(value: Any) -> bool:
    """Integer (batch, sequence, ...) inputs: token ids and the like."""
    return isinstance(value, torch.Tensor) and value.dim() >= 2 and not value.is_floating_point() and value.dtype != torch.bool


def dynamic_spec(value: Any, batch: int | None, seqs: Collection[int]) -> Any:
    """Which dimensions of one input fxlrd asks torch.export to keep dynamic: the batch, and
    the sequence of token inputs and of the other (batch, sequence, ...) inputs beside them
    (masks of any dtype, embeddings): dimension 1 when it is one of the token lengths ``seqs``."""
    from torch.export import Dim

    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        return None
    spec = {}
    if batch is not None and value.shape[0] == batch:
        spec[0] = Dim.AUTO
    same_batch = batch is None or value.shape[0] == batch
    if value.dim() >= 2 and (_is_tokens(value) or (value.shape[1] in seqs and same_batch)):
        spec[1] = Dim.AUTO
    return spec or None


def _auto_dynamic_shapes(bound: inspect.BoundArguments, batch: int | None, seqs: Collection[int]) -> dict[str, Any]:
    spec = lambda v: dynamic_spec(v, batch, seqs)  # noqa: E731
    out = {}
    for name, value in bound.arguments.items():
        param = bound.signature.parameters[name]
        if param.kind == param.VAR_KEYWORD:
            out[name] = {k: pytree.tree_map(spec, v) for k, v in value.items()}
        elif param.kind == param.VAR_POSITIONAL:
            out[name] = tuple(pytree.tree_map(spec, v) for v in value)
        else:
            out[name] = pytree.tree_map(spec, value, is_leaf=lambda v: isinstance(v, torch.Tensor))
    return out


def _batch_size(inputs: Args) -> int | None:
    sizes = {t.shape[0] for t in pytree.tree_leaves(inputs) if isinstance(t, torch.Tensor) and t.dim() > 0}
    return sizes.pop() if len(sizes) == 1 else None


def sequence_lengths(inputs: Args) -> set[int]:
    """The sequence lengths of a text batch: dimension 1 of its token inputs (an
    encoder-decoder's two, a query's and a document's)."""
    return {t.shape[1] for t in pytree.tree_leaves(inputs) if _is_tokens(t)}


def _widen(inputs: Args, dim: int, size: int, batch: int | None) -> Args:
    """Export specializes dimensions of size 1: repeat ``dim`` of every input whose ``dim`` is
    1 (and whose batch is ``batch``) to 2, so that it stays dynamic."""

    def widen(t: torch.Tensor) -> torch.Tensor:
        if t.dim() <= dim or t.shape[dim] != size or (dim > 0 and batch is not None and t.shape[0] != batch):
            return t
        return t.expand(*t.shape[:dim], 2, *t.shape[dim + 1 :]).clone()

    return pytree.tree_map_only(torch.Tensor, widen, inputs)


def _static_dims(gm: fx.GraphModule, asked: Sequence[str]) -> list[str]:
    """Which of the ``asked`` dynamic dimensions ("batch", "sequence") no input of the
    exported graph kept symbolic (export specialized them: the graph runs at one size)."""
    from torch.fx.experimental.symbolic_shapes import is_concrete_int

    kept = {"batch": False, "sequence": False}
    for node in gm.graph.nodes:
        val = node.meta.get("val") if node.op == "placeholder" else None
        if isinstance(val, torch.Tensor):
            for d, key in ((0, "batch"), (1, "sequence")):
                if val.dim() > d and not is_concrete_int(val.shape[d]):
                    kept[key] = True
    return [key for key in asked if not kept[key]]


_aten = torch.ops.aten
_REGION_LAYER_OPS = {_aten.linear.default, _aten.conv1d.default, _aten.conv2d.default, _aten.conv3d.default,
                     _aten.conv1d.padding, _aten.conv2d.padding, _aten.conv3d.padding,
                     _aten.conv_transpose1d.default, _aten.conv_transpose2d.input, _aten.conv_transpose3d.input,
                     _aten.convolution.default, _aten.addmm.default, _aten.mm.default, _aten.matmul.default}  # fmt: skip


def training_ops(gm: fx.GraphModule) -> int:
    """Dropout and batch-norm operations an export graph runs in training mode (torch.export
    records the mode as an argument: the module's ``train()``/``eval()`` no longer reaches them)."""
    count = 0
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in (torch.ops.aten.dropout.default, torch.ops.aten.feature_dropout.default,
                           torch.ops.aten.alpha_dropout.default, torch.ops.aten.feature_alpha_dropout.default,
                           torch.ops.aten.dropout_.default, torch.ops.aten.feature_dropout_.default,
                           torch.ops.aten.alpha_dropout_.default, torch.ops.aten.feature_alpha_dropout_.default):  # fmt: skip
            train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train")
            count += bool(train) and node.args[1] != 0
        elif node.target is torch.ops.aten.batch_norm.default:
            count += bool(node.args[5] if len(node.args) > 5 else node.kwargs.get("training"))
    return count


def _layers_in_regions(gm: fx.GraphModule) -> int:
    """Linear/conv operations inside the subgraphs of higher-order operators (a
    ``torch.no_grad()`` or autocast region, a ``torch.cond`` branch) of an export graph:
    fxlrd's sites are the top-level graph's."""
    count = 0
    for node in gm.graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.HigherOrderOperator):
            continue
        for arg in node.args:
            sub = getattr(gm, arg.target, None) if isinstance(arg, fx.Node) and arg.op == "get_attr" else None
            if isinstance(sub, fx.GraphModule):
                count += sum(n.op == "call_function" and n.target in _REGION_LAYER_OPS for n in sub.graph.nodes)
    return count


@fx.node.has_side_effect  # kept by dead-code elimination though nothing reads its result
def check_size(x: torch.Tensor, dim: int, lower: int, upper: int | None, name: str) -> None:
    """Raise unless ``x.shape[dim]`` is in ``[lower, upper]``: the sizes an exported graph was
    specialized to (a branch on the size was taken at capture; another size would run it
    silently wrong). A node of captured graphs, in place of torch.export's own input guards."""
    if isinstance(x, fx.Proxy):  # traced by another tracer than fxlrd's (which keeps it a node): it stays a node
        x.tracer.create_proxy("call_function", check_size, (x, dim, lower, upper, name), {})
        return
    size = x.shape[dim]
    if size < lower or (upper is not None and size > upper):
        raise ValueError(
            f"input {name!r} has size {size} in dimension {dim}; this captured graph holds for {_size_range(lower, upper)} "
            "there (torch.export's bound: a branch the model took on that size at capture, or a limit of its own such "
            "as its position embeddings): run it at such sizes, or capture at the size you need (example_inputs, or "
            "dynamic_shapes=...)"
        )


def _size_range(lower: int, upper: int | None) -> str:
    if upper is None:
        return f"sizes of at least {lower}"
    return f"sizes of at most {upper}" if lower <= 2 else f"sizes {lower} to {upper}"


def _size_guards(gm: fx.GraphModule, ranges: Mapping[Any, Any]) -> list[str]:
    """Insert a `check_size` node for each input dimension whose range torch.export narrowed
    beyond the default (sizes of at least 2, unbounded; fxlrd's graphs also run at 1), and
    return notes naming them."""
    def finite(value: Any) -> int | None:
        if abs(value) == torch.utils._sympy.numbers.int_oo:
            return None
        try:
            return int(value)
        except (TypeError, ValueError, OverflowError):
            return None

    bounds = {}
    for symbol, r in ranges.items():
        lower, upper = finite(r.lower), finite(r.upper)
        lower = lower if lower is not None and lower > 2 else None
        if lower is not None or upper is not None:
            bounds[symbol] = (lower or 0, upper)
    notes = []
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    anchor = placeholders[-1] if placeholders else None
    for node in placeholders:
        val = node.meta.get("val")
        if anchor is None or not isinstance(val, torch.Tensor):
            continue
        for dim, size in enumerate(val.shape):
            expr = getattr(getattr(size, "node", None), "expr", None)
            if expr in bounds:
                lower, upper = bounds.pop(expr)
                with gm.graph.inserting_after(anchor):
                    anchor = gm.graph.call_function(check_size, (node, dim, lower, upper, node.name))
                notes.append(f"export bounded input {node.name!r} dimension {dim} to {_size_range(lower, upper)} (a "
                             "branch taken on it, or a limit of the model's): other sizes raise a clear error")  # fmt: skip
    return notes


def fixed_sizes(gm: nn.Module, inputs: Args | None = None) -> list[tuple[str, int, int, int | None]]:
    """The input dimensions an export capture fixed at the example's size: ``(input, dim,
    size, given)``, ``given`` the size in ``inputs`` (None without them); with ``inputs``, only
    the dimensions where they differ. fxlrd keeps such graphs running at other sizes (a CNN's
    convs are size-generic), so a size the graph cannot take fails inside it: this names why."""
    from torch.fx.experimental.symbolic_shapes import is_concrete_int

    graph = getattr(gm, "graph", None)
    if graph is None:
        return []
    values = None
    if inputs is not None:
        try:
            values = placeholder_values(gm, flat_inputs(gm, inputs, "inputs"))
        except Exception:  # noqa: BLE001  (inputs that do not bind: nothing to compare)
            return []
    out = []
    for node in graph.nodes:
        val = node.meta.get("val") if node.op == "placeholder" else None
        if not isinstance(val, torch.Tensor) or not any(not is_concrete_int(d) for d in val.shape[:1]):
            continue  # not an export capture's input (fx graphs record no symbolic batch)
        given = values.get(node) if values is not None else None
        for dim, size in enumerate(val.shape):
            if dim == 0 or not is_concrete_int(size):
                continue
            if values is None:
                out.append((node.name, dim, int(size), None))
            elif isinstance(given, torch.Tensor) and given.dim() > dim and given.shape[dim] != int(size):
                out.append((node.name, dim, int(size), int(given.shape[dim])))
    return out


def _fixed_size_notes(gm: fx.GraphModule) -> list[str]:
    """A note for the lengths export fixed in float inputs (an audio waveform's samples, an
    image's height and width; not channels or features), which users may expect to vary."""
    from .sites import find_sites

    read_by: dict[fx.Node, str] = {}  # an input a layer reads as it is: its features (linear) or channels (conv)
    for site in find_sites(gm).values():
        for n in site.nodes:
            x = site.input(n)
            if x is not None and x.op == "placeholder" and site.spec is not None:
                read_by.setdefault(x, site.spec.kind)
    by_input: dict[str, list[str]] = {}
    for name, dim, size, _ in fixed_sizes(gm):
        node = next(n for n in gm.graph.nodes if n.op == "placeholder" and n.name == name)
        val, reader = node.meta["val"], read_by.get(node)
        if reader == "conv":  # (batch, channels, length...)
            length = dim >= 2
        elif reader == "linear":  # (batch, ..., features)
            length = dim < val.dim() - 1
        else:  # a waveform (batch, samples); an image (batch, channels, height, width)
            length = val.dim() == 2 or 2 <= dim < val.dim() - (val.dim() == 3)
        if val.is_floating_point() and length:
            by_input.setdefault(name, []).append(f"{dim} ({size})")
    return [f"export fixed input {name!r} at the example's size in dimension {', '.join(dims)}: other sizes run only "
            "where the model's code does not depend on them (pass dynamic_shapes=... to make them dynamic)"
            for name, dims in by_input.items()]  # fmt: skip


def dynamic_export_inputs(model: nn.Module, inputs: Args) -> tuple[tuple, dict, Any, list[str]]:
    """``(args, kwargs, dynamic_shapes, asked)`` for ``torch.export.export`` with the batch and
    the token sequence dynamic (``asked``: which of the two). Export specializes dimensions of
    size 1, so a batch or sequence of 1 is widened to 2 first."""
    args, kwargs = inputs
    batch, seqs = _batch_size(inputs), sequence_lengths(inputs)
    if batch == 1:
        args, kwargs = _widen((args, kwargs), 0, 1, None)
        batch = 2
    if 1 in seqs:
        args, kwargs = _widen((args, kwargs), 1, 1, batch)
        seqs = (seqs - {1}) | {2}
    bound = bind_inputs(model, (args, kwargs))
    if bound is None:
        return args, kwargs, None, []
    asked = ["batch"] * (batch is not None) + ["sequence"] * bool(seqs)
    return args, kwargs, _auto_dynamic_shapes(bound, batch, seqs), asked


def _torch_export(model: nn.Module, args: tuple, kwargs: Mapping[str, Any], dynamic_shapes: Any = None) -> Any:
    """``torch.export.export(strict=False)``, without the partial graph torch prints to stderr when it fails (a
    data-dependent guard: dozens of lines, twice per attempt; fxlrd's `CaptureError` names the file and line, and
    the graph stays on the exception as ``partial_fx_graph``). Anything else written to stderr is passed on."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stderr(buffer):
            return torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)
    except BaseException as exc:
        graph = getattr(exc, "partial_fx_graph", None)
        text = buffer.getvalue()
        buffer = io.StringIO(text.replace(f"{graph}\n", "") if graph is not None else text)
        raise
    finally:
        sys.stderr.write(buffer.getvalue())


def _same_outputs(model: nn.Module, gm: fx.GraphModule, inputs: Args) -> bool:
    """Whether ``gm`` computes what ``model`` does on ``inputs`` (float outputs within 1e-4 of
    their scale; True when the outputs cannot be compared, or ``model`` is training: dropout)."""
    if model.training:
        return True

    def run(fn: Callable) -> list[torch.Tensor]:
        # on copies of the inputs (a model that writes to its input in place saw the first call's result, and the
        # user's example was changed), and from one random state (a model sampling noise in eval mode differed)
        args, kwargs = pytree.tree_map_only(torch.Tensor, torch.clone, inputs)
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return [t for t in pytree.tree_leaves(fn(*args, **kwargs)) if isinstance(t, torch.Tensor)]

    try:
        with torch.no_grad():
            want, got = run(model), run(gm)
    except Exception:  # noqa: BLE001  (a graph that does not run at the example's size fails there, with its own error)
        return True
    if len(want) != len(got):
        return True
    for w, g in zip(want, got):
        if w.shape != g.shape:
            return False
        if w.is_floating_point() and w.numel():
            scale = float(w.abs().max()) if bool(w.isfinite().all()) else 0.0
            if not torch.allclose(g.to(w.dtype), w, rtol=1e-4, atol=1e-4 * scale + 1e-6, equal_nan=True):
                return False
        elif not w.is_floating_point() and not torch.equal(g, w):
            return False
    return True


def _export(model: nn.Module, inputs: Args, dynamic_shapes: Any, widen: bool = True) -> tuple[fx.GraphModule, list[str]]:
    notes: list[str] = []
    args, kwargs = inputs
    bound = bind_inputs(model, inputs)
    automatic = dynamic_shapes is None and bound is not None and widen
    asked: list[str] = []
    if automatic:
        args, kwargs, dynamic_shapes, asked = dynamic_export_inputs(model, inputs)
    without_cache = False
    try:
        ep = _torch_export(model, args, kwargs, dynamic_shapes=dynamic_shapes)
    except Exception as exc:  # noqa: BLE001
        configs = {id(c): c for m in model.modules() if getattr(c := getattr(m, "config", None), "use_cache", False)}
        if _is_cache_output_error(exc) and configs:
            for config in configs.values():  # the model's and its parts' own (T5's decoder holds a copy)
                config.use_cache = False
            notes.append("config.use_cache set to False on the captured copy (a KV cache in the output cannot be exported)")
            without_cache = True  # exported again below: a failure then is reported as its own, not as the cache's
        elif automatic:  # fxlrd's guess at the dynamic dimensions did not export (torch rejects some, e.g. in **kwargs)
            try:
                ep = _torch_export(model, *inputs)
            except Exception:  # noqa: BLE001  (report the first failure: static shapes were only a fallback)
                raise exc from None
            notes.append(f"captured with static shapes: export with a dynamic batch failed ({_one_line(exc)}); "
                         "the graph may only run at the example_inputs' shapes, pass dynamic_shapes=... for others")  # fmt: skip
        else:
            raise
    if without_cache:
        ep = _torch_export(model, args, kwargs, dynamic_shapes=dynamic_shapes)
    exported = ep.module()
    graph = exported.graph
    static = _static_dims(exported, asked) if automatic and not any("static shapes" in n for n in notes) else []
    if static:
        notes.append(f"export fixed the {' and '.join(static)} size to the example's: the graph runs at that size only "
                     "(pass dynamic_shapes=... to choose)")  # fmt: skip
    for node in list(graph.nodes):  # input guards of the exported program: shapes are checked by the ops themselves,
        if node.op == "call_module" and node.target == "_guards_fn":  # and sizes it specialized by check_size nodes
            graph.erase_node(node)
    gm = fx.GraphModule(exported, graph, type(model).__name__)
    notes += _size_guards(gm, ep.range_constraints) + _fixed_size_notes(gm)
    trained = training_ops(gm)
    if trained:
        message = (f"captured with torch.export in training mode: {trained} dropout/batch-norm operations run as in "
                   "training in this graph (gm.eval() does not change them; ONNX export refuses it): capture "
                   "model.eval() for inference or export, train()-mode only to fine-tune the graph as it is")  # fmt: skip
        notes.append(message)
        warnings.warn(message, FxlrdWarning, stacklevel=4)
    from .sites import computed_weight_layers

    computed = computed_weight_layers(gm)
    if computed:
        notes.append(f"{computed} linear/conv operations compute their weight in the graph (a parametrization such as "
                     "weight_norm): they are not decomposed, nor listed in the plan (a torch.fx capture decomposes them, where fx can trace the model)")  # fmt: skip
    hidden = _layers_in_regions(gm)
    if hidden:
        notes.append(f"{hidden} linear/conv operations run inside torch.no_grad(), autocast or torch.cond regions of the "
                     "export graph: they are not decomposed, nor listed in the plan")  # fmt: skip
    removed, moved = _follow_module_device(gm, _device_of(model, inputs))
    if removed or moved:
        notes.append(f"torch.export's device constants follow the module: {removed} metadata checks removed, "
                     f"{moved} operations read the module's device")  # fmt: skip
    gm._tracer_cls = FxlrdTracer  # what unpickling re-traces with (export's own tracer cannot be rebuilt)
    gm._tracer_extras = {}
    if bound is not None:
        gm._fxlrd_arg_names = [n for n in bound.signature.parameters]
    gm.graph.eliminate_dead_code()
    gm.recompile()
    gm.train(model.training)  # the flag only (the graph ran as the model's mode was at capture), as the model says
    widened = automatic and _shapes_of((args, kwargs)) != _shapes_of(inputs)
    if widened and not _same_outputs(model, gm, inputs):  # a branch on the size: the graph took the size-2 side
        gm, again = _export(model, inputs, None, widen=False)
        kept = [n for n in notes if n.startswith("config.use_cache")]  # done to the copy: still true
        return gm, kept + again
    if not widen and dynamic_shapes is None and bound is not None:
        sizes = " and ".join(["batch"] * (_batch_size(inputs) == 1) + ["sequence"] * (1 in sequence_lengths(inputs)))
        what = f"{sizes} of 1" if sizes else "shapes"
        notes.append(f"{STATIC_AT_ONE} {what}, with static shapes: exported at 2 (torch.export fixes sizes of 1), the "
                     "graph computed something else at 1 (the model branches on that size); it runs at the example's "
                     "shapes only, pass dynamic_shapes=... (or an example of another size) for others")  # fmt: skip
    return gm, notes


STATIC_AT_ONE = "captured at the example's"  # how a capture note says the graph was captured again at size 1


def widens(record: Mapping[str, Any]) -> bool:
    """Whether a capture made again from ``record`` (a plan's) may export a size of 1 at 2, as
    its first capture did: not when that capture found the model branching on the size."""
    return not any(str(n).startswith(STATIC_AT_ONE) for n in record.get("notes") or ())


def _shapes_of(inputs: Args) -> list[tuple[int, ...]]:
    return [tuple(t.shape) for t in pytree.tree_leaves(inputs) if isinstance(t, torch.Tensor)]


DEVICE_ANCHOR = "_fxlrd_device"


class DeviceAnchor(nn.Module):
    """An empty buffer that moves with the module holding it: where an exported graph reads
    its device at run time. A child module of its own, so that copying or pickling the
    GraphModule keeps the buffer out of the state dict (fx re-registers top-level buffers as
    persistent, but copies child modules whole)."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.register_buffer("anchor", torch.empty(0, device=device), persistent=False)


def _device_of(model: nn.Module, inputs: Args) -> torch.device:
    """The device the model was captured on: its parameters' (else its inputs', else the CPU)."""
    for t in itertools.chain(model.parameters(), model.buffers(), pytree.tree_leaves(inputs)):
        if isinstance(t, torch.Tensor):
            return t.device
    return torch.device("cpu")


def _same_device(value: object, device: torch.device) -> bool:
    """Whether ``value`` is a device naming ``device`` (``cuda`` matches ``cuda:0``)."""
    if not isinstance(value, torch.device) or value.type != device.type:
        return False
    return value.index is None or device.index is None or value.index == device.index


def _follow_module_device(gm: fx.GraphModule, device: torch.device) -> tuple[int, int]:
    """Make an exported graph run wherever its module is moved.

    torch.export records the device it ran on as constants: ``arange(..., device=cpu)``,
    ``to(x, cpu)`` and ``_assert_tensor_metadata(x, device=cpu, dtype=...)``, so that a captured
    model moved with ``.to("cuda")`` fails with "Tensor device mismatch". The metadata checks
    are removed (they pin the dtype too); every other argument naming the capture device
    reads ``_fxlrd_device.anchor.device`` at run time instead (`DeviceAnchor`). Dtypes the
    graph casts to stay as recorded. Only the top-level graph is rewritten.

    Returns:
        The metadata checks removed and the nodes whose device now follows the module.
    """
    graph, removed, moved, device_node = gm.graph, 0, 0, None
    assert_metadata = getattr(torch.ops.aten, "_assert_tensor_metadata", None)
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if assert_metadata is not None and node.target is assert_metadata.default and not node.users:
            graph.erase_node(node)
            removed += 1
            continue
        if not any(_same_device(v, device) for v in (*node.args, *node.kwargs.values())):
            continue
        if device_node is None:
            gm.add_submodule(DEVICE_ANCHOR, DeviceAnchor(device))
            first = next(n for n in graph.nodes if n.op != "placeholder")
            with graph.inserting_before(first):
                device_node = graph.call_function(getattr, (graph.get_attr(f"{DEVICE_ANCHOR}.anchor"), "device"))
        node.args = tuple(device_node if _same_device(a, device) else a for a in node.args)
        node.kwargs = {k: device_node if _same_device(v, device) else v for k, v in node.kwargs.items()}
        moved += 1
    return removed, moved


def _is_cache_output_error(exc: BaseException) -> bool:
    text = str(exc)
    return "Cache" in text and "not a known type" in text


def capture(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    inputs: Args | None = None,
    mode: str = "auto",
    leaf_modules: Sequence[type[nn.Module] | str] = (),
    dynamic_shapes: Any = None,
    attention: str = "packed",
    copy_model: bool = True,
    training: bool | None = None,
    widen: bool = True,
) -> Captured:
    """Capture ``model`` as a ``GraphModule`` (see the module docstring).

    Args:
        model: the model; an already captured ``GraphModule`` is taken as it is.
        example_inputs: a tensor, a tuple of positional inputs or a dict of keyword inputs;
            needed for ``"export"`` (and for ``"auto"`` when fx fails).
        inputs: the example inputs already as ``(args, kwargs)`` (instead of ``example_inputs``).
        mode: ``"auto"``, ``"fx"`` or ``"export"``.
        leaf_modules: module types or qualified names fx keeps opaque.
        dynamic_shapes: passed to ``torch.export.export`` (default: dynamic batch and sequence).
        attention: how ``nn.MultiheadAttention`` projections become layers: ``"packed"`` (one
            q/k/v projection) or ``"separate"`` (q, k and v each); see `fxlrd.attention`.
        copy_model: capture a deep copy, so the result shares no module with ``model``.
        training: capture the copy in this mode (torch.export bakes the mode into the graph:
            dropout and batch norm run as they did at capture); None: the model's own.
        widen: torch.export: a batch or sequence of 1 is exported at 2 and checked at 1
            (False: captured at 1 with static shapes, as a plan recording that check's failure says).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: the example inputs do not run through the model.
        CaptureError: the model cannot be captured; the message names each failure, the
            user's code that failed, and the ways out.
    """
    from .attention import separate_cross_attention, swap_attention

    check_module(model)
    if mode not in CAPTURE_MODES:
        raise ConfigError(f"capture must be one of {CAPTURE_MODES}, got {mode!r}")
    if inputs is None:
        inputs = normalize_inputs(example_inputs)
    if isinstance(model, fx.GraphModule):
        gm = copy.deepcopy(model) if copy_model else model
        previous = getattr(model, "fxlrd_capture", None) or {}
        return Captured(gm, previous.get("mode", "fx"), "already a GraphModule")
    names = dict(model.named_modules(remove_duplicate=False))  # (a module under each of its names)
    unknown = [n for n in leaf_modules if isinstance(n, str) and n not in names]
    if unknown:
        raise ConfigError(
            f"leaf_modules: {unknown[0]!r} is no submodule of this {type(model).__name__}: give qualified names as "
            "model.named_modules() lists them (e.g. 'encoder.layer.0'), or module types (the class itself, not its name)"
        )
    # fx names a module registered twice by its first name only: a leaf given by another is that one
    first = {id(m): n for n, m in reversed(list(names.items()))}
    leaf_modules = [first[id(names[n])] if isinstance(n, str) else n for n in leaf_modules]
    if dynamic_shapes is not None and mode == "fx":
        warnings.warn("dynamic_shapes apply to torch.export; capture='fx' traces no shapes (the graph runs at any size "
                      "the model does): they are ignored", FxlrdWarning, stacklevel=caller_stacklevel())  # fmt: skip
    if leaf_modules and mode == "export":
        warnings.warn("leaf_modules apply to fx tracing; capture='export' traces into every module (they are ignored)",
                      FxlrdWarning, stacklevel=caller_stacklevel())  # fmt: skip
    if inputs is not None:
        bind_inputs(model, inputs)
    elif mode == "export":
        raise ConfigError(
            "capture='export' needs example_inputs=... (a tensor, tuple or dict of one batch): torch.export runs the model"
        )
    original = model
    folded = 0
    if copy_model:
        model = _deepcopy(model)
        folded = _fold_weight_norms(model)
        if training is not None:
            model.train(training)
    nested = [n for n, m in model.named_modules() if isinstance(m, nn.TransformerEncoder) and getattr(m, "use_nested_tensor", False)]
    swapped = swap_attention(model, attention)
    notes = [f"{swapped} nn.MultiheadAttention swapped for fxlrd.attention.MultiheadAttention ({attention})"] if swapped else []
    if swapped and nested:
        notes.append(
            f"nn.TransformerEncoder {', '.join(repr(n) for n in nested)} runs without nested tensors: with a "
            "src_key_padding_mask its outputs at padded positions are computed, as in training mode, torch.compile and "
            "torch.export, where eager inference without gradients returns zeros there; pool over the real tokens"
        )
    if folded:
        notes.append(f"{folded} torch.nn.utils.weight_norm/spectral_norm hooks folded into their layers' weights on the captured copy")
    captured = _capture_once(model, original, inputs, mode, leaf_modules, dynamic_shapes, notes, widen)
    crossed = separate_cross_attention(model) if swapped else 0
    if crossed:  # the packed layout's cross-attention projections are no sites: capture them separate
        notes.append(f"{crossed} of them ran as cross-attention: captured with separate q/k/v projections")
        captured = _capture_once(model, original, inputs, mode, leaf_modules, dynamic_shapes, notes, widen)
    return captured


def _capture_once(model: nn.Module, original: nn.Module, inputs: Args | None, mode: str,
                  leaf_modules: Sequence[type[nn.Module] | str], dynamic_shapes: Any, notes: list[str],
                  widen: bool = True) -> Captured:  # fmt: skip
    """`capture`'s fx, then export, attempt on the prepared ``model``."""
    fx_error: BaseException | None = None
    if mode in ("auto", "fx"):
        try:
            gm = _trace_fx(model, leaf_modules)
            _keep_non_persistent(original, gm)
        except Exception as exc:  # noqa: BLE001  (any tracing failure is reported the same way)
            fx_error = exc
            if mode == "fx":
                raise CaptureError(_fx_message(model, exc)) from exc
        else:  # (notes outside the try: a warning turned into an error is not a tracing failure)
            return Captured(gm, "fx", "symbolic_trace succeeded",
                            notes + _unused_parameters(model, gm) + _unseen_layers(model, gm)
                            + _stacked_weights(model, gm))  # fmt: skip
    if inputs is None:
        raise CaptureError(
            _fx_message(model, fx_error)
            + "\nWith example_inputs=... (a tensor, tuple or dict of one batch) fxlrd captures it with torch.export instead."
        ) from fx_error
    _check_runs(model, inputs, fx_error)
    try:
        with warnings.catch_warnings():  # torch's own pytree deprecation notices
            warnings.simplefilter("ignore", FutureWarning)
            gm, export_notes = _export(model, inputs, dynamic_shapes, widen)
    except Exception as exc:  # noqa: BLE001
        raise CaptureError(_both_message(model, fx_error, exc)) from exc
    _keep_non_persistent(original, gm)
    reason = "requested" if mode == "export" else f"symbolic_trace failed ({_one_line(fx_error)})"
    log.info("fxlrd: captured %s with torch.export: %s", type(model).__name__, reason)
    return Captured(gm, "export", reason, notes + export_notes + _unused_parameters(model, gm) + _unseen_layers(model, gm)
                    + _stacked_weights(model, gm),
                    training=model.training,
                    dynamic_shapes_given=dynamic_shapes is not None)


def _deepcopy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model``. Tensors a hook computed from parameters (the hook-based
    ``weight_norm`` sets ``module.weight`` so; torch cannot deepcopy a tensor with a history)
    are copied detached."""
    memo: dict[int, Any] = {}
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, torch.Tensor) and value.grad_fn is not None:
                memo[id(value)] = value.detach().clone()
    return copy.deepcopy(model, memo)


def _fold_weight_norms(model: nn.Module) -> int:
    """Remove the hook-based ``torch.nn.utils.weight_norm`` and ``spectral_norm`` from
    ``model`` (a copy), each weight computed once (from ``weight_g`` and ``weight_v``; from
    ``weight_orig`` and the stored singular vectors, as in eval mode): the layer then holds its
    weight as a parameter, as fxlrd decomposes it. Otherwise the graph would read the plain
    ``weight`` attribute the hook last wrote (stale, or the raw weight before any forward).
    Returns how many were folded."""
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    count = 0
    for module in model.modules():
        for hook in [h for h in module._forward_pre_hooks.values() if isinstance(h, (WeightNorm, SpectralNorm))]:
            sources = ("_g", "_v") if isinstance(hook, WeightNorm) else ("_orig",)
            trainable = any(getattr(module, hook.name + s).requires_grad for s in sources)  # a frozen layer stays so
            with torch.no_grad():
                if isinstance(hook, WeightNorm):
                    torch.nn.utils.remove_weight_norm(module, hook.name)
                else:
                    torch.nn.utils.remove_spectral_norm(module, hook.name)
            getattr(module, hook.name).requires_grad_(trainable)
            count += 1
    return count


def warn_dynamic_shapes(recorded: Mapping[str, Any], given: Any, how: str) -> None:
    """Warn when a capture is made again without the ``dynamic_shapes`` its record says the
    original capture was given: the graph then gets fxlrd's own guess (batch, token sequence)."""
    if recorded.get("mode") == "export" and recorded.get("dynamic_shapes") == "given" and given is None:
        from .errors import FxlrdWarning

        warnings.warn(f"the model was captured with dynamic_shapes=... of its own, which a plan does not record: pass "
                      f"them again ({how}), or the graph has fxlrd's dynamic batch and token sequence only",
                      FxlrdWarning, stacklevel=3)  # fmt: skip


def _unseen_layers(model: nn.Module, gm: fx.GraphModule) -> list[str]:
    """A note, and a warning, when Linear/conv modules' weights are read by operations that are
    not layer sites (`fxlrd.sites.unseen_layers`): those layers are kept whole."""
    from .sites import unseen_layers

    unseen = unseen_layers(model, gm)
    if not unseen:
        return []
    shown = ", ".join(f"{path} (read by {op})" for path, op in unseen[:3]) + (", ..." if len(unseen) > 3 else "")
    which = "1 Linear/conv module's weight is" if len(unseen) == 1 else f"{len(unseen)} Linear/conv modules' weights are"
    message = (f"{which} read by operations fxlrd does not take as layers: {shown}; kept whole. To decompose such a "
               "layer, compute it with F.linear / F.conv*d, an nn.Linear/nn.Conv*d forward, or x @ W.T")  # fmt: skip
    warnings.warn(message, FxlrdWarning, stacklevel=caller_stacklevel())
    return [message]


def _stacked_weights(model: nn.Module, gm: fx.GraphModule) -> list[str]:
    """A note, and a warning, when the graph computes with 3-D weights (a mixture of experts'
    stacked expert matrices, `fxlrd.sites.stacked_weights`) read in a way `fxlrd.experts`
    cannot factorize (anything but ``bmm(P[ids], x)`` or ``grouped_mm(x, P, offs)``): fxlrd keeps them whole."""
    from .experts import find_stacked

    stacked = [s for s in find_stacked(model, gm).values() if s.reason]
    if not stacked:
        return []
    n = sum(s.shape[0] * s.shape[1] * s.shape[2] for s in stacked)
    total = max(sum(p.numel() for p in gm.parameters()), 1)
    shown = ", ".join(f"{s.path} ({'×'.join(map(str, s.shape))})" for s in stacked[:2]) + (", ..." if len(stacked) > 2 else "")
    share = f"{100 * n / total:.0f}%" if n >= total / 100 else "under 1%"
    message = (f"{len(stacked)} stacked 3-D weight{'s' if len(stacked) > 1 else ''} (matrices stacked in one tensor, as a "
               f"mixture of experts holds its experts: {shown}) hold{'s' if len(stacked) == 1 else ''} {n} parameters, {share} of the model, "
               f"read in a way fxlrd cannot factorize ({stacked[0].path}: {stacked[0].reason}; fxlrd factorizes "
               "torch.bmm(P[ids], x) and grouped_mm(x, P, offs), transformers' 'batched_mm' and 'grouped_mm' experts), so they "
               "are kept whole and "
               "the model shrinks less than its layers' ratio says")  # fmt: skip
    warnings.warn(message, FxlrdWarning, stacklevel=caller_stacklevel())
    return [message]


def _unused_parameters(model: nn.Module, gm: fx.GraphModule) -> list[str]:
    """A note when the graph holds fewer parameters than the model: modules its forward never
    calls (an auxiliary head) are not in a capture, so neither in the result nor its counts."""
    kept = {id(p) for p in gm.parameters()}
    kept_names = {name for name, _ in gm.named_parameters(remove_duplicate=False)}
    lost = [(name, p) for name, p in model.named_parameters() if id(p) not in kept and name not in kept_names]
    if not lost:
        return []
    owners = list(dict.fromkeys(name.rpartition(".")[0] or name for name, _ in lost))
    n = sum(p.numel() for _, p in lost)
    return [f"{n} parameters the forward never uses are not in the captured model (in {', '.join(owners[:3])}"
            f"{', ...' if len(owners) > 3 else ''}): neither in the result nor in its parameter counts"]


def _keep_non_persistent(model: nn.Module, gm: fx.GraphModule) -> None:
    """Buffers the model keeps out of its state dict (``persistent=False``) stay out of the
    captured one (GraphModule re-registers the buffers it reads as persistent)."""
    for owner_name, owner in model.named_modules():
        for leaf in owner._non_persistent_buffers_set:
            path = f"{owner_name}.{leaf}" if owner_name else leaf
            holder_name, _, name = path.rpartition(".")
            try:
                holder = gm.get_submodule(holder_name) if holder_name else gm
            except AttributeError:
                continue
            if name in holder._buffers:
                holder._non_persistent_buffers_set.add(name)


def _fx_message(model: nn.Module, exc: BaseException | None) -> str:
    frame = _user_frame(exc) if exc is not None else ""
    return (
        f"torch.fx could not trace {type(model).__name__}: {_one_line(exc) if exc else ''}"
        + (f"\n  {frame}" if frame else "")
        + "\nWays out: mark the submodule holding that code as a leaf, LRDConfig(leaf_modules=[TheSubmoduleType or "
        "'its.qualified.name']) (layers inside a leaf are not decomposed), make the code traceable (no Python "
        "control flow on tensor values), or capture with torch.export (capture='export' with example_inputs)."
    )


def _both_message(model: nn.Module, fx_error: BaseException | None, export_error: BaseException) -> str:
    lines = [f"fxlrd could not capture {type(model).__name__}:"]
    if fx_error is not None:
        frame = _user_frame(fx_error)
        lines.append(f"- torch.fx.symbolic_trace: {_one_line(fx_error)}" + (f"\n    {frame}" if frame else ""))
    frame = _user_frame(export_error)
    lines.append(f"- torch.export.export(strict=False): {_one_line(_innermost(export_error))}" + (f"\n    {frame}" if frame else ""))
    lines.append(
        "Ways out: make the failing code traceable (torch.cond or plain tensor ops instead of Python `if` on tensor "
        "values), mark the submodule holding it as a leaf for fx (LRDConfig(leaf_modules=[...]); its layers are then "
        "kept), or pass dynamic_shapes=... / other example_inputs if export failed on shapes."
    )
    return "\n".join(lines + _experts_hint(model, "eager"))


def _experts_hint(model: nn.Module, failing: str) -> list[str]:
    """The way out for a transformers mixture of experts whose ``experts_implementation`` is
    ``failing`` (``"eager"``: a Python loop over the experts hit; ``"grouped_mm"``: an
    operation whose fake kernel takes bfloat16 only in torch 2.13); [] for other models."""
    if getattr(getattr(model, "config", None), "_experts_implementation", None) != failing:
        return []  # (transformers sets "eager" on every model without grouped_mm experts: the modules tell)
    if not any("Expert" in type(m).__name__ for m in model.modules()):
        return []
    how = ("a Python loop over the experts its tokens are routed to" if failing == "eager"
           else "transformers' grouped_mm")  # fmt: skip
    return [f'Its mixture of experts runs {how} (experts_implementation="{failing}"), which export cannot trace: '
            'build the model with experts_implementation="batched_mm" (from_pretrained / from_config; on the '
            "command line, with a package.module:factory that does), which it can"
            + (", or cast it to bfloat16, where export traces grouped_mm." if failing == "grouped_mm" else ".")]


# -- input signatures (save/load, plans) ----------------------------------------------------------
def input_signature(inputs: Args | None) -> dict[str, Any] | None:
    """The example inputs' structure, shapes and dtypes, as JSON-ready data."""
    if inputs is None:
        return None

    def one(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return {"shape": list(value.shape), "dtype": str(value.dtype).replace("torch.", "")}
        if isinstance(value, (bool, int, float, str)) or value is None:
            return {"value": value}
        raise TypeError(f"example input of type {type(value).__name__} cannot be recorded")

    args, kwargs = inputs
    try:
        return {"args": [pytree.tree_map(one, a) for a in args], "kwargs": {k: pytree.tree_map(one, v) for k, v in kwargs.items()}}
    except TypeError:
        return None


def inputs_from_signature(signature: Mapping[str, Any]) -> Args:
    """Example inputs (zeros) of a recorded `input_signature`."""

    def leaf(d: Any) -> bool:
        return isinstance(d, dict) and ("shape" in d or "value" in d)

    def make(d: Any) -> Any:
        if "value" in d:
            return d["value"]
        return torch.zeros(d["shape"], dtype=getattr(torch, d["dtype"]))

    args = tuple(pytree.tree_map(make, a, is_leaf=leaf) for a in signature.get("args", []))
    kwargs = {k: pytree.tree_map(make, v, is_leaf=leaf) for k, v in signature.get("kwargs", {}).items()}
    return args, kwargs
