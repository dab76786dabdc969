"""Figures across runs: each is the median of the per-run values, shown with their min and max.

Ratios (speed-up, MAC ratio, one variant against another) are formed *within* each run, where
the two were timed taking turns, and only then aggregated across runs.
"""

from __future__ import annotations

import json
import re
import statistics
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from .machine import machine_kind
from .records import case_key, is_gpu_backend, run_settings

__all__ = [
    "EQUAL_PARAMS_TOLERANCE",
    "Spread",
    "spread",
    "VariantSummary",
    "CaseRuns",
    "group",
    "facets",
    "case_labels",
    "base_name",
    "summarize",
    "equal_params",
    "Comparison",
    "equal_param_comparisons",
]

EQUAL_PARAMS_TOLERANCE = 0.03
Run = Mapping[str, Any]


@dataclass(frozen=True)
class Spread:
    """The median of some per-run values and their range across runs."""

    median: float
    low: float
    high: float
    n: int

    def format(self, fmt: str = "{:.2f}", suffix: str = "") -> str:
        """``median [low–high]`` with ``fmt`` applied to each (just the median when they print alike)."""
        med, low, high = fmt.format(self.median), fmt.format(self.low), fmt.format(self.high)
        return med + suffix if low == high else f"{med}{suffix} [{low}–{high}]"


def spread(values: Iterable[float | None]) -> Spread | None:
    """The `Spread` of ``values`` (None entries ignored); None when there are none.

    Args:
        values: one value per run.
    """
    kept = [float(v) for v in values if v is not None]
    if not kept:
        return None
    return Spread(statistics.median(kept), min(kept), max(kept), len(kept))


@dataclass(frozen=True)
class VariantSummary:
    """One variant of one case across runs."""

    name: str
    latency_s: Spread
    params: Spread | None = None
    macs: Spread | None = None
    speedup: Spread | None = None
    mac_ratio: Spread | None = None
    speedup_per_mac_ratio: Spread | None = None
    extra: dict[str, Spread | None] = field(default_factory=dict)


@dataclass
class CaseRuns:
    """The runs of one case on one kind of machine."""

    kind: str
    case: dict[str, Any]
    threads: int | None
    runs: list[Run] = field(default_factory=list)
    failed: list[Run] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)  # `records.run_settings`, equal in all its runs

    @property
    def title(self) -> str:
        """``model · backend · batch N`` (and the layout for training cases)."""
        c = self.case
        parts = [c.get("model"), c.get("backend"), f"batch {c['batch']}" if "batch" in c else None, c.get("layout")]
        return " · ".join(str(p) for p in parts if p)


def _kind(record: Run) -> str:
    """The machine kind runs are pooled within. Records imported from older results that did
    not record the vector extensions cannot be told apart by machine: each source is a kind
    of its own (two such EPYC imports timed the same original 19.4 and 24.0 ms)."""
    machine = record.get("machine", {})
    kind = machine_kind(machine, gpu=is_gpu_backend(record.get("case", {}).get("backend")))
    if machine.get("vector_extensions") is None and record.get("imported_from"):
        kind += f" · imported from {str(record['imported_from']).rsplit('/', 1)[-1]}"
    return kind


def _family(record: Run) -> tuple[str, str]:
    """What a variant's size must be compared within: the machine kind and the case without
    its backend, batch and inputs (a speed case's model; a transform case's model, ratio and
    quantum), so one variant gets the same name in every column of a table."""
    case = {k: v for k, v in record.get("case", {}).items() if k not in ("backend", "batch", "inputs", "layout")}
    return _kind(record), json.dumps(case, sort_keys=True)


def _megas(params: float) -> str:
    x = params / 1e6
    return f"{x:.0f}" if x >= 100 else f"{x:#.3g}"


