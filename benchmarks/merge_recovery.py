"""How much of an approximate merge's output error each recovery step gives back.

A SmallResNet trained on scikit-learn's digits is decomposed at α = 2 (Tucker-2 of the 3×3
convs) and then approximately merged. Against the decomposed-but-unmerged model, measured
on the test split: relative logit error and accuracy for the naive merge, after batch-norm
re-estimation (of the moved norms, then of all norms), and after the least-squares refit
(+ re-estimation), all before fine-tuning; fine-tuning is in digits_finetune.py.
Calibration: 512 training images.

Run: .venv/bin/python benchmarks/merge_recovery.py
"""

from __future__ import annotations

import argparse

import torch

import fxlrd
from fxlrd import LRDConfig
from fxlrd.recover import reestimate_norms, refit_merged

from _common import header, write
from _digits import accuracy, digits_data
from digits_finetune import train_original


@torch.no_grad()
def logit_error(model, reference, x) -> float:
    model.eval(), reference.eval()
    want = reference(x)
    return ((model(x) - want).norm() / want.norm()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--ratio", type=float, default=2.0)
    parser.add_argument("--calibration", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    env = header("approximate merge recovery (digits)", vars(args))
    train, test = digits_data(seed=args.seed)
    base, base_acc = train_original(train, test, args.epochs, args.seed)
    cfg = dict(ratio=args.ratio, rank_quantum=1, decompose_pointwise=False)
    reference = fxlrd.transform(base, LRDConfig(**cfg)).eval()
    calib = [train[0][i : i + 128] for i in range(0, args.calibration, 128)]
    x = test[0]
    rows = {"original": {"accuracy": base_acc, "logit_error": logit_error(base, reference, x)},
            "decomposed (unmerged)": {"accuracy": accuracy(reference, test), "logit_error": 0.0}}  # fmt: skip
    gm = fxlrd.transform(base, LRDConfig(**cfg | {"decompose_pointwise": None}, merge="approximate")).eval()
    rows["merged, naive"] = {"accuracy": accuracy(gm, test), "logit_error": logit_error(gm, reference, x)}
    reestimate_norms(gm, calib)
    rows["+ BN re-estimation (moved norms)"] = {"accuracy": accuracy(gm, test), "logit_error": logit_error(gm, reference, x)}
    reestimate_norms(gm, calib, which="all")
    rows["+ BN re-estimation (all norms)"] = {"accuracy": accuracy(gm, test), "logit_error": logit_error(gm, reference, x)}
    report = refit_merged(gm, reference, calib)
    reestimate_norms(gm, calib, which="all")
    rows["+ least-squares refit"] = {"accuracy": accuracy(gm, test), "logit_error": logit_error(gm, reference, x)}
    for name, r in rows.items():
        print(f"{name:24s} accuracy {r['accuracy']:6.2f}%  logit error vs unmerged {r['logit_error']:.3f}")
    md = ["| model | test accuracy (%) | relative logit error vs unmerged |", "|---|---|---|"]
    md += [f"| {n} | {r['accuracy']:.2f} | {r['logit_error']:.3f} |" for n, r in rows.items()]
    md += ["", "Per merged layer, least-squares fit error ‖T − MX‖/‖T‖ on the calibration batches:", "",
           "| layer | before refit | after refit |", "|---|---|---|"]  # fmt: skip
    md += [f"| {k} | {v['before']:.3f} | {v['after']:.3f} |" for k, v in report.items()]
    write("merge_recovery", {"environment": env, "settings": vars(args), "results": rows, "refit": report}, "\n".join(md))


if __name__ == "__main__":
    main()
