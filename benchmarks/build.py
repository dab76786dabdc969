"""Building a case's variants once per command, before its timed runs.

The prepare step runs in its own process: it builds every variant (searches included), saves it
with `fxlrd.save` under the command's work directory (and exports it to ONNX for the
onnxruntime backend, or compiles it once for the compile backend), and writes the case's manifest. Every timed run then loads the very same
models, so runs differ only in the measurement. Variants whose ranks do not depend on the
backend or batch are built once per model and shared by its cases.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

import fxlrd
from fxlrd.latency import LatencyConfig, make_timer

from . import models, variants
from .variants import BuildContext, Variant

__all__ = ["manifest_path", "prepare", "load_variant", "as_args", "rotated"]


def _case_dir(workdir: Path, model: str, backend: str, batch: int) -> Path:
    return Path(workdir) / model / f"{backend}-b{batch}"


def manifest_path(workdir: Path, model: str, backend: str, batch: int) -> Path:
    """Where the prepare step of a case writes its manifest (variant -> what was built)."""
    return _case_dir(workdir, model, backend, batch).with_suffix(".json")


def _variant_dir(workdir: Path, model: str, variant: Variant, backend: str, batch: int) -> Path:
    parent = _case_dir(workdir, model, backend, batch) if variant.searched else Path(workdir) / model / "shared"
    return parent / variant.name.replace("@", "_at_").replace("+", "_")


def rotated(names: list[str], run: int) -> list[str]:
    """``names`` starting at the ``run``-th (1-based, cyclically): each run of a case times its
    variants in another order, so that no variant always runs first in each round."""
    k = (run - 1) % len(names) if names else 0
    return names[k:] + names[:k]


def as_args(inputs: Any) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of a tensor or a dict of keyword tensors."""
    return ((), dict(inputs)) if isinstance(inputs, Mapping) else ((inputs,), {})


def _global_search(gm: nn.Module) -> dict[str, Any] | None:
    record = getattr(gm, "fxlrd_plan", None) and gm.fxlrd_plan.settings.get("global_search")
    if not record:
        return None
    return {"target_speedup": record.get("target_speedup"), "measured_speedup": record.get("measured_speedup"),
            "rounds": len(record.get("rounds", []))}  # fmt: skip


def _config_summary(config: fxlrd.LRDConfig) -> dict[str, Any]:
    """The settings that differ from `LRDConfig`'s defaults, and the rank quantum always (its
    default depends on the CPU); the latency search by backend, threads, quantum, and the
    timing context, dtype and int8 mode where set, and a global search's samples per
    whole-model measurement (the batch it timed at is the case's, or the first batch size of
    a gpu suite command)."""
    defaults = fxlrd.LRDConfig().to_dict()
    out = {k: v for k, v in config.to_dict().items() if v != defaults[k] or k == "rank_quantum"}
    if out.get("latency"):
        latency = out["latency"]
        out["latency"] = {k: latency[k] for k in ("backend", "threads", "quantum")}
        out["latency"] |= {k: latency[k] for k in ("context", "dtype", "quantize") if latency.get(k) not in (None, "layer")}
        if latency.get("context") == "neighbours":
            out["latency"]["depth"] = latency.get("depth")
        if config.target_speedup is not None:  # the closed loop's samples per whole-model measurement
            out["latency"]["model_repeats"] = config.latency.whole_model_repeats
    return out


def _describe(gm: nn.Module, per_sample: Any, variant: Variant, ctx: BuildContext, build_s: float) -> dict[str, Any]:
    """Size, MACs per sample and how the variant was built."""
    info: dict[str, Any] = {
        "params": fxlrd.count_params(gm),
        "macs": fxlrd.count_macs(gm, per_sample),
        "weight_layers": sum(p.dim() >= 2 for p in gm.parameters()),
        "build_s": build_s,
    }
    if variant.config is not None:
        plan = gm.fxlrd_plan
        info |= {"config": _config_summary(variant.config(ctx)), "decomposed_layers": len(plan.decomposed),
                 "kept_layers": sum(lp.method == "keep" for lp in plan), "global_search": _global_search(gm)}  # fmt: skip
    return info


