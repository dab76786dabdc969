"""One timed run of a speed case: every variant of (model, backend, batch), taking turns.

onnxruntime runs the ONNX files the prepare step exported (CPU execution provider, sessions
from `fxlrd.export.onnx_session`: no spinning between runs); eager, compile and cuda run the
saved variants through `fxlrd.latency.make_timer` — the runners the latency search itself uses.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from fxlrd.export import onnx_feed, onnx_session
from fxlrd.latency import LatencyConfig, make_timer
from fxlrd.timing import median_times

from . import models
from .build import as_args, load_variant, rotated

__all__ = ["BACKENDS", "case", "run"]

BACKENDS = ("onnxruntime", "eager", "compile", "cuda")
_SIZE_FIELDS = ("params", "macs", "weight_layers", "build_s", "config", "decomposed_layers", "kept_layers", "global_search")


def _onnx_runner(path: str, inputs: Any, threads: int) -> Callable[[], object]:
    session = onnx_session(path, threads=threads)
    feed = onnx_feed(session, as_args(inputs))
    return lambda: session.run(None, feed)


def _torch_runner(backend: str, model: torch.nn.Module, inputs: Any, threads: int) -> Callable[[], object]:
    timer = make_timer(LatencyConfig(backend=backend, threads=threads, progress=False))
    return timer.model_runner(model, as_args(inputs))


def _usable(info: Mapping[str, Any], backend: str) -> str | None:
    """Why a manifest entry cannot be timed on ``backend`` (None if it can)."""
    return info.get("failed") or info.get({"onnxruntime": "onnx_failed", "compile": "compile_failed"}.get(backend, ""))


def case(task: Mapping[str, Any]) -> dict[str, Any]:
    """What the run measures: model, backend, batch and the inputs' shapes."""
    inputs = models.get(task["model"]).inputs(task["batch"])
    return {"model": task["model"], "backend": task["backend"], "batch": task["batch"], "inputs": models.describe_inputs(inputs)}


def run(task: Mapping[str, Any]) -> dict[str, Any]:
    """Time every variant of the case, taking turns; the figures of one run.

    Args:
        task: ``model``, ``backend``, ``batch``, ``threads``, ``repeats``, ``warmup``, ``run``
            (which variant goes first) and ``manifest`` (written by `benchmarks.build.prepare`).

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
    loaded = {}
    if backend != "onnxruntime":  # load everything before a runner moves a model (cuda) or compiles it
        original = spec.build()
        loaded = {n: load_variant(spec, original, entries[n], inputs) for n in todo}
    runners, setup_s = {}, {}
    for name in todo:
        t0 = time.perf_counter()
        try:
            runners[name] = (_onnx_runner(entries[name]["onnx"], inputs, threads) if backend == "onnxruntime"
                             else _torch_runner(backend, loaded[name], inputs, threads))  # fmt: skip
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
    return {"variants": figures, "order": list(runners), "skipped": skipped, "failed": failed}
