"""fxlrd's speed benchmarks, one entry point (``make bench`` runs everything, for hours).

    python -m benchmarks speed --models resnet50 --variants original,quantized --backends onnxruntime --batch 1 --repeats 10 --runs 3
    python -m benchmarks training --models resnet50 --layouts nchw channels_last
    python -m benchmarks transform --models resnet50 resnet152
    python -m benchmarks gpu                      # the GPU leg: fp32/bf16, eager/compile, batch 1 64 256
    python -m benchmarks report [--readme]        # tables and plots from every run logged
    python -m benchmarks                          # all suites with their defaults (gpu: with CUDA), then the report

Each case — (model, backend, batch) for speed and gpu, (model, backend, batch, layout) for training,
a model for transform — is built once, then timed in --runs fresh processes, in each of which
its variants take turns (gpu: each process times every case of a model; its records are speed
records). Every run is appended to benchmarks/results/<suite>.jsonl with its
machine, versions and settings; the markdown tables and plots are regenerated from all of them.
Run it on a quiet machine: figures measured while other work runs are noise.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from . import models, speed, training, transform, variants
from .machine import ROOT
from .records import RESULTS, log_path, read
from .report import MIN_RUNS, readme_table, replace_region, write_reports
from .suite import Invocation, cuda_available, run_gpu, run_speed, run_training, run_transform

DEFAULTS: dict[str, dict[str, Any]] = {
    "speed": {"models": list(models.MODELS), "variants": [n for n, v in variants.VARIANTS.items() if not v.retired],
              "backends": list(speed.CPU_BACKENDS),
              "batch": [1, 8], "repeats": 20, "warmup": 3},  # fmt: skip
    "training": {"models": list(models.MODELS), "variants": ["quantized"], "backends": list(training.BACKENDS),
                 "batch": [8], "repeats": 10, "warmup": 3},  # fmt: skip
    "transform": {"models": list(transform.MODELS), "repeats": 5, "warmup": 1},
    "gpu": {"models": ["resnet50", "vit_b_16", "bert_base"],
            "variants": ["original", "vanilla", "quantized", "quantized@vanilla", "merged", "optimized"],
            "backends": list(speed.GPU_NCHW_BACKENDS), "batch": [1, 64, 256], "repeats": 10, "warmup": 3},
}
CHOICES = {"models": list(models.MODELS), "variants": list(variants.VARIANTS)}


def _names(values: list[str] | None) -> list[str] | None:
    """Names given space- or comma-separated (``a,b c``), in order, without repeats."""
    if values is None:
        return None
    return list(dict.fromkeys(n.strip() for v in values for n in v.split(",") if n.strip()))


def parser() -> argparse.ArgumentParser:
    """The command line."""
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("suite", nargs="?", default="all", choices=("speed", "training", "transform", "gpu", "report", "all"))
    p.add_argument("--models", nargs="+", metavar="NAME", help=f"among {', '.join(models.MODELS)}")
    p.add_argument("--variants", nargs="+", metavar="NAME",
                   help=f"among {', '.join(variants.VARIANTS)} (training: the compressed ones to train; default quantized)")
    p.add_argument("--backends", nargs="+", metavar="NAME", help=f"among {', '.join(speed.BACKENDS)} (training: eager, cuda)")
    p.add_argument("--batch", nargs="+", type=int, metavar="N", help="batch sizes (speed: 1 8; training: 8)")
    p.add_argument("--layouts", nargs="+", choices=list(training.LAYOUTS), default=list(training.LAYOUTS),
                   help="training: memory layouts, each its own case")  # fmt: skip
    p.add_argument("--repeats", type=int, metavar="N", help="timed calls per variant per run (speed 20, training 10, transform 5)")
    p.add_argument("--warmup", type=int, metavar="N", help="untimed calls per variant per run (speed and training 3, "
                   "transform 1)")  # fmt: skip
    p.add_argument("--runs", type=int, default=MIN_RUNS, metavar="R", help=f"fresh processes per case (at least {MIN_RUNS})")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), metavar="N",
                   help="intra-op threads of every backend (default: the CPUs this process may use)")  # fmt: skip
    p.add_argument("--results-dir", type=Path, default=RESULTS, metavar="DIR",
                   help="where the logs are appended and the tables written (smoke tests: a scratch directory)")  # fmt: skip
    p.add_argument("--work-dir", type=Path, default=ROOT / "build" / "bench", metavar="DIR",
                   help="built variants and ONNX files while a command runs (removed after)")  # fmt: skip
    p.add_argument("--readme", action="store_true", help="report: also write the README's table")
    p.add_argument("--gpu", action="store_true", help="report --readme: write the GPU table (its own README region)")
    p.add_argument("--machine", metavar="TEXT", help="report --readme: the machine kind (a substring); default: the newest run's")
    return p


def _check(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for field, choices in CHOICES.items():
        unknown = [n for n in getattr(args, field) or () if n not in choices]
        if unknown:
            p.error(f"unknown {field} {', '.join(unknown)}; choose among {', '.join(choices)}")
    if args.runs < MIN_RUNS:
        p.error(f"--runs must be at least {MIN_RUNS}: each figure is the median over at least {MIN_RUNS} fresh processes")
    for name in ("repeats", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if (args.warmup is not None and args.warmup < 0) or any(b < 1 for b in args.batch or ()):
        p.error("--warmup must be >= 0 and every --batch >= 1")


def _settings(p: argparse.ArgumentParser, args: argparse.Namespace, suite: str) -> dict[str, Any]:
    """The suite's models, variants, backends, batches, repeats and warmup: given, else its defaults.

    Backends a suite does not have are an error when it was named, and left out (with a note)
    when it runs as part of all suites.
    """
    chosen = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in DEFAULTS[suite].items()}
    allowed = {"speed": speed.BACKENDS, "training": training.BACKENDS, "gpu": speed.GPU_BACKENDS}.get(suite, ())
    if suite == "speed" and args.suite == "all":  # the gpu suite times the GPU backends then
        allowed = speed.CPU_BACKENDS
    backends = chosen.get("backends", [])
    foreign = [b for b in backends if b not in allowed]
    if foreign and args.suite == suite:
        p.error(f"{suite}: backends must be among {', '.join(allowed)}, got {', '.join(backends)}")
    if foreign:
        print(f"{suite}: leaving out backends it does not have: {', '.join(foreign)}")
        backends = chosen["backends"] = [b for b in backends if b in allowed]
    gpu = [b for b in backends if b in speed.GPU_BACKENDS]
    if gpu and not cuda_available() and speed.gpu_device().startswith("cuda"):
        print(f"{suite}: skipping backends {', '.join(gpu)}: torch sees no CUDA device")
        chosen["backends"] = [b for b in backends if b not in gpu]
    return chosen


def _run_suite(p: argparse.ArgumentParser, args: argparse.Namespace, suite: str, argv: list[str]) -> None:
    s = _settings(p, args, suite)
    inv = Invocation.create(args.results_dir, args.work_dir, argv, threads=args.threads, runs=args.runs,
                            repeats=s["repeats"], warmup=s["warmup"])  # fmt: skip
    if suite == "speed":
        run_speed(inv, s["models"], s["variants"], s["backends"], s["batch"])
    elif suite == "gpu":
        if s["backends"]:
            run_gpu(inv, s["models"], s["variants"], s["backends"], s["batch"])
    elif suite == "training":
        run_training(inv, s["models"], s["variants"], s["backends"], s["batch"], args.layouts)
    else:
        run_transform(inv, s["models"])


def _report(args: argparse.Namespace) -> None:
    for path in write_reports(args.results_dir):
        print(f"wrote {path}")
    if args.readme:
        table = readme_table(read(log_path(args.results_dir, "speed")), machine=args.machine, models=args.models,
                             variants=args.variants, backends=args.backends, batches=args.batch, gpu=args.gpu)  # fmt: skip
        readme = ROOT / "README.md"
        region = "bench-gpu" if args.gpu else "bench"
        readme.write_text(replace_region(readme.read_text(), table, region=region))
        print(f"wrote the table between the {region} markers of {readme}")


def main(argv: list[str]) -> int:
    """Run the suites the command line names, then regenerate the reports; the exit status."""
    p = parser()
    args = p.parse_args(argv)
    args.models, args.variants, args.backends = _names(args.models), _names(args.variants), _names(args.backends)
    _check(p, args)
    suites = ("speed", "training", "transform", "gpu") if args.suite == "all" else (args.suite,)
    for suite in suites:
        if suite != "report":
            _run_suite(p, args, suite, argv)
    try:
        _report(args)
    except ValueError as exc:  # e.g. --readme with no run to show
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
