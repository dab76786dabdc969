"""One timed run of a speed case: every variant of (model, backend, batch), taking turns.

onnxruntime runs the ONNX files the prepare step exported (CPU execution provider, sessions
from `fxlrd.export.onnx_session`: no spinning between runs); eager and compile run the saved
variants through `fxlrd.latency.make_timer` — the runners the latency search itself uses
(``compile`` on the CPU with inductor's freezing, the setting for CPU inference).

The GPU backends run the variants on CUDA: ``cuda`` (eager, float32), ``cuda_bf16`` (eager,
every weight and floating input in bfloat16), ``cuda_compile`` and ``cuda_compile_bf16``
(torch.compile, inductor, default mode); each also with the suffix ``_cl`` (``cuda_bf16_cl``
...): the same in channels_last, every 4-d weight and input of the original and the variants
alike (cuDNN's tensor-core convolutions want it; NCHW stays the default). A compiled variant
keeps its compiled graphs across batch sizes, under torch.compile's default dynamic-shape policy: the first batch size (1)
gets a static graph, the second one a graph with a dynamic batch that the later ones reuse.
Compilation happens before timing. float32 runs with torch's default TF32 settings and
cuDNN's benchmark mode off, which the record notes.
"""

from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from fxlrd.export import onnx_feed, onnx_session
from fxlrd.latency import LatencyConfig, TorchTimer, make_timer
from fxlrd.timing import median_times

from . import models
from .build import as_args, load_variant, rotated

__all__ = ["BACKENDS", "CPU_BACKENDS", "GPU_BACKENDS", "GPU_NCHW_BACKENDS", "GpuModels", "case", "run", "gpu_device",
           "gpu_dtype", "gpu_layout", "variant_key"]

GPU_NCHW_BACKENDS = ("cuda", "cuda_bf16", "cuda_compile", "cuda_compile_bf16")
GPU_BACKENDS = GPU_NCHW_BACKENDS + tuple(f"{b}_cl" for b in GPU_NCHW_BACKENDS)
CPU_BACKENDS = ("onnxruntime", "eager", "compile")
BACKENDS = CPU_BACKENDS + GPU_BACKENDS
# Where the GPU backends run; smoke tests on a machine without a GPU set it to "cpu".
GPU_DEVICE_VARIABLE = "FXLRD_BENCH_GPU_DEVICE"
_SIZE_FIELDS = ("params", "macs", "weight_layers", "build_s", "config", "decomposed_layers", "kept_layers", "global_search")


def _onnx_runner(path: str, inputs: Any, threads: int) -> Callable[[], object]:
    session = onnx_session(path, threads=threads)
    feed = onnx_feed(session, as_args(inputs))
    return lambda: session.run(None, feed)


def _torch_runner(backend: str, model: torch.nn.Module, inputs: Any, threads: int) -> Callable[[], object]:
    timer = make_timer(LatencyConfig(backend=backend, threads=threads, progress=False))
    return timer.model_runner(model, as_args(inputs))


def gpu_device() -> str:
    """The device of the GPU backends: ``cuda`` unless ``$FXLRD_BENCH_GPU_DEVICE`` says otherwise."""
    return os.environ.get(GPU_DEVICE_VARIABLE, "cuda")


def gpu_dtype(backend: str) -> torch.dtype:
    """The dtype a GPU backend runs in."""
    return torch.bfloat16 if backend.removesuffix("_cl").endswith("_bf16") else torch.float32


def gpu_layout(backend: str) -> torch.memory_format:
    """The memory layout a GPU backend runs in: channels_last for the ``_cl`` ones."""
    return torch.channels_last if backend.endswith("_cl") else torch.contiguous_format


def _to(value: Any, device: str, dtype: torch.dtype, layout: torch.memory_format = torch.contiguous_format) -> Any:
    """A tensor on ``device``, floating ones in ``dtype`` (token ids and masks keep theirs), a
    4-d one in ``layout``."""
    if not isinstance(value, torch.Tensor):
        return value
    value = value.to(device, dtype) if value.is_floating_point() else value.to(device)
    return value.contiguous(memory_format=layout) if value.dim() == 4 else value


class GpuModels:
    """The variants of one process on the GPU: each cast to a dtype and moved there once, from
    the CPU float32 models it was given, and run at every batch size through the latency
    search's own runner (`fxlrd.latency.TorchTimer`). A compiled variant keeps its compiled
    graphs across batch sizes; one that failed is not tried again."""

    def __init__(self, loaded: Mapping[str, torch.nn.Module]):
        self.loaded: Mapping[str, torch.nn.Module] = loaded
        self.ready: dict[tuple[str, str], torch.nn.Module] = {}
        self.failed: dict[tuple[str, str, bool], str] = {}

    def runner(self, name: str, backend: str, inputs: Any) -> Callable[[], object]:
        """One synchronised call of variant ``name`` on ``backend``, after an untimed first call
        (which compiles it for these shapes when the backend compiles)."""
        device, dtype, compiled, layout = gpu_device(), gpu_dtype(backend), "compile" in backend, gpu_layout(backend)
        key = (name, str(dtype)) if layout == torch.contiguous_format else (name, str(dtype), "channels_last")
        if (*key, compiled) in self.failed:
            raise RuntimeError(f"failed before in this process: {self.failed[(*key, compiled)]}")
        if key not in self.ready:
            self.ready[key] = copy.deepcopy(self.loaded[name]).to(device, dtype).to(memory_format=layout).eval()
        args, kwargs = as_args(inputs)
        cast = (tuple(_to(a, device, dtype, layout) for a in args), {k: _to(v, device, dtype, layout) for k, v in kwargs.items()})
        timer = TorchTimer(LatencyConfig(backend="eager", progress=False), compiled=compiled, device=device)
        try:
            run = timer.model_runner(self.ready[key], cast)
            run()  # a variant that cannot run fails here, before the timing, and alone
            return run
        except Exception as exc:
            self.failed[(*key, compiled)] = f"{type(exc).__name__}: {exc}"
            raise