def _size_labels(records: Sequence[Run], tolerance: float = EQUAL_PARAMS_TOLERANCE) -> dict[tuple, str]:
    """A name for each size a variant was built at, where one decomposed variant (on one
    machine kind, for one model) was built at sizes more than ``tolerance`` apart, e.g. a
    latency-optimized variant searched once in float32 at batch 1 and once in bfloat16 at
    batch 64: those are different models, and pooling them would give the median of
    neither. Sorted, a new size starts where one is more than ``tolerance`` above the
    smallest of the current size, so one row never spans more than ``tolerance`` (a chain of
    small steps used to pool 33.8 and 35.3 M).
    Undecomposed variants (the original, int8) keep their names.

    Returns:
        (family, variant, params) -> ``"variant · 44.8 M"`` (3 significant digits), only
        for the variants to split.
    """
    sizes: dict[tuple, set[int]] = {}
    for record in records:
        for name, v in record.get("variants", {}).items():
            if isinstance(v, Mapping) and v.get("params") and "config" in v:
                sizes.setdefault((_family(record), name), set()).add(v["params"])
    labels: dict[tuple, str] = {}
    for key, found in sizes.items():
        clusters: list[list[int]] = []
        for p in sorted(found):  # a size joins its group while within tolerance of the group's smallest (no chaining)
            if clusters and equal_params(clusters[-1][0], p, tolerance):
                clusters[-1].append(p)
            else:
                clusters.append([p])
        if len(clusters) > 1:
            names = [f"{key[1]} · {_megas(statistics.median(c))} M" for c in clusters]
            if len(set(names)) < len(names):  # medians > 3 % apart print apart; never pool two sizes silently
                names = [f"{key[1]} · {statistics.median(c):.0f} params" for c in clusters]
            for c, label in zip(clusters, names):
                labels |= {(*key, p): label for p in c}
    return labels


def base_name(name: str) -> str:
    """The variant's name without the size `group` may have added (``"optimized · 44.8 M"``)."""
    return name.split(" · ")[0]


def _relabelled(record: Run, labels: Mapping[tuple, str]) -> Run:
    family = _family(record)
    variants = record.get("variants", {})
    names = {n: labels.get((family, n, v.get("params") if isinstance(v, Mapping) else None), n)
             for n, v in variants.items()}  # fmt: skip
    if all(n == m for n, m in names.items()):
        return record
    return {**record, "variants": {names[n]: v for n, v in variants.items()}}


def _one_mac_counter(records: list[Run], tolerance: float = 0.005) -> list[Run]:
    """``records`` with the MACs left out of runs whose counter was not the newest one's: per
    machine kind, model and input size, the original's MACs per sample in the newest run that counted them
    are the reference (an older counter read fused attention as zero MACs: ViT-B/16's original
    at 11.3 G instead of 17.6 G, so its MAC ratios differed between the columns of one row).
    Their timings still count."""
    def original_macs(record: Run) -> float | None:
        return ((record.get("variants") or {}).get("original") or {}).get("macs")

    def key_of(record: Run) -> tuple[str, Any, str]:  # one input size per sample: MACs differ between sizes
        case = record.get("case", {})
        per_sample = re.sub(r"(^|[\s=,])\d+[×x]", r"\1", str(case.get("inputs", "")))  # each tensor without its batch
        return _kind(record), case.get("model"), per_sample

    newest: dict[tuple[str, Any, str], tuple[str, float]] = {}
    for record in records:
        macs, key = original_macs(record), key_of(record)
        stamp = str(record.get("timestamp", ""))
        if macs and (key not in newest or stamp >= newest[key][0]):
            newest[key] = (stamp, macs)
    out = []
    for record in records:
        macs = original_macs(record)
        ref = newest.get(key_of(record), (None, None))[1]
        if macs and ref and abs(macs - ref) > tolerance * ref:
            variants = {n: ({**v, "macs": None} if isinstance(v, Mapping) else v)
                        for n, v in record.get("variants", {}).items()}  # fmt: skip
            record = {**record, "variants": variants}
        out.append(record)
    return out