def _build(variant: Variant, ctx: BuildContext, where: Path, per_sample: Any) -> dict[str, Any]:
    """Build, describe and save one variant; a failure is recorded, not raised."""
    t0 = time.perf_counter()
    try:
        gm = variant.build(ctx)
        build_s = time.perf_counter() - t0
        reason = variant.skip_reason(gm) if variant.config is not None else None
        if reason:
            return {"skipped": reason}
        info = _describe(gm, per_sample, variant, ctx, build_s)
        if variant.config is not None:
            fxlrd.save(gm, where, overwrite=True)
            info["dir"] = str(where)
        return info
    except Exception as exc:  # noqa: BLE001  (a variant that cannot be built is a result: the log keeps why)
        return {"failed": f"{type(exc).__name__}: {exc}"}


def load_variant(spec: models.ModelSpec, original: nn.Module, info: Mapping[str, Any], inputs: Any) -> nn.Module:
    """The model a manifest entry describes: the original itself, or the saved variant loaded onto it."""
    if "dir" not in info:
        return original
    return fxlrd.load(original, info["dir"], example_inputs=inputs)


def _rebatched(batches: list[Any], size: int) -> list[Any]:
    """The calibration samples in batches of ``size``, the batch size the model was exported at
    (an exported original may have its batch size fixed, e.g. torch's MultiheadAttention).
    Only samples of the same shape share a batch (token batches are padded to their own
    longest sentence); a shape's samples left over at the end of its run are dropped."""
    keyed = isinstance(batches[0], Mapping)
    rows = [{k: v[i : i + 1] for k, v in b.items()} if keyed else b[i : i + 1]
            for b in batches for i in range(next(iter(b.values())).shape[0] if keyed else b.shape[0])]  # fmt: skip

    def shape(row: Any) -> Any:
        return tuple((k, tuple(v.shape)) for k, v in row.items()) if keyed else tuple(row.shape)

    out, run = [], []
    for row in rows:
        if run and shape(row) != shape(run[0]):
            run = []
        run.append(row)
        if len(run) == size:
            out.append({k: torch.cat([r[k] for r in run]) for k in run[0]} if keyed else torch.cat(run))
            run = []
    return out


def _export(spec: models.ModelSpec, original: nn.Module, info: dict[str, Any], inputs: Any, path: Path,
            quantize: str | None = None, calibration: list[Any] | None = None) -> None:  # fmt: skip
    """Export the variant to ONNX (checked against onnxruntime; in int8 when ``quantize`` says,
    static int8 calibrated on ``calibration``); its path, or why it failed, goes into ``info``."""
    try:
        fxlrd.export_onnx(load_variant(spec, original, info, inputs), inputs, path, quantize=quantize,
                          calibration=calibration)  # fmt: skip
        info["onnx"] = str(path)
    except Exception as exc:  # noqa: BLE001  (recorded; the other variants still run)
        info["onnx_failed"] = f"{type(exc).__name__}: {exc}"


def _warm_compile(spec: models.ModelSpec, original: nn.Module, info: dict[str, Any], inputs: Any, threads: int) -> None:
    """Compile the variant once, so that every timed run finds it in inductor's on-disk cache
    (a first run compiling from scratch was an outlier), or record why it does not compile."""
    try:
        model = load_variant(spec, original, info, inputs)
        make_timer(LatencyConfig(backend="compile", threads=threads, progress=False)).model_runner(model, as_args(inputs))
    except Exception as exc:  # noqa: BLE001  (recorded; the timed runs then skip the variant)
        info["compile_failed"] = f"{type(exc).__name__}: {exc}"


