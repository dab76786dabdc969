"""How much faster, for how much accuracy: data-aware decomposition on real pretrained models.

    .venv/bin/python benchmarks/fidelity.py                      # both models, all ratios (~1 h here)
    .venv/bin/python benchmarks/fidelity.py --models minilm --ratios 1.5 2 --distill-steps 0

Models and data (nothing is downloaded; see benchmarks/_real.py):
- EfficientNet-Lite1 (ImageNet weights), on views of scikit-learn's sample photographs:
  fidelity = top-1 agreement with the original and mean KL(original ‖ compressed).
- all-MiniLM-L6-v2 (sentence-transformer BERT), on first paragraphs of standard-library
  docstrings: fidelity = mean cosine similarity of the sentence embeddings (mean pooling).

Methods, at each compression ratio α over the decomposed layers (all conv/linear layers of
the CNN but its depthwise convs; MiniLM's encoder linears):
- ``data-free``: the weights' truncated SVD / Tucker-2, every layer at α;
- ``whitened``: input whitening on calibration data (SVD-LLM), every layer at α;
- ``whitened+seq``: + sequential error compensation;
- ``global``: whitened + output sensitivity (the full output-channel matrix; for the CNN the
  softmax's Fisher, ``sensitivity="kl"``, for MiniLM the normalized sentence embedding), ranks
  allocated across layers (α over all of them);
- ``global+seq``: + sequential error compensation;
- ``narrow+global+seq``: MLP blocks narrowed (``mlp="narrow"``: fewer hidden neurons,
  chosen on calibration data, the second layer refitted; `fxlrd.narrow`) by α, the other
  layers as ``global+seq`` at α; for the CNN its inverted residuals keep fewer hidden
  channels, narrowed one after another, each refitted to the original block's output;
- ``narrow+global``: the same without sequential fitting (every block narrowed and every
  layer factorized from one pass over the original model);
- ``narrow+global+seq+local``: + the narrowed FFN blocks refitted one at a time by Adam steps
  on each block's own output error (`fxlrd.recover.reconstruct_mlps`: up and down layers
  of the block, against the original block on the same inputs; ``--local-steps`` per block,
  on the first ``local_batches`` batches of the distillation text): training, but local
  (no backward pass through the model);
- ``fused+…``: the same with sibling linears fused before decomposition
  (``siblings="fuse"``: MiniLM's query, key and value share one input factor; `fxlrd.siblings`);
  ``fusedqk+…``: queries and keys only (``siblings=["*.query", "*.key"]``);
- ``…+distill``: + a short distillation to the original (``--distill-steps`` Adam
  steps, batch 16) on data neither calibration nor held out: for MiniLM every paragraph of
  the calibration modules' docstrings (~8 k), for the CNN a third random draw of views.

With ``--int8 METHOD ...``: the original and those methods' models also go through
onnxruntime's int8 quantization: for the CNN static (``fxlrd.export_onnx(..., quantize="int8")``:
QDQ, per-channel int8 weights, uint8 activations, calibrated on the same calibration data),
for MiniLM dynamic (``quantize="int8-dynamic"``: int8 weights of the matrix products, their
inputs scaled per call; static int8 does not keep MiniLM close, see ``MiniLMCase.int8``), and
their fidelity is measured by running the int8 ONNX files (rows ``int8`` at α = 1 and
``METHOD+int8``), timed with the others: LRD + int8 against int8 alone, for accuracy.

Also: each layer's output error, whitened vs data-free at equal rank (the median ratio);
onnxruntime CPU latency of every variant (variants taking turns, ``--runs`` rounds, median
[min–max]); a Pareto plot of speed-up against fidelity. Results are appended to
``results/fidelity.jsonl`` (every run kept); ``results/fidelity.md`` and the PNG are
regenerated from all runs of this machine kind.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import sys
import tempfile
import time
import types
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
if str(Path(__file__).resolve().parents[1]) not in sys.path:  # run as a script: `benchmarks` importable too
    sys.path.append(str(Path(__file__).resolve().parents[1]))

import _real  # noqa: E402

import fxlrd  # noqa: E402
from fxlrd import LRDConfig  # noqa: E402
from fxlrd.quantize import QuantizeConfig  # noqa: E402
from fxlrd.timing import environment, median_times  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("data-free", "whitened", "whitened+seq", "global", "global+seq", "global+seq+distill", "narrow+global", "narrow+global+seq",
           "narrow+global+seq+distill", "narrow+global+seq+local", "narrow+global+seq+local+distill",
           "fused+whitened+seq", "fused+global+seq", "fused+narrow+global+seq", "fused+narrow+global+seq+distill",
           "fusedqk+narrow+global+seq", "fusedqk+narrow+global+seq+distill")


# -- models ----------------------------------------------------------------------------------------
class Case:
    """A model with its data, its fidelity measure and how to compress it."""

    name: str
    include: list[str] | None = None
    distill_schedule = "constant"
    int8: Any = "int8"  # `fxlrd.export_onnx`'s quantize=: every default operator type
    # +local (`fxlrd.recover.reconstruct_mlps`): Adam steps per narrowed block, their learning rate, and how
    # many distillation batches it fits on (MiniLM: 200 batches, ~100 k token positions, ~6 min here)
    local_steps, local_lr, local_batches = 800, 3e-4, 200

    def fidelity(self, model: torch.nn.Module) -> dict[str, float]:
        raise NotImplementedError


class EfficientNetCase(Case):
    name = "efficientnet_lite1"

    distill_lr = 3e-5
    distill_steps = 300  # ~1.7 s a step here

    def __init__(self, n_calibration: int, n_held_out: int, n_distill: int = 640, batch: int = 16):
        self.model = _real.efficientnet_lite1()
        views = _real.image_views(n_calibration, seed=1)
        self.calibration = [views[i : i + batch] for i in range(0, n_calibration, batch)]
        self.held_out = _real.image_views(n_held_out, seed=2)
        more = _real.image_views(n_distill, seed=3)  # a third draw: distillation sees neither other set
        self.distill_batches = [more[i : i + batch] for i in range(0, n_distill, batch)]
        self.example = self.calibration[0][:1]
        self.timing_input = self.example
        self.reference = self._logits(self.model)
        self.sensitivity = "kl"  # the top-1 class and KL count: the softmax's Fisher, not every logit alike
        self.distill_loss = "kl"

    def _logits(self, model) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([model(self.held_out[i : i + 32]) for i in range(0, len(self.held_out), 32)])

    def fidelity(self, model) -> dict[str, float]:
        out = self._logits(model)
        kl = F.kl_div(out.log_softmax(-1), self.reference.log_softmax(-1), log_target=True, reduction="batchmean")
        return {"top1_agreement": float((out.argmax(-1) == self.reference.argmax(-1)).float().mean()), "kl": float(kl)}

    primary = "top1_agreement"

    @staticmethod
    def from_onnx(outputs: list) -> torch.Tensor:
        return torch.from_numpy(outputs[0])


def _pooled(outputs, inputs) -> torch.Tensor:
    mask = inputs[1]["attention_mask"][..., None].to(outputs.last_hidden_state.dtype)
    return (outputs.last_hidden_state * mask).sum(1) / mask.sum(1)


def _sentence_embedding(outputs, inputs) -> torch.Tensor:
    """What the sentence transformer outputs: the normalized mean-pooled embedding (cosine
    similarity is all that counts, not the embedding's length)."""
    return F.normalize(_pooled(outputs, inputs), dim=-1)


def _cosine_loss(student, teacher, inputs) -> torch.Tensor:
    return (1 - F.cosine_similarity(_pooled(student, inputs), _pooled(teacher, inputs), dim=-1)).mean()


def _embedding_loss(student, teacher, inputs) -> torch.Tensor:
    """Distillation loss for sentence embeddings: 1 − cosine of the mean-pooled embeddings (the
    measured quantity) plus the tokens' relative squared error (padding left out), which gives
    every token a target instead of one per sentence (measured: 0.933 against 0.929 for the
    cosine alone, α = 2, 600 steps)."""
    mask = inputs[1]["attention_mask"][..., None].to(student.last_hidden_state.dtype)
    s, t = student.last_hidden_state, teacher.last_hidden_state
    return _cosine_loss(student, teacher, inputs) + ((s - t).pow(2) * mask).sum() / (t.pow(2) * mask).sum()


class MiniLMCase(Case):
    name = "minilm"
    include = ["encoder.*"]
    # int8: dynamic (activations scaled per call), the matrix products only. Static int8
    # calibrated on the docstrings costs MiniLM far more: held-out cosine 0.927 against 0.993
    # dynamic (AMD EPYC, 2026-12-05; every default operator type or MatMul/Gemm only alike),
    # and its (unused) pooler output is off by 0.41, past export_onnx's check.
    int8 = QuantizeConfig(dynamic=True)

    distill_lr = 2e-4
    distill_steps = 1200  # ~0.25 s a step here
    distill_schedule = "cosine"  # measured at α = 2, 600 steps: 0.937 against 0.933 at a constant 1e-4

    def __init__(self, n_calibration: int, n_held_out: int, n_distill: int | None = None, batch: int = 16,
                 n_paragraphs: int = 0):  # fmt: skip
        self.model, self.tokenizer = _real.minilm()
        cal_modules, held_modules = _real.text_split()
        self.held_out = _real.docstring_sentences(held_modules, limit=n_held_out)
        # Distillation text: every docstring paragraph of the calibration modules and their
        # submodules (~8 k), none of the held-out modules' first paragraphs; batches shuffled
        # (token_batches groups them by length). Its first ``n_paragraphs`` also calibrate.
        corpus = _real.docstring_corpus(cal_modules, exclude=set(_real.docstring_sentences(held_modules)))
        random.Random(0).shuffle(corpus)
        cal = _real.docstring_sentences(cal_modules, limit=n_calibration) + corpus[:n_paragraphs]
        self.calibration = _real.token_batches(self.tokenizer, cal, batch=batch)
        self.distill_batches = _real.token_batches(self.tokenizer, corpus[:n_distill], batch=batch)
        random.Random(1).shuffle(self.distill_batches)
        self.example = self.calibration[0]
        enc = self.tokenizer(["a sentence of about the usual length for a docstring, padded"] * 1, padding="max_length",
                             max_length=128, truncation=True, return_tensors="pt")  # fmt: skip
        self.timing_input = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        self.reference = _real.embed(self.model, self.tokenizer, self.held_out)
        self.sensitivity = _sentence_embedding
        self.distill_loss = _embedding_loss

    def fidelity(self, model) -> dict[str, float]:
        emb = _real.embed(model, self.tokenizer, self.held_out)
        return {"cosine": float((emb * self.reference).sum(-1).mean())}

    primary = "cosine"

    @staticmethod
    def from_onnx(outputs: list) -> Any:
        return types.SimpleNamespace(last_hidden_state=torch.from_numpy(outputs[0]))


# -- methods ---------------------------------------------------------------------------------------
def _config(case: Case, method: str, ratio: float) -> tuple[LRDConfig, bool]:
    """The LRDConfig of a method, and whether it uses calibration data."""
    base = {"ratio": ratio, "include": case.include}
    if method.startswith("fused+"):
        base["siblings"] = "fuse"
        method = method.removeprefix("fused+")
    elif method.startswith("fusedqk+"):  # queries and keys share a factor; values keep their own
        base["siblings"] = ["*.query", "*.key"]
        method = method.removeprefix("fusedqk+")
    if method == "data-free":
        return LRDConfig(**base), False
    if method == "whitened":
        return LRDConfig(**base, sensitivity=False), True
    if method == "whitened+seq":
        return LRDConfig(**base, sensitivity=False, sequential=True), True
    glob = {**base, "allocation": "global", "sensitivity": case.sensitivity}
    if method.startswith("narrow+"):
        glob["mlp"] = "narrow"
        method = method.removeprefix("narrow+")
    if method == "global":
        return LRDConfig(**glob), True
    return LRDConfig(**glob, sequential=True), True  # global+seq (and +distill)


def layer_output_errors(case: Case, ratio: float) -> dict[str, Any]:
    """Each decomposed layer's output error on the calibration data at the plan's ranks:
    whitened vs data-free (relative squared error of the layer's output)."""
    from fxlrd.calibrate import collect_stats
    from fxlrd.capture import capture
    from fxlrd.factorized import decompose_weight
    from fxlrd.sites import find_sites

    captured = capture(case.model, case.example)
    stats = collect_stats(captured.gm, case.calibration, progress=False)
    plan = fxlrd.plan(case.model, LRDConfig(ratio=ratio, include=case.include), example_inputs=case.example)
    sites = find_sites(captured.gm)
    rows = []
    for lp in plan.decomposed:
        site, st = sites[lp.name], stats.get(lp.name)
        if st is None:
            continue
        w = site.weight(captured.gm).detach()
        cov = st.inputs.covariance()

        def error(fact) -> float:
            # output error of the layer on the calibration inputs: ||(W - W')X||² / ||W X||², through the
            # channel Gram (exact for linear and 1x1 conv layers, which are all SVD here)
            mats = [m.weight.detach().double().reshape(m.weight.shape[0], -1) for m in fact.children()]
            approx = mats[0]
            for m in mats[1:]:
                approx = m @ approx
            wm = w.double().reshape(w.shape[0], -1)
            if approx.shape != wm.shape or cov.shape[0] != wm.shape[1]:
                return float("nan")  # k x k convs: the channel Gram does not give the output error exactly
            d = wm - approx
            return float(torch.trace(d @ cov @ d.T) / torch.trace(wm @ cov @ wm.T))

        free, _ = decompose_weight(w, None, site.spec, lp.method, lp.ranks)
        white, _ = decompose_weight(w, None, site.spec, lp.method, lp.ranks, stats=st.inputs)
        e_free, e_white = error(free), error(white)
        if e_free == e_free and e_white == e_white and e_free > 0:
            rows.append({"layer": lp.name, "ranks": list(lp.ranks), "data_free": e_free, "whitened": e_white})
    ratios = [r["whitened"] / r["data_free"] for r in rows]
    return {"ratio": ratio, "layers": rows, "median_whitened_over_data_free": statistics.median(ratios) if ratios else None}


# -- int8 ------------------------------------------------------------------------------------------
class OnnxModel:
    """An ONNX file run by onnxruntime (CPU, no spinning), called like the PyTorch model it
    came from, so a case measures its fidelity as it measures any model's."""

    def __init__(self, path: Path, case: Case, threads: int):
        from fxlrd.export import onnx_session

        self.path, self.case = path, case
        self.session = onnx_session(path, threads=threads)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from fxlrd.export import onnx_feed

        return self.case.from_onnx(self.session.run(None, onnx_feed(self.session, (args, kwargs))))


def int8_model(case: Case, model: torch.nn.Module, path: Path, threads: int) -> OnnxModel:
    """``model`` exported to ONNX and quantized to int8 by onnxruntime as the case says: static
    quantization calibrated on the case's calibration batches, or dynamic (no calibration)."""
    dynamic = isinstance(case.int8, QuantizeConfig) and case.int8.dynamic
    fxlrd.export_onnx(model, case.example, path, quantize=case.int8, calibration=None if dynamic else case.calibration)
    return OnnxModel(path, case, threads)


# -- latency ---------------------------------------------------------------------------------------
def latency(models: dict[str, torch.nn.Module], example: Any, rounds: int, repeats: int, threads: int,
            onnx_files: dict[str, Path] | None = None) -> dict[str, dict]:  # fmt: skip
    """onnxruntime CPU latency of each model, all taking turns, ``rounds`` rounds (fresh
    sessions each, in this process): per model the median of the round medians with their
    min and max, and the round medians themselves (``rounds_ms``: ratios are formed within a
    round). ``onnx_files``: more models, as ONNX files already written (the int8 ones)."""
    from fxlrd.export import export_onnx_file, onnx_feed, onnx_session
    from fxlrd.capture import normalize_inputs

    inputs = normalize_inputs(example)
    paths = {}
    tmp = tempfile.TemporaryDirectory()
    for name, model in models.items():
        paths[name] = Path(tmp.name) / f"{name.replace('+', '_')}.onnx"
        model.eval()
        export_onnx_file(model, inputs, paths[name])
    paths |= onnx_files or {}
    per_round: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(rounds):
        sessions = {name: onnx_session(p, threads=threads) for name, p in paths.items()}
        runs = {name: (lambda s=s: s.run(None, onnx_feed(s, inputs))) for name, s in sessions.items()}
        times = median_times(runs, repeats=repeats, warmup=3)
        for name, t in times.items():
            per_round[name].append(t["median"])
        del sessions
    tmp.cleanup()
    return {n: {"median_ms": statistics.median(v) * 1e3, "min_ms": min(v) * 1e3, "max_ms": max(v) * 1e3, "rounds": len(v),
                "rounds_ms": [t * 1e3 for t in v]} for n, v in per_round.items()}  # fmt: skip


def round_ratios(base: Mapping[str, Any], other: Mapping[str, Any]) -> dict[str, float]:
    """``base / other`` round by round (the two took turns in each round): median, min, max."""
    ratios = [b / o for b, o in zip(base["rounds_ms"], other["rounds_ms"])]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "rounds": len(ratios)}


