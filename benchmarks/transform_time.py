"""How long fxlrd.transform takes: ResNet-50 and ResNet-152 at α = 2, median of 5.

Targets on the 2-core CI machine: ≤ 3 s (ResNet-50) and ≤ 8 s (ResNet-152).
Run: .venv/bin/python benchmarks/transform_time.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import fxlrd
from fxlrd import LRDConfig, zoo

from _common import header, write

TARGETS_S = {"resnet50": 3.0, "resnet152": 8.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--ratio", type=float, default=2.0)
    args = parser.parse_args()
    config = LRDConfig(ratio=args.ratio)
    settings = {"ratio": args.ratio, "rank_quantum": config.rank_quantum, "tucker_iters": config.tucker_iters,
                "repeats": args.repeats, "warmup": 1}  # fmt: skip
    env = header("fxlrd.transform time", settings)
    rows = {}
    for name, target in TARGETS_S.items():
        torch.manual_seed(0)
        model = zoo.get(name).eval()
        fxlrd.transform(model, config)  # warm-up: imports, allocator
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            gm = fxlrd.transform(model, config)
            times.append(time.perf_counter() - t0)
        plan = gm.fxlrd_plan
        rows[name] = {
            "median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "target_s": target,
            "layers_decomposed": len(plan.decomposed), "params_before": plan.model_params,
            "params_after": plan.params_after_model(),
        }  # fmt: skip
        r = rows[name]
        print(f"{name}: median {r['median_s']:.2f} s (min {r['min_s']:.2f}, max {r['max_s']:.2f}) "
              f"target <= {target} s -> {'met' if r['median_s'] <= target else 'MISSED'}; "
              f"{r['layers_decomposed']} layers decomposed")  # fmt: skip
    md = ["| model | layers decomposed | params | median (s) | min | max | target (s) | met |", "|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        md.append(
            f"| {name} | {r['layers_decomposed']} | {r['params_before'] / 1e6:.2f} M → {r['params_after'] / 1e6:.2f} M | "
            f"{r['median_s']:.2f} | {r['min_s']:.2f} | {r['max_s']:.2f} | ≤ {r['target_s']} | "
            f"{'yes' if r['median_s'] <= r['target_s'] else 'no'} |"
        )
    write("transform_time", {"environment": env, "settings": settings, "results": rows}, "\n".join(md))


if __name__ == "__main__":
    main()
