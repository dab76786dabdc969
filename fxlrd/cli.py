"""Command line: ``fxlrd demo`` (compress, export, time) and ``fxlrd plan``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from . import zoo
from .api import plan as make_plan
from .api import transform
from .config import LRDConfig
from .latency import BACKENDS, LatencyConfig
from .export import export_onnx, onnx_session
from .metrics import count_macs, count_params
from .timing import environment, median_times

__all__ = ["main"]


def _config(args: argparse.Namespace) -> LRDConfig:
    latency = None
    if args.latency or args.target_speedup:
        latency = LatencyConfig(backend=args.latency or "onnxruntime", threads=getattr(args, "threads", None))
    return LRDConfig(ratio=args.ratio, rank_quantum=args.quantum, beta=args.beta, latency=latency,
                     target_speedup=args.target_speedup)  # fmt: skip


def _inputs(args: argparse.Namespace) -> tuple[torch.Tensor]:
    torch.manual_seed(0)
    return (torch.randn(args.batch, 3, args.size, args.size),)


def cmd_plan(args: argparse.Namespace) -> int:
    model = zoo.get(args.model).eval()
    p = make_plan(model, _config(args), example_inputs=_inputs(args))
    print(p.table())
    if args.json:
        p.to_json(args.json)
        print(f"plan written to {args.json}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    env = environment()
    print("fxlrd demo: " + ", ".join(f"{k}={v}" for k, v in env.items()))
    print(f"settings: model={args.model} (random weights) ratio={args.ratio} quantum={args.quantum} "
          f"batch={args.batch} size={args.size} ort_threads={args.threads} repeats={args.repeats}\n")  # fmt: skip
    torch.manual_seed(0)
    model = zoo.get(args.model).eval()
    inputs = _inputs(args)
    config = _config(args)
    t0 = time.perf_counter()
    gm = transform(model, config, example_inputs=inputs)
    transform_s = time.perf_counter() - t0
    print(gm.fxlrd_plan.table())
    params = (count_params(model), count_params(gm))
    macs = (count_macs(model, inputs), count_macs(gm, inputs))
    print(f"\ntransform: {transform_s:.2f} s")
    print(f"params: {params[0] / 1e6:.2f} M -> {params[1] / 1e6:.2f} M ({params[0] / params[1]:.2f}x fewer)")
    print(f"MACs:   {macs[0] / 1e9:.2f} G -> {macs[1] / 1e9:.2f} G ({macs[0] / macs[1]:.2f}x fewer)")
    out = Path(args.out)
    paths = {}
    for name, m in (("original", model), ("decomposed", gm)):
        t0 = time.perf_counter()
        paths[name] = export_onnx(m, inputs, out / f"{args.model}_{name}.onnx")
        print(f"exported {paths[name]} ({time.perf_counter() - t0:.1f} s, checked against onnxruntime)")
    sessions = {name: onnx_session(p, threads=args.threads) for name, p in paths.items()}
    feed = {"input": inputs[0].numpy()}
    times = median_times({n: (lambda s=s: s.run(None, feed)) for n, s in sessions.items()}, repeats=args.repeats)
    print(f"\nonnxruntime CPU latency, batch {args.batch}, {args.threads} threads, median of {args.repeats}:")
    for name, t in times.items():
        print(f"  {name:<10} {t['median'] * 1e3:8.2f} ms  (min {t['min'] * 1e3:.2f}, max {t['max'] * 1e3:.2f})")
    speedup = times["original"]["median"] / times["decomposed"]["median"]
    print(f"  speed-up   {speedup:.2f}x  (MAC ratio {macs[0] / macs[1]:.2f}x)")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "environment": env, "settings": vars(args) | {"func": None}, "transform_s": transform_s,
            "params": params, "macs": macs, "latency_s": times, "speedup": speedup,
        }, indent=1, default=str))  # fmt: skip
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fxlrd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, func, help_ in (
        ("demo", cmd_demo, "compress a zoo model, export ONNX, print the plan and the measured speed-up"),
        ("plan", cmd_plan, "print the decomposition plan of a zoo model"),
    ):
        p = sub.add_parser(name, help=help_)
        p.set_defaults(func=func)
        p.add_argument("--model", default="resnet50", choices=sorted(zoo._MODELS))
        p.add_argument("--ratio", type=float, default=2.0, help="compression ratio per layer (> 1)")
        p.add_argument("--quantum", type=int, default=8, help="round ranks down to a multiple of this")
        p.add_argument("--beta", type=float, default=1.0, help="Tucker r2/r1")
        p.add_argument("--batch", type=_positive_int, default=1)
        p.add_argument("--size", type=_positive_int, default=224, help="input height and width")
        p.add_argument("--json", default=None, help="also write the result as JSON here")
        p.add_argument("--latency", choices=BACKENDS, default=None, help="choose ranks by timing layers on this backend")
        p.add_argument("--target-speedup", type=float, default=None, help="global mode: whole-model speed-up to reach")
    demo = sub.choices["demo"]
    demo.add_argument("--out", default="build", help="folder for the ONNX files")
    demo.add_argument("--threads", type=_positive_int, default=os.cpu_count(), help="onnxruntime intra-op threads (default: all cores)")
    demo.add_argument("--repeats", type=_positive_int, default=30)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError) as exc:  # configuration mistakes: one clear line, no traceback
        print(f"fxlrd: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
