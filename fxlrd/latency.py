"""Timing one layer on a target backend, and a disk cache of those timings.

Latency depends only on shapes, so layers are timed with random weights at their real input
shape. Identical layers (ResNet repeats its blocks) share a cache key and are timed once per
machine. This module knows nothing of ranks or plans; `fxlrd.ranks.search` uses it.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import statistics
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Callable, Literal, Sequence

import torch
from torch import nn

from .decompose import user_threads
from .errors import ConfigError, FxlrdWarning
from .modes import eval_mode

if TYPE_CHECKING:
    from .capture import Args

__all__ = [
    "LatencyConfig",
    "LayerTimer",
    "TorchTimer",
    "OnnxRuntimeTimer",
    "make_timer",
    "LatencyCache",
    "default_cache_path",
    "median_call_time",
]

Backend = Literal["onnxruntime", "eager", "compile", "cuda"]
BACKENDS = ("onnxruntime", "eager", "compile", "cuda")
CONTEXTS = ("layer", "neighbours")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class LatencyConfig:
    """How ranks are chosen by measured latency (paper Algorithm 1; `fxlrd.ranks.search`).

    Args:
        backend: where the model will run: ``"onnxruntime"`` (CPU execution provider, CUDA
            provider when present), ``"eager"`` (torch on CPU), ``"compile"`` (torch.compile,
            inductor) or ``"cuda"`` (torch eager on the GPU).
        window: candidates span ``[ceil((1 - window)·R), R]`` below the target rank R.
        quantum: candidates are multiples of this (plus R itself); 1 scans every rank.
            Default: the CPU's vector width (`fxlrd.timing.default_rank_quantum`).
        tolerance: the chosen rank is the largest whose time is within ``(1 + tolerance)``
            of the fastest candidate.
        repeats: timed samples per measurement (the median is used).
        warmup: untimed calls before measuring.
        threads: intra-op threads of the backend (default: torch's current setting).
        cache_path: the timing cache file (default: ``$XDG_CACHE_HOME/fxlrd/latency.json``).
        cache: set False to time everything afresh and write nothing.
        time_budget_s: stop searching after this many seconds; the remaining layers get
            data-free quantized ranks, and the plan says so.
        progress: show a progress bar on stderr.
        context: how a layer is timed: ``"layer"``, alone at its input shape; ``"neighbours"``,
            inside a window of the model's graph with the operations around it (the batch
            norm, activation and residual add the backend fuses with it, up to the next
            layers; `fxlrd.ranks.context`), so fusions and layout changes count as in the
            deployed model. Layers whose window cannot be cut out are timed alone.
        depth: the most operations a ``"neighbours"`` window takes on each side of the layer.
        dtype: the dtype the torch backends time layers in (``"float32"``, ``"bfloat16"`` or
            ``"float16"``; weights and floating inputs are cast, on a copy): time in the dtype
            the model will be deployed in, since the fastest ranks differ (bfloat16 tensor
            cores want dimensions in multiples of 8). None: as the model is (float32).
            onnxruntime times the exported float32 model and takes none.
        quantize: onnxruntime only: ``"int8"`` or ``"int8-dynamic"`` times every layer, window
            and whole model after onnxruntime's int8 quantization, with `export_onnx`'s
            settings for that mode (static: calibrated on the timing inputs, random for a layer
            or window and the example inputs for a whole model; speed does not depend on the
            values), on the CPU, so ranks are chosen for the int8 model you deploy: int8
            kernels reward ranks differently, and each factor adds a requantization, so a
            factor chain gains less over its layer in int8 than in float32. Weights the mode does
            not quantize (a transposed conv's; convs' under dynamic int8) stay in float, as they
            run deployed. Its timings are cached apart from float32's. None: float32.
        model_repeats: timed samples per whole-model measurement: global mode's original,
            its trials (each taking turns with the original) and narrowing's speed-up.
            Default: 4 × ``repeats``. A search times a few whole models, and their ratio
            decides it, so more samples cost little there and steady it: ResNet-50 in int8
            against a factorized copy (onnxruntime, a 2-core Xeon, scratch run) measured
            1.24–1.42× in six measurements of 15 samples, 1.32–1.36× of 60.
    """

    backend: Backend = "onnxruntime"
    window: float = 0.25
    quantum: int | None = None
    tolerance: float = 0.02
    repeats: int = 15
    warmup: int = 3
    threads: int | None = None
    cache_path: str | os.PathLike | None = None
    cache: bool = True
    time_budget_s: float | None = None
    progress: bool = True
    context: Literal["layer", "neighbours"] = "layer"
    depth: int = 3
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    quantize: Literal["int8", "int8-dynamic"] | None = None
    model_repeats: int | None = None

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError(f"latency backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.context not in CONTEXTS:
            raise ConfigError(f"latency context must be one of {CONTEXTS}, got {self.context!r}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ConfigError(f"latency dtype must be one of {DTYPES} or None, got {self.dtype!r}")
        if self.dtype == "float32":  # what the models are: timed as they are, in the same cache entries
            object.__setattr__(self, "dtype", None)
        if self.dtype is not None and self.backend == "onnxruntime":
            raise ConfigError(f"dtype={self.dtype!r} applies to the torch backends (eager, compile, cuda); onnxruntime "
                              "times the exported float32 model: leave dtype unset or choose another backend")  # fmt: skip
        if self.quantize is not None:
            from .quantize import QUANTIZE_MODES

            if self.quantize not in QUANTIZE_MODES:
                raise ConfigError(f"latency quantize must be one of {QUANTIZE_MODES} or None, got {self.quantize!r}")
            if self.backend != "onnxruntime":
                raise ConfigError(f"quantize={self.quantize!r} times layers in onnxruntime's int8: use "
                                  f"backend='onnxruntime' (got {self.backend!r}), or leave quantize unset")  # fmt: skip
        if not isinstance(self.depth, int) or self.depth < 0:
            raise ConfigError(f"depth must be an int >= 0, got {self.depth!r}")
        if not isinstance(self.window, (int, float)) or not 0 <= self.window < 1:
            raise ConfigError(f"window must be in [0, 1), got {self.window!r}")
        if self.quantum is None:
            from .timing import default_rank_quantum

            object.__setattr__(self, "quantum", default_rank_quantum())
        if not isinstance(self.quantum, int) or self.quantum < 1:
            raise ConfigError(f"quantum must be an int >= 1, got {self.quantum!r}")
        if not isinstance(self.tolerance, (int, float)) or not 0 <= self.tolerance < float("inf"):
            raise ConfigError(f"tolerance must be a finite number >= 0, got {self.tolerance!r}")
        for name in ("repeats", "warmup"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < (1 if name == "repeats" else 0):
                raise ConfigError(f"{name} must be a positive int, got {value!r}")
        if self.model_repeats is not None and (
                not isinstance(self.model_repeats, int) or isinstance(self.model_repeats, bool) or self.model_repeats < 1):
            raise ConfigError(f"model_repeats must be a positive int (or None for 4 x repeats), got {self.model_repeats!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ConfigError(f"threads must be an int >= 1 or None, got {self.threads!r}")
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            raise ConfigError(f"time_budget_s must be > 0 seconds or None, got {self.time_budget_s!r}")
        if self.backend == "cuda" and not torch.cuda.is_available():
            raise ConfigError('backend="cuda" needs a CUDA device and a CUDA build of torch; use "eager" or "onnxruntime" on CPU')

    @property
    def whole_model_repeats(self) -> int:
        """Samples per whole-model measurement: ``model_repeats``, or 4 × ``repeats``."""
        return self.model_repeats if self.model_repeats is not None else 4 * self.repeats

    def to_dict(self) -> dict:
        d = asdict(self)
        d["cache_path"] = None if self.cache_path is None else str(self.cache_path)
        return d


def median_call_time(fn: Callable[[], object], *, repeats: int, warmup: int, min_sample_s: float = 5e-4) -> float:
    """Median seconds per call of ``fn``: ``repeats`` samples, each of enough calls to last
    at least ``min_sample_s`` (so timer overhead does not dominate microsecond layers)."""
    for _ in range(max(warmup, 1)):
        fn()
    t0 = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t0, 1e-7)
    number = max(1, int(min_sample_s / once))
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        samples.append((time.perf_counter() - t0) / number)
    return statistics.median(samples)


def _cpu_name() -> str:
    from .timing import environment

    return str(environment()["processor"])


class LayerTimer:
    """Times a module at an input shape on one backend. Subclasses set ``backend`` and
    ``context`` (device, versions, dtype, threads: everything the cache key needs)."""

    backend: str = ""
    context: str = ""

    def inputs_runner(self, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> Callable[[], object]:  # pragma: no cover
        """A zero-argument callable running ``module(*inputs)`` once (a layer, or a `Window`)."""
        raise NotImplementedError

    def runner(self, module: nn.Module, input_shape: Sequence[int]) -> Callable[[], object]:
        """A zero-argument callable running ``module`` once on a random input of that shape."""
        dtype = next(module.parameters()).dtype
        return self.inputs_runner(module, (torch.randn(tuple(input_shape), dtype=dtype),))

    def time(self, module: nn.Module, input_shape: Sequence[int]) -> float:
        """Median seconds of one run of ``module`` at ``input_shape``."""
        return median_call_time(self.runner(module, input_shape), repeats=self.config.repeats, warmup=self.config.warmup)

    def time_inputs(self, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> float:
        """Median seconds of one run of ``module(*inputs)``."""
        return median_call_time(self.inputs_runner(module, inputs), repeats=self.config.repeats, warmup=self.config.warmup)

    def speedup(self, original: nn.Module, other: nn.Module, input_shape: Sequence[int]) -> float:
        """How many times faster ``other`` runs than ``original``, the two timed taking turns
        so the machine's drift cancels out of the ratio."""
        from .timing import median_times

        runs = {"original": self.runner(original, input_shape), "other": self.runner(other, input_shape)}
        times = median_times(runs, repeats=self.config.repeats, warmup=self.config.warmup)
        return times["original"]["median"] / times["other"]["median"]

    def model_runner(self, model: nn.Module, inputs: "Args") -> Callable[[], object]:  # pragma: no cover
        """A zero-argument callable running a whole model once on ``inputs`` (``(args, kwargs)``)."""
        raise NotImplementedError

    def time_model(self, model: nn.Module, inputs: "Args") -> float:
        """Median seconds of one run of a whole model on ``inputs``."""
        return median_call_time(self.model_runner(model, inputs), repeats=self.config.whole_model_repeats,
                                warmup=self.config.warmup)  # fmt: skip

    def speedup_model(self, original: nn.Module, other: nn.Module, inputs: "Args") -> float:
        """`speedup` for whole models on their real inputs (any number, keyword inputs too)."""
        from .timing import median_times

        runs = {"original": self.model_runner(original, inputs), "other": self.model_runner(other, inputs)}
        times = median_times(runs, repeats=self.config.whole_model_repeats, warmup=self.config.warmup)
        return times["original"]["median"] / times["other"]["median"]