def group(records: Iterable[Run]) -> list[CaseRuns]:
    """Runs grouped by machine kind, case and settings (`records.case_key`: threads, repeats,
    warmup, compile and GPU settings), in order of first appearance. Runs of different code
    (git commits) with equal settings are pooled.

    A decomposed variant built at sizes more than ±3 % apart on one machine kind (a searched
    variant searched under other settings) is reported as one variant per size, named with
    its size (`_size_labels`).

    Args:
        records: run records of one suite; those with an ``error`` count as failed runs.
    """
    records = _one_mac_counter(list(records))
    labels = _size_labels(records)
    groups: dict[tuple[str, str], CaseRuns] = {}
    for record in map(lambda r: _relabelled(r, labels), records):
        key = (_kind(record), case_key(record))
        if key not in groups:
            threads = record.get("settings", {}).get("threads")
            groups[key] = CaseRuns(key[0], dict(record.get("case", {})), threads, settings=run_settings(record))
        (groups[key].failed if record.get("error") else groups[key].runs).append(record)
    return _failures_with_their_case(list(groups.values()))


def _agrees(failed: CaseRuns, g: CaseRuns) -> bool:
    """Whether every case field and setting that failed runs recorded is ``g``'s: a run that
    died before its case was described recorded no input shapes, nor the backend's settings."""
    return (g.kind == failed.kind and all(g.case.get(k) == v for k, v in failed.case.items())
            and all(g.settings.get(k) == v for k, v in failed.settings.items()))  # fmt: skip


def _failures_with_their_case(groups: list[CaseRuns]) -> list[CaseRuns]:
    """``groups`` with the failed runs of a group without a successful run moved to the one
    group with successful runs whose case and settings they agree with (`_agrees`), so a
    failure is shown beside the runs of its case; they stay a group of their own when no
    group, or more than one, agrees."""
    out = []
    for g in groups:
        if not g.runs:
            homes = [h for h in groups if h.runs and _agrees(g, h)]
            if len(homes) == 1:
                homes[0].failed.extend(g.failed)
                continue
        out.append(g)
    return out


def facets(g: CaseRuns) -> dict[str, str]:
    """What tells a case apart from another case of one model, backend and batch, each as
    printed: its thread count, its input shapes and every other setting its runs share
    (repeats, warmup, compile and GPU settings)."""
    out = {"threads": f"{g.threads} thread{'' if g.threads == 1 else 's'}", "inputs": f"inputs {g.case.get('inputs', '?')}"}
    for key, value in g.settings.items():
        if key == "threads":
            continue
        if isinstance(value, Mapping):
            out |= {f"{key}.{k}": f"{k} {v}" for k, v in value.items()}
        else:
            out[key] = f"{key} {value}"
    return out


def case_labels(groups: Sequence[CaseRuns], base: Any) -> list[str]:
    """A label for each group: ``base(group)``, followed, where other groups share that base,
    by what tells them apart (`facets`: ``resnet50 · 1 thread``), so no two cases read alike."""
    bases = [base(g) for g in groups]
    out = []
    for g, b in zip(groups, bases):
        peers = [facets(h) for h, c in zip(groups, bases) if c == b]
        mine = facets(g)
        keys = list(dict.fromkeys(k for p in peers for k in p))
        varying = [k for k in keys if len({p.get(k, f"{k} -") for p in peers}) > 1]
        out.append(" · ".join([b] + [mine.get(k, f"{k.split('.')[-1]} -") for k in varying]))
    return out


def _variant_names(runs: Sequence[Run]) -> list[str]:
    names: dict[str, None] = {}
    for run in runs:
        names.update(dict.fromkeys(run.get("variants", {})))
    return list(names)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if not a or not b else a / b


