"""Latency-quantized ranks on ResNet-50 (paper Algorithm 1), measured.

Variants at α = 2, 224×224, batch 1 and 8, on onnxruntime CPU and torch eager (2 threads):
original; vanilla (paper ranks, quantum 1); quantized (quantum 8, no timing); optimized
(ranks chosen by timing on that backend and batch, candidates multiples of 8, and the same
with multiples of 16); global (target_speedup). Reports params,
MACs, median latency, speed-up over the original, and speed-up ÷ MAC ratio (how close to the
FLOP limit each gets), plus the search time with a cold and a warm cache. Also the paper's
Fig. 2 for fxlrd: latency vs Tucker rank of ResNet-152's layer4 512→512 3×3 conv at 7×7.

Run: .venv/bin/python benchmarks/rank_optimization.py      (about 10 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import tempfile
import time
from pathlib import Path

import torch

import fxlrd
from fxlrd import LRDConfig, zoo
from fxlrd.export import onnx_session
from fxlrd.latency import LatencyConfig, make_timer
from fxlrd.factorized import factorized_like
from fxlrd.timing import median_times

from _common import RESULTS, header, write

TARGETS = {"optimized_vs_original": 1.7, "optimized_vs_vanilla": 1.1, "warm_search_s": 10.0, "cold_search_s": 180.0}


def _runner(backend: str, model, x: torch.Tensor, workdir: Path, name: str):
    """A zero-argument callable running ``model`` on ``x`` on the backend."""
    if backend == "onnxruntime":
        path = fxlrd.export_onnx(model, x, workdir / f"{name}.onnx")
        session = onnx_session(path, threads=torch.get_num_threads())
        feed = {"input": x.numpy()}
        return lambda: session.run(None, feed)
    model = model.eval()

    def run():
        with torch.inference_mode():
            model(x)

    return run


def bench_backend(backend: str, batch: int, model, args, workdir: Path, cache: Path) -> dict:
    x = torch.randn(batch, 3, 224, 224)
    lat = LatencyConfig(backend=backend, threads=args.threads, cache_path=cache, progress=False)
    configs = {
        "vanilla": LRDConfig(ratio=2, rank_quantum=1),
        "quantized": LRDConfig(ratio=2, rank_quantum=8),
        "optimized": LRDConfig(ratio=2, latency=lat),
        # onnxruntime's CPU conv kernels block channels by 16 on AVX-512: the same search on multiples of 16.
        "optimized_q16": LRDConfig(ratio=2, latency=dataclasses.replace(lat, quantum=16)),
        "global": LRDConfig(ratio=2, target_speedup=args.target, latency=lat),
    }
    variants = {"original": model}
    search_s, plans = {}, {}
    for name, cfg in configs.items():
        t0 = time.perf_counter()
        plans[name] = fxlrd.plan(model, cfg, example_inputs=x)
        search_s[name] = time.perf_counter() - t0
        variants[name] = fxlrd.apply(model, plans[name])
    runners = {n: _runner(backend, m, x, workdir, f"{backend}_{batch}_{n}") for n, m in variants.items()}
    times = median_times(runners, repeats=args.repeats, warmup=3)
    x1 = torch.randn(1, 3, 224, 224)
    rows = {}
    base_t = times["original"]["median"]
    base_macs = fxlrd.count_macs(model, (x1,))
    for name, m in variants.items():
        macs = fxlrd.count_macs(m, (x1,))
        speedup = base_t / times[name]["median"]
        rows[name] = {
            "params": fxlrd.count_params(m), "macs_per_image": macs, "latency_ms": times[name]["median"] * 1e3,
            "latency_min_ms": times[name]["min"] * 1e3, "latency_max_ms": times[name]["max"] * 1e3,
            "speedup": speedup, "mac_ratio": base_macs / macs, "speedup_over_mac_ratio": speedup / (base_macs / macs),
            "plan_s": search_s.get(name), "kept_layers": None if name == "original" else sum(lp.method == "keep" for lp in plans[name]),
        }  # fmt: skip
    rows["global"]["global_search"] = plans["global"].settings["global_search"]
    return rows


def search_times(model, args) -> dict:
    """Cold (empty cache) and warm search of ResNet-50, onnxruntime, batch 1."""
    x = torch.randn(1, 3, 224, 224)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = LRDConfig(ratio=2, latency=LatencyConfig(threads=args.threads, cache_path=Path(tmp) / "c.json", progress=False))
        out = {}
        for label in ("cold", "warm"):
            t0 = time.perf_counter()
            fxlrd.plan(model, cfg, example_inputs=x)
            out[f"{label}_s"] = time.perf_counter() - t0
        return out


def figure2(args) -> dict:
    """Latency vs rank of ResNet-152 layer4.1.conv2 (512→512 3×3 at 7×7), Tucker r1 = r2 = r."""
    layer = zoo.resnet152().layer4[1].conv2
    shape = (1, 512, 7, 7)
    timer = make_timer(LatencyConfig(backend="onnxruntime", threads=args.threads, repeats=args.repeats, warmup=3))
    original = timer.time(copy.deepcopy(layer), shape)
    ranks = list(range(args.fig_lo, args.fig_hi + 1, args.fig_step))
    times = [timer.time(factorized_like(layer, "tucker2", (r, r), device="cpu"), shape) for r in ranks]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    ax.plot(ranks, [t * 1e3 for t in times], ".-", lw=1, ms=3, label="Tucker-2 (r, r)")
    ax.axhline(original * 1e3, color="gray", ls="--", lw=1, label="original 3×3 conv")
    ax.axvline(309, color="red", ls=":", lw=1, label="α = 2 rank (309)")
    ax.set_xlabel("Tucker rank r")
    ax.set_ylabel("latency (ms)")
    ax.set_title("ResNet-152 layer4.1.conv2 512→512 3×3 @7×7, onnxruntime CPU, batch 1")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "rank_latency_resnet152_layer4.png")
    return {"layer": "layer4.1.conv2", "input_shape": shape, "original_ms": original * 1e3,
            "ranks": ranks, "latency_ms": [t * 1e3 for t in times]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--backends", nargs="+", default=["onnxruntime", "eager"])
    parser.add_argument("--target", type=float, default=2.0, help="target_speedup of the global variant")
    parser.add_argument("--fig-lo", type=int, default=160)
    parser.add_argument("--fig-hi", type=int, default=512)
    parser.add_argument("--fig-step", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = {k: v for k, v in vars(args).items()} | {"model": "resnet50 (random weights)", "ratio": 2, "size": 224}
    env = header("latency-quantized ranks, ResNet-50", settings)
    torch.manual_seed(0)
    model = zoo.resnet50().eval()
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "latency.json"
        for backend in args.backends:
            for batch in args.batches:
                key = f"{backend}_batch{batch}"
                results[key] = bench_backend(backend, batch, model, args, Path(tmp), cache)
                for name, r in results[key].items():
                    print(f"{key:22s} {name:10s} {r['latency_ms']:8.2f} ms  x{r['speedup']:.2f}  MACs x{r['mac_ratio']:.2f}  "
                          f"params {r['params'] / 1e6:.2f} M")  # fmt: skip
    search = search_times(model, args)
    print(f"search time ResNet-50 onnxruntime batch 1: cold {search['cold_s']:.1f} s, warm {search['warm_s']:.1f} s")
    fig = figure2(args)
    md = []
    for key, rows in results.items():
        md += [f"### {key}", "", "| variant | params (M) | GMACs/image | latency ms (median) | speed-up | MAC ratio | speed-up ÷ MAC ratio | layers kept | plan time (s) |",
               "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for name, r in rows.items():
            md.append(f"| {name} | {r['params'] / 1e6:.2f} | {r['macs_per_image'] / 1e9:.2f} | {r['latency_ms']:.2f} | "
                      f"{r['speedup']:.2f}× | {r['mac_ratio']:.2f}× | {r['speedup_over_mac_ratio']:.2f} | "
                      f"{r['kept_layers'] if r['kept_layers'] is not None else '-'} | "
                      f"{r['plan_s']:.1f} |" if r["plan_s"] is not None else
                      f"| {name} | {r['params'] / 1e6:.2f} | {r['macs_per_image'] / 1e9:.2f} | {r['latency_ms']:.2f} | 1.00× | 1.00× | 1.00 | - | - |")  # fmt: skip
        g = rows["global"]["global_search"]
        md += ["", f"global: target {g['target_speedup']}×; the search measured {g['measured_speedup']:.2f}× "
                   f"after {len(g['rounds'])} round(s); this run measured {rows['global']['speedup']:.2f}× "
                   f"({'met' if rows['global']['speedup'] >= g['target_speedup'] else 'missed'})", ""]  # fmt: skip
    ort1 = results.get("onnxruntime_batch1")
    if ort1:
        opt = max((ort1["optimized"], ort1["optimized_q16"]), key=lambda r: r["speedup"])
        van = ort1["vanilla"]
        checks = {
            "optimized ≥ 1.7× original (ORT, batch 1)": opt["speedup"] >= TARGETS["optimized_vs_original"],
            "optimized ≥ 1.1× vanilla (ORT, batch 1)": van["latency_ms"] / opt["latency_ms"] >= TARGETS["optimized_vs_vanilla"],
            "warm search ≤ 10 s": search["warm_s"] <= TARGETS["warm_search_s"],
            "cold search ≤ 3 min": search["cold_s"] <= TARGETS["cold_search_s"],
        }
        md += ["### Targets (onnxruntime CPU, batch 1, best optimized variant)", "",
               f"optimized: {ort1['optimized']['speedup']:.2f}× (quantum 8), {ort1['optimized_q16']['speedup']:.2f}× (quantum 16); "
               f"best / vanilla: {van['latency_ms'] / opt['latency_ms']:.2f}×", ""]  # fmt: skip
        md += [f"- {k}: {'met' if v else 'MISSED'}" for k, v in checks.items()]
    md += ["", f"Search time: cold {search['cold_s']:.1f} s, warm {search['warm_s']:.1f} s.", "",
           "![latency vs rank](rank_latency_resnet152_layer4.png)", ""]  # fmt: skip
    write("rank_optimization", {"environment": env, "settings": settings, "results": results, "search": search, "figure2": fig}, "\n".join(md))


if __name__ == "__main__":
    main()
