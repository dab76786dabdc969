"""Where the time goes: onnxruntime's per-operator profile of ResNet-50 and its decompositions.

Each model is exported with ``fxlrd.export_onnx``, run in an onnxruntime CPU session with the
suite's settings (no spinning) and profiling on, ``--runs`` calls after warm-up; the kernel
time of every node is read from the profile (median over the calls). Per model the report
gives the kernel time by operator type, the fusions onnxruntime made (operator counts of its
optimized graph against the exported one), and each conv's MACs and achieved GFLOP/s with its
arithmetic intensity (FLOPs per byte of activations and weights moved): thin low-rank factors
have low intensity and run far below the machine's peak, which is where the time the FLOP count
promises is lost.

Run: .venv/bin/python benchmarks/ort_profile.py [--runs 30] [--threads 2]
     [--variants original quantized merged merged_optimized_ctx]  (the last searches its ranks: minutes)
Appends to benchmarks/results/ort_profile.jsonl and writes ort_profile.md (from every run).
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fxlrd  # noqa: E402
from fxlrd import LRDConfig, zoo  # noqa: E402
from fxlrd.latency import LatencyConfig  # noqa: E402

from benchmarks.machine import machine, machine_kind, versions  # noqa: E402
from benchmarks.records import append, now, read  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = {
    "original": None,
    "quantized": LRDConfig(ratio=2),
    "merged": LRDConfig(ratio=2, merge="approximate"),
    # the suite's merged_optimized_ctx: ranks searched on onnxruntime inside each layer's neighbours (torch's threads)
    "merged_optimized_ctx": LRDConfig(ratio=2, merge="approximate",
                                      latency=LatencyConfig(backend="onnxruntime", context="neighbours", progress=False)),
}


def _shape(entry: Any) -> list[int]:
    """``{"float": [1, 64, 56, 56]}`` -> ``[1, 64, 56, 56]``."""
    return list(next(iter(entry.values()))) if isinstance(entry, dict) and entry else []


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def node_macs(op: str, inputs: list[list[int]], outputs: list[list[int]]) -> int:
    """MACs of a Conv/FusedConv/Gemm/MatMul node from its shapes (0 for other operators)."""
    if op in ("Conv", "FusedConv") and len(inputs) >= 2 and outputs:
        w = inputs[1]  # [O, I/groups, kh, kw]
        return _numel(outputs[0]) * _numel(w[1:])
    if op in ("Gemm", "MatMul", "FusedMatMul") and len(inputs) >= 2 and outputs:
        return _numel(outputs[0]) * inputs[0][-1]
    return 0


def profile_session(path: Path, x: torch.Tensor, runs: int, threads: int, optimized: Path) -> list[dict[str, Any]]:
    """Per node: name, operator, shapes and median kernel time (µs) over ``runs`` calls."""
    import onnxruntime as ort

    options = ort.SessionOptions()  # the suite's settings (as fxlrd.export.onnx_session), profiling on
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    options.enable_profiling = True
    options.optimized_model_filepath = str(optimized)
    options.profile_file_prefix = str(path.with_suffix(""))
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x.numpy()}
    warmup = 5
    for _ in range(warmup + runs):
        session.run(None, feed)
    trace = Path(session.end_profiling())
    events = json.loads(trace.read_text())
    trace.unlink(missing_ok=True)
    per_node: dict[str, list[float]] = collections.defaultdict(list)
    info: dict[str, dict[str, Any]] = {}
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        name = e["name"][: -len("_kernel_time")]
        per_node[name].append(float(e["dur"]))  # in call order: the first ``warmup`` are dropped below
        args = e.get("args", {})
        info.setdefault(name, {"op": args.get("op_name", "?"),
                               "inputs": [_shape(s) for s in args.get("input_type_shape", [])],
                               "outputs": [_shape(s) for s in args.get("output_type_shape", [])]})  # fmt: skip
    nodes = []
    for name, durs in per_node.items():
        durs = durs[warmup:]
        meta = info[name]
        macs = node_macs(meta["op"], meta["inputs"], meta["outputs"])
        moved = 4 * (sum(_numel(s) for s in meta["inputs"]) + sum(_numel(s) for s in meta["outputs"]))
        nodes.append({"name": name, "op": meta["op"], "us": statistics.median(durs), "calls": len(durs), "macs": macs,
                      "bytes": moved, "inputs": meta["inputs"], "outputs": meta["outputs"]})  # fmt: skip
    return nodes


def op_counts(path: Path) -> dict[str, int]:
    import onnx

    return dict(collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node))


def summarize(nodes: list[dict[str, Any]]) -> dict[str, Any]:
    """Kernel time by operator type, and the convs' achieved GFLOP/s by arithmetic intensity."""
    total = sum(n["us"] for n in nodes)
    by_op: dict[str, float] = collections.defaultdict(float)
    for n in nodes:
        by_op[n["op"]] += n["us"]
    convs = [n for n in nodes if n["macs"]]
    buckets = {"< 10 FLOP/B": (0, 10), "10–50 FLOP/B": (10, 50), "≥ 50 FLOP/B": (50, float("inf"))}
    by_intensity = {}
    for label, (lo, hi) in buckets.items():
        sel = [n for n in convs if lo <= 2 * n["macs"] / n["bytes"] < hi]
        us = sum(n["us"] for n in sel)
        macs = sum(n["macs"] for n in sel)
        by_intensity[label] = {"layers": len(sel), "ms": us / 1e3, "gmacs": macs / 1e9,
                               "gflops_per_s": (2 * macs / (us * 1e-6) / 1e9) if us else None}  # fmt: skip
    return {"kernel_ms": total / 1e3, "by_op_ms": {k: v / 1e3 for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])},
            "gemm_gmacs": sum(n["macs"] for n in convs) / 1e9,
            "gemm_gflops_per_s": 2 * sum(n["macs"] for n in convs) / (sum(n["us"] for n in convs) * 1e-6) / 1e9,
            "by_intensity": by_intensity}  # fmt: skip