def summarize(runs: Sequence[Run], baseline: str | None = "original",
              extra: Sequence[str] = ()) -> dict[str, VariantSummary]:  # fmt: skip
    """Per variant: latency, params, MACs and, against ``baseline`` in the same run, speed-up,
    MAC ratio and speed-up ÷ MAC ratio, each a `Spread` across ``runs``.

    Args:
        runs: successful run records of one case.
        baseline: the variant speed-ups are measured against (None: no ratios).
        extra: other per-variant fields to aggregate the same way (e.g. ``"trainable_params"``).

    Returns:
        Variant name -> `VariantSummary`, in order of first appearance.
    """
    out = {}
    counted = _current_mac_count(runs)
    for name in _variant_names(runs):
        pairs = [(run["variants"][name], run["variants"].get(baseline) or {}, id(run) in counted)
                 for run in runs if name in run["variants"]]  # fmt: skip
        speedups = [_ratio(base.get("median_s"), v["median_s"]) for v, base, _ in pairs]
        mac_ratios = [_ratio(base.get("macs"), v.get("macs")) if current else None for v, base, current in pairs]
        per_mac = [None if s is None or m is None else s / m for s, m in zip(speedups, mac_ratios)]
        out[name] = VariantSummary(
            name, spread(v["median_s"] for v, _, _ in pairs), spread(v.get("params") for v, _, _ in pairs),
            spread(v.get("macs") if current else None for v, _, current in pairs), spread(speedups),
            spread(mac_ratios), spread(per_mac), {key: spread(v.get(key) for v, _, _ in pairs) for key in extra},
        )  # fmt: skip
    return out


def _current_mac_count(runs: Sequence[Run], tolerance: float = 0.005) -> set[int]:
    """The ids of the runs whose MACs were counted as the newest run counted them: the
    original's MACs within ``tolerance`` of the newest run's. An older counter (one that read
    fused attention as zero MACs: ViT-B/16's original at 11.3 G instead of 17.6 G) gives other
    MAC ratios, which must not be pooled with these; its runs' timings still count."""
    def original_macs(run: Run) -> float | None:
        return (run.get("variants", {}).get("original") or {}).get("macs")

    dated = sorted((str(r.get("timestamp", "")), i) for i, r in enumerate(runs) if original_macs(r))
    if not dated:
        return {id(r) for r in runs}
    reference = original_macs(runs[dated[-1][1]])
    return {id(r) for r in runs if original_macs(r) is None or abs(original_macs(r) - reference) <= tolerance * reference}


def equal_params(a: float, b: float, tolerance: float = EQUAL_PARAMS_TOLERANCE) -> bool:
    """Whether parameter counts ``a`` and ``b`` are within ``tolerance`` of each other
    (relative to the smaller, so the test is symmetric)."""
    return abs(a - b) <= tolerance * min(a, b)


@dataclass(frozen=True)
class Comparison:
    """Variant ``a`` against its peer ``b`` over the runs in which both ran at equal parameters."""

    a: str
    b: str
    params_a: Spread
    params_b: Spread
    speedup: Spread  # how many times faster a ran than b


def _int8(name: str) -> bool:
    return "int8" in base_name(name)


def equal_param_comparisons(runs: Sequence[Run], tolerance: float = EQUAL_PARAMS_TOLERANCE,
                            exclude: Sequence[str] = ("original",)) -> list[Comparison]:  # fmt: skip
    """Every pair of variants that ran in the same run with parameter counts within
    ``tolerance`` of each other, compared within those runs.

    The match is made per run: a searched variant's size can differ from run to run.

    Args:
        runs: successful run records of one case.
        tolerance: the relative difference allowed (±3 % by default).
        exclude: variants not compared (the uncompressed original).

    Returns:
        One `Comparison` per pair that matched in at least one run: ``a`` the variant that
        appears later (variants are listed roughly from plain to elaborate), ``b`` its peer.
    """
    names = [n for n in _variant_names(runs) if n not in exclude]
    found: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    for run in runs:
        v = run.get("variants", {})
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                pa, pb = (v.get(a) or {}).get("params"), (v.get(b) or {}).get("params")
                if _int8(a) != _int8(b):  # int8 against float is not a comparison of decompositions at one size
                    continue
                if pa and pb and equal_params(pa, pb, tolerance):
                    found.setdefault((b, a), []).append((pb, pa, v[a]["median_s"] / v[b]["median_s"]))
    return [Comparison(a, b, spread(x[0] for x in xs), spread(x[1] for x in xs), spread(x[2] for x in xs))
            for (a, b), xs in found.items()]  # fmt: skip