# -- the run -------------------------------------------------------------------------------------
def run_case(case: Case, ratios: list[float], methods: list[str], distill_steps: int | None, distill_lr: float | None,
             rounds: int, repeats: int, threads: int, distill_features: float = 0.0,
             int8: list[str] | None = None, local_steps: int | None = None) -> dict[str, Any]:  # fmt: skip
    """Every method at every ratio, then every model timed (taking turns). ``distill_steps`` and
    ``distill_lr`` None: the case's own (1200 steps from 2e-4 on a cosine for MiniLM, 300 at
    3e-5 for the CNN). ``int8``: the methods whose models (and the original's) are also
    measured quantized to int8 by onnxruntime."""
    rows = []
    timed: dict[str, torch.nn.Module] = {"original": case.model}
    int8_files: dict[str, Path] = {}
    int8_dir = tempfile.TemporaryDirectory()
    original_params = fxlrd.count_params(case.model)
    original_macs = fxlrd.count_macs(case.model, case.timing_input)

    scheme = "dynamic" if isinstance(case.int8, QuantizeConfig) and case.int8.dynamic else "static"

    def add_int8(key: str, model: torch.nn.Module, row: dict[str, Any]) -> None:
        t0 = time.perf_counter()
        path = Path(int8_dir.name) / f"{key.replace('+', '_').replace('@', '_')}.int8.onnx"
        try:
            quantized = int8_model(case, model, path, threads)
        except Exception as exc:  # noqa: BLE001  (a model int8 cannot keep close is a result too)
            print(f"  {key}+int8: FAILED {type(exc).__name__}: {exc}", flush=True)
            rows.append({**row, "method": f"{row['method']}+int8", "int8_scheme": scheme,
                         "failed": f"{type(exc).__name__}: {exc}"})  # fmt: skip
            return
        fid = case.fidelity(quantized)
        int8_files[f"{key}+int8"] = path
        rows.append({**row, "method": "int8" if row["method"] == "original" else f"{row['method']}+int8",
                     "seconds": time.perf_counter() - t0, "int8": True, "int8_scheme": scheme, **fid})  # fmt: skip
        print(f"  {rows[-1]['method']:<26} α={row['ratio']:<4g} " + "  ".join(f"{k} {v:.4f}" for k, v in fid.items())
              + f"  ({rows[-1]['seconds']:.0f} s)", flush=True)  # fmt: skip

    if int8:
        add_int8("original", case.model, {"ratio": 1.0, "method": "original", "params": original_params,
                                          "macs": original_macs})  # fmt: skip
    for ratio in ratios:
        built: dict[str, torch.nn.Module] = {}
        for method in methods:
            t0 = time.perf_counter()
            if method.endswith("+local"):
                start = built.get(method.removesuffix("+local"))
                if start is None or not (getattr(start, "fxlrd_plan", None) and start.fxlrd_plan.settings.get("narrowed")):
                    print(f"  α={ratio:<4g} {method:<20} skipped: no narrowed MLP blocks", flush=True)
                    continue
                model = copy.deepcopy(start)
                steps = local_steps if local_steps is not None else case.local_steps
                batches = case.distill_batches[: case.local_batches]
                blocks = fxlrd.recover.reconstruct_mlps(model, case.model, batches, steps=steps, lr=case.local_lr,
                                                        progress=False)  # fmt: skip
                built[method] = model
                extra = {"local_steps": steps, "local_lr": case.local_lr, "local_batches": len(batches),
                         "local_blocks": blocks}  # fmt: skip
            elif method.endswith("+distill"):
                steps = distill_steps if distill_steps is not None else case.distill_steps
                start = built.get(method.removesuffix("+distill"))
                if start is None or steps <= 0:
                    continue
                model = copy.deepcopy(start)
                lr = distill_lr or case.distill_lr
                curve = fxlrd.recover.distill(model, case.model, case.distill_batches, steps=steps, lr=lr,
                                              loss=case.distill_loss, features=distill_features or False,
                                              schedule=case.distill_schedule,
                                              progress=False)  # fmt: skip
                extra = {"distill_steps": steps, "distill_lr": lr, "distill_schedule": case.distill_schedule,
                         "distill_features": distill_features,
                         "distill_loss_first": sum(curve[:10]) / 10, "distill_loss_last": sum(curve[-10:]) / 10}  # fmt: skip
            else:
                config, calibrated = _config(case, method, ratio)
                model = fxlrd.transform(case.model, config, example_inputs=case.example,
                                        calibration=case.calibration if calibrated else None)  # fmt: skip
                extra = {}
                built[method] = model
            seconds = time.perf_counter() - t0
            fid = case.fidelity(model)
            params, macs = fxlrd.count_params(model), fxlrd.count_macs(model, case.timing_input)
            key = f"{method}@{ratio:g}"
            timed[key] = model
            row = {"ratio": ratio, "method": method, "params": params, "macs": macs, "seconds": seconds, **fid, **extra}
            rows.append(row)
            print(f"  α={ratio:<4g} {method:<20} params {params / 1e6:6.2f} M  MACs {macs / 1e9:6.3f} G  "
                  + "  ".join(f"{k} {v:.4f}" for k, v in fid.items()) + f"  ({seconds:.0f} s)", flush=True)  # fmt: skip
            if int8 and method in int8:
                add_int8(key, model, {"ratio": ratio, "method": method, "params": params, "macs": macs})
    print("  timing (onnxruntime CPU, variants taking turns)...", flush=True)
    lat = latency(timed, case.timing_input, rounds, repeats, threads, int8_files)
    int8_dir.cleanup()
    base = lat["original"]["median_ms"]
    rows = [r for r in rows if "failed" not in r] + [r for r in rows if "failed" in r]
    for row in rows:
        if "failed" in row:
            continue
        t = lat["original+int8" if row["method"] == "int8" else
                f"{row['method'].removesuffix('+int8')}@{row['ratio']:g}" + ("+int8" if row.get("int8") else "")]
        row.update(latency_ms=t, speedup=base / t["median_ms"], mac_ratio=original_macs / row["macs"],
                   param_ratio=original_params / row["params"], speedup_rounds=round_ratios(lat["original"], t))  # fmt: skip
        if row.get("int8") and row["method"] != "int8" and "original+int8" in lat:  # LRD + int8 over int8 alone
            row["over_int8_rounds"] = round_ratios(lat["original+int8"], t)
    return {"model": case.name, "original": {"params": original_params, "macs": original_macs,
            "latency_ms": lat["original"], **case.fidelity(case.model)}, "rows": rows}  # fmt: skip


