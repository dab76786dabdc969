"""Peak memory of calibration for a BERT-base-sized model, measured, and what it means at 7B.

    .venv/bin/python benchmarks/calibration_memory.py [--batches 8 --batch 8 --seq 128]
    .venv/bin/python benchmarks/calibration_memory.py --model moe [--batches 1 --batch 8 --kept-batch 2]

``--model moe``: the suite's mixture of experts (``batched_mm``), calibrated with the output
sensitivity (experts and layers): its backward pass as fxlrd runs it (gathered expert stacks
gathered again) and, at ``--kept-batch`` sequences, as autograd runs it by default (every
gathered stack kept until the backward pass).

Each measurement runs in a fresh process: the peak resident memory (``ru_maxrss``) after the
model is built is compared with the peak after calibration (the Gram matrices, the model's
activations for one batch, and with sensitivity one backward pass and each layer's output
sensitivity, a ``C_out × C_out`` matrix or its diagonal). The Gram and sensitivity matrices
are also counted exactly. Results are appended to ``results/calibration_memory.jsonl`` and
``results/calibration_memory.md`` is regenerated from all runs.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def measure(batches: int, batch: int, seq: int, sensitivity: str) -> dict:
    """In this process: build BERT-base, calibrate, report memory."""
    import warnings

    import torch
    from transformers import BertConfig, BertModel

    from fxlrd.calibrate import collect_stats
    from fxlrd.capture import capture

    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    model = BertModel(BertConfig()).eval()
    data = [{"input_ids": torch.randint(0, 30522, (batch, seq)), "attention_mask": torch.ones(batch, seq, dtype=torch.long)}
            for _ in range(batches)]  # fmt: skip
    gm = capture(model, data[0]).gm
    del model
    before = _rss_mb()
    t0 = time.perf_counter()
    stats = collect_stats(gm, data, sensitivity=sensitivity != "off", progress=False,
                          sensitivity_matrix="diagonal" if sensitivity == "diagonal" else "full")  # fmt: skip
    seconds = time.perf_counter() - t0
    after = _rss_mb()
    unique = {id(s.inputs): s.inputs for s in stats.values()}
    gram_mb = sum(s.gram.numel() * s.gram.element_size() for s in unique.values()) / 2**20
    sens = [s.output_sensitivity for s in stats.values() if s.output_sensitivity is not None]
    sens_mb = sum(t.numel() * t.element_size() for t in sens) / 2**20
    return {"params_M": sum(p.numel() for p in gm.parameters()) / 1e6, "sites": len(stats), "distinct_inputs": len(unique),
            "gram_MiB": gram_mb, "sensitivity_MiB": sens_mb, "peak_before_MiB": before, "peak_after_MiB": after,
            "calibration_peak_increase_MiB": after - before, "seconds": seconds}  # fmt: skip


def llama7b_estimate() -> dict:
    """Gram matrices of a LLaMA-7B-shaped decoder (32 blocks, hidden 4096, MLP 11008), on paper."""
    h, m, blocks = 4096, 11008, 32
    per_block = {"q,k,v (one input)": h * h, "o_proj": h * h, "gate,up (one input)": h * h, "down_proj": m * m}
    gram = sum(per_block.values()) * 8
    outputs = (3 * h * h + h * h + 2 * m * m + h * h) * 8  # full sensitivity: q, k, v, o, gate, up, down outputs
    tokens = 128 * 2048  # SVD-LLM's calibration: 256 sequences of 2048 tokens is common; 128 here
    activation = tokens * h * 4  # one fp32 hidden state for every calibration token
    return {"per_block_gram_GiB": gram / 2**30, "all_blocks_gram_GiB": blocks * gram / 2**30,
            "per_block_full_sensitivity_GiB": outputs / 2**30, "all_blocks_full_sensitivity_GiB": blocks * outputs / 2**30,
            "calibration_tokens": tokens, "one_hidden_state_all_tokens_GiB": activation / 2**30}  # fmt: skip


def measure_moe(batches: int, batch: int, mode: str) -> dict:
    """In this process: build the suite's moe model, calibrate its experts and layers with the
    output sensitivity (``mode``: "kept", autograd keeps the gathered stacks), report memory."""
    import warnings

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks.models import MOE_SEQUENCE, _moe_tokens, get
    from fxlrd import calibrate
    from fxlrd.calibrate import collect_stats
    from fxlrd.capture import capture
    from fxlrd.experts import expert_stats, find_stacked

    warnings.simplefilter("ignore")
    if mode == "kept":
        calibrate._is_gather = lambda node: False  # no stack gathered again: autograd keeps what it saves
    model = get("moe").build()
    data = [_moe_tokens(batch, seed=100 + i) for i in range(batches)]
    gm = capture(model, data[0], mode="export").gm
    stacks = find_stacked(model, gm)
    before = _rss_mb()
    t0 = time.perf_counter()
    experts = expert_stats(gm, stacks, data, progress=False, sensitivity=True)
    layers = collect_stats(gm, data, progress=False, sensitivity=True)
    seconds = time.perf_counter() - t0
    after = _rss_mb()
    return {"params_M": sum(p.numel() for p in gm.parameters()) / 1e6, "stacks": len(experts), "sites": len(layers),
            "tokens_per_batch": batch * MOE_SEQUENCE, "peak_before_MiB": before, "peak_after_MiB": after,
            "calibration_peak_increase_MiB": after - before, "seconds": seconds}  # fmt: skip


MOE_ROWS = {"kept": "gathered stacks kept for the backward pass (autograd's default)",
            "regathered": "gathered again in the backward pass (fxlrd)"}  # fmt: skip

ROWS = {"inputs only": "off", "with sensitivity (diagonal)": "diagonal", "with sensitivity (full matrix)": "full"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--model", choices=("bert_base", "moe"), default="bert_base")
    parser.add_argument("--kept-batch", type=int, default=2,
                        help="moe: the batch at which autograd's default (stacks kept) is measured too")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--sensitivity", choices=tuple(ROWS.values()), default="off", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=tuple(MOE_ROWS), default="regathered", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        measured = (measure_moe(args.batches, args.batch, args.mode) if args.model == "moe"
                    else measure(args.batches, args.batch, args.seq, args.sensitivity))  # fmt: skip
        print(json.dumps(measured))
        return 0
    from fxlrd.timing import environment

    env = environment()
    if args.model == "moe":
        return _main_moe(args, env)
    rows = {}
    for name, sensitivity in ROWS.items():
        cmd = [sys.executable, __file__, "--worker", "--batches", str(args.batches), "--batch", str(args.batch),
               "--seq", str(args.seq), "--sensitivity", sensitivity]  # fmt: skip
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        rows[name] = json.loads(out)
        print(name, rows[name], flush=True)
    return _append({"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "environment": env,
                    "settings": vars(args) | {"worker": None}, "bert_base": rows, "llama7b_estimate": llama7b_estimate()})


def _append(run: dict) -> int:
    """Append ``run`` to the results (every run kept) and render them all again."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / "calibration_memory.jsonl", "a") as f:
        f.write(json.dumps(run) + "\n")
    _write_markdown()
    print(f"appended to {RESULTS / 'calibration_memory.jsonl'}")
    return 0