class TorchTimer(LayerTimer):
    """torch eager or torch.compile (inductor), on CPU or CUDA, through torch.utils.benchmark.

    On the CPU, compiled modules are compiled with inductor's *freezing* (weights folded in as
    constants and prepacked into oneDNN's blocked layouts), the setting for CPU inference:
    without it, inductor on CPU runs ResNet-50 at about eager speed (94 against 100 ms on a
    2-core AMD EPYC, 42 ms with freezing). A frozen module does not see later changes to its
    weights, which timing never makes. ``freezing=False`` compiles as torch.compile's default.
    """

    def __init__(self, config: LatencyConfig, *, compiled: bool = False, device: str = "cpu",
                 freezing: bool | None = None):  # fmt: skip
        self.config, self.compiled, self.device = config, compiled, torch.device(device)
        self.freezing = (self.device.type == "cpu") if freezing is None else freezing
        self.dtype = getattr(torch, config.dtype) if config.dtype else None
        self.threads = config.threads or user_threads()
        self.backend = ("compile" if compiled else "eager") + ("-cuda" if self.device.type == "cuda" else "")
        where = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else _cpu_name()
        self.context = f"{where}|torch={torch.__version__}|threads={self.threads}" + (f"|{config.dtype}" if config.dtype else "")
        if compiled and self.freezing:
            self.context += "|freezing"

    def _compile(self, module: nn.Module, *args: object, **kwargs: object) -> Callable[..., object]:
        """``module`` compiled for these inputs by a first call outside the timing (with
        freezing when the timer freezes: inductor reads the flag when it compiles, and
        ``torch.compile(options={"freezing": True})`` does not reach it in torch 2.13; setting
        it around every timed call would add about 20 µs to each)."""
        compiled = torch.compile(module)
        with torch.no_grad(), contextlib.ExitStack() as stack:
            if self.freezing:
                import torch._inductor.config as inductor_config

                stack.enter_context(inductor_config.patch(freezing=True))
            compiled(*args, **kwargs)
        return compiled

    def _place(self, module: nn.Module) -> nn.Module:
        """The module in eval mode on the timer's device (and in its dtype): a copy unless it is
        that already, so the caller's keeps its own mode, device and dtype."""
        if self.dtype is not None:
            return copy.deepcopy(module).to(self.device, self.dtype).eval()
        on_device = all(t.device.type == self.device.type and self.device.index in (None, t.device.index)
                        for t in [*module.parameters(), *module.buffers()])  # fmt: skip
        if any(m.training for m in module.modules()) or not on_device:
            module = copy.deepcopy(module)
        return module.to(self.device).eval()

    def _cast(self, value: object) -> object:
        if not isinstance(value, torch.Tensor):
            return value
        return value.to(self.device, self.dtype) if self.dtype is not None and value.is_floating_point() else value.to(self.device)

    def _prepare(self, module: nn.Module, input_shape: Sequence[int]) -> tuple[Callable[..., object], torch.Tensor]:
        module = self._place(module)
        x = torch.randn(tuple(input_shape), device=self.device, dtype=next(module.parameters()).dtype)
        if self.compiled:
            module = self._compile(module, x)
        return module, x

    def model_runner(self, model: nn.Module, inputs: "Args") -> Callable[[], object]:
        model = self._place(model)
        args, kwargs = tuple(map(self._cast, inputs[0])), {k: self._cast(v) for k, v in inputs[1].items()}
        if self.compiled:
            model = self._compile(model, *args, **kwargs)
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        threads = self.threads

        def run() -> None:
            previous = torch.get_num_threads()
            torch.set_num_threads(threads)
            with torch.no_grad():
                model(*args, **kwargs)
            sync()
            torch.set_num_threads(previous)

        return run

    def inputs_runner(self, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> Callable[[], object]:
        return self.model_runner(module, (tuple(inputs), {}))

    @torch.no_grad()
    def time(self, module: nn.Module, input_shape: Sequence[int]) -> float:
        from torch.utils import benchmark

        module, x = self._prepare(module, input_shape)
        timer = benchmark.Timer(stmt="m(x)", globals={"m": module, "x": x}, num_threads=self.threads)
        timer.timeit(self.config.warmup or 1)
        number = max(1, int(5e-4 / max(timer.timeit(1).mean, 1e-7)))  # samples of >= 0.5 ms
        return statistics.median(timer.timeit(number).mean for _ in range(self.config.repeats))


class OnnxRuntimeTimer(LayerTimer):
    """onnxruntime (CUDA execution provider when present, else CPU): export the layer alone, time
    it; with ``config.quantize``, time its int8 quantization instead (`_int8`), on the CPU (the
    CUDA provider runs most of a QDQ model dequantized)."""

    def __init__(self, config: LatencyConfig):
        import onnxruntime as ort

        self.config = config
        available = ort.get_available_providers() if config.quantize is None else ["CPUExecutionProvider"]
        self.providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        self.threads = config.threads or user_threads()
        self.backend = "onnxruntime"
        # the GPU's name, as the torch timer's: a cache in a home folder shared across machines
        where = torch.cuda.get_device_name() if self.providers[0] == "CUDAExecutionProvider" and torch.cuda.is_available() \
            else "cuda" if self.providers[0] == "CUDAExecutionProvider" else _cpu_name()  # fmt: skip
        self.context = f"{where}|ort={ort.__version__}|{self.providers[0]}|threads={self.threads}"
        self.quantize = config.quantize
        if self.quantize is not None:
            self.context += f"|{self.quantize}"

    def inputs_runner(self, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> Callable[[], object]:
        from .export import onnx_session

        module = _on_cpu(module)
        with eval_mode(module):  # exported in eval mode; the caller's module keeps its own
            data = onnx_bytes(module, *inputs)
        if self.quantize is not None:  # (the layer exporter shares equal weights; the deployed model's differ)
            data = self._int8(_shared_initializers_copied(data), (tuple(inputs), {}))
        session = onnx_session(data, threads=self.threads, providers=self.providers)
        feed = {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs)}
        return lambda: session.run(None, feed)

    def model_runner(self, model: nn.Module, inputs: "Args") -> Callable[[], object]:
        from .export import export_onnx_file, onnx_feed, onnx_session

        model = _on_cpu(model)
        with tempfile.TemporaryDirectory() as tmp, eval_mode(model):  # the caller's model keeps its mode
            path = Path(tmp) / "model.onnx"
            export_onnx_file(model, inputs, path)
            data = path.read_bytes() if self.quantize is None else self._int8(path.read_bytes(), inputs)
            session = onnx_session(data, threads=self.threads, providers=self.providers)
        feed = onnx_feed(session, inputs)
        return lambda: session.run(None, feed)

    def _int8(self, data: bytes, inputs: "Args") -> bytes:
        """The float ONNX model ``data`` quantized as ``export_onnx(quantize=self.quantize)``
        quantizes it; static int8 is calibrated on ``inputs`` (``(args, kwargs)``: the timing
        inputs themselves — random for a layer or window, the example inputs for a whole model;
        kernel speed does not depend on the values). A model with no weight the mode quantizes (a
        transposed conv; a conv under dynamic int8, which quantizes matrix products only) is
        timed as the quantizer leaves it, its weights in float, as the deployed model runs it."""
        import onnx

        from .export import onnx_feed
        from .quantize import quantize_onnx_file

        calibration = None
        if self.quantize == "int8":  # one batch, by the model's input names
            graph = onnx.load_from_string(data).graph
            constants = {i.name for i in graph.initializer}
            names = [i.name for i in graph.input if i.name not in constants]
            reader = SimpleNamespace(get_inputs=lambda: [SimpleNamespace(name=n) for n in names])
            calibration = [{k: torch.from_numpy(v) for k, v in onnx_feed(reader, inputs).items()}]
        with tempfile.TemporaryDirectory() as tmp:
            src, dst = Path(tmp) / "float.onnx", Path(tmp) / "int8.onnx"
            src.write_bytes(data)
            quantize_onnx_file(src, dst, calibration, self.quantize, require_quantized=False)
            return dst.read_bytes()


def _shared_initializers_copied(data: bytes) -> bytes:
    """``data`` with every ``Identity`` of an initializer (or of such an Identity) replaced by a
    copy of it under the Identity's output name. The TorchScript layer exporter keeps one copy
    of equal weights and reads it through Identity nodes (a window's random layers fold equal
    batch-norm biases), and the quantizer then leaves such a conv's bias unquantized ("Expected
    bias ... to be an initializer"), a conv onnxruntime ran about 3x slower than the deployed
    model's, whose weights differ."""
    import onnx

    model = onnx.load_from_string(data)
    graph = model.graph
    inits, outputs = {i.name: i for i in graph.initializer}, {o.name for o in graph.output}
    changed = False
    for node in list(graph.node):  # graph order: a chain's first Identity comes first
        if node.op_type == "Identity" and node.input[0] in inits and node.output[0] not in outputs:
            copy_ = onnx.TensorProto()
            copy_.CopyFrom(inits[node.input[0]])
            copy_.name = node.output[0]
            graph.initializer.append(copy_)
            inits[copy_.name] = copy_
            graph.node.remove(node)
            changed = True
    return model.SerializeToString() if changed else data


def _on_cpu(module: nn.Module) -> nn.Module:
    """``module`` itself when it is on the CPU, else a copy there (the caller's stays where it is)."""
    if all(t.device.type == "cpu" for t in [*module.parameters(), *module.buffers()]):
        return module
    return copy.deepcopy(module).cpu()


def onnx_bytes(module: nn.Module, *inputs: torch.Tensor) -> bytes:
    """A small module (a layer, a window of layers) as ONNX bytes: the TorchScript exporter is
    ~20x faster for one layer; the torch.export-based exporter takes over where that one is gone."""
    names = ["input"] if len(inputs) == 1 else [f"input{i}" for i in range(len(inputs))]
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            buf = io.BytesIO()
            torch.onnx.export(module, tuple(inputs), buf, dynamo=False, input_names=names)
            return buf.getvalue()
        except Exception:  # noqa: BLE001  (legacy exporter removed or unable: use the new one)
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "layer.onnx"
                torch.onnx.export(module, tuple(inputs), str(path), dynamo=True, input_names=names, external_data=False)
                return path.read_bytes()


def make_timer(config: LatencyConfig) -> LayerTimer:
    """The `LayerTimer` of ``config.backend``."""
    if config.backend == "onnxruntime":
        return OnnxRuntimeTimer(config)
    if config.backend == "cuda":
        return TorchTimer(config, device="cuda")
    return TorchTimer(config, compiled=config.backend == "compile")


def default_cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fxlrd" / "latency.json"


_CACHE_FORMAT = "fxlrd.latency-cache/1"


class LatencyCache:
    """Layer timings on disk, keyed by strings that hold everything the time depends on.

    Writes merge with what is on disk under a file lock and replace the file atomically, so
    two processes can fill the same cache at once. A corrupt file is reported and rebuilt.
    """

    def __init__(self, path: str | os.PathLike | None):
        self.path = None if path is None else Path(path)
        self.entries: dict[str, float] = {}
        self.hits = self.misses = 0
        self._dirty: dict[str, float] = {}
        if self.path is not None:
            self.entries = self._read()

    def _read(self, warn: bool = True) -> dict[str, float]:
        assert self.path is not None
        try:
            if not self.path.exists():
                return {}
            data = json.loads(self.path.read_text())
            if data.get("format") != _CACHE_FORMAT:
                raise ValueError(f"format is {data.get('format')!r}, not {_CACHE_FORMAT!r}")
            entries = {str(k): float(v) for k, v in data["entries"].items()}
        except (ValueError, KeyError, TypeError, AttributeError, OSError) as exc:
            if warn:
                warnings.warn(f"fxlrd latency cache {self.path} is unreadable ({exc}); rebuilding it", FxlrdWarning,
                              stacklevel=3)  # fmt: skip
            return {}
        bad = [k for k, v in entries.items() if not 0 <= v < float("inf")]  # (NaN fails too)
        if bad:
            if warn:
                warnings.warn(f"fxlrd latency cache {self.path}: {len(bad)} timings are not finite seconds >= 0 "
                              f"(first: {bad[0][:80]!r}); they are measured again", FxlrdWarning, stacklevel=3)  # fmt: skip
            entries = {k: v for k, v in entries.items() if k not in bad}
        return entries

    def get(self, key: str) -> float | None:
        value = self.entries.get(key)
        if value is None:
            self.misses += 1
        else:
            self.hits += 1
        return value

    def put(self, key: str, seconds: float) -> None:
        self.entries[key] = seconds
        self._dirty[key] = seconds

    def flush(self) -> None:
        """Merge this process's new entries into the file. A file that cannot be written (its
        folder is a file, no permission, a full disk) is warned about once; the timings stay
        in memory for this search and the search goes on."""
        if self.path is None or not self._dirty:
            return
        import fcntl

        tmp = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path.with_suffix(self.path.suffix + ".lock"), "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                merged = self._read(warn=False) | self._dirty
                fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".latency.", suffix=".json")
                with os.fdopen(fd, "w") as f:
                    json.dump({"format": _CACHE_FORMAT, "entries": merged}, f, indent=0, sort_keys=True)
                os.replace(tmp, self.path)
        except OSError as exc:
            if tmp is not None and os.path.exists(tmp):
                os.remove(tmp)
            warnings.warn(f"fxlrd latency cache {self.path} cannot be written ({exc}); timings are kept in memory only "
                          "(set LatencyConfig(cache_path=...) to a writable file, or cache=False)", FxlrdWarning, stacklevel=2)  # fmt: skip
            self.path = None  # warned once: the rest of the search runs without the file
            return
        self.entries |= merged
        self._dirty.clear()

    def timed(self, key: str, measure: Callable[[], float]) -> float:
        """The cached time under ``key``, measuring (and storing) it on a miss."""
        value = self.get(key)
        if value is None:
            value = measure()
            self.put(key, value)
        return value
