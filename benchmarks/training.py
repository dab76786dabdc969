"""One timed run of a training case: a training step (forward, backward, SGD step) of the
original and of each compressed variant under each freezing policy, taking turns.

Every model runs in the case's memory layout — NCHW (torch's default) or channels_last, the
original included — so a speed-up never mixes layouts. The loss is the mean square of the first
floating output: the step's cost does not depend on what is learnt. Dropout is off in every
model (p = 0, which torch skips): the transformers' compressed graphs are captured by
torch.export in eval mode and carry no dropout, so their originals must not pay for it either.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn
from torch.utils import _pytree as pytree

import fxlrd
from fxlrd.timing import median_times

from . import models, variants
from .build import as_args, load_variant, rotated
from .speed import gpu_device

__all__ = ["POLICIES", "LAYOUTS", "BACKENDS", "case", "run", "variant_names"]

POLICIES = ("none", "paper", "sequential")
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
BACKENDS = ("eager", "cuda")


def variant_names(bases: list[str]) -> list[str]:
    """The timed variants: ``original`` and ``<base>/<policy>`` for each compressed base variant
    (only ``/none`` for one that decomposes nothing, as it has no factors to freeze)."""
    names = ["original"]
    for base in bases:
        if base != "original":
            names += [f"{base}/{p}" for p in (POLICIES if variants.get(base).decomposes else ("none",))]
    return names


def _loss(output: Any) -> torch.Tensor:
    first = next(t for t in pytree.tree_leaves(output) if isinstance(t, torch.Tensor) and t.is_floating_point())
    return first.float().square().mean()


def _without_dropout(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.p = 0.0


def _trainer(model: nn.Module, policy: str | None, inputs: Any, device: str) -> Callable[[], None]:
    """One training step of ``model`` as a zero-argument callable (freezing ``policy`` applied)."""
    model.train()
    _without_dropout(model)
    if policy in ("none", "paper"):
        fxlrd.freeze(model, policy)
    optimizer = torch.optim.SGD(fxlrd.param_groups(model), lr=0.01, momentum=0.9)
    freezer = fxlrd.SequentialFreezer(model, period=1, optimizer=optimizer) if policy == "sequential" else None
    args, kwargs = as_args(inputs)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        _loss(model(*args, **kwargs)).backward()
        optimizer.step()
        if freezer is not None:  # the phase switch is part of what sequential freezing costs
            freezer.step()
        sync()

    return step


def _to(inputs: Any, device: str, layout: torch.memory_format) -> Any:
    move = lambda t: t.to(device).contiguous(memory_format=layout) if t.dim() == 4 else t.to(device)  # noqa: E731
    return {k: move(v) for k, v in inputs.items()} if isinstance(inputs, Mapping) else move(inputs)


def case(task: Mapping[str, Any]) -> dict[str, Any]:
    """What the run measures: model, backend, batch, memory layout and the inputs' shapes."""
    inputs = models.get(task["model"]).inputs(task["batch"])
    return {"model": task["model"], "backend": task["backend"], "batch": task["batch"], "layout": task["layout"],
            "inputs": models.describe_inputs(inputs)}  # fmt: skip


def run(task: Mapping[str, Any]) -> dict[str, Any]:
    """Time a training step of every variant of the case, taking turns; the figures of one run.

    Args:
        task: ``model``, ``backend`` (``eager`` or ``cuda``), ``batch``, ``layout``, ``variants``
            (the compressed bases), ``threads``, ``repeats``, ``warmup``, ``run`` (which variant
            goes first) and ``manifest``.

    Returns:
        The record's ``variants`` (median/min/max seconds per step, parameters and trainable
        parameters), ``order`` (the order they took turns in), ``skipped`` and ``failed``.
    """
    torch.set_num_threads(task["threads"])
    device = gpu_device() if task["backend"] == "cuda" else "cpu"  # $FXLRD_BENCH_GPU_DEVICE=cpu rehearses it
    layout = LAYOUTS[task["layout"]]
    entries = json.loads(Path(task["manifest"]).read_text())["variants"]
    spec = models.get(task["model"])
    inputs = spec.inputs(task["batch"])
    skipped = {n: e["skipped"] for n, e in entries.items() if "skipped" in e}
    failed = {n: e["failed"] for n, e in entries.items() if "failed" in e}
    original = spec.build()
    steps, sizes = {}, {}
    for name in rotated(variant_names(task["variants"]), task["run"]):
        base, _, policy = name.partition("/")
        if base in skipped or base in failed:
            continue
        model = load_variant(spec, original, entries[base], inputs) if base != "original" else spec.build()
        model = model.to(device=device, memory_format=layout)
        steps[name] = _trainer(model, policy or None, _to(inputs, device, layout), device)
        sizes[name] = {"params": entries[base]["params"], "macs": entries[base]["macs"],
                       "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}  # fmt: skip
    times = median_times(steps, repeats=task["repeats"], warmup=task["warmup"])
    figures = {n: {"median_s": t["median"], "min_s": t["min"], "max_s": t["max"], "samples": t["n"]} | sizes[n]
               for n in variant_names(task["variants"]) if (t := times.get(n))}  # fmt: skip
    return {"variants": figures, "order": list(steps), "skipped": skipped, "failed": failed}