def _main_moe(args: argparse.Namespace, env: dict) -> int:
    rows = []
    for mode, batch in (("kept", args.kept_batch), ("regathered", args.kept_batch), ("regathered", args.batch)):
        cmd = [sys.executable, __file__, "--worker", "--model", "moe", "--batches", str(args.batches), "--batch",
               str(batch), "--mode", mode]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True)
        row = {"mode": mode, "batch": batch, "returncode": done.returncode}
        if done.returncode == 0:
            row |= json.loads(done.stdout.strip().splitlines()[-1])
        else:  # (killed for memory, say: kept as it is)
            row["error"] = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        rows.append(row)
        print(row, flush=True)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks.models import MOE_SEQUENCE

    settings = {"model": "moe", "batches": args.batches, "batch": args.batch, "kept_batch": args.kept_batch,
                "seq": MOE_SEQUENCE, "sensitivity": "full"}  # fmt: skip
    return _append({"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "environment": env, "settings": settings, "moe": rows})


def _moe_markdown(r: dict) -> list[str]:
    s = r["settings"]
    e = r["environment"]
    md = [f"## {r['date']} — {e['processor']} ({e['vector_extensions']}; {e['cpus']} cores), torch {e['torch']}", "",
          f"The suite's `moe` model (transformers Qwen3MoeModel on batched_mm, random weights), {s['batches']} "
          "batch(es), calibrated with the output sensitivity (full matrices), experts and layers:", "",
          "(peak RSS increase: the process's high-water mark after calibration less the one after building and "
          "capturing the model)", "",
          "| backward pass | batch | tokens | stacks | layer sites | peak RSS increase (MiB) | time (s) |",
          "|---|---|---|---|---|---|---|"]  # fmt: skip
    for v in r["moe"]:
        if "error" in v:
            md.append(f"| {MOE_ROWS[v['mode']]} | {v['batch']} | | | | failed: {v['error']} | |")
        else:
            md.append(f"| {MOE_ROWS[v['mode']]} | {v['batch']} | {v['tokens_per_batch']} | {v['stacks']} | {v['sites']} | "
                      f"{v['calibration_peak_increase_MiB']:.0f} | {v['seconds']:.1f} |")  # fmt: skip
    return md + [""]


def _write_markdown() -> None:
    runs = [json.loads(line) for line in (RESULTS / "calibration_memory.jsonl").read_text().splitlines() if line.strip()]
    md = ["# Calibration memory", "", "`benchmarks/calibration_memory.py`; every run kept, newest first.", ""]
    for r in reversed(runs):
        if "moe" in r:
            md += _moe_markdown(r)
            continue
        s = r["settings"]
        md += [f"## {r['date']} — {r['environment']['processor']}", "",
               f"BERT-base (random weights), {s['batches']} batches of {s['batch']}×{s['seq']} tokens:", "",
               "| calibration | sites | distinct inputs | Gram matrices (MiB) | sensitivities (MiB) | "
               "peak RSS increase (MiB) | time (s) |",
               "|---|---|---|---|---|---|---|"]  # fmt: skip
        for name, v in r["bert_base"].items():
            sens = f"{v['sensitivity_MiB']:.0f}" if "sensitivity_MiB" in v else "not counted"
            md.append(f"| {name} | {v['sites']} | {v['distinct_inputs']} | {v['gram_MiB']:.0f} | {sens} | "
                      f"{v['calibration_peak_increase_MiB']:.0f} | {v['seconds']:.1f} |")  # fmt: skip
        e = r["llama7b_estimate"]
        md += ["", f"LLaMA-7B-shaped decoder, on paper: the Gram matrices of one block take {e['per_block_gram_GiB']:.2f} GiB "
               f"(float64), of all 32 blocks {e['all_blocks_gram_GiB']:.1f} GiB — so `sequential=True`, which fits one layer "
               f"at a time, needs one block's Gram matrices plus the live activations of every calibration token at the "
               f"current point of the graph, twice (original and compressed): {e['one_hidden_state_all_tokens_GiB']:.1f} GiB "
               f"per fp32 hidden state for {e['calibration_tokens']} tokens (128 sequences of 2048). With a residual stream "
               "and one branch live that is about 4 hidden states × 2 versions ≈ "
               f"{8 * e['one_hidden_state_all_tokens_GiB']:.0f} GiB, plus the 13 GiB fp16 weights: a 64 GiB host, or fewer "
               "calibration tokens. The non-sequential path streams batches and needs all blocks' Gram matrices "
               f"({e['all_blocks_gram_GiB']:.0f} GiB), or one block's at a time when sites are calibrated in groups "
               "(`collect_stats(names=...)`)."]  # fmt: skip
        if "per_block_full_sensitivity_GiB" in e:
            md += ["", f"The full output-sensitivity matrices (`sensitivity_matrix=\"full\"`, the default) add "
                   f"{e['per_block_full_sensitivity_GiB']:.2f} GiB per block ({e['all_blocks_full_sensitivity_GiB']:.0f} GiB "
                   "for all 32): at that scale use `sensitivity_matrix=\"diagonal\"` (11 MB for all 32 blocks), or calibrate the "
                   "blocks in groups."]  # fmt: skip
        md.append("")
    (RESULTS / "calibration_memory.md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    sys.exit(main())
