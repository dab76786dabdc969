"""Training step time of ResNet-50 on this CPU: original, LRD, LRD + freezing (paper 2.2 / 000).

Batch 8 at 160×160, SGD with momentum, cross-entropy on random data (time does not depend on
the values). Variants are timed taking turns, median of the repeats. Sequential freezing
switches phase every step, so its median covers both phases (each also reported alone).
Target on this CPU: LRD + paper freezing ≥ 1.8× the original's throughput.

Run: .venv/bin/python benchmarks/training_throughput.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import fxlrd
from fxlrd import LRDConfig, SequentialFreezer, param_groups, zoo

from _common import header, write

PAPER_TRAIN_SPEEDUP = {"lrd": 6.1, "lrd_paper_freeze": 24.6}  # % over original, ResNet-50, GPU (Table 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quantum", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = vars(args) | {"model": "resnet50 (random weights)", "ratio": 2, "optimizer": "SGD(lr=0.01, momentum=0.9)"}
    env = header("training throughput, ResNet-50", settings)
    torch.manual_seed(0)
    original = zoo.resnet50()
    lrd = lambda: fxlrd.transform(original, LRDConfig(ratio=2, rank_quantum=args.quantum))  # noqa: E731
    models = {"original": original, "lrd": lrd(), "lrd_paper_freeze": fxlrd.freeze(lrd(), "paper"), "lrd_sequential": lrd()}
    freezer = SequentialFreezer(models["lrd_sequential"], period=1)
    optims = {n: torch.optim.SGD(param_groups(m), lr=0.01, momentum=0.9) for n, m in models.items()}
    x = torch.randn(args.batch, 3, args.size, args.size)
    y = torch.randint(0, 1000, (args.batch,))
    loss_fn = nn.CrossEntropyLoss()

    def step(name: str) -> float:
        model, opt = models[name], optims[name]
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()
        elapsed = time.perf_counter() - t0
        if name == "lrd_sequential":
            freezer.step()
        return elapsed

    for name in models:
        models[name].train()
        for _ in range(2):
            step(name)
    samples: dict[str, list[float]] = {n: [] for n in models}
    phases: dict[int, list[float]] = {0: [], 1: []}
    for _ in range(args.repeats):
        for name in models:
            phase = freezer.phase
            t = step(name)
            samples[name].append(t)
            if name == "lrd_sequential":
                phases[phase].append(t)
    base = statistics.median(samples["original"])
    rows = {}
    for name, ts in samples.items():
        med = statistics.median(ts)
        rows[name] = {
            "step_ms": med * 1e3, "min_ms": min(ts) * 1e3, "max_ms": max(ts) * 1e3, "images_per_s": args.batch / med,
            "speedup": base / med, "trainable_params": sum(p.numel() for p in models[name].parameters() if p.requires_grad),
            "params": fxlrd.count_params(models[name]), "paper_gpu_speedup_pct": PAPER_TRAIN_SPEEDUP.get(name),
        }  # fmt: skip
        print(f"{name:18s} step {med * 1e3:8.1f} ms  {args.batch / med:6.2f} img/s  x{base / med:.2f}")
    rows["lrd_sequential"]["phase_step_ms"] = {k: statistics.median(v) * 1e3 for k, v in phases.items() if v}
    md = ["| variant | params (M) | trainable (M) | step ms (median) | img/s | speed-up | paper (GPU) |", "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        paper = f"+{r['paper_gpu_speedup_pct']}%" if r["paper_gpu_speedup_pct"] else "-"
        md.append(f"| {name} | {r['params'] / 1e6:.2f} | {r['trainable_params'] / 1e6:.2f} | {r['step_ms']:.0f} | "
                  f"{r['images_per_s']:.2f} | {r['speedup']:.2f}× (+{(r['speedup'] - 1) * 100:.0f}%) | {paper} |")  # fmt: skip
    ph = rows["lrd_sequential"]["phase_step_ms"]
    met = rows["lrd_paper_freeze"]["speedup"] >= 1.8
    md += ["", f"Sequential freezing by phase: " + ", ".join(f"phase {k}: {v:.0f} ms" for k, v in ph.items()),
           "", f"Target LRD + paper freezing ≥ 1.8× original: {'met' if met else 'MISSED'} ({rows['lrd_paper_freeze']['speedup']:.2f}×)"]  # fmt: skip
    write("training_throughput", {"environment": env, "settings": settings, "results": rows}, "\n".join(md))


if __name__ == "__main__":
    main()
