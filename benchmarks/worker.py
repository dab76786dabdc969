"""One step of the suite in a fresh process: ``python -m benchmarks.worker '<task JSON>'``.

Steps: ``prepare`` (build a case's variants, `benchmarks.build.prepare`) and one timed run of
``speed``, ``training`` or ``transform``. A timed run appends its record to the suite's log —
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


def _timed_run(task: Mapping[str, Any]) -> int:
    describe_case, run = SUITES[task["step"]]
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


def main(argv: list[str]) -> int:
    """Run the step that ``argv[0]`` (a JSON task) describes; the exit status."""
    task = json.loads(argv[0])
    if task["step"] == "prepare":
        build.prepare(task)
        return 0
    return _timed_run(task)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
