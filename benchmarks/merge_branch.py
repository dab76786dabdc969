"""Layer merging and branched Tucker on ResNets: the paper's Table 3 rows for fxlrd.

Variants at α = 2: original; vanilla LRD (paper ranks, quantum 1); optimized (latency-
quantized ranks for that backend and batch); merged (Tucker-2 of the 3×3 convs, factors
merged into the 1×1 convs: approximate merge, original depth; ranks rounded to multiples of
``--quantum``, 16 by default, the AVX-512 block width of onnxruntime's conv kernels);
merged+optimized (the same with latency-searched ranks); branched N = 2 and 4 (BTD init,
same quantum). Reports conv/linear layers, params, MACs, median latency and speed-up, on onnxruntime
CPU and torch eager. Target: merged ResNet-50 ≥ 2.0× the original on onnxruntime, batch 1.

Run: .venv/bin/python benchmarks/merge_branch.py [--models resnet50 resnet101 resnet152]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from torch import fx, nn

import fxlrd
from fxlrd import LRDConfig, zoo
from fxlrd.export import onnx_session
from fxlrd.latency import LatencyConfig
from fxlrd.timing import median_times

from _common import header, write

PAPER = {  # Table 3, % over the original (GPU): layers, params, train, infer
    "resnet50": {"vanilla": (115, -50.0, 6.1, 6.8), "optimized": (115, -47.3, 14.2, 14.0), "merged": (50, -51.5, 43.6, 40.6)},
    "resnet101": {"vanilla": (233, -50.1, 9.7, 10.5), "optimized": (233, -52.0, 14.5, 19.9), "merged": (101, None, 52.7, 54.6)},
    "resnet152": {"vanilla": (352, -50.1, 11.7, 13.1), "optimized": (352, -51.9, 15.9, 18.4), "merged": (152, None, 55.9, 54.9)},
}


def layers(model: nn.Module) -> int:
    gm = model if isinstance(model, fx.GraphModule) else fx.symbolic_trace(model)
    kinds = (nn.Conv1d, nn.Conv2d, nn.Linear)
    return sum(n.op == "call_module" and isinstance(gm.get_submodule(n.target), kinds) for n in gm.graph.nodes)


def runner(backend: str, model: nn.Module, x: torch.Tensor, path: Path):
    if backend == "onnxruntime":
        session = onnx_session(fxlrd.export_onnx(model, x, path), threads=torch.get_num_threads())
        feed = {"input": x.numpy()}
        return lambda: session.run(None, feed)
    model.eval()

    def run():
        with torch.inference_mode():
            model(x)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet50"])
    parser.add_argument("--cases", nargs="+", default=["onnxruntime:1", "onnxruntime:8", "eager:1"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--quantum", type=int, default=16, help="rank quantum of the merged and branched variants")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = vars(args) | {"ratio": 2, "size": 224, "weights": "random", "branch_init": "btd"}
    env = header("layer merging and branched Tucker", settings)
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "latency.json"
        for name in args.models:
            torch.manual_seed(0)
            model = zoo.get(name).eval()
            fixed = {
                "vanilla": fxlrd.transform(model, LRDConfig(ratio=2, rank_quantum=1)),
                "merged": fxlrd.transform(model, LRDConfig(ratio=2, rank_quantum=args.quantum, merge="approximate")),
                "branched2": fxlrd.transform(model, LRDConfig(ratio=2, rank_quantum=args.quantum, branches=2)),
                "branched4": fxlrd.transform(model, LRDConfig(ratio=2, rank_quantum=args.quantum, branches=4)),
            }
            x1 = torch.randn(1, 3, 224, 224)
            base_macs = fxlrd.count_macs(model, (x1,))
            for case in args.cases:
                backend, batch = case.split(":")
                x = torch.randn(int(batch), 3, 224, 224)
                lat = LatencyConfig(backend=backend, threads=args.threads, cache_path=cache, progress=False)
                variants = {"original": model, "vanilla": fixed["vanilla"],
                            "optimized": fxlrd.transform(model, LRDConfig(ratio=2, latency=lat), example_inputs=x),
                            "merged": fixed["merged"],
                            "merged_optimized": fxlrd.transform(model, LRDConfig(ratio=2, latency=lat, merge="approximate"), example_inputs=x),
                            "branched2": fixed["branched2"], "branched4": fixed["branched4"]}  # fmt: skip
                runs = {v: runner(backend, m, x, Path(tmp) / f"{name}_{case.replace(':', '_')}_{v}.onnx") for v, m in variants.items()}
                times = median_times(runs, repeats=args.repeats, warmup=3)
                rows = {}
                for v, m in variants.items():
                    macs = fxlrd.count_macs(m, (x1,))
                    rows[v] = {
                        "layers": layers(m), "params": fxlrd.count_params(m), "macs_per_image": macs,
                        "latency_ms": times[v]["median"] * 1e3, "speedup": times["original"]["median"] / times[v]["median"],
                        "mac_ratio": base_macs / macs,
                    }  # fmt: skip
                    print(f"{name} {case:14s} {v:10s} layers {rows[v]['layers']:4d} params {rows[v]['params'] / 1e6:6.2f} M "
                          f"{rows[v]['latency_ms']:8.2f} ms x{rows[v]['speedup']:.2f} (MACs x{rows[v]['mac_ratio']:.2f})")  # fmt: skip
                results[f"{name}_{backend}_batch{batch}"] = rows
    md = []
    for key, rows in results.items():
        model_name = key.split("_")[0]
        md += [f"### {key}", "", "| variant | layers | params (M) | GMACs/image | latency ms | speed-up | MAC ratio | paper infer (GPU) |",
               "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for v, r in rows.items():
            paper = PAPER.get(model_name, {}).get(v)
            md.append(f"| {v} | {r['layers']} | {r['params'] / 1e6:.2f} | {r['macs_per_image'] / 1e9:.2f} | {r['latency_ms']:.2f} | "
                      f"{r['speedup']:.2f}× | {r['mac_ratio']:.2f}× | {f'+{paper[3]}%' if paper else '-'} |")  # fmt: skip
        md.append("")
    r50 = results.get("resnet50_onnxruntime_batch1")
    if r50:
        s = max(r50["merged"]["speedup"], r50["merged_optimized"]["speedup"])
        md.append(f"Target: merged ResNet-50 ≥ 2.0× original on onnxruntime CPU, batch 1: {'met' if s >= 2.0 else 'MISSED'} "
                  f"(best merged variant {s:.2f}×)")
    name = "merge_branch" if args.models == ["resnet50"] else "merge_branch_" + "_".join(args.models)
    if all(c.startswith("eager") for c in args.cases) and args.models != ["resnet50"]:
        name += "_eager"
    write(name, {"environment": env, "settings": settings, "results": results}, "\n".join(md))


if __name__ == "__main__":
    main()