def markdown(records: list[dict[str, Any]]) -> str:
    lines = ["# onnxruntime per-operator profile (ResNet-50, batch 1)", "",
             "Generated by `benchmarks/ort_profile.py` from every run in `ort_profile.jsonl` (newest first). "
             "Kernel times are medians over the profiled calls; GFLOP/s counts 2 FLOPs per MAC; intensity is FLOPs "
             "per byte of float32 inputs, weights and outputs.", ""]  # fmt: skip
    for rec in reversed(records):
        lines += [f"## {rec['timestamp']} · {machine_kind(rec['machine'])}", "",
                  f"versions: {', '.join(f'{k} {v}' for k, v in rec['versions'].items())} · settings: {rec['settings']} · "
                  f"command: `{rec['command']}`", ""]  # fmt: skip
        names = list(rec["models"])
        lines += ["| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        s = {n: rec["models"][n]["summary"] for n in names}
        lines.append("| kernel time (ms) | " + " | ".join(f"{s[n]['kernel_ms']:.2f}" for n in names) + " |")
        lines.append("| conv/GEMM GMACs | " + " | ".join(f"{s[n]['gemm_gmacs']:.2f}" for n in names) + " |")
        lines.append("| conv/GEMM GFLOP/s | " + " | ".join(f"{s[n]['gemm_gflops_per_s']:.0f}" for n in names) + " |")
        ops = sorted({op for n in names for op in s[n]["by_op_ms"]}, key=lambda op: -max(s[n]["by_op_ms"].get(op, 0) for n in names))
        for op in ops[:6]:
            lines.append(f"| {op} (ms) | " + " | ".join(f"{s[n]['by_op_ms'].get(op, 0):.2f}" for n in names) + " |")
        for label in next(iter(s.values()))["by_intensity"]:
            cells = []
            for n in names:
                b = s[n]["by_intensity"][label]
                cells.append(f"{b['layers']} layers, {b['ms']:.2f} ms, {b['gflops_per_s']:.0f} GFLOP/s" if b["ms"] else "—")
            lines.append(f"| convs at {label} | " + " | ".join(cells) + " |")
        lines.append("| nodes exported → run | " + " | ".join(
            f"{sum(rec['models'][n]['exported_ops'].values())} → {sum(rec['models'][n]['optimized_ops'].values())}"
            for n in names) + " |")  # fmt: skip
        fused = lambda n: ", ".join(f"{op} {c}" for op, c in sorted(rec["models"][n]["optimized_ops"].items()))  # noqa: E731
        lines += ["", "Operators onnxruntime runs after its graph optimizations:", ""]
        lines += [f"- {n}: {fused(n)}" for n in names]
        if rec.get("notes"):
            lines += ["", rec["notes"]]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--variants", nargs="+", default=["original", "quantized", "merged"], choices=list(VARIANTS))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = zoo.resnet50().eval()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    rec: dict[str, Any] = {"timestamp": now(), "command": "python benchmarks/ort_profile.py " + " ".join(argv),
                           "machine": machine(), "versions": versions(),
                           "settings": {"runs": args.runs, "threads": args.threads, "batch": 1}, "models": {}}  # fmt: skip
    print(f"machine: {machine_kind(rec['machine'])}\nsettings: {rec['settings']}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.variants:
            config = VARIANTS[name]
            m = model if config is None else fxlrd.transform(model, config, example_inputs=x)
            path = Path(tmp) / f"{name}.onnx"
            fxlrd.export_onnx(m, x, path)
            optimized = Path(tmp) / f"{name}.opt.onnx"
            nodes = profile_session(path, x, args.runs, args.threads, optimized)
            summary = summarize(nodes)
            rec["models"][name] = {"summary": summary, "exported_ops": op_counts(path), "optimized_ops": op_counts(optimized),
                                   "slowest_per_flop": sorted((n for n in nodes if n["macs"]),
                                                              key=lambda n: n["us"] / n["macs"], reverse=True)[:10]}  # fmt: skip
            print(f"{name}: kernel {summary['kernel_ms']:.2f} ms, conv/GEMM {summary['gemm_gflops_per_s']:.0f} GFLOP/s, "
                  f"by op {', '.join(f'{k} {v:.2f}' for k, v in list(summary['by_op_ms'].items())[:4])}", flush=True)  # fmt: skip
    append(RESULTS / "ort_profile.jsonl", rec)
    (RESULTS / "ort_profile.md").write_text(markdown(read(RESULTS / "ort_profile.jsonl")))
    print(f"wrote {RESULTS / 'ort_profile.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