def variant_key(name: str, entry: Mapping[str, Any]) -> str:
    """What identifies a loaded variant within a process: the directory it was saved in (a
    searched variant built for another case is another model), or the name of one never saved
    (the original)."""
    return str(entry.get("dir") or name)


def gpu_settings() -> dict[str, Any]:
    """What the GPU figures depend on besides the case: TF32 flags, cuDNN's benchmark mode."""
    return {"matmul_tf32": torch.backends.cuda.matmul.allow_tf32, "cudnn_tf32": torch.backends.cudnn.allow_tf32,
            "cudnn_benchmark": torch.backends.cudnn.benchmark, "device": gpu_device()}  # fmt: skip


def _usable(info: Mapping[str, Any], backend: str) -> str | None:
    """Why a manifest entry cannot be timed on ``backend`` (None if it can)."""
    return info.get("failed") or info.get({"onnxruntime": "onnx_failed", "compile": "compile_failed"}.get(backend, ""))


def case(task: Mapping[str, Any]) -> dict[str, Any]:
    """What the run measures: model, backend, batch and the inputs' shapes."""
    inputs = models.get(task["model"]).inputs(task["batch"])
    return {"model": task["model"], "backend": task["backend"], "batch": task["batch"], "inputs": models.describe_inputs(inputs)}


def run(task: Mapping[str, Any], loaded: dict[str, torch.nn.Module] | None = None,
        gpu: GpuModels | None = None) -> dict[str, Any]:  # fmt: skip
    """Time every variant of the case, taking turns; the figures of one run.

    Args:
        task: ``model``, ``backend``, ``batch``, ``threads``, ``repeats``, ``warmup``, ``run``
            (which variant goes first) and ``manifest`` (written by `benchmarks.build.prepare`).
        loaded: the variants already loaded in this process, by `variant_key` (filled as they
            are loaded), so that a process timing several cases loads each variant once.
        gpu: the variants already on the GPU (moved and compiled once per dtype), likewise.

    Returns:
        The record's ``variants`` (median/min/max seconds, samples, size and how it was built;
        ``setup_s``: session creation or compilation), ``order`` (the order they took turns in),
        ``skipped`` and ``failed``.
    """
    torch.set_num_threads(task["threads"])
    backend, threads = task["backend"], task["threads"]
    manifest = json.loads(Path(task["manifest"]).read_text())
    spec = models.get(task["model"])
    inputs = spec.inputs(task["batch"])
    entries = manifest["variants"]
    skipped = {n: info["skipped"] for n, info in entries.items() if "skipped" in info}
    failed = {n: _usable(info, backend) for n, info in entries.items() if n not in skipped and _usable(info, backend)}
    todo = rotated([n for n in entries if n not in skipped and n not in failed], task["run"])
    loaded = {} if loaded is None else loaded
    keys = {n: variant_key(n, entries[n]) for n in todo}
    if backend != "onnxruntime" and any(keys[n] not in loaded for n in todo):  # load before a runner moves or compiles one
        original = spec.build()
        loaded |= {keys[n]: load_variant(spec, original, entries[n], inputs) for n in todo if keys[n] not in loaded}
    if backend in GPU_BACKENDS and gpu is None:
        gpu = GpuModels(loaded)
    runners, setup_s = {}, {}
    for name in todo:
        t0 = time.perf_counter()
        try:
            if backend == "onnxruntime":
                runners[name] = _onnx_runner(entries[name]["onnx"], inputs, threads)
            elif backend in GPU_BACKENDS:
                runners[name] = gpu.runner(keys[name], backend, inputs)
            else:
                runners[name] = _torch_runner(backend, loaded[keys[name]], inputs, threads)
        except Exception as exc:  # noqa: BLE001  (a variant the backend cannot run is a result too)
            failed[name] = f"{type(exc).__name__}: {exc}"
            continue
        setup_s[name] = time.perf_counter() - t0
    times = median_times(runners, repeats=task["repeats"], warmup=task["warmup"])
    figures = {  # in the manifest's order, whatever order they ran in
        name: {"median_s": t["median"], "min_s": t["min"], "max_s": t["max"], "samples": t["n"], "setup_s": setup_s[name]}
        | {k: entries[name][k] for k in _SIZE_FIELDS if entries[name].get(k) is not None}
        for name in entries if (t := times.get(name))
    }
    out = {"variants": figures, "order": list(runners), "skipped": skipped, "failed": failed}
    if backend in GPU_BACKENDS:
        out["gpu_settings"] = gpu_settings() | {"dtype": str(gpu_dtype(backend)).removeprefix("torch.")}
    if backend == "compile":  # CPU inductor freezes the weights (fxlrd.latency.TorchTimer); earlier runs did not
        out["compile_settings"] = {"freezing": True}
    return out