def _load_runs() -> list[dict]:
    """Every run in ``fidelity.jsonl`` (a line torn by a run killed mid-write is skipped with a warning)."""
    from benchmarks.records import read

    return read(RESULTS / "fidelity.jsonl")


def report(runs: list[dict]) -> str:
    """Markdown of every run (newest first), grouped by machine."""
    out = ["# Fidelity of data-aware decomposition on real pretrained models", "",
           "Every run of `benchmarks/fidelity.py` is kept in `fidelity.jsonl`; newest first. Speed-up: the median "
           "[min–max] over the timing rounds of the ratio formed within each round (the variants took turns, fresh "
           "sessions each round, one process); `ᵐ`: a run from before 2026-12-06, which kept only the ratio of the "
           "round medians.", ""]  # fmt: skip
    for run in reversed(runs):
        env = run["environment"]
        out += [f"## {run['date']} — {env['processor']} ({env.get('vector_extensions', '?')}), {env['cpus']} cores",
                "", f"`{run['command']}`; torch {env['torch']}, onnxruntime {env.get('onnxruntime')}; settings: "
                + ", ".join(f"{k}={v}" for k, v in run["settings"].items()), ""]  # fmt: skip
        for case in run["cases"]:
            o = case["original"]
            metric = "top1_agreement" if "top1_agreement" in (case["rows"][0] if case["rows"] else {}) else "cosine"
            extra = "KL" if metric == "top1_agreement" else ""
            out += [f"### {case['model']}: original {o['params'] / 1e6:.2f} M params, {o['macs'] / 1e9:.3f} G MACs, "
                    f"{o['latency_ms']['median_ms']:.2f} ms", "",
                    f"| α | method | params (M) | MACs (G) | MAC ratio | latency ms, median [min–max] | speed-up | "
                    f"speed-up ÷ MAC ratio | {metric} |" + (f" {extra} |" if extra else ""),
                    "|---|---|---|---|---|---|---|---|---|" + ("---|" if extra else "")]  # fmt: skip
            for r in case["rows"]:
                if "failed" in r:
                    out.append(f"| {r['ratio']:g} | {r['method']} | {r['params'] / 1e6:.2f} | {r['macs'] / 1e9:.3f} | "
                               f"failed: {r['failed'][:200]} |")  # fmt: skip
                    continue
                lat = r["latency_ms"]
                out.append(f"| {r['ratio']:g} | {r['method']} | {r['params'] / 1e6:.2f} | {r['macs'] / 1e9:.3f} | "
                           f"{r['mac_ratio']:.2f} | {lat['median_ms']:.2f} [{lat['min_ms']:.2f}–{lat['max_ms']:.2f}] | "
                           f"{_speedup(r)} | {_speed(r) / r['mac_ratio']:.2f} | {r[metric]:.4f} |"
                           + (f" {r['kl']:.4f} |" if extra else ""))  # fmt: skip
            out.append("")
        for err in run.get("layer_errors", []):
            med = err["median_whitened_over_data_free"]
            out.append(f"- {err['model']} α={err['ratio']:g}: layer output error, whitened ÷ data-free at equal rank, "
                       f"median over {len(err['layers'])} layers: **{med:.3f}**" if med is not None else "")  # fmt: skip
        out.append("")
    return "\n".join(out) + "\n"


