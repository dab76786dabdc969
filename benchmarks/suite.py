"""The parent process of a command: it schedules the cases, and for each case a prepare
process and ``runs`` timed processes, each a fresh Python (`benchmarks.worker`).

Cases run one after the other; a model's built variants live under the command's work
directory until its cases are done. The parent times nothing itself.
"""

from __future__ import annotations

import datetime
import json
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from . import models
from .aggregate import group
from .build import manifest_path
from .machine import ROOT, describe
from .records import append, by_invocation, log_path, read
from .speed import gpu_dtype
from .report import case_markdown, transform_table
from .worker import SUITES, record

__all__ = ["Invocation", "spawn", "run_speed", "run_gpu", "run_training", "run_transform", "cuda_available"]


@dataclass(frozen=True)
class Invocation:
    """One command's settings, shared by all its runs.

    Args:
        results: the results directory (the logs are appended to there).
        workdir: where this command's built variants live while it runs.
        command: the command line, recorded with every run.
        id: identifies this command's runs in the logs.
        threads: intra-op threads of every backend.
        runs: timed processes per case.
        repeats: timed calls per variant in a run (after ``warmup`` untimed ones).
        warmup: untimed calls per variant before timing.
    """

    results: Path
    workdir: Path
    command: str
    id: str
    threads: int
    runs: int
    repeats: int
    warmup: int

    @classmethod
    def create(cls, results: Path, workdir: Path, argv: Sequence[str], **settings: Any) -> "Invocation":
        """A new command: its id from the time and process id, its own work directory."""
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        id_ = f"{stamp}-{os.getpid()}"
        command = "python -m benchmarks " + shlex.join(argv)
        return cls(Path(results).resolve(), Path(workdir).resolve() / id_, command, id_, **settings)

    def task(self, step: str, **fields: Any) -> dict[str, Any]:
        """A worker's task: this command's settings and the step's own fields."""
        return {"step": step, "invocation": self.id, "command": self.command, "results": str(self.results),
                "workdir": str(self.workdir), "threads": self.threads, "runs": self.runs, "repeats": self.repeats,
                "warmup": self.warmup, **fields}  # fmt: skip


def spawn(task: Mapping[str, Any]) -> int:
    """Run one worker step in a fresh Python process (its output streams through); its exit status."""
    return subprocess.run([sys.executable, "-m", "benchmarks.worker", json.dumps(task)], cwd=ROOT).returncode


def cuda_available() -> bool:
    """Whether torch sees a CUDA device."""
    import torch

    return torch.cuda.is_available()


def _record_crash(task: Mapping[str, Any], status: int, what: str) -> None:
    """Log a process that died without leaving its record (killed, out of memory...), under
    its case as the suite describes it (with the input shapes), so the report shows the failure
    beside the case's runs; from the task's keys where the case cannot be described."""
    case = {k: task[k] for k in ("model", "backend", "batch", "layout") if k in task}
    try:
        case = SUITES[task["step"]][0](task)
    except Exception:  # noqa: BLE001  (the crash is logged all the same, with what is known of its case)
        pass
    rec = record(task, case, {"error": f"{what} exited with status {status} without a record; see its output"})
    append(log_path(Path(task["results"]), task["step"]), rec)


def _timed_runs(inv: Invocation, step: str, fields: Mapping[str, Any]) -> None:
    for run in range(1, inv.runs + 1):
        task = inv.task(step, run=run, **fields)
        status = spawn(task)
        if status != 0:
            _record_crash(task, status, f"run {run}")


def _prepare(inv: Invocation, suite: str, fields: Mapping[str, Any]) -> str | None:
    """Build a case's variants; the manifest's path, or None (and a logged failure) if that failed."""
    status = spawn(inv.task("prepare", **fields))
    if status == 0:
        return str(manifest_path(inv.workdir, fields["model"], fields["backend"], fields["batch"]))
    _record_crash(inv.task(suite, run=None, **fields), status, "building the variants")
    return None


def _summary(inv: Invocation, suite: str, case: Mapping[str, Any]) -> None:
    """Print this command's figures for one case, aggregated across its runs."""
    mine = by_invocation(read(log_path(inv.results, suite)), inv.id)
    runs = [r for r in mine if all(r.get("case", {}).get(k) == v for k, v in case.items())]
    if not runs:
        return
    print(f"\n== {suite} summary of this command ({inv.runs} runs per case)\n{describe(runs[-1])}")
    print(f"settings: threads {inv.threads} · repeats {inv.repeats} · warmup {inv.warmup} · command: {inv.command}\n")
    for g in group(runs):
        print("\n".join(transform_table([g]) if suite == "transform" else case_markdown(g, training=suite == "training")))


