"""Calibration: per-site input statistics streamed over calibration data, and the
sequential (error-compensating) fit.

Data-free decomposition minimises the weight error ‖W − W′‖. What a user loses is the
output error on their data, ‖(W − W′)X‖. That needs only the input Gram matrix of each site,
``G = Σ x xᵀ`` (C×C, float64), and a sample count — never the activations themselves — so
calibration streams batch by batch with memory bounded by the Gram matrices:

- Linear: ``x`` is each input row (all leading dimensions are samples).
- 1×1 conv: each input position the conv reads (a strided 1×1 conv reads every s-th one).
- k×k conv: the input-channel Gram over all positions. The exact Gram of a k×k conv is over
  unfolded patches (C·k² × C·k²: 170 MB per 512-channel 3×3 layer in float64); the channel
  Gram is what whitening the *input mode* of Tucker-2 and CP needs, since their first factor
  is a 1×1 projection of the channels. It treats positions within a patch as uncorrelated:
  an approximation for the core, exact for the input projection.

Sites reading the same input (q, k and v) share one set of statistics.

`sequential_factors` goes further (SVD-LLM's local update, AA-SVD's anchored objective):
layers are fitted in graph order, each to the inputs ``X̃`` that the already-compressed layers
before it produce, so that it maps them to the *original* layer's outputs ``W X``. With
``G̃ = X̃X̃ᵀ`` and ``C = X X̃ᵀ`` the best full-rank map is ``W* = W C G̃⁻¹`` (least squares), and
``‖WX − W′X̃‖² = ‖WX − W*X̃‖² + ‖(W* − W′)X̃‖²``, so the whitened truncation of ``W*`` under
``G̃`` is the exact optimum: the closed-form refit and the whitening in one step.
"""

from __future__ import annotations

import operator
import os
import re
import sys
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.utils import _pytree as pytree

from .capture import Args, flat_inputs, inputs_error, normalize_inputs, padding_mask, placeholder_values
from .config import check_sensitivity
from .decompose import Whitening, whitening
from .errors import ConfigError
from .modes import saved_modes
from .sites import Site, find_sites, tensor_index

__all__ = ["InputStats", "SiteStats", "collect_stats", "kl_outputs", "sequential_factors", "all_reduce_stats"]


@dataclass
class InputStats:
    """Streamed second moments of one site's input: ``gram = Σ x xᵀ`` over ``count`` samples.

    ``total = Σ x`` (the mean's numerator). ``cross = Σ x x̃ᵀ`` pairs the original model's
    input ``x`` with the compressed model's ``x̃`` (sequential calibration only).
    """

    gram: torch.Tensor
    count: int = 0
    cross: torch.Tensor | None = None
    total: torch.Tensor | None = None
    shrink: bool = True  # regularize by `shrinkage` (False: the plain sample second moments)
    _whitening: Whitening | None = field(default=None, repr=False, compare=False)

    @property
    def channels(self) -> int:
        return self.gram.shape[0]

    def covariance(self) -> torch.Tensor:
        """``gram / count``: the mean of ``x xᵀ``."""
        return self.gram / max(self.count, 1)

    def shrinkage(self) -> float:
        """The oracle-approximating shrinkage (OAS, Chen et al. 2010) of the second-moment
        matrix toward a scaled identity, from its trace, its squared Frobenius norm and the
        sample count alone: near 0 with many samples per channel, near 1 with few (a final
        layer seeing 32 pooled feature vectors of 1280 channels)."""
        if not self.shrink:
            return 0.0
        p, n = self.channels, max(self.count, 1)
        cov = self.covariance()
        tr, tr2 = float(cov.diagonal().sum()), float((cov * cov).sum())
        den = (n + 1 - 2 / p) * (tr2 - tr * tr / p)
        if den <= 0:
            return 0.0 if tr2 * p <= tr * tr * (1 + 1e-12) else 1.0  # already a scaled identity
        return min(1.0, max(0.0, ((1 - 2 / p) * tr2 + tr * tr) / den))

    def regularized(self) -> torch.Tensor:
        """The second-moment matrix shrunk by `shrinkage`: what whitening and refits use, so
        directions the calibration data never visited keep a share of the weight."""
        cov = self.covariance()
        rho = self.shrinkage()
        if rho == 0.0:
            return cov
        mu = float(cov.diagonal().mean())
        return (1 - rho) * cov + rho * mu * torch.eye(cov.shape[0], dtype=cov.dtype)

    def whitening(self) -> Whitening:
        """``S`` with ``S Sᵀ ≈`` the regularized second moments (cached): see
        `fxlrd.decompose.whitening` and `shrinkage`."""
        if self._whitening is None:
            w = whitening(self.regularized())
            rho = self.shrinkage()
            if rho > 1e-3:
                note = f"shrinkage {rho:.2f} ({self.count} samples, {self.channels} channels)"
                w = Whitening(w.factor, w.method, w.damping, "; ".join(filter(None, [note, w.note])))
            self._whitening = w
        return self._whitening

    def add(self, x: torch.Tensor, x_orig: torch.Tensor | None = None) -> None:
        """Accumulate samples: ``x`` is ``(n, C)``."""
        x = x.detach().to(device="cpu", dtype=torch.float64)
        self.gram += x.T @ x
        self.total = x.sum(0) if self.total is None else self.total + x.sum(0)
        self.count += x.shape[0]
        if x_orig is not None:
            xo = x_orig.detach().to(device="cpu", dtype=torch.float64)
            if self.cross is None:
                self.cross = torch.zeros_like(self.gram)
            self.cross += xo.T @ x


def _batched(site: Site, x: torch.Tensor) -> torch.Tensor:
    """A conv's input or output with its batch dimension: torch convs also take one unbatched
    sample, (C, *spatial)."""
    return x.unsqueeze(0) if site.spec.kind != "linear" and x.dim() == len(site.spec.stride) + 1 else x


def _real_tokens(site: Site, x: torch.Tensor, mask: torch.Tensor | None,
                 layouts: dict[str, bool | None] | None = None) -> torch.Tensor:  # fmt: skip
    """A linear site's values at the real tokens only (padding left out of the statistics: its
    activations are not the model's work, and they bias the fit).

    ``x`` is (batch, sequence, ...), (sequence, batch, ...) (a model that turns the batch
    sequence-first inside), or flattened batch-major to (batch·sequence, channels) as GPT-2's
    ``Conv1D`` does. Which of the first two a site's values are shows only when the mask is not
    square; ``layouts`` (site name → sequence-first, None: not known yet) keeps what a batch
    showed for the square ones, which are read batch-major (the Hugging Face convention) until a
    batch shows otherwise (a warning then says that earlier square batches were misread). Values
    of any other shape are taken whole."""
    if mask is None or site.spec.kind != "linear":
        return x
    b, s = mask.shape
    if x.dim() >= 3:
        lead = tuple(x.shape[:2])
        if b != s and lead in ((b, s), (s, b)):
            seq_first = lead == (s, b)
            if layouts is not None:
                if seq_first and site.name in layouts and layouts[site.name] is None:
                    warnings.warn(
                        f"calibration: {site.name!r} runs sequence-first, which showed only after batches whose "
                        "attention_mask is square (batch size = length) were read batch-major: their padding "
                        "entered its statistics; put a batch of another shape first",
                        stacklevel=2,
                    )
                layouts[site.name] = seq_first
        elif b == s and lead == (b, s):
            seq_first = layouts.setdefault(site.name, None) if layouts is not None else None
            seq_first = bool(seq_first)
        else:
            return x
        return x[(mask.T if seq_first else mask).to(x.device)]
    if x.dim() == 2 and x.shape[0] == mask.numel() and s > 1:
        return x[mask.reshape(-1).to(x.device)]
    return x


