"""The machine a run executes on: CPU model, vector extensions, cores, GPU and library versions.

Every run record carries these, and the report groups runs by `machine_kind`: figures from
different CPUs are never pooled.
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping

from fxlrd.timing import cpu_vector_extensions

__all__ = ["cpu_model", "machine", "versions", "machine_kind", "describe"]

ROOT = Path(__file__).resolve().parents[1]
_PACKAGES = ("torch", "onnxruntime", "transformers", "numpy", "onnx")


def _read_cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_model(cpuinfo: str) -> str:
    """The CPU's model name from ``/proc/cpuinfo`` text (``platform.processor()`` without one).

    Args:
        cpuinfo: the text of ``/proc/cpuinfo``.

    Returns:
        The first ``model name`` value, or what the platform reports, or ``"unknown"``.
    """
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and value.strip():
            return value.strip()
    return platform.processor() or "unknown"


def _gpu() -> str | None:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def machine(cpuinfo: str | None = None) -> dict[str, Any]:
    """This machine: CPU model, vector extensions, CPUs this process may use, all CPUs, GPU.

    Args:
        cpuinfo: ``/proc/cpuinfo`` text to read the CPU from (default: this machine's).
    """
    info = _read_cpuinfo() if cpuinfo is None else cpuinfo
    return {
        "cpu": cpu_model(info),
        # The library's reading, the one its default rank quantum (the vector width) follows;
        # None (unknown) where there is no /proc/cpuinfo to read, not "no AVX2".
        "vector_extensions": cpu_vector_extensions(info) if info.strip() else None,
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "logical_cpus": os.cpu_count(),
        "arch": platform.machine(),
        "gpu": _gpu(),
    }


GIT_VARIABLE = "FXLRD_BENCH_GIT"  # the commit, for a copy of the code without its git history


def _git_commit(root: Path = ROOT) -> str | None:
    """The checkout's commit, with ``+dirty.<hash>`` when tracked files other than the results
    (which every run appends to) differ from it, the hash that of the difference (two sets of
    uncommitted edits on one commit are two code versions); ``$FXLRD_BENCH_GIT`` where there
    is no git history (a copy of the tree sent to another machine)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        diff = subprocess.run(["git", "diff", "HEAD", "--", ".", ":(exclude)benchmarks/results"], cwd=root,
                              capture_output=True, check=True).stdout  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get(GIT_VARIABLE)
    return head.stdout.strip() + (f"+dirty.{hashlib.sha256(diff).hexdigest()[:8]}" if diff else "")


def versions() -> dict[str, str | None]:
    """Python, fxlrd (and its git commit) and the libraries that run the models."""
    import fxlrd

    out: dict[str, str | None] = {"python": platform.python_version(), "fxlrd": fxlrd.__version__, "git": _git_commit()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def machine_kind(info: Mapping[str, Any], gpu: bool = False) -> str:
    """The label runs are grouped by: CPU model, CPUs, vector extensions (and the GPU if it ran there).

    Args:
        info: a `machine` dict (records imported from older results may lack the extensions).
        gpu: name the GPU too (for runs on the CUDA backend).
    """
    extensions = info.get("vector_extensions")
    flags = "vector extensions unknown" if extensions is None else (", ".join(extensions) or "no AVX2")
    kind = f"{info.get('cpu', 'unknown')} · {info.get('cpus', '?')} CPUs · {flags}"
    if gpu and info.get("gpu"):
        kind += f" · {info['gpu']}"
    return kind


def describe(record: Mapping[str, Any]) -> str:
    """Two lines naming a run's machine and versions, printed beside its figures."""
    versions_ = record.get("versions", {})
    names = ("python", "torch", "onnxruntime", "transformers", "fxlrd", "git")
    listed = ", ".join(f"{n} {versions_[n]}" for n in names if versions_.get(n))
    return f"machine: {machine_kind(record.get('machine', {}), gpu=True)}\nversions: {listed}"