def _cleanup(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def run_speed(inv: Invocation, model_names: Sequence[str], variant_names: Sequence[str], backends: Sequence[str],
              batches: Sequence[int]) -> None:  # fmt: skip
    """Time every (model, backend, batch) case: build its variants, then ``inv.runs`` runs."""
    names = ["original"] + [v for v in variant_names if v != "original"]
    try:
        for model in model_names:
            for backend in backends:
                for batch in batches:
                    case = {"model": model, "backend": backend, "batch": batch}
                    manifest = _prepare(inv, "speed", {**case, "search_backend": backend, "variants": names})
                    if manifest:
                        _timed_runs(inv, "speed", {**case, "manifest": manifest})
                        _summary(inv, "speed", case)
            _cleanup(inv.workdir / model)
    finally:
        _cleanup(inv.workdir)


def run_gpu(inv: Invocation, model_names: Sequence[str], variant_names: Sequence[str], backends: Sequence[str],
            batches: Sequence[int]) -> None:  # fmt: skip
    """The GPU leg of the speed suite: per model, one prepare, then ``inv.runs`` processes that
    each time every (backend, batch) case, the variants taking turns in each.

    One process per run rather than per case: on a GPU a case takes milliseconds, while a
    process spends seconds loading the variants and compiling them. A run's records are those
    of the speed suite (one per case), so the report pools them with any other GPU runs.
    Searched variants are built once per dtype (``cuda``: float32, ``cuda_bf16``: bfloat16),
    their layers timed eagerly on the GPU in that dtype at the first batch size.
    """
    names = ["original"] + [v for v in variant_names if v != "original"]
    groups: dict[str, list[str]] = {}  # the search backend of each dtype -> its backends, in the order asked
    for backend in backends:
        groups.setdefault("cuda" if gpu_dtype(backend) == gpu_dtype("cuda") else "cuda_bf16", []).append(backend)
    try:
        for model in model_names:
            manifests = {}
            for group_backend, members in groups.items():
                fields = {"model": model, "backend": group_backend, "batch": batches[0], "search_backend": group_backend,
                          "variants": names}  # fmt: skip
                status = spawn(inv.task("prepare", **fields))
                for backend in members:
                    if status == 0:
                        manifests[backend] = str(manifest_path(inv.workdir, model, group_backend, batches[0]))
                    else:
                        crashed = inv.task("speed", run=None, model=model, backend=backend, batch=batches[0])
                        _record_crash(crashed, status, "building the variants")
            manifests = {b: manifests[b] for b in backends if b in manifests}  # the cases in the order asked
            if manifests:
                cases = {"model": model, "backends": list(manifests), "batches": list(batches), "manifests": manifests}
                for run in range(1, inv.runs + 1):
                    task = inv.task("speed_cases", run=run, **cases)
                    status = spawn(task)
                    if status != 0:  # a crash record for each case this run left without one, under that case
                        logged = {(r.get("case", {}).get("backend"), r.get("case", {}).get("batch"))
                                  for r in by_invocation(read(log_path(inv.results, "speed")), inv.id)
                                  if r.get("run") == run and r.get("case", {}).get("model") == model}  # fmt: skip
                        for backend in manifests:
                            for batch in batches:
                                if (backend, batch) not in logged:
                                    crashed = {**task, "step": "speed", "backend": backend, "batch": batch,
                                               "manifest": manifests[backend]}  # fmt: skip
                                    _record_crash(crashed, status, f"run {run}")
                for backend in backends:
                    for batch in batches:
                        _summary(inv, "speed", {"model": model, "backend": backend, "batch": batch})
            _cleanup(inv.workdir / model)
    finally:
        _cleanup(inv.workdir)


def run_training(inv: Invocation, model_names: Sequence[str], bases: Sequence[str], backends: Sequence[str],
                 batches: Sequence[int], layouts: Sequence[str]) -> None:  # fmt: skip
    """Time training steps for every (model, backend, batch, layout) case."""
    names = ["original"] + [v for v in bases if v != "original"]
    try:
        for model in model_names:
            tokens = models.get(model).tokens
            for backend in backends:
                for batch in batches:
                    case = {"model": model, "backend": backend, "batch": batch}
                    manifest = _prepare(inv, "training", {**case, "search_backend": backend, "variants": names})
                    for layout in layouts:
                        if tokens and layout != "nchw":
                            print(f"skipping {model} · {layout}: token inputs have no channels_last layout")
                        elif manifest:
                            fields = {**case, "layout": layout, "variants": names, "manifest": manifest}
                            _timed_runs(inv, "training", fields)
                            _summary(inv, "training", {**case, "layout": layout})
            _cleanup(inv.workdir / model)
    finally:
        _cleanup(inv.workdir)


def run_transform(inv: Invocation, model_names: Sequence[str]) -> None:
    """Time `fxlrd.transform` of every model, ``inv.runs`` processes each."""
    for model in model_names:
        _timed_runs(inv, "transform", {"model": model})
        _summary(inv, "transform", {"model": model})