def _speed(row: Mapping[str, Any]) -> float:
    """A row's speed-up figure: the median of the per-round ratios (the ratio of the round
    medians for runs from before 2026-12-06, which kept only that)."""
    rounds = row.get("speedup_rounds")
    return rounds["median"] if rounds is not None else row["speedup"]


def _speedup(row: Mapping[str, Any]) -> str:
    """The speed-up cell: median [min–max] of the per-round ratios, and over int8 alone for an
    int8 row; runs before 2026-12-06 kept only the ratio of the round medians (marked ``ᵐ``)."""
    rounds = row.get("speedup_rounds")
    if rounds is None:
        return f"{row['speedup']:.2f}x ᵐ"
    text = f"{rounds['median']:.2f}x [{rounds['min']:.2f}–{rounds['max']:.2f}]"
    over = row.get("over_int8_rounds") if row.get("method") != "int8" else None  # (int8 alone: itself)
    return text + (f", {over['median']:.2f}x [{over['min']:.2f}–{over['max']:.2f}] over int8" if over else "")


def _machine(run: dict) -> str:
    """The machine kind a run is grouped by: CPU model and vector extensions (Xeons with and
    without AMX report the same model name)."""
    env = run["environment"]
    return f"{env.get('processor')} · {env.get('vector_extensions', 'vector extensions unknown')}"


