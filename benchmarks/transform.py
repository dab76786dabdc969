"""One timed run of the transform suite: `fxlrd.transform` of one model, ``repeats`` times.

The config is the default one (α = 2, default rank quantum). Models torch.fx cannot trace
(the transformers) get example inputs, which their torch.export capture needs; the others
are transformed without, as a user would.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Mapping

import torch

import fxlrd

from . import models

__all__ = ["MODELS", "case", "run"]

MODELS = ("resnet50", "resnet152", "vit_b_16", "bert_base")


def case(task: Mapping[str, Any]) -> dict[str, Any]:
    """What the run measures: the model and the config (its rank quantum follows the CPU's
    vector width), and whether it is given example inputs."""
    tokens = models.get(task["model"]).tokens
    return {"model": task["model"], "ratio": 2, "rank_quantum": fxlrd.LRDConfig(ratio=2).rank_quantum, "example_inputs": tokens}


def run(task: Mapping[str, Any]) -> dict[str, Any]:
    """Transform the model ``warmup`` times untimed (imports, allocator), then ``repeats`` times timed.

    Args:
        task: ``model``, ``threads``, ``warmup`` and ``repeats``.

    Returns:
        The record's ``variants`` (one, ``quantized``: median/min/max seconds,
        every sample, layers decomposed, parameters before and after).
    """
    torch.set_num_threads(task["threads"])
    spec = models.get(task["model"])
    model = spec.build()
    example = spec.inputs(1) if spec.tokens else None
    config = fxlrd.LRDConfig(ratio=2)
    for _ in range(task["warmup"]):
        fxlrd.transform(model, config, example_inputs=example)
    samples = []
    for _ in range(task["repeats"]):
        t0 = time.perf_counter()
        gm = fxlrd.transform(model, config, example_inputs=example)
        samples.append(time.perf_counter() - t0)
    figures = {
        "median_s": statistics.median(samples), "min_s": min(samples), "max_s": max(samples), "samples_s": samples,
        "layers_decomposed": len(gm.fxlrd_plan.decomposed), "params_before": fxlrd.count_params(model),
        "params": fxlrd.count_params(gm),
    }  # fmt: skip
    return {"variants": {"quantized": figures}}
