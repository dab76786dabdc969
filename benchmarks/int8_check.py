"""Do int8 kernels stay fast at the thin widths of low-rank factors? A quick check, not a benchmark.

A 256→256 3×3 conv at 28² (batch 8) is Tucker-2 decomposed at ranks 60 and 64 (multiples of 16
suit AVX-512 VNNI's 16 × int32 accumulators better), exported with ``fxlrd.export_onnx`` in
float32 and quantized (``quantize="int8"``: QDQ, uint8 activations / int8 per-channel weights,
and int8/int8 for comparison), then timed in onnxruntime on the CPU, rounds interleaved,
median. The original dense conv is timed alongside. Runs in well under a minute; on a shared
machine treat the figures as indicative. Prints only (writes no result file).

Run: .venv/bin/python benchmarks/int8_check.py [--rounds 30] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import fxlrd
from fxlrd import LRDConfig
from fxlrd.export import onnx_session
from fxlrd.quantize import QuantizeConfig
from fxlrd.timing import environment

CHANNELS, SIZE, BATCH = 256, 28, 8


def _models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Conv2d(CHANNELS, CHANNELS, 3, padding=1), nn.ReLU()).eval()
    models: dict[str, nn.Module] = {"dense": dense}
    for rank in (60, 64):
        cfg = LRDConfig(rank_rule="fixed", rank=(rank, rank), rank_quantum=1)
        models[f"rank {rank}"] = fxlrd.transform(dense, cfg)
    return models


def _time(sessions: dict[str, object], x, rounds: int) -> dict[str, float]:
    feed = {"input": x.numpy()}
    for s in sessions.values():
        for _ in range(3):
            s.run(None, feed)
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(rounds):  # interleaved: a noisy neighbour hits every variant alike
        for key, s in sessions.items():
            t = time.perf_counter()
            s.run(None, feed)
            times[key].append(time.perf_counter() - t)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    settings = {"layer": f"conv {CHANNELS}->{CHANNELS} 3x3 @ {SIZE}x{SIZE}", "batch": BATCH, "ranks": "60, 64",
                "threads": args.threads, "rounds": args.rounds, "statistic": "median ms"}  # fmt: skip
    print("# int8 at thin factor widths (onnxruntime)")
    print("environment: " + ", ".join(f"{k}={v}" for k, v in environment().items()))  # CPU model and SIMD flags
    print("settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    x = torch.randn(BATCH, CHANNELS, SIZE, SIZE)
    calibration = [torch.randn(BATCH, CHANNELS, SIZE, SIZE) for _ in range(4)]
    variants = {"fp32": None, "int8 u8s8": QuantizeConfig(), "int8 s8s8": QuantizeConfig(activations="int8")}
    sessions = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in _models().items():
            for variant, config in variants.items():
                path = Path(tmp) / f"{name.replace(' ', '')}_{variant.replace(' ', '_')}.onnx"
                quantize = {"quantize": config, "calibration": calibration} if config else {}
                fxlrd.export_onnx(model, x, path, **quantize)
                sessions[(name, variant)] = onnx_session(path, threads=args.threads)
        ms = _time(sessions, x, args.rounds)
    base = ms[("dense", "fp32")]
    print(f"\n| layer | {' | '.join(variants)} | int8 u8s8 vs fp32 |")
    print("|---|" + "---|" * (len(variants) + 1))
    for name in ("dense", "rank 60", "rank 64"):
        cells = [f"{ms[(name, v)]:.2f} ({base / ms[(name, v)]:.2f}×)" for v in variants]
        print(f"| {name} | {' | '.join(cells)} | {ms[(name, 'fp32')] / ms[(name, 'int8 u8s8')]:.2f}× |")
    print("\n(ms, median; in brackets: speed-up over the dense float32 conv)")


if __name__ == "__main__":
    main()
