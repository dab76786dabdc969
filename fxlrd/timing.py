"""Wall-clock timing of whole models: medians over repeated runs, variants interleaved."""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable, Mapping

__all__ = ["median_times", "environment"]


def median_times(
    runs: Mapping[str, Callable[[], object]], *, repeats: int = 20, warmup: int = 3
) -> dict[str, dict[str, float]]:
    """Time each callable ``repeats`` times, taking turns, after ``warmup`` calls each.

    Taking turns spreads any drift of the machine (turbo, other load) over all variants
    alike, so their ratio is fair. Returns per name the median, min and max in seconds.
    """
    for fn in runs.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
    return {n: {"median": statistics.median(s), "min": min(s), "max": max(s), "n": len(s)} for n, s in samples.items()}


def environment() -> dict[str, object]:
    """Machine and library versions, printed beside every figure."""
    import numpy
    import torch

    info: dict[str, object] = {
        "machine": platform.machine(),
        "processor": _cpu_name(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "numpy": numpy.__version__,
    }
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:  # pragma: no cover
        pass
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name()
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
