"""Wall-clock timing of whole models: medians over repeated runs, variants interleaved."""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable, Mapping

__all__ = ["median_times", "environment", "cpu_vector_extensions", "default_rank_quantum"]


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
        "vector_extensions": (" ".join(cpu_vector_extensions()) or "none found") if _cpuinfo_readable() else "unknown",
        # the CPUs this process may run on (a container's share), not the host's count
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "logical_cpus": os.cpu_count(),
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


_VECTOR_FLAGS = {
    "avx2": "AVX2", "avx512f": "AVX-512F", "avx512_vnni": "AVX-512 VNNI", "avx512_bf16": "AVX-512 BF16",
    "avx_vnni": "AVX-VNNI", "amx_tile": "AMX", "amx_int8": "AMX-INT8", "amx_bf16": "AMX-BF16", "asimd": "NEON", "sve": "SVE",
}  # fmt: skip


def _cpuinfo_readable() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return bool(f.read(1))
    except OSError:
        return False


def cpu_vector_extensions(cpuinfo: str | None = None) -> list[str]:
    """The CPU's SIMD extensions that matter for kernel speed (AVX2, AVX-512, VNNI, AMX...),
    read from ``/proc/cpuinfo`` (or the text given)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return []
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[1].split())
            break
    return [name for flag, name in _VECTOR_FLAGS.items() if flag in flags]


def default_rank_quantum(extensions: list[str] | None = None) -> int:
    """Ranks the CPU's vector units fill exactly: 16 float32 lanes with AVX-512, 8 with AVX2,
    4 otherwise (NEON). onnxruntime's and oneDNN's conv and GEMM kernels block channels by the
    vector width; a rank between two multiples costs the next multiple's time."""
    ext = cpu_vector_extensions() if extensions is None else extensions
    if "AVX-512F" in ext:
        return 16
    if "AVX2" in ext:
        return 8
    return 4


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