def _print(name: str, info: Mapping[str, Any]) -> None:
    if "failed" in info or "skipped" in info:
        print(f"  {name:20s} {'FAILED' if 'failed' in info else 'skipped'}: {info.get('failed') or info['skipped']}")
        return
    onnx = "".join(f"; {what} FAILED: {info[key]}" for key, what in (("onnx_failed", "ONNX export"), ("compile_failed", "compile"))
                   if key in info)  # fmt: skip
    print(f"  {name:20s} {info['params'] / 1e6:8.2f} M params {info['macs'] / 1e9:7.2f} GMACs/sample "
          f"built in {info['build_s']:.1f} s{onnx}", flush=True)  # fmt: skip


def _built(variant: Variant, ctx: BuildContext, workdir: Path, name: str, backend: str, batch: int,
           per_sample: Any) -> dict[str, Any]:  # fmt: skip
    """``variant``'s build record in this case: read back, or built, saved and recorded now."""
    where = _variant_dir(workdir, name, variant, backend, batch)
    info_path = where.with_suffix(".json")
    if info_path.exists():
        return json.loads(info_path.read_text())
    info = _build(variant, ctx, where, per_sample)
    info_path.parent.mkdir(parents=True, exist_ok=True)
    info_path.write_text(json.dumps(info, default=str))
    return info


def prepare(task: Mapping[str, Any]) -> Path:
    """Build (or reuse) every variant of a case and write its manifest.

    Args:
        task: ``model``, ``backend`` (where it will be timed), ``search_backend`` (where
            searched ranks are timed), ``batch``, ``variants``, ``threads`` and ``workdir``.

    Returns:
        The manifest's path.
    """
    torch.set_num_threads(task["threads"])
    workdir, name, backend, batch = Path(task["workdir"]), task["model"], task["backend"], task["batch"]
    spec = models.get(name)
    original = spec.build()
    inputs = spec.inputs(batch)
    ctx = BuildContext(spec, original, inputs, task["search_backend"], task["threads"], workdir / "latency.json")
    per_sample = spec.inputs(1)
    print(f"building {name} variants for {backend}, batch {batch} (inputs {models.describe_inputs(inputs)})", flush=True)
    entries: dict[str, Any] = {}
    for variant in map(variants.get, task["variants"]):
        where = _variant_dir(workdir, name, variant, backend, batch)
        if variant.int8 and backend != "onnxruntime":
            entries[variant.name] = {"skipped": "int8 variants run in onnxruntime only (PyTorch: the PT2E chain in the README)"}
            continue
        if variant.times_int8 and not variant.retired and ctx.backend != "onnxruntime":
            entries[variant.name] = {"skipped": "its ranks are timed in onnxruntime's int8: onnxruntime only"}
            continue
        if variant.int8 == "int8-dynamic" and not spec.tokens:
            entries[variant.name] = {"skipped": "dynamic int8 quantizes the matrix products only: for transformers"}
            continue
        info_path = where.with_suffix(".json")
        if info_path.exists() and not variant.retired:  # (a retired one fails with its reason, even built before)
            info = json.loads(info_path.read_text())
        elif variant.base:  # an int8 twin: its float variant's model, built (or found) and saved once
            info = _built(variants.get(variant.base), ctx, workdir, name, backend, batch, per_sample)
        else:
            info = _build(variant, ctx, where, per_sample)
        built = not ("failed" in info or "skipped" in info)
        info_path.parent.mkdir(parents=True, exist_ok=True)
        info_path.write_text(json.dumps(info, default=str))
        entry = dict(info)
        if built and backend == "onnxruntime":  # per batch: an exported original may have a fixed batch size
            calibration = _rebatched(ctx.calibration, batch) if variant.int8 == "int8" else None  # static only
            _export(spec, original, entry, inputs, where.with_suffix(f".b{batch}.onnx"), variant.int8, calibration)
        if built and backend == "compile":  # per case: inductor compiles for the batch's shapes
            _warm_compile(spec, original, entry, inputs, task["threads"])
        _print(variant.name, entry)
        entries[variant.name] = entry
    path = manifest_path(workdir, name, backend, batch)
    path.parent.mkdir(parents=True, exist_ok=True)  # every variant may have been skipped
    path.write_text(json.dumps({"model": name, "backend": backend, "batch": batch, "variants": entries}, default=str))
    return path
