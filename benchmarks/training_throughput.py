"""Training step time of ResNet-50 on this CPU: original, LRD, LRD + freezing (paper 2.2 / 000).

Batch 8 at 160×160, SGD with momentum, cross-entropy on random data (time does not depend on
the values), in PyTorch's default NCHW memory format and in channels_last (oneDNN's preferred
layout on CPU, which suits the thin factor convs far better). Variants are timed taking turns,
median of the repeats; speed-ups are given against the original in the same format and
against the default NCHW original. Sequential freezing
switches phase every step, so its median covers both phases (each also reported alone).
Target on this CPU: LRD + paper freezing ≥ 1.8× the original's throughput.

Run: .venv/bin/python benchmarks/training_throughput.py
"""

from __future__ import annotations

import argparse
import copy
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
    parser.add_argument("--formats", nargs="+", default=["nchw", "channels_last"], choices=["nchw", "channels_last"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = vars(args) | {"model": "resnet50 (random weights)", "ratio": 2, "optimizer": "SGD(lr=0.01, momentum=0.9)"}
    env = header("training throughput, ResNet-50", settings)
    torch.manual_seed(0)
    original = zoo.resnet50()
    lrd = lambda: fxlrd.transform(original, LRDConfig(ratio=2, rank_quantum=args.quantum))  # noqa: E731
    base = {"original": lambda: copy.deepcopy(original), "lrd": lrd,
            "lrd_paper_freeze": lambda: fxlrd.freeze(lrd(), "paper"), "lrd_sequential": lrd}  # fmt: skip
    formats = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
    models, freezers = {}, {}
    for fmt in args.formats:
        for name, make in base.items():
            models[f"{name}/{fmt}"] = make().to(memory_format=formats[fmt])
            if name == "lrd_sequential":
                freezers[f"{name}/{fmt}"] = SequentialFreezer(models[f"{name}/{fmt}"], period=1)
    optims = {n: torch.optim.SGD(param_groups(m), lr=0.01, momentum=0.9) for n, m in models.items()}
    x = torch.randn(args.batch, 3, args.size, args.size)
    inputs = {fmt: x.to(memory_format=formats[fmt]).contiguous(memory_format=formats[fmt]) for fmt in args.formats}
    y = torch.randint(0, 1000, (args.batch,))
    loss_fn = nn.CrossEntropyLoss()

    def step(name: str) -> float:
        model, opt = models[name], optims[name]
        xin = inputs[name.split("/")[1]]
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss_fn(model(xin), y).backward()
        opt.step()
        elapsed = time.perf_counter() - t0
        if name in freezers:
            freezers[name].step()
        return elapsed

    for name in models:
        models[name].train()
        for _ in range(2):
            step(name)
    samples: dict[str, list[float]] = {n: [] for n in models}
    phases: dict[str, dict[int, list[float]]] = {n: {0: [], 1: []} for n in freezers}
    for _ in range(args.repeats):
        for name in models:
            phase = freezers[name].phase if name in freezers else None
            t = step(name)
            samples[name].append(t)
            if phase is not None:
                phases[name][phase].append(t)
    rows = {}
    first = f"original/{args.formats[0]}"
    for name, ts in samples.items():
        med = statistics.median(ts)
        same = statistics.median(samples[f"original/{name.split('/')[1]}"])
        rows[name] = {
            "step_ms": med * 1e3, "min_ms": min(ts) * 1e3, "max_ms": max(ts) * 1e3, "images_per_s": args.batch / med,
            "speedup_same_format": same / med, "speedup_vs_default_original": statistics.median(samples[first]) / med,
            "trainable_params": sum(p.numel() for p in models[name].parameters() if p.requires_grad),
            "params": fxlrd.count_params(models[name]), "paper_gpu_speedup_pct": PAPER_TRAIN_SPEEDUP.get(name.split("/")[0]),
        }  # fmt: skip
        if name in phases:
            rows[name]["phase_step_ms"] = {k: statistics.median(v) * 1e3 for k, v in phases[name].items() if v}
        print(f"{name:28s} step {med * 1e3:8.1f} ms  {args.batch / med:6.2f} img/s  x{same / med:.2f} (same format)  "
              f"x{rows[name]['speedup_vs_default_original']:.2f} (vs {first})")  # fmt: skip
    md = [f"| variant / memory format | params (M) | trainable (M) | step ms (median) | img/s | speed-up, same format | speed-up vs {first} | paper (GPU) |",
          "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, r in rows.items():
        paper = f"+{r['paper_gpu_speedup_pct']}%" if r["paper_gpu_speedup_pct"] else "-"
        md.append(f"| {name} | {r['params'] / 1e6:.2f} | {r['trainable_params'] / 1e6:.2f} | {r['step_ms']:.0f} | "
                  f"{r['images_per_s']:.2f} | {r['speedup_same_format']:.2f}× | {r['speedup_vs_default_original']:.2f}× | {paper} |")  # fmt: skip
    md.append("")
    for name in phases:
        md.append(f"{name} by phase: " + ", ".join(f"phase {k}: {v:.0f} ms" for k, v in rows[name]["phase_step_ms"].items()))
    md.append("")
    for fmt in args.formats:
        r = rows[f"lrd_paper_freeze/{fmt}"]
        md.append(f"Target LRD + paper freezing ≥ 1.8× the original ({fmt}): same format {r['speedup_same_format']:.2f}× "
                  f"({'met' if r['speedup_same_format'] >= 1.8 else 'missed'}), vs the default NCHW original "
                  f"{r['speedup_vs_default_original']:.2f}× ({'met' if r['speedup_vs_default_original'] >= 1.8 else 'missed'})")  # fmt: skip
    write("training_throughput", {"environment": env, "settings": settings, "results": rows}, "\n".join(md))


if __name__ == "__main__":
    main()
