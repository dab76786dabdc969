"""`LRDConfig`: every knob of a decomposition, validated when it is built."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Literal, Sequence

from torch import nn

from .errors import ConfigError
from .latency import LatencyConfig

__all__ = ["LRDConfig", "RankRule", "DEFAULT_LAYER_TYPES"]

RankRule = Literal["ratio", "fixed", "energy", "vbmf"]
RANK_RULES: tuple[str, ...] = ("ratio", "fixed", "energy", "vbmf")
DEFAULT_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.ConvTranspose1d, nn.ConvTranspose2d)


def _as_patterns(value: str | Sequence[str] | None, name: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = (value,)
    patterns = tuple(value)
    if not all(isinstance(p, str) and p for p in patterns):
        raise ConfigError(f"{name} must be glob patterns (non-empty strings), got {value!r}")
    return patterns


def _plain(value: Any) -> Any:
    """A numpy (or other) integer or real scalar as a Python int or float; tuples item by item."""
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, bool) or isinstance(value, (int, float)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_sensitivity(sensitivity: Any, matrix: str) -> None:
    """Raise `ConfigError` unless ``sensitivity`` and ``sensitivity_matrix`` are settings
    `LRDConfig` and `fxlrd.calibrate.collect_stats` accept."""
    if not isinstance(sensitivity, bool) and not callable(sensitivity) and not (isinstance(sensitivity, str) and sensitivity == "kl"):
        raise ConfigError(
            f"sensitivity must be True, False, 'kl' (a classifier's logits) or a callable(outputs, inputs), got {sensitivity!r}"
        )
    if matrix not in ("full", "diagonal"):
        raise ConfigError(f"sensitivity_matrix must be 'full' or 'diagonal', got {matrix!r}")


@dataclass(frozen=True)
class LRDConfig:
    """How to choose ranks and which layers to decompose.

    Args:
        ratio: compression ratio α of each layer (original params / decomposed params), > 1.
        rank_rule: ``"ratio"`` (ranks from ``ratio``, paper eq. 7 for Tucker), ``"fixed"``
            (``rank``), ``"energy"`` (smallest rank keeping ``energy`` of Σσ²) or ``"vbmf"``
            (empirical variational Bayes matrix factorization).
        rank: the rank for ``rank_rule="fixed"``: an int, or ``(r1, r2)`` for Tucker
            (input-side, output-side). Ranks above what a layer allows are clamped.
        energy: fraction of Σσ² to keep for ``rank_rule="energy"``, in (0, 1].
        rank_quantum: round ranks down to a multiple of this (a rank below it is left as is);
            1 gives the paper's exact ranks. Default (None): the CPU's float32 vector width —
            16 with AVX-512, 8 with AVX2, 4 otherwise (`fxlrd.timing.default_rank_quantum`); 1
            for ``rank_rule="fixed"`` and ``"energy"``, whose ranks are the user's requirement.
        min_rank: smallest rank allowed on a mode the decomposition cuts (a mode kept whole, as a
            3-channel input under Tucker-2, is not held to it); a layer needing less is kept.
        beta: r2 / r1 for Tucker-2 (paper eq. 7).
        include: glob patterns on qualified names; only matching layers are decomposed. A
            router (`fxlrd.sites.routes`) is kept unless its exact name is one of them.
        exclude: glob patterns on qualified names never decomposed.
        filter_fn: ``filter_fn(module, qualified_name) -> bool``; False keeps the layer.
        layer_types: module types to decompose (subclasses included).
        tucker_iters: HOOI iterations after the HOSVD initialisation of Tucker-2.
        cp_iters: ALS iterations of the CP fit (``conv_method="cp"``).
        allow_larger: decompose even when the factors would hold at least as many
            parameters as the layer (useful for exactness checks); otherwise such a layer is kept.
        leaf_modules: module types or qualified names that tracing keeps opaque; the way
            around code inside them that torch.fx cannot trace.
        latency: choose ranks by measured latency on a backend (`LatencyConfig`); needs
            ``example_inputs``. ``rank_quantum`` is then ignored: ``latency.quantum`` applies.
        target_speedup: global mode: choose every layer's ranks (or keep it) so the model's
            predicted latency is ``1 / target_speedup`` of the original with the least total
            truncation error. Implies ``latency=LatencyConfig()`` when that is not given.
        merge: ``None``, ``"exact"`` or ``"approximate"``: run `fxlrd.passes.MergePass` after
            decomposing (paper 2.3).
        branches: N > 1 makes Tucker cores grouped convs with N branches (paper 2.4).
        branch_init: ``"btd"`` (block-term ALS) or ``"truncate"`` (diagonal blocks).
        decompose_pointwise: decompose Linear and 1×1 convs too. Default: yes, unless
            ``merge`` is set (the paper's merged ResNet decomposes only the k×k convs and
            merges their factors into the 1×1 convs around them).
        linear_method: the method for Linear and 1×1 conv layers (default ``"svd"``).
        conv_method: the method for k×k convolutions: ``"tucker2"`` (default) or ``"cp"``
            (any method registered in `fxlrd.methods`).
        attention: how ``nn.MultiheadAttention`` projections are decomposed: ``"packed"``
            (q, k, v as one matrix, the default) or ``"separate"`` (see `fxlrd.attention`).
        target_params: a size budget for the whole model: a parameter count (int), or a
            fraction of the model's parameters (float in (0, 1)). Each layer's ranks (or keep)
            are then chosen together so the budget is met with the least total error (output
            error when calibration data is given). With ``target_speedup``: the least-error
            model that is that fast *and* that small.
        allocation: ``"uniform"`` (every layer at ``ratio``, the default) or ``"global"``
            (``ratio`` applies to the decomposed layers as a whole; ranks allocated by error; with
            ``target_speedup``, the fastest model within that size). A per-layer ``latency``
            search alone takes no size budget.
        sequential: with calibration data, compress layers in graph order, each fitted to the
            inputs the already-compressed layers produce (error compensation).
        sensitivity: with calibration data, also weigh each layer's output channels by how much
            the model's output depends on them (one backward pass per calibration batch), so
            factorization and rank allocation minimise the estimated *model* output error
            rather than each layer's own. False: plain input whitening (SVD-LLM). True: every
            floating output counts (squared error). ``"kl"``: a classifier, whose predicted
            distribution counts (the softmax's Fisher information, i.e. ``KL(original ‖
            compressed)``). A callable ``fn(outputs, inputs) -> tensor(s)`` says which
            function of the outputs to keep (e.g. mean-pooled sentence embeddings).
        sensitivity_matrix: ``"full"`` (default): each layer's output-channel sensitivity as a
            ``C_out × C_out`` matrix, so correlated output channels are weighed together
            (float64, ``8·C_out²`` bytes per layer during planning); ``"diagonal"``: only its
            diagonal, for models too large for that.
        mlp: how MLP blocks (``linear → elementwise activation → linear``, or gated,
            ``down(act(gate(x)) ⊙ up(x))``; hidden activations used nowhere else) are
            compressed. ``"factorize"`` (default): their layers like any other. ``"narrow"``:
            the block keeps fewer hidden neurons, chosen on the calibration data, and its last
            layer is refitted by least squares (`fxlrd.narrow`): ``ratio`` times fewer
            parameters, dense layers instead of factors. Needs calibration data; with
            ``allocation="global"`` or ``target_params`` the blocks are narrowed at ``ratio``
            and the other layers' ranks allocated to the budget that is left (``target_params``
            counts the whole model, the narrowed blocks at their narrowed size; a
            ``target_speedup`` counts from the model before narrowing: what narrowing gained
            is measured, and the other layers are chosen for the rest).
        siblings: ``"separate"`` (default): linear layers that read the same input (attention's
            query, key and value; a gated MLP's gate and up) are decomposed one by one.
            ``"fuse"``: they are first fused into one layer (outputs stacked, then split;
            `fxlrd.siblings`), so their decomposition shares one input factor: two GEMMs
            instead of two per layer, and with calibration data at one ratio for every layer
            less error at equal parameters on trained weights (not under a global allocation,
            which then cannot rank the members apart). Only siblings that would all be
            decomposed are fused; the fused layer is named after its members
            (``…self.query_key_value``). Or glob patterns: only the layers they match are
            fused (``["*.query", "*.key"]``: the values keep their own factors).
        experts: stacked expert weights (a mixture of experts' ``(E, m, n)`` parameters, read as
            ``bmm(P[ids], x)``; `fxlrd.experts`): ``"factorize"`` (default) factorizes each
            expert's matrix at the stack's rank by the per-layer rule (``ratio``, ``fixed``,
            ``energy``; whitened per expert when calibration data is given), the graph
            multiplying by the selected factors; ``"keep"``
            leaves them whole. Under ``latency`` a stack's rank is searched by timing its
            product alone, as a layer's; under ``target_speedup`` each stack is kept or given a
            rank beside the layers, its options priced the same way (a ``grouped_mm`` stack on
            onnxruntime, which cannot run it, is kept, the plan says why).
    """

    ratio: float = 2.0
    rank_rule: RankRule = "ratio"
    rank: int | tuple[int, int] | None = None
    energy: float | None = None
    rank_quantum: int | None = None
    min_rank: int = 1
    beta: float = 1.0
    include: str | Sequence[str] | None = None
    exclude: str | Sequence[str] = ()
    filter_fn: Callable[[nn.Module, str], bool] | None = field(default=None, compare=False)
    layer_types: Sequence[type[nn.Module]] = DEFAULT_LAYER_TYPES
    tucker_iters: int = 0
    cp_iters: int = 300
    allow_larger: bool = False
    leaf_modules: Sequence[type[nn.Module] | str] = ()
    latency: LatencyConfig | None = None
    target_speedup: float | None = None
    merge: str | None = None
    branches: int = 1
    branch_init: str = "btd"
    decompose_pointwise: bool | None = None
    linear_method: str = "svd"
    conv_method: str = "tucker2"
    attention: str = "packed"
    target_params: int | float | None = None
    allocation: str = "uniform"
    sequential: bool = False
    sensitivity: bool | str | Callable[[Any, Any], Any] = field(default=True, compare=False)
    sensitivity_matrix: str = "full"
    mlp: str = "factorize"
    siblings: str | Sequence[str] = "separate"
    experts: str = "factorize"

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731  (frozen)
        for name in ("ratio", "rank", "energy", "rank_quantum", "min_rank", "beta", "tucker_iters", "cp_iters",
                     "target_params", "target_speedup"):  # fmt: skip
            set_(name, _plain(getattr(self, name)))  # numpy scalars (np.int64(5000)) as Python numbers
        if not _is_number(self.ratio) or self.ratio <= 1:
            raise ConfigError(
                f"ratio must be a number > 1 (original params / decomposed params), got {self.ratio!r}; "
                "ratio=2 halves each layer"
            )
        if self.rank_rule not in RANK_RULES:
            raise ConfigError(f"rank_rule must be one of {RANK_RULES}, got {self.rank_rule!r}")
        if self.rank_rule == "fixed" and self.rank is None:
            raise ConfigError('rank_rule="fixed" needs rank=..., e.g. LRDConfig(rank_rule="fixed", rank=64)')
        if self.rank is not None:
            ranks = self.rank if isinstance(self.rank, tuple) else (self.rank,)
            if not 1 <= len(ranks) <= 2 or not all(isinstance(r, int) and not isinstance(r, bool) for r in ranks):
                raise ConfigError(f"rank must be a positive int or a pair (r1, r2) of them, got {self.rank!r}")
            if any(r <= 0 for r in ranks):
                raise ConfigError(f"rank must be >= 1, got {self.rank!r}; to leave a layer alone, exclude it")
        for name, rule in (("rank", "fixed"), ("energy", "energy")):
            if getattr(self, name) is not None and self.rank_rule != rule:
                raise ConfigError(f"{name}={getattr(self, name)!r} is used by rank_rule={rule!r} only, and "
                                  f"rank_rule is {self.rank_rule!r}: add rank_rule={rule!r}, or leave {name} out")
        if self.rank_rule == "energy" and self.energy is None:
            raise ConfigError('rank_rule="energy" needs energy=... in (0, 1], e.g. energy=0.9')
        if self.energy is not None and (not _is_number(self.energy) or not 0 < self.energy <= 1):
            raise ConfigError(f"energy must be in (0, 1] (fraction of sum of squared singular values kept), got {self.energy!r}")
        if self.rank_quantum is None and self.rank_rule in ("fixed", "energy"):
            set_("rank_quantum", 1)  # the user's own rank, or the smallest that keeps the energy: not rounded down
        elif self.rank_quantum is None:
            from .timing import default_rank_quantum

            set_("rank_quantum", default_rank_quantum())
        for name in ("rank_quantum", "min_rank"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be an int >= 1, got {value!r}")
        if not _is_number(self.beta) or self.beta <= 0:
            raise ConfigError(f"beta (r2 / r1 for Tucker) must be a number > 0, got {self.beta!r}")
        for name, least in (("tucker_iters", 0), ("cp_iters", 1)):  # HOOI may be skipped; CP is fitted by ALS only
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ConfigError(f"{name} must be an int >= {least}, got {value!r}")
        set_("include", _as_patterns(self.include, "include"))
        if self.include == ():
            raise ConfigError("include=[] matches no layer, so nothing would be decomposed: leave include out (None) "
                              "to consider every layer, or give glob patterns such as include=['layer4.*']")  # fmt: skip
        set_("exclude", _as_patterns(self.exclude, "exclude") or ())
        if self.filter_fn is not None and not callable(self.filter_fn):
            raise ConfigError(f"filter_fn must be callable(module, qualified_name) -> bool, got {self.filter_fn!r}")
        layer_types = (self.layer_types,) if isinstance(self.layer_types, type) else tuple(self.layer_types)
        if not layer_types or not all(isinstance(t, type) and issubclass(t, nn.Module) for t in layer_types):
            raise ConfigError(f"layer_types must be nn.Module subclasses, got {self.layer_types!r}")
        set_("layer_types", layer_types)
        leaves = (self.leaf_modules,) if isinstance(self.leaf_modules, (str, type)) else tuple(self.leaf_modules)
        if not all(isinstance(x, str) or (isinstance(x, type) and issubclass(x, nn.Module)) for x in leaves):
            raise ConfigError(f"leaf_modules must be nn.Module types or qualified names, got {self.leaf_modules!r}")
        set_("leaf_modules", leaves)
        if self.latency is not None and not isinstance(self.latency, LatencyConfig):
            raise ConfigError(f"latency must be an fxlrd.LatencyConfig, got {type(self.latency).__name__}")
        if self.merge not in (None, "exact", "approximate"):
            raise ConfigError(f"merge must be None, 'exact' or 'approximate', got {self.merge!r}")
        if not isinstance(self.branches, int) or isinstance(self.branches, bool) or self.branches < 1:
            raise ConfigError(f"branches must be an int >= 1, got {self.branches!r}")
        if self.branch_init not in ("btd", "truncate"):
            raise ConfigError(f"branch_init must be 'btd' or 'truncate', got {self.branch_init!r}")
        from .attention import ATTENTION_LAYOUTS
        from .methods import get_method, methods

        for name in ("linear_method", "conv_method"):
            value = getattr(self, name)
            if value not in methods():
                raise ConfigError(f"{name} must be one of the registered methods {methods()}, got {value!r}")
            if self.rank_rule not in get_method(value).rank_rules:
                raise ConfigError(
                    f"rank_rule={self.rank_rule!r} is not defined for {name}={value!r}; "
                    f"it takes {get_method(value).rank_rules}"
                )
        from .factorized import LayerSpec

        probes = {"linear_method": (LayerSpec("linear", 8, 8), "Linear and 1x1 conv layers", "svd"),
                  "conv_method": (LayerSpec("conv", 8, 8, (3, 3), 1, True, (1, 1), (1, 1), (1, 1)), "k×k convolutions",
                                  "tucker2 or cp")}  # fmt: skip
        for name, (spec, what, use) in probes.items():
            why = get_method(getattr(self, name)).applies(spec)
            if why:
                raise ConfigError(f"{name}={getattr(self, name)!r} cannot decompose {what} ({why}): use {use}")
        if self.branches > 1 and self.conv_method != "tucker2":
            raise ConfigError(f"branches={self.branches} groups Tucker-2 cores: it needs conv_method='tucker2', "
                              f"not {self.conv_method!r}")  # fmt: skip
        if self.attention not in ATTENTION_LAYOUTS:
            raise ConfigError(f"attention must be one of {ATTENTION_LAYOUTS}, got {self.attention!r}")
        if self.target_params is not None:
            tp = self.target_params
            if isinstance(tp, bool) or not _is_number(tp) or tp <= 0 or (isinstance(tp, float) and not tp < 1 and tp != int(tp)):
                raise ConfigError(
                    f"target_params must be a parameter count (int > 0) or a fraction of the model in (0, 1), got {tp!r}"
                )
            if isinstance(tp, float) and tp == 1.0:  # the whole model, or one parameter: neither is a budget
                raise ConfigError(
                    "target_params=1.0 is neither a fraction of the model (< 1, e.g. 0.5) nor a parameter count "
                    "(an int, e.g. 5_000_000)"
                )
            if isinstance(tp, float) and tp >= 1:
                object.__setattr__(self, "target_params", int(tp))
        if self.allocation not in ("uniform", "global"):
            raise ConfigError(f"allocation must be 'uniform' or 'global', got {self.allocation!r}")
        if not isinstance(self.sequential, bool):
            raise ConfigError(f"sequential must be True or False, got {self.sequential!r}")
        check_sensitivity(self.sensitivity, self.sensitivity_matrix)
        if self.experts not in ("factorize", "keep"):
            raise ConfigError(f"experts must be 'factorize' (stacked expert weights factorized per expert) or 'keep', got {self.experts!r}")
        if self.mlp not in ("factorize", "narrow"):
            raise ConfigError(f"mlp must be 'factorize' or 'narrow' (fewer hidden neurons; needs calibration data), got {self.mlp!r}")
        if not (isinstance(self.siblings, str) and self.siblings in ("separate", "fuse")):
            patterns = None if isinstance(self.siblings, str) else _as_patterns(self.siblings, "siblings")
            if not patterns:
                raise ConfigError(f"siblings must be 'separate', 'fuse' (linear layers reading one input decomposed as one), "
                                  f"or glob patterns of the layers to fuse (['*.query', '*.key']), got {self.siblings!r}")  # fmt: skip
            set_("siblings", patterns)
        if self.latency is not None and self.target_speedup is None and (
                self.target_params is not None or self.allocation == "global"):  # fmt: skip
            raise ConfigError(
                "latency=... alone times each layer and picks its fastest ranks; it does not take a parameter "
                "budget (target_params or allocation='global'): add target_speedup=... for the fastest model within "
                "the budget, or drop latency to meet the budget with the least error"
            )
        size_allocation = self.target_speedup is None and self.latency is None and (
            self.allocation == "global" or self.target_params is not None)  # fmt: skip
        if size_allocation and self.rank_rule != "ratio":
            raise ConfigError(
                f"rank_rule={self.rank_rule!r} is not used when global allocation chooses every rank for a parameter "
                "budget (allocation='global' or target_params): leave rank_rule at 'ratio', or use allocation='uniform'"
            )
        if self.decompose_pointwise is None:
            set_("decompose_pointwise", self.merge is None)
        if self.target_speedup is not None:
            if not _is_number(self.target_speedup) or self.target_speedup <= 1:
                raise ConfigError(f"target_speedup must be a number > 1 (e.g. 1.8 for 1.8x faster), got {self.target_speedup!r}")
            if self.latency is None:
                set_("latency", LatencyConfig())

    def method_for(self, spec: Any) -> str:
        """The method for a layer of ``spec`` (a `fxlrd.factorized.LayerSpec`)."""
        return self.linear_method if spec.pointwise else self.conv_method

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON-ready values (``filter_fn`` is recorded only as present or not)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("filter_fn", "sensitivity") and callable(value):
                value = getattr(value, "__qualname__", repr(value))
            elif f.name == "filter_fn":
                value = None if value is None else getattr(value, "__qualname__", repr(value))
            elif f.name == "latency":
                value = None if value is None else value.to_dict()
            elif f.name in ("layer_types", "leaf_modules"):
                value = [v if isinstance(v, str) else v.__name__ for v in value]
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out