def plot(runs: list[dict], path: Path, machine: str) -> None:
    """Speed-up against fidelity on one machine kind: for each model, each (α, method) point
    from the newest of that machine's runs that measured it at the thread count of its newest
    run (a run of a few points does not hide the sweep; speed-ups are each run's own ratios to
    its original, the median over its rounds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mine = [r for r in runs if _machine(r) == machine]
    threads = mine[-1].get("settings", {}).get("threads") if mine else None  # speed-ups at one thread count only
    latest: dict[str, dict] = {}
    for r in mine:
        if r.get("settings", {}).get("threads") == threads:
            for case in r["cases"]:
                points = latest.setdefault(case["model"], {"model": case["model"], "points": {}})["points"]
                points.update({(row["ratio"], row["method"]): row for row in case["rows"] if "failed" not in row})
    cases = [{"model": c["model"], "rows": list(c["points"].values())} for c in latest.values()]
    fig, axes = plt.subplots(1, len(cases), figsize=(5.2 * len(cases), 4), squeeze=False)
    for ax, case in zip(axes[0], cases):
        metric = "top1_agreement" if case["rows"] and "top1_agreement" in case["rows"][0] else "cosine"
        for method in dict.fromkeys(r["method"] for r in case["rows"] if "failed" not in r):
            pts = sorted((_speed(r), r[metric], r["ratio"]) for r in case["rows"] if r["method"] == method
                         and "failed" not in r)  # fmt: skip
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=method, markersize=4)
                for x, y, a in pts:
                    ax.annotate(f"{a:g}", (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points")
        ax.set_xlabel("speed-up (onnxruntime CPU, batch 1)")
        ax.set_ylabel(metric.replace("_", " "))
        ax.set_title(case["model"], fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)  # each panel its own: the methods (and their colours) differ per model
    fig.suptitle(f"{machine}" + (f", {threads} threads" if threads else "") + " — labels: α", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_machines(runs: list[dict], results: Path) -> list[Path]:
    """One Pareto plot per machine kind, ``fidelity_pareto_<machine>.png``; the paths written."""
    from benchmarks.plots import slug

    paths = []
    for machine in dict.fromkeys(map(_machine, runs)):
        paths.append(results / f"fidelity_pareto_{slug(machine)}.png")
        plot(runs, paths[-1], machine)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["efficientnet_lite1", "minilm"], choices=["efficientnet_lite1", "minilm"])
    parser.add_argument("--ratios", nargs="+", type=float, default=[1.25, 1.5, 2.0, 3.0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--image-calibration", type=int, default=512, help="calibration views of the photographs")
    parser.add_argument("--image-held-out", type=int, default=256, help="held-out views (another random draw)")
    parser.add_argument("--text-calibration", type=int, default=1024, help="calibration sentences (at most what exists)")
    parser.add_argument("--text-held-out", type=int, default=1000, help="held-out sentences (at most what exists)")
    parser.add_argument("--text-paragraphs", type=int, default=0, metavar="N",
                        help="also calibrate on N paragraphs of the distillation text (longer: ~3 072 give ~100 k tokens)")
    parser.add_argument("--distill-steps", type=int, default=None, help="default: 1200 for MiniLM, 300 for the CNN")
    parser.add_argument("--distill-lr", type=float, default=None, help="default: 2e-4 (cosine) for MiniLM, 3e-5 for the CNN")
    parser.add_argument("--local-steps", type=int, default=None,
                        help="Adam steps per narrowed block for the +local methods (default: the case's)")
    parser.add_argument("--distill-images", type=int, default=640, help="distillation views (a third random draw)")
    parser.add_argument("--distill-text", type=int, default=None,
                        help="distillation paragraphs (default: all ~8 k of the calibration modules' docstrings)")
    parser.add_argument("--distill-features", type=float, default=0.0, metavar="W",
                        help="weight of per-layer feature matching in the distillation (0: outputs only)")
    parser.add_argument("--int8", nargs="*", default=[], choices=METHODS, metavar="METHOD",
                        help="also quantize the original and these methods' models to int8 (onnxruntime: static, "
                             "calibrated on the calibration data, for the CNN; dynamic for MiniLM) and measure them")  # fmt: skip
    parser.add_argument("--runs", type=int, default=3, help="timing rounds (fresh sessions; at least 3)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--no-save", action="store_true", help="print only (e.g. while other work loads the machine)")
    args = parser.parse_args(argv)
    if args.runs < 3 and not args.no_save:
        parser.error(f"--runs {args.runs}: a saved result needs at least 3 timing rounds (or pass --no-save)")
    if args.text_paragraphs < 0:
        parser.error(f"--text-paragraphs must be 0 or more (paragraphs added to the calibration text), got {args.text_paragraphs}")
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    env = environment()
    settings = {k: v for k, v in vars(args).items() if k != "no_save"}
    print("environment: " + ", ".join(f"{k}={v}" for k, v in env.items()))
    print("settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()), flush=True)
    cases, layer_errors = [], []
    for name in args.models:
        if name == "efficientnet_lite1":
            case: Case = EfficientNetCase(args.image_calibration, args.image_held_out, args.distill_images)
        else:
            case = MiniLMCase(args.text_calibration, args.text_held_out, args.distill_text, n_paragraphs=args.text_paragraphs)
        print(f"\n{name}: original {case.fidelity(case.model)}", flush=True)
        for ratio in args.ratios:
            err = layer_output_errors(case, ratio)
            layer_errors.append({"model": name, **err})
            print(f"  α={ratio:g}: layer output error whitened/data-free, median over {len(err['layers'])} layers: "
                  f"{err['median_whitened_over_data_free']:.3f}", flush=True)  # fmt: skip
        cases.append(run_case(case, args.ratios, args.methods, args.distill_steps, args.distill_lr, args.runs,
                              args.repeats, args.threads, args.distill_features, args.int8, args.local_steps))  # fmt: skip
    run = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": " ".join(["benchmarks/fidelity.py", *(argv or sys.argv[1:])]),
           "environment": env, "settings": settings, "cases": cases, "layer_errors": layer_errors}  # fmt: skip
    if args.no_save:
        print(report([run]))
        return 0
    RESULTS.mkdir(parents=True, exist_ok=True)
    from benchmarks.records import append

    append(RESULTS / "fidelity.jsonl", json.loads(json.dumps(run, default=float)))  # locked, flushed, on a line of its own
    (RESULTS / "fidelity.md").write_text(report(_load_runs()))
    plots = plot_machines(_load_runs(), RESULTS)
    print(f"\nappended to {RESULTS / 'fidelity.jsonl'}; wrote fidelity.md and {', '.join(p.name for p in plots)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
