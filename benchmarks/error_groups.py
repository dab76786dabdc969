"""Where MiniLM's compression error comes from, and how well the allocator predicted it.

    .venv/bin/python benchmarks/error_groups.py [--ratio 1.5]

all-MiniLM-L6-v2 compressed as `benchmarks/fidelity.py`'s ``global`` method does (whitened,
full sensitivity matrix of the normalized sentence embedding, ranks allocated across the
encoder linears). Then each group of layers (query, key, value, attention output, FFN in,
FFN out) is compressed *alone* — every other decomposed layer put back to its original
weight — and the held-out embeddings' 1 − cosine measured. Beside it, the allocator's own
prediction for the group: the sum of its layers' predicted relative squared errors, halved
(for unit vectors ``1 − cos = ‖u − v‖² / 2``). Appended to ``results/error_groups.jsonl``;
``results/error_groups.md`` is regenerated from all runs.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fidelity  # noqa: E402

import fxlrd  # noqa: E402
from fxlrd.factorized import Factorized  # noqa: E402
from fxlrd.timing import environment  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
GROUPS = {
    "query": lambda n: n.endswith("attention.self.query"),
    "key": lambda n: n.endswith("attention.self.key"),
    "value": lambda n: n.endswith("attention.self.value"),
    "attention output": lambda n: n.endswith("attention.output.dense"),
    "FFN in": lambda n: n.endswith("intermediate.dense"),
    "FFN out": lambda n: n.endswith(".output.dense") and "attention" not in n,
}


def _only(gm: torch.nn.Module, original: torch.nn.Module, keep) -> torch.nn.Module:
    """A copy of ``gm`` in which the decomposed layers not selected by ``keep`` compute their
    original weight again (identity input factor, the original layer as output factor)."""
    out = copy.deepcopy(gm)
    layers = dict(original.named_modules())
    for name, m in list(out.named_modules()):
        if isinstance(m, Factorized) and not keep(name):
            lin = layers[name]
            identity = torch.nn.Linear(lin.in_features, lin.in_features, bias=False)
            with torch.no_grad():
                identity.weight.copy_(torch.eye(lin.in_features))
            m.in_proj, m.out_proj = identity, copy.deepcopy(lin)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ratio", type=float, default=1.5)
    args = parser.parse_args(argv)
    case = fidelity.MiniLMCase(1024, 1000)
    config, _ = fidelity._config(case, "global", args.ratio)
    plan = fxlrd.plan(case.model, config, example_inputs=case.example, calibration=case.calibration)
    gm = fxlrd.apply(case.model, plan, example_inputs=case.example, calibration=case.calibration)
    rows = {"all": {"layers": len(plan.decomposed), "measured": 1 - case.fidelity(gm)["cosine"],
                    "predicted": sum(lp.error or 0.0 for lp in plan.decomposed) / 2}}  # fmt: skip
    for group, keep in GROUPS.items():
        chosen = [lp for lp in plan.decomposed if keep(lp.name)]
        rows[group] = {"layers": len(chosen), "ranks": [lp.ranks[0] for lp in chosen],
                       "measured": 1 - case.fidelity(_only(gm, case.model, keep))["cosine"],
                       "predicted": sum(lp.error or 0.0 for lp in chosen) / 2}  # fmt: skip
        print(group, rows[group], flush=True)
    run = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "environment": environment(), "ratio": args.ratio, "groups": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / "error_groups.jsonl", "a") as f:
        f.write(json.dumps(run) + "\n")
    runs = [json.loads(line) for line in (RESULTS / "error_groups.jsonl").read_text().splitlines() if line.strip()]
    md = ["# Where MiniLM's compression error comes from", "", "`benchmarks/error_groups.py`; every run kept, newest first. "
          "1 − cosine of the held-out sentence embeddings with each group of layers compressed alone, against the "
          "allocator's prediction.", ""]  # fmt: skip
    for r in reversed(runs):
        env = r["environment"]
        md += [f"## {r['date']} — {env['processor']} ({env.get('vector_extensions', '?')}), α = {r['ratio']:g} (global)", "",
               "| layers compressed | decomposed | measured 1 − cos | predicted | measured ÷ predicted |", "|---|---|---|---|---|"]
        for g, v in r["groups"].items():
            ratio = v["measured"] / v["predicted"] if v["predicted"] > 0 else float("nan")
            md.append(f"| {g} | {v['layers']} | {v['measured']:.4f} | {v['predicted']:.4f} | {ratio:.1f} |")
        md.append("")
    (RESULTS / "error_groups.md").write_text("\n".join(md) + "\n")
    print(f"appended to {RESULTS / 'error_groups.jsonl'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