def _square_last(masks: Sequence[torch.Tensor | None]) -> list[int]:
    """Batch indices with the square masks last, so a site's layout is known before them."""
    return sorted(range(len(masks)), key=lambda i: masks[i] is not None and masks[i].shape[0] == masks[i].shape[1])


def _on_real_tokens(t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``t`` with its padding positions zeroed, when it is a (batch, sequence, ...) output."""
    if mask is None or t.dim() < 3 or t.shape[:2] != mask.shape:
        return t
    return t * mask.to(device=t.device, dtype=t.dtype).reshape(*mask.shape, *([1] * (t.dim() - 2)))


def _projection(t: torch.Tensor, mask: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
    """A random projection vector shaped like ``t``: standard normal at its real tokens, drawn
    for those alone in order (the draws do not depend on how much padding a batch carries),
    zero at the padding."""
    if mask is None or t.dim() < 3 or t.shape[:2] != mask.shape:
        return torch.randn(t.shape, generator=generator, dtype=t.dtype).to(t.device)
    keep = mask.to(dtype=torch.bool, device="cpu")
    v = torch.zeros(t.shape, dtype=t.dtype)
    v[keep] = torch.randn((int(keep.sum()), *t.shape[2:]), generator=generator, dtype=t.dtype)
    return v.to(t.device)


def _samples(site: Site, x: torch.Tensor, mask: torch.Tensor | None = None,
             layouts: dict[str, bool | None] | None = None) -> torch.Tensor:  # fmt: skip
    """A site's input as ``(samples, channels)`` rows, the positions the layer reads (for a
    text batch, its real tokens: ``mask`` from `padding_mask`, ``layouts`` as `_real_tokens`')."""
    spec = site.spec
    if spec.kind == "linear":
        x = _real_tokens(site, x, mask, layouts)
        return x.reshape(-1, x.shape[-1])
    x = _batched(site, x)
    if spec.pointwise and any(s > 1 for s in spec.stride) and spec.padding != "same" and not spec.transposed:
        # a strided 1×1 conv reads every s-th position of its padded input: those are its samples
        pad = (0,) * len(spec.stride) if spec.padding == "valid" else tuple(spec.padding)
        if any(pad):
            mode = "constant" if spec.padding_mode == "zeros" else spec.padding_mode
            x = F.pad(x, [p for p in reversed(pad) for _ in range(2)], mode=mode)
        index = (slice(None), slice(None)) + tuple(slice(None, None, s) for s in spec.stride)
        x = x[index]
    if spec.pointwise and spec.transposed and any(spec.padding):
        # a padded 1×1 transposed conv crops its output: the input positions it maps into the crop never reach it
        index = [slice(None), slice(None)]
        for size, s, p, extra in zip(x.shape[2:], spec.stride, spec.padding, spec.output_padding or (0,) * len(spec.stride)):
            full = (size - 1) * s + 1 + extra
            index.append(slice(-(-p // s), (full - p - 1) // s + 1))
        x = x[tuple(index)]
    return x.movedim(1, -1).reshape(-1, x.shape[1])


def _sampling(site: Site) -> tuple:
    """Which positions of its input `_samples` reads for ``site``: layers reading one input
    alike (a ResNet's 3×3 conv reads every position, the strided 1×1 downsample beside it
    every other) share its statistics."""
    spec = site.spec
    if spec.kind == "linear":
        return ("linear",)  # (their real tokens: one input, one layout)
    strided = spec.pointwise and any(s > 1 for s in spec.stride) and spec.padding != "same" and not spec.transposed
    cropped = spec.pointwise and spec.transposed and any(spec.padding)
    return ("conv", (tuple(spec.stride), str(spec.padding), spec.padding_mode) if strided else None,
            (tuple(spec.stride), tuple(spec.padding), tuple(spec.output_padding or ())) if cropped else None)  # fmt: skip


def _as_args(item: Any, index: int | None = None) -> Args:
    """One calibration batch as ``(args, kwargs)``, or an error naming the batch and the fix."""
    where = "calibration batch" + ("" if index is None else f" {index}")
    if not isinstance(item, (torch.Tensor, tuple, list, Mapping)):
        hint = " (convert it with torch.from_numpy)" if type(item).__module__ == "numpy" else ""
        raise ConfigError(
            f"{where} is a {type(item).__name__}{hint}: each batch must be like example_inputs, a tensor, a tuple of "
            "positional inputs or a dict of keyword inputs"
        )
    try:
        return normalize_inputs(item)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def check_calibration(calibration: Any) -> None:
    """Raise `ConfigError` unless ``calibration`` is an iterable of batches (not one batch, a
    path or a number)."""
    if isinstance(calibration, (str, bytes, os.PathLike)):
        raise ConfigError(
            f"calibration is a path ({str(calibration)!r}), not batches: load them first, e.g. "
            "calibration=torch.load(path) for a saved list of batches (the command line takes a path: --calibration)"
        )
    if isinstance(calibration, (torch.Tensor, Mapping)):
        raise ConfigError(
            "calibration must be an iterable of inputs (a list of batches, a DataLoader...), each like example_inputs; "
            "wrap a single batch in a list: calibration=[batch]"
        )
    try:
        iter(calibration)  # a map-style Dataset (only __getitem__ and __len__) iterates too
    except TypeError:
        raise ConfigError(
            f"calibration must be an iterable of inputs (a list of batches, a DataLoader...), got {type(calibration).__name__}"
        ) from None


def _batches(calibration: Iterable, progress: bool, what: str):
    from tqdm.auto import tqdm

    check_calibration(calibration)
    try:
        total = len(calibration)
    except TypeError:  # no length (a generator; a DataLoader over an IterableDataset has __len__ and raises)
        total = None
    return tqdm(calibration, desc=what, unit="batch", total=total, disable=None if progress else True, file=sys.stderr, leave=False)


_ENCODER_TOKENS = ("input_ids", "inputs_embeds", "attention_mask")
_DECODER_TOKENS = ("decoder_input_ids", "decoder_inputs_embeds", "decoder_attention_mask")


def token_streams(gm: fx.GraphModule, nodes: Iterable[fx.Node]) -> dict[fx.Node, str]:
    """Which token sequence each of ``nodes`` runs over, read from the symbolic sequence sizes
    an export capture records: ``"encoder"`` or ``"decoder"`` for an encoder-decoder (a
    ``decoder_input_ids`` input; the two sequences are different symbols), and ``"other"``
    for a value none of whose leading two dimensions involves a token sequence (a CLIP's vision
    tokens, 17 of them, beside text whose padded length may also be 17: the text mask must not
    fall on them). Nodes it cannot tell (no symbols recorded, or the two sequences share one)
    are left out."""
    placeholders = {n.target: n for n in gm.graph.nodes if n.op == "placeholder"}

    def symbols(node: fx.Node, dims: slice) -> list[str]:
        shape = getattr(node.meta.get("val"), "shape", None) or ()
        return [str(d) for d in list(shape)[dims] if isinstance(d, torch.SymInt)]

    def leading(node: fx.Node) -> list[str] | None:  # the first two sizes as text (symbols, products, numbers)
        shape = getattr(node.meta.get("val"), "shape", None)
        return None if shape is None else [str(d) for d in list(shape)[:2]]

    stream_of: dict[str, str] = {}
    for stream, keys in (("encoder", _ENCODER_TOKENS), ("decoder", _DECODER_TOKENS)):
        for key in keys:
            if key in placeholders:
                for sym in symbols(placeholders[key], slice(1, 2)):
                    if stream_of.setdefault(sym, stream) != stream:
                        return {}  # one symbol for both sequences: they cannot be told apart
    if not stream_of:
        return {}
    encoder_decoder = any(k in placeholders for k in _DECODER_TOKENS[:2])
    out = {}
    for node in nodes:
        sizes = leading(node)
        if sizes is None:
            continue
        found = {stream for sym, stream in stream_of.items() for size in sizes if re.search(rf"\b{sym}\b", size)}
        if not found:
            out[node] = "other"
        elif encoder_decoder and len(found) == 1:
            out[node] = found.pop()
    return out


def _writes_in_place(gm: fx.GraphModule, node: fx.Node, arg: fx.Node) -> bool:
    """Whether ``node`` may overwrite ``arg`` (``nn.ReLU(inplace=True)``, ``aten.relu_``,
    ``x.add_(...)``): a gradient taken at ``arg`` would then be taken after the change."""
    if node.op == "call_module":
        return bool(getattr(gm.get_submodule(node.target), "inplace", False))
    if node.op == "call_method":
        return str(node.target).endswith("_") and not str(node.target).endswith("__")
    if node.op == "call_function":
        schema = getattr(node.target, "_schema", None)
        if schema is not None and schema.is_mutable:
            return True
        return bool(node.kwargs.get("inplace")) or (getattr(node.target, "__name__", "").endswith("_")
                                                    and not getattr(node.target, "__name__", "").endswith("__"))  # fmt: skip
    return False


# Python-level ops whose output may be a view of their first argument (aten ops say so in their schema)
_VIEW_METHODS = frozenset({
    "view", "view_as", "reshape", "reshape_as", "transpose", "permute", "t", "expand", "expand_as", "squeeze",
    "unsqueeze", "flatten", "unflatten", "narrow", "select", "unfold", "chunk", "split", "split_with_sizes",
    "tensor_split", "unbind", "__getitem__", "as_strided", "detach", "contiguous", "diagonal", "movedim", "moveaxis",
    "swapaxes", "swapdims", "real", "imag", "view_as_real", "view_as_complex",
})  # fmt: skip
_VIEW_FUNCTIONS = frozenset({operator.getitem, *(getattr(torch, n) for n in _VIEW_METHODS if hasattr(torch, n))})


def _aliases_input(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node``'s output may share memory with its first argument: a view (``x.view``,
    ``x[:, :8]``, ``aten.slice``) or an in-place op, which returns its input."""
    if not node.args or not isinstance(node.args[0], fx.Node):
        return False
    if node.op == "call_function":
        schema = getattr(node.target, "_schema", None)
        if schema is not None:
            return bool(schema.returns) and schema.returns[0].alias_info is not None
        if node.target in _VIEW_FUNCTIONS:
            return True
    if node.op == "call_method" and node.target in _VIEW_METHODS:
        return True
    return _writes_in_place(gm, node, node.args[0])


def _aliases(gm: fx.GraphModule, node: fx.Node) -> set[fx.Node]:
    """``node`` and every node whose output may view its memory (views of views, …)."""
    out, todo = {node}, [node]
    while todo:
        for user in todo.pop().users:
            if user not in out and user.args and user.args[0] in out and _aliases_input(gm, user):
                out.add(user)
                todo.append(user)
    return out


def _overwritten(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether a later node may write to ``node``'s output, directly or through a view of it."""
    return any(_writes_in_place(gm, user, a) for a in _aliases(gm, node) for user in a.users)


_aten = torch.ops.aten
_DROPOUTS = frozenset({_aten.dropout.default, _aten.feature_dropout.default, _aten.alpha_dropout.default,
                       _aten.feature_alpha_dropout.default, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d,
                       F.alpha_dropout, F.feature_alpha_dropout,
                       # in place (nn.Dropout(inplace=True)): they return their input, as the identity does
                       _aten.dropout_.default, _aten.feature_dropout_.default, _aten.alpha_dropout_.default,
                       _aten.feature_alpha_dropout_.default})  # fmt: skip
_ATTENTIONS = frozenset({_aten.scaled_dot_product_attention.default, F.scaled_dot_product_attention})


class EvalInterpreter(fx.Interpreter):
    """Runs a graph as in eval mode where the graph itself says otherwise: an export capture of
    a model in training mode (a Hugging Face model straight from its constructor) bakes
    ``aten.dropout(x, p, train=True)`` and batch statistics in, as ``F.dropout(...,
    training=True)`` or an attention's ``dropout_p`` from a ``self.training`` read at fx trace
    time. Calibration reads no dropout noise and leaves running statistics alone: dropouts are
    the identity (attention's too), batch norms use their running statistics and leave them
    and their step counters alone.

    Run with gradients (the sensitivity's backward pass), a stack of weights gathered by a
    tensor of indices (``P[ids]``: a mixture's experts as ``batched_mm`` picks them, one matrix
    per token) is not kept for the backward pass: autograd would keep every layer's gathered
    copy, tokens × top-k matrices each, until the backward pass; it keeps the indices instead
    and gathers again when the backward pass needs the matrices, one product at a time. Not
    under saved-tensor hooks of the caller's own (``torch.autograd.graph.save_on_cpu()``),
    which then apply as they would, nor where they are disabled: autograd keeps the copies."""

    def __init__(self, module: fx.GraphModule, **kwargs: Any):
        super().__init__(module, **kwargs)
        # a batch norm's step counter, which a training-mode export graph increments in a node of
        # its own (other buffers a forward writes, a cache it reads back, are written as before)
        self._counters = {id(b) for n, b in module.named_buffers() if n.rsplit(".", 1)[-1] == "num_batches_tracked"}
        self._gathers = {node for node in module.graph.nodes if _is_gather(node)}
        self._recipes: dict[int, tuple[Any, tuple]] = {}  # id of a gathered stack → how to gather it again

    def run(self, *args: Any, **kwargs: Any) -> Any:
        if not (self._gathers and torch.is_grad_enabled()) or _caller_hooks():
            return super().run(*args, **kwargs)
        with torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack_gathered):
            return super().run(*args, **kwargs)

    def run_node(self, node: fx.Node) -> Any:
        out = super().run_node(node)
        if node in self._gathers and isinstance(out, torch.Tensor) and out._base is None and torch.is_grad_enabled():
            args, _ = self.fetch_args_kwargs_from_env(node)
            if not isinstance(args[0], nn.Parameter):  # (a buffer the forward may write before the backward reads it)
                return out
            index = args[1][0] if isinstance(args[1], (list, tuple)) else args[1]
            self._recipes[id(out)] = _Gather(node.target, args, out._version, args[0]._version, index._version)
            weakref.finalize(out, self._recipes.pop, id(out), None)  # (its id may be reused once it is gone)
        return out

    def _pack(self, t: torch.Tensor) -> Any:
        """A saved tensor: a gathered stack as its recipe (unchanged since gathered, and saved as
        itself or a view of the same dtype), any other with its version, which the unpacking
        checks as autograd does without hooks (hooks turn its own check off)."""
        base = t if t._base is None else t._base
        recipe = self._recipes.get(id(base))
        if recipe is None or base._version != recipe.version or t.dtype != base.dtype or t.is_conj() or t.is_neg():
            return _Saved(t, t._version)
        return recipe, t.size(), t.stride(), t.storage_offset()

    def call_function(self, target: Any, args: tuple, kwargs: dict) -> Any:
        schema = getattr(target, "_schema", None)
        if schema is not None and schema.is_mutable and args and id(args[0]) in self._counters:
            return args[0]  # num_batches_tracked += 1: left as it is
        if target in _DROPOUTS:
            return args[0] if args else kwargs["input"]
        if target is _aten.native_dropout.default:
            return args[0], torch.ones_like(args[0], dtype=torch.bool)
        if target is _aten.batch_norm.default and len(args) > 5 and args[5] and args[3] is not None:
            args = (*args[:5], False, *args[6:])  # (without running statistics it can only use the batch's)
        if target is F.batch_norm and (args[1] if len(args) > 1 else kwargs.get("running_mean")) is not None:
            if len(args) > 5 and args[5]:  # (an fx trace of a module calling it with training=self.training)
                args = (*args[:5], False, *args[6:])
            elif kwargs.get("training"):
                kwargs = {**kwargs, "training": False}
        if target in _ATTENTIONS:  # attention dropout
            if len(args) > 4:
                args = (*args[:4], 0.0, *args[5:])
            elif kwargs.get("dropout_p"):
                kwargs = {**kwargs, "dropout_p": 0.0}
        return super().call_function(target, args, kwargs)


def _caller_hooks() -> bool:
    """Whether saved-tensor hooks are the caller's to choose here: some are set (they would be
    replaced by `EvalInterpreter`'s inside it), or they are disabled (setting any raises)."""
    autograd = torch._C._autograd
    try:  # (private: where they fail, autograd's default, which keeps the copies but is always right)
        return not autograd._saved_tensors_hooks_is_enabled() or autograd._top_saved_tensors_default_hooks(False) is not None
    except (AttributeError, TypeError, RuntimeError):
        return True


def _is_gather(node: fx.Node) -> bool:
    """``P[ids]`` of a module's own tensor ``P`` by one index tensor (`fxlrd.sites.tensor_index`)."""
    return tensor_index(node) is not None and node.args[0].op == "get_attr"


@dataclass
class _Gather:
    """How `EvalInterpreter` gathers a stack again: ``target(*args)``, and the versions of the
    gathered tensor, the stack and the indices when it was gathered."""

    target: Any
    args: tuple
    version: int
    source_version: int
    index_version: int


@dataclass
class _Saved:
    tensor: torch.Tensor
    version: int


_MODIFIED = ("one of the variables needed for gradient computation has been modified by an inplace operation "
             "during fxlrd's calibration (the sensitivity's backward pass): {what}")  # fmt: skip


def _unpack_gathered(packed: Any) -> torch.Tensor:
    """A saved tensor back: as it was (checked unchanged), or gathered again (`EvalInterpreter`)."""
    if isinstance(packed, _Saved):
        if packed.tensor._version != packed.version:
            raise RuntimeError(_MODIFIED.format(what=f"a {tuple(packed.tensor.shape)} tensor, at version "
                                                f"{packed.tensor._version}, saved at {packed.version}"))  # fmt: skip
        return packed.tensor
    recipe, size, stride, offset = packed
    source, index = recipe.args
    flat_index = index[0] if isinstance(index, (list, tuple)) else index
    if source._version != recipe.source_version or flat_index._version != recipe.index_version:
        raise RuntimeError(_MODIFIED.format(what=f"the stack {tuple(source.shape)} or the indices it was gathered by"))
    with torch.no_grad():
        return recipe.target(source.detach(), index).as_strided(size, stride, offset)


class TokenMasks:
    """The real-token masks of one batch, per token sequence: an encoder-decoder's decoder
    tokens follow its ``decoder_attention_mask`` (none given: all are real), not the encoder's
    ``attention_mask``, which used to be applied to decoder values of the same length."""

    def __init__(self, inputs: Args, streams: Mapping[fx.Node, str] | None = None):
        kwargs = inputs[1] if len(inputs) > 1 and isinstance(inputs[1], Mapping) else {}
        self.encoder = padding_mask(inputs)
        decoder = kwargs.get("decoder_attention_mask")
        self.decoder = decoder.detach() != 0 if isinstance(decoder, torch.Tensor) and decoder.dim() == 2 else None
        tokens = next((kwargs[k] for k in _DECODER_TOKENS[:2] if isinstance(kwargs.get(k), torch.Tensor)), None)
        self.decoder_length = int(tokens.shape[1]) if tokens is not None and tokens.dim() >= 2 else None
        self.streams = streams or {}

    def told_apart(self) -> bool:
        """Whether the encoder and decoder sequences differ in length (the encoder mask's shape then
        matches encoder values only)."""
        return self.encoder is not None and self.decoder_length != self.encoder.shape[1]

    def for_node(self, node: fx.Node | None) -> torch.Tensor | None:
        """The mask of the values of ``node`` (a site's input or output)."""
        stream = self.streams.get(node)
        if stream == "other":  # not over the tokens (a vision tower's patches)
            return None
        if self.decoder_length is None:
            return self.encoder
        if stream is not None:
            return self.decoder if stream == "decoder" else self.encoder
        return self.encoder if self.told_apart() else None

    def for_output(self, t: torch.Tensor) -> torch.Tensor | None:
        """The mask of a model output ``t``."""
        if self.decoder_length is None:
            return self.encoder
        if self.decoder is not None and t.dim() >= 3 and tuple(t.shape[:2]) == tuple(self.decoder.shape):
            return self.decoder
        return self.encoder if self.told_apart() else None


def _site_inputs(sites: Mapping[str, Site]) -> dict[fx.Node, list[str]]:
    """Input node → the sites that read it (one set of statistics per distinct input)."""
    out: dict[fx.Node, list[str]] = {}
    for name, site in sites.items():
        if site.spec is None or site.reason:
            continue
        for node in site.nodes:
            x = site.input(node)
            if x is not None:
                out.setdefault(x, []).append(name)
    return out


@dataclass
class SiteStats:
    """What a data-aware method knows of one site: its input statistics (shared with other
    sites reading the same input) and, optionally, how much the model's output cares about
    its output channels.

    ``output_sensitivity`` estimates ``E[JᵀJ]`` (J: the Jacobian of the model's outputs with
    respect to this layer's output channels at one position, summed over positions), divided
    by the model outputs' energy: an error ``δ`` of the layer's output costs about
    ``δᵀ M δ`` of relative squared model-output error. It is the full ``C_out × C_out``
    matrix (the output factor of a Kronecker-factored curvature, as in K-FAC and generalized
    Fisher-weighted SVD) or, to save memory, its diagonal (a vector; Fisher-weighted SVD).
    Estimated with random projections: one backward pass per batch with a Gaussian ``v``,
    ``E[(Jᵀv)(Jᵀv)ᵀ] = JᵀJ``.
    """

    inputs: InputStats
    output_sensitivity: torch.Tensor | None = None
    output_energy: float = 0.0
    unreached: bool = False  # sensitivities were measured, and the model's outputs do not depend on this site

    @property
    def count(self) -> int:
        return self.inputs.count

    def whitening(self) -> Whitening:
        return self.inputs.whitening()

    def output_weights(self, floor: float = 1e-2) -> torch.Tensor | None:
        """The output-mode weighting (relative model-output error per unit of squared channel
        error): a matrix (full sensitivity) or a vector (diagonal), with ``floor`` × its mean
        diagonal added (matrix) or as a lower bound (vector), so no direction is free and the
        matrix is positive definite; None without sensitivities."""
        if self.output_sensitivity is None or self.output_energy <= 0:
            return None
        w = self.output_sensitivity / self.output_energy
        mean = float(w.diagonal().mean()) if w.dim() == 2 else float(w.mean())
        if not mean > 0:
            return None
        if w.dim() == 2:
            return w + floor * mean * torch.eye(w.shape[0], dtype=w.dtype)
        return w.clamp_min(floor * mean)


def _output_moments(site: Site, g: torch.Tensor, full: bool, mask: torch.Tensor | None = None,
                    layouts: dict[str, bool | None] | None = None) -> torch.Tensor:  # fmt: skip
    """A site's output gradient as channel rows (real tokens only, with ``mask`` and
    ``layouts`` as `_real_tokens`'): their Gram matrix (``full``) or its diagonal."""
    g = _batched(site, _real_tokens(site, g.detach().double(), mask, layouts))
    rows = g.reshape(-1, g.shape[-1]) if site.spec.kind == "linear" else g.movedim(1, -1).reshape(-1, g.shape[1])
    return rows.T @ rows if full else rows.pow(2).sum(0)


def kl_outputs(outputs: Any, inputs: Any = None) -> torch.Tensor:
    """``sensitivity="kl"``: the function of a classifier's logits ``z`` whose ``JᵀJ`` is the
    Fisher information of its softmax, the curvature of ``KL(original ‖ compressed)``:
    ``√p ⊙ (z − pᵀz)`` with ``p = softmax(z)`` held constant, since
    ``(I − p1ᵀ)diag(p)(I − 1pᵀ) = diag(p) − ppᵀ``. Errors then count by how much they move
    the predicted distribution, not by every logit alike (most of a 1000-class head's logits
    are for classes the model never predicts)."""
    logits = _logits_of(outputs)
    p = logits.detach().float().softmax(-1).to(logits.dtype)
    return p.sqrt() * (logits - (p * logits).sum(-1, keepdim=True))


def _logits_of(outputs: Any) -> torch.Tensor:
    if isinstance(outputs, torch.Tensor):
        return outputs
    found = outputs.get("logits") if isinstance(outputs, Mapping) else getattr(outputs, "logits", None)
    if isinstance(found, torch.Tensor):
        return found
    leaves = [t for t in pytree.tree_leaves(outputs) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if len(leaves) == 1:
        return leaves[0]
    raise ConfigError(
        f"sensitivity='kl' needs a model that returns its logits (a tensor, or an output with .logits); this one returns "
        f"{len(leaves)} floating tensors. Pass sensitivity=fn(outputs, inputs) returning the logits, or sensitivity=True"
    )


def sensitivity_grads(gm: fx.GraphModule, result: Any, inputs: Args, sensitivity: bool | Callable[[Any, Any], Any],
                      wrt: Sequence[torch.Tensor], masks: TokenMasks, streams: Mapping[fx.Node, str],
                      generator: torch.Generator) -> tuple[list[torch.Tensor | None], float]:  # fmt: skip
    """One batch's sensitivity sample: the gradients, with respect to ``wrt`` (values the graph
    computed), of the model's outputs (``result``; with a callable ``sensitivity``, what it
    picks of them) projected on a random vector at their real tokens (``E[(Jᵀv)(Jᵀv)ᵀ] = JᵀJ``),
    and the energy of those outputs on their real tokens (the unit of relative error)."""
    if callable(sensitivity):
        with torch.enable_grad():
            result = sensitivity(_unflatten_outputs(gm, result), inputs)
    leaves = pytree.tree_leaves(result)
    output_leaves = _output_leaves(gm)
    # the graph's own outputs: each one's node tells whether it runs over the tokens
    nodes = output_leaves if not callable(sensitivity) and len(output_leaves) == len(leaves) else [None] * len(leaves)
    kept = [(t, x) for t, x in zip(leaves, nodes) if isinstance(t, torch.Tensor) and t.is_floating_point()
            and t.requires_grad]  # fmt: skip
    outs = [t for t, _ in kept]
    out_masks = [None if streams.get(x) == "other" else masks.for_output(t) for t, x in kept]
    if callable(sensitivity) and not outs:
        raise ConfigError(
            f"the sensitivity function returned {type(result).__name__}, with no tensor computed from the "
            "model's outputs (none that is floating point and not detached): return, e.g., the "
            "normalized embedding or the logits it is given, or use sensitivity=False"
        )
    if not outs:
        return [None] * len(wrt), 0.0
    vs = [_projection(t, m, generator) for t, m in zip(outs, out_masks)]
    grads = torch.autograd.grad(outs, list(wrt), grad_outputs=vs, allow_unused=True)
    energy = sum(float(_on_real_tokens(t.detach().double(), m).pow(2).sum()) for t, m in zip(outs, out_masks))
    return list(grads), energy


def _output_leaves(gm: fx.GraphModule) -> list[Any]:
    """The graph's output values, flat (nodes, and constants)."""
    output_node = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    return pytree.tree_leaves(output_node.args[0]) if output_node.args else []


def output_streams(gm: fx.GraphModule, nodes: Iterable[fx.Node]) -> dict[fx.Node, str]:
    """`token_streams` of ``nodes`` and of the graph's outputs (which of them run over the tokens)."""
    output_leaves = _output_leaves(gm)
    return token_streams(gm, [*nodes, *(x for x in output_leaves if isinstance(x, fx.Node))])


def collect_stats(
    gm: fx.GraphModule,
    calibration: Iterable,
    *,
    example: Args | None = None,
    names: Iterable[str] | None = None,
    sensitivity: bool | str | Callable[[Any, Any], Any] = False,
    sensitivity_matrix: str = "full",
    progress: bool = True,
    distributed: bool | None = None,
    group: Any = None,
    seed: int = 0,
) -> dict[str, SiteStats]:
    """Input statistics of every conv/linear site of ``gm`` over ``calibration``.

    Args:
        gm: the captured model (it runs in eval mode; its mode, parameters and buffers are
            left as they were).
        calibration: an iterable of inputs, each of the same form as ``example_inputs`` (a
            tensor, a tuple of positional inputs or a dict of keyword inputs).
        example: the example inputs, for error messages.
        names: only these sites (default: all).
        sensitivity: also estimate each site's output sensitivity (`SiteStats`): one backward
            pass per batch. True: every floating output counts alike (squared error);
            ``"kl"``: the model is a classifier and its predicted distribution counts
            (`kl_outputs`); a callable ``fn(outputs, inputs)`` picks what of the outputs counts.
        sensitivity_matrix: ``"full"`` (each site's ``C_out × C_out`` matrix) or
            ``"diagonal"`` (its diagonal: memory ``C_out`` instead of ``C_out²`` per site).
        progress: a progress bar over the batches.
        distributed: all-reduce the statistics over ``torch.distributed`` (default: when a
            process group is initialised), so each process can see its own shard of the data.
        group: the process group.
        seed: for the random projections of ``sensitivity``.

    Returns:
        Site name → `SiteStats` (sites reading the same input share their `InputStats`).

    Raises:
        ConfigError: the calibration iterable is empty.
        ValueError: a calibration item does not run through the model.
    """
    sites = find_sites(gm)
    check_sensitivity(sensitivity, sensitivity_matrix)
    if isinstance(sensitivity, str):  # "kl"
        sensitivity = kl_outputs
    full = sensitivity_matrix == "full"
    wanted = set(sites) if names is None else set(names)
    by_input = {n: [s for s in ss if s in wanted] for n, ss in _site_inputs(sites).items()}
    by_input = {n: ss for n, ss in by_input.items() if ss}
    by_output = {node: name for name in wanted if name in sites and not sites[name].reason and sites[name].spec is not None
                 for node in sites[name].nodes}  # fmt: skip
    inputs_stats: dict[fx.Node, InputStats] = {}
    sens: dict[str, torch.Tensor] = {}
    energy = 0.0
    site_outputs: list[tuple[str, torch.Tensor]] = []
    layouts: dict[str, bool | None] = {}  # linear site → its values are sequence-first (see _real_tokens)
    streams = output_streams(gm, [*by_input, *(sites[n].input(sites[n].nodes[0]) for n in set(by_output.values()))])

    overwritten = {node for node in by_output if _overwritten(gm, node)}

    class Recorder(EvalInterpreter):
        def run_node(self, node: fx.Node) -> Any:
            out = super().run_node(node)
            if node in by_input and isinstance(out, torch.Tensor):
                read = {}  # sites reading this input the same way share one InputStats
                for name in by_input[node]:
                    read.setdefault(_sampling(sites[name]), name)
                for how, name in read.items():
                    x = _samples(sites[name], out, masks.for_node(node), layouts)
                    check_finite(x, name, index)  # (raised past the interpreter, which would add its node)
                    if (node, how) not in inputs_stats:
                        inputs_stats[node, how] = InputStats(torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64))
                    inputs_stats[node, how].add(x)
            if sensitivity and node in by_output and isinstance(out, torch.Tensor) and out.is_floating_point():
                leaf = not out.requires_grad
                if leaf:  # frozen up to here: no path before it to lose
                    out = out.detach().requires_grad_()
                site_outputs.append((by_output[node], out))
                if leaf or node in overwritten:  # the gradient is taken at ``out``: the graph goes on with a copy
                    out = out.clone()  # (a leaf: whatever writes in place, a leaf may not be written)
            return out

    restore_modes = saved_modes(gm)
    gm.eval()
    recorder = Recorder(gm)
    generator = torch.Generator().manual_seed(process_seed(seed, distributed, group))
    n = 0
    try:
        for index, item in enumerate(_batches(calibration, progress, "calibration")):
            inputs = _as_args(item, index)
            masks = TokenMasks(inputs, streams)
            site_outputs.clear()
            flat = flat_inputs(gm, inputs, f"calibration batch {index}")  # (its errors name the batch)
            try:
                with torch.set_grad_enabled(bool(sensitivity)):
                    result = recorder.run(*flat)
            except ConfigError as exc:  # ours, from inside the graph: without the node the interpreter appends
                if exc.args and isinstance(exc.args[0], str):
                    exc.args = (exc.args[0].split("\n\nWhile executing")[0], *exc.args[1:])
                raise
            except Exception as exc:  # noqa: BLE001  (the item does not fit the model: a number for a tensor, too)
                raise inputs_error(gm, inputs, exc, "calibration item").with_traceback(None) from exc
            if sensitivity and site_outputs:
                grads, batch_energy = sensitivity_grads(gm, result, inputs, sensitivity, [t for _, t in site_outputs],
                                                        masks, streams, generator)  # fmt: skip
                for (name, _), g in zip(site_outputs, grads):
                    if g is not None:
                        site = sites[name]
                        ch = _output_moments(site, g, full, masks.for_node(site.input(site.nodes[0])), layouts).cpu()
                        sens[name] = sens[name] + ch if name in sens else ch
                energy += batch_energy
            site_outputs.clear()
            n += 1
    finally:
        restore_modes()
    if finish_pass(n, list(inputs_stats.values()), distributed, group) and sensitivity:
        for name in sorted(sens):
            all_reduce_sum(sens[name], group)
        e = torch.tensor([energy], dtype=torch.float64)
        all_reduce_sum(e, group)
        energy = float(e.item())
    calls: dict[str, list[InputStats]] = {}  # a site called more than once (shared across depth) reads several inputs
    for node, names_ in by_input.items():
        for name in names_:
            if (node, _sampling(sites[name])) in inputs_stats:
                calls.setdefault(name, []).append(inputs_stats[node, _sampling(sites[name])])
    # one object per input node (sites reading the same input share it), pooled over a site's calls
    measured = bool(sensitivity) and energy > 0
    return {name: SiteStats(stats[0] if len(stats) == 1 else _pooled(stats), sens.get(name), energy,
                            unreached=measured and (name not in sens or not bool(sens[name].any())))
            for name, stats in calls.items()}  # fmt: skip


def check_finite(x: torch.Tensor, layer: str, batch: int | None) -> None:
    """A `ConfigError` when a layer's calibration inputs hold NaN or infinite values (they
    would make its statistics, and every factor or refit fitted on them, NaN)."""
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        where = f"calibration batch {batch}" if batch is not None else "the calibration data"
        raise ConfigError(
            f"{where}: the input of layer {layer!r} holds NaN or infinite values (in the batch itself, or computed "
            "by the model from it: an overflow in a low-precision dtype); leave such batches out of the calibration "
            "data, or calibrate the model in float32"
        )


def _pooled(stats: Sequence[InputStats]) -> InputStats:
    """The statistics of the union of the samples of ``stats`` (a layer's several calls)."""
    out = InputStats(sum(s.gram for s in stats))
    out.count = sum(s.count for s in stats)
    totals = [s.total for s in stats if s.total is not None]
    out.total = sum(totals) if totals else None
    return out


def _unflatten_outputs(gm: fx.GraphModule, flat: Any) -> Any:
    """The model's outputs in their original structure (an export capture returns them flat
    from the interpreter)."""
    out_spec = getattr(gm, "_out_spec", None)
    if out_spec is None:
        return flat
    return pytree.tree_unflatten(pytree.tree_leaves(flat), out_spec)


def finish_pass(batches: int, stats: list[InputStats], distributed: bool | None, group: Any = None) -> bool:
    """After a calibration pass of ``batches`` batches: refuse an empty one, and sum ``stats``
    over the processes (``distributed``; None: when a process group is initialised). Returns
    whether they were summed. A process with no batch is refused on every process (the others
    would wait for it in the sums)."""
    if distributed is None:
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed:
        empty = torch.tensor([float(batches == 0)], dtype=torch.float64)
        all_reduce_sum(empty, group)
        if empty.item() > 0:
            raise ConfigError(f"calibration is empty on {int(empty.item())} of the processes: every process needs at "
                              "least one batch of its own (shard the data so that each gets some)")  # fmt: skip
    if batches == 0:
        raise ConfigError("calibration is empty: pass at least one batch of inputs (calibration=[batch, ...])")
    if distributed:
        all_reduce_stats(stats, group=group)
    return distributed


def all_reduce_sum(tensor: torch.Tensor, group: Any = None) -> None:
    """Sum ``tensor`` over the processes of ``group`` in place, where the backend can: NCCL
    reduces CUDA tensors only, so a CPU statistic goes through the process's GPU."""
    import torch.distributed as dist

    if tensor.device.type != "cuda" and dist.is_initialized() and dist.get_backend(group) == "nccl":
        on_gpu = tensor.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(on_gpu, op=dist.ReduceOp.SUM, group=group)
        tensor.copy_(on_gpu)
    else:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)


def process_seed(seed: int, distributed: bool | None, group: Any = None) -> int:
    """``seed``, offset by the process's rank when statistics are summed over processes: each
    shard's random projections (sensitivity) are then drawn apart, as one process's batches are."""
    dist = torch.distributed
    if distributed is False or not (dist.is_available() and dist.is_initialized()):
        return seed
    return seed + dist.get_rank(group)


def all_reduce_stats(stats: list[InputStats], group: Any = None) -> None:
    """Sum Gram matrices and counts over the processes of ``group`` (in place), so every
    process holds the statistics of the union of their data."""
    for s in stats:
        all_reduce_sum(s.gram, group)
        count = torch.tensor([s.count], dtype=torch.float64)
        all_reduce_sum(count, group)
        s.count = int(count.item())
        if s.cross is not None:  # the cross moments (sequential compensation)
            all_reduce_sum(s.cross, group)
        if s.total is None:  # the sum (narrowing's mean); every process reduces the same tensors
            s.total = torch.zeros(s.channels, dtype=s.gram.dtype)
        all_reduce_sum(s.total, group)
        s._whitening = None


# -- sequential calibration ---------------------------------------------------------------------
def _compensated_weight(weight: torch.Tensor, stats: InputStats, ridge: float = 1e-6) -> torch.Tensor:
    """``W* = W C G̃⁻¹`` on the input-channel mode: the full-rank layer mapping the compressed
    model's inputs to the original layer's outputs (least squares on the shrunk second
    moments, so few samples do not make it fit noise; the cross term shrinks alike toward
    the identity map, i.e. toward W itself, and so does the ridge: ``(C + dI)(G̃ + dI)⁻¹``, which
    is the identity where the inputs are the original's or carry nothing)."""
    rho = stats.shrinkage()
    n = max(stats.count, 1)
    g = stats.regularized()
    cross = (1 - rho) * stats.cross / n + rho * float(g.diagonal().mean()) * torch.eye(g.shape[0], dtype=g.dtype)
    damp = ridge * max(float(g.diagonal().mean()), 1e-300)
    eye = torch.eye(g.shape[0], dtype=g.dtype)
    map_ = torch.linalg.solve(g + damp * eye, (cross + damp * eye).T).T  # (C + dI)(G̃ + dI)⁻¹  (C×C)
    return torch.einsum("sc...,cd->sd...", weight.detach().double().cpu(), map_)


def _separate(orig: dict[fx.Node, list[Any]], comp: dict[fx.Node, list[Any]], node: fx.Node) -> None:
    """Give the compressed stream its own copy of ``node``'s tensors before a node writes to
    them in place, and of every value it shares with the original stream that views the same
    memory (``h`` beside ``h.view(-1)``, written through the view), as views of that one copy:
    a write through one is seen through the others, in each stream apart."""

    def tensors(v: Any) -> list[torch.Tensor]:
        if isinstance(v, torch.Tensor):
            return [v]
        return [t for x in v for t in tensors(x)] if type(v) in (tuple, list) else []

    copies = [{t.untyped_storage().data_ptr(): t.untyped_storage() for t in tensors(v)} for v in orig[node]]
    shared = [other for other, values in comp.items() if values is orig.get(other)
              and any(t.untyped_storage().data_ptr() in copies[i] for i, v in enumerate(values) for t in tensors(v))]  # fmt: skip
    copies = [{ptr: storage.clone() for ptr, storage in c.items()} for c in copies]

    def moved(v: Any, i: int) -> Any:
        if isinstance(v, torch.Tensor):
            copy = copies[i].get(v.untyped_storage().data_ptr())
            if copy is None:
                return v
            return torch.empty(0, dtype=v.dtype, device=v.device).set_(copy, v.storage_offset(), v.size(), v.stride())
        return type(v)(moved(x, i) for x in v) if type(v) in (tuple, list) else v

    for other in shared:
        comp[other] = [moved(v, i) for i, v in enumerate(comp[other])]


@torch.no_grad()
def sequential_factors(
    gm: fx.GraphModule,
    plan: Any,
    calibration: Iterable,
    *,
    example: Args | None = None,
    stats: Mapping[str, SiteStats] | None = None,
    progress: bool = True,
    distributed: bool | None = None,
    group: Any = None,
) -> dict[str, nn.Module]:
    """Fit every decomposed layer of ``plan`` in graph order to the compressed model's own
    inputs (see the module docstring); returns site name → `Factorized`.

    All calibration batches advance through the graph together, one node at a time, in two
    versions (original and compressed); a value is freed after its last use, so memory holds
    the live activations of one stretch of the graph (about one block) for all batches, plus
    the Gram matrices.

    A layer called more than once (weights shared across depth, as ALBERT's) cannot be fitted
    to the inputs of calls that come after its fit: it is fitted on ``stats`` (all its calls'
    plain statistics, pooled) when given, else on its first call, and its factors run at
    every call of the compressed stream.
    """
    from .factorized import decompose_weight

    stats_by_site = stats
    sites = find_sites(gm)
    todo = {name: site for name, site in sites.items() if name in plan.layers and plan[name].decomposed}
    first_node = {site.nodes[0]: name for name, site in todo.items()}
    later_node = {node: name for name, site in todo.items() for node in site.nodes[1:]}
    options = {"tucker_iters": int(plan.settings.get("tucker_iters", 0) or 0),
               "cp_iters": int(plan.settings.get("cp_iters") or 300)}  # fmt: skip
    items = [_as_args(item, i) for i, item in enumerate(_batches(calibration, False, "calibration"))]
    batches = [flat_inputs(gm, item, f"calibration batch {i}") for i, item in enumerate(items)]
    streams = token_streams(gm, [site.input(site.nodes[0]) for site in todo.values()])
    token_masks = [TokenMasks(item, streams) for item in items]
    if not batches:
        raise ConfigError("calibration is empty: pass at least one batch of inputs (calibration=[batch, ...])")
    if distributed is None:
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()

    nodes = list(gm.graph.nodes)
    last_use: dict[fx.Node, int] = {}
    for i, node in enumerate(nodes):
        for arg in node.all_input_nodes:
            last_use[arg] = i
    orig: dict[fx.Node, list[Any]] = {}
    comp: dict[fx.Node, list[Any]] = {}
    factors: dict[str, nn.Module] = {}
    bound = [placeholder_values(gm, b) for b in batches]
    restore_modes = saved_modes(gm)
    gm.eval()
    interp = EvalInterpreter(gm)

    def run(node: fx.Node, env: dict[fx.Node, list[Any]], i: int) -> Any:
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: env[n][i])
        return getattr(interp, node.op)(node.target, args, kwargs)

    from tqdm.auto import tqdm

    bar = tqdm(total=len(todo), desc="sequential fit", unit="layer", disable=None if progress else True, file=sys.stderr, leave=False)
    try:
        for index, node in enumerate(nodes):
            if node.op == "placeholder":
                orig[node] = comp[node] = [b[node] for b in bound]
            elif node.op == "output":
                break
            else:
                same = all(comp[a] is orig[a] for a in node.all_input_nodes)
                if not same and any(_writes_in_place(gm, node, a) for a in node.all_input_nodes):
                    for a in node.all_input_nodes:  # (h += fc(h) in an export graph): each stream changes its own
                        if comp[a] is orig[a]:
                            _separate(orig, comp, a)
                orig[node] = [run(node, orig, i) for i in range(len(batches))]
                if node in first_node:
                    name = first_node[node]
                    site, lp = todo[name], plan[name]
                    x_node = site.input(node)
                    local = None
                    layouts: dict[str, bool | None] = {}
                    masks = [m.for_node(x_node) for m in token_masks]
                    for i in _square_last(masks):
                        x_c = _samples(site, comp[x_node][i], masks[i], layouts)
                        x_o = _samples(site, orig[x_node][i], masks[i], layouts)
                        check_finite(x_c, name, i), check_finite(x_o, name, i)
                        if local is None:
                            local = InputStats(torch.zeros(x_c.shape[1], x_c.shape[1], dtype=torch.float64))
                        local.add(x_c, x_o)
                    if distributed:
                        all_reduce_stats([local], group=group)
                    dense = site.weight(gm)
                    prior = (stats_by_site or {}).get(name)
                    if prior is not None and name in later_node.values():  # called again later: all calls, pooled
                        fact, _ = decompose_weight(dense, site.bias(gm), site.spec, lp.method, lp.ranks, stats=prior,
                                                   options=options, source=name)  # fmt: skip
                    else:
                        site_stats = SiteStats(local, prior.output_sensitivity, prior.output_energy) if prior else SiteStats(local)
                        fact, _ = decompose_weight(_compensated_weight(dense, local), site.bias(gm), site.spec, lp.method,
                                                   lp.ranks, stats=site_stats, options=options, source=name)  # fmt: skip
                    fact = fact.to(dtype=dense.dtype, device=dense.device)
                    factors[name] = fact
                    comp[node] = [fact(comp[x_node][i]) for i in range(len(batches))]
                    bar.update(1)
                elif node in later_node and later_node[node] in factors:  # the compressed model runs the factors here too
                    x_node = todo[later_node[node]].input(node)
                    comp[node] = [factors[later_node[node]](comp[x_node][i]) for i in range(len(batches))]
                elif same:
                    comp[node] = orig[node]
                else:
                    comp[node] = [run(node, comp, i) for i in range(len(batches))]
            for arg in node.all_input_nodes:
                if last_use.get(arg) == index:
                    orig.pop(arg, None)
                    comp.pop(arg, None)
    finally:
        bar.close()
        restore_modes()
    return factors
