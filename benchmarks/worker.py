"""One step of the suite in a fresh process: ``python -m benchmarks.worker '<task JSON>'``.

Steps: ``prepare`` (build a case's variants, `benchmarks.build.prepare`), one timed run of
``speed``, ``training`` or ``transform``, and ``speed_cases`` (one run of every GPU case of a
model: a speed record per case). A timed run appends its record to the suite's log —
also when it fails, then with its ``error`` — and prints it with the machine, versions and
settings. The exit status is 0 once the record is written, so a non-zero status tells the
caller that the process died without leaving one.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Mapping

from . import build, speed, training, transform
from .machine import machine, versions
from .records import FORMAT, append, log_path, now
from .report import run_text

__all__ = ["SUITES", "record", "main"]

SUITES: dict[str, tuple[Callable, Callable]] = {
    "speed": (speed.case, speed.run),
    "training": (training.case, training.run),
    "transform": (transform.case, transform.run),
}


def record(task: Mapping[str, Any], case: Mapping[str, Any], result: Mapping[str, Any]) -> dict[str, Any]:
    """A run's record: who, where, with what, then its figures (or its error)."""
    settings = {k: task[k] for k in ("threads", "repeats", "warmup") if k in task}
    return {
        "format": FORMAT, "suite": task["step"], "timestamp": now(), "invocation": task["invocation"],
        "run": task["run"], "runs": task["runs"], "command": task["command"], "machine": machine(),
        "versions": versions(), "settings": settings, "case": dict(case), **result,
    }  # fmt: skip


def _timed_run(task: Mapping[str, Any], run: Callable[[Mapping[str, Any]], Mapping[str, Any]] | None = None) -> int:
    describe_case, suite_run = SUITES[task["step"]]
    run = run or suite_run
    case: Mapping[str, Any] = {k: task[k] for k in ("model", "backend", "batch", "layout") if k in task}
    try:
        case = describe_case(task)
        result = run(task)
    except Exception as exc:  # noqa: BLE001  (a failed run is kept in the log too, with why)
        traceback.print_exc()
        result = {"error": f"{type(exc).__name__}: {exc}"}
    rec = record(task, case, result)
    append(log_path(Path(task["results"]), task["step"]), rec)
    print(run_text(rec), flush=True)
    return 0


def _speed_cases(task: Mapping[str, Any]) -> int:
    """Every (backend, batch) case of one model in this process, one speed record each; the
    variants are loaded once, and moved to the GPU (and compiled) once per dtype."""
    loaded: dict = {}
    gpu = speed.GpuModels(loaded)
    for backend in task["backends"]:
        for batch in task["batches"]:
            case_task = {**task, "step": "speed", "backend": backend, "batch": batch, "manifest": task["manifests"][backend]}
            _timed_run(case_task, lambda t: speed.run(t, loaded, gpu))
    return 0


def main(argv: list[str]) -> int:
    """Run the step that ``argv[0]`` (a JSON task) describes; the exit status."""
    task = json.loads(argv[0])
    if task["step"] == "prepare":
        build.prepare(task)
        return 0
    if task["step"] == "speed_cases":
        return _speed_cases(task)
    return _timed_run(task)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
