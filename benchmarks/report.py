"""Markdown tables (and the README's table) regenerated from every run in the logs.

Each figure is the median across runs of the per-run figure, with [min–max] across runs;
speed-ups and other ratios are formed within a run (the variants took turns there) and only
then aggregated. Runs are pooled only within one machine kind and one case.
"""

from __future__ import annotations

import collections
import json
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from .aggregate import (
    EQUAL_PARAMS_TOLERANCE,
    CaseRuns,
    Spread,
    VariantSummary,
    equal_param_comparisons,
    base_name,
    case_labels,
    group,
    summarize,
)
from .machine import describe
from .records import SUITES, is_gpu_backend, log_path, read

__all__ = [
    "README_START",
    "README_END",
    "run_text",
    "case_markdown",
    "transform_table",
    "suite_markdown",
    "readme_table",
    "replace_region",
    "write_reports",
]

README_START, README_END = "<!-- bench:start -->", "<!-- bench:end -->"
MIN_RUNS = 3  # what the suite asks of every figure
README_SECTION = "### Benchmark suite"
BACKEND_ORDER = ("onnxruntime", "eager", "compile", "cuda", "cuda_bf16", "cuda_compile", "cuda_compile_bf16",
                 "cuda_cl", "cuda_bf16_cl", "cuda_compile_cl", "cuda_compile_bf16_cl")
Run = Mapping[str, Any]


# -- formatting ------------------------------------------------------------------------------------
def _scaled(s: Spread | None, k: float) -> Spread | None:
    return None if s is None else Spread(s.median * k, s.low * k, s.high * k, s.n)


def _fmt(s: Spread | None, fmt: str = "{:.2f}", suffix: str = "") -> str:
    return "-" if s is None else s.format(fmt, suffix)


def _range(s: Spread | None, k: float, fmt: str = "{:.2f}") -> str:
    """A size: one number, or ``low–high`` when it differed between runs (searched ranks)."""
    if s is None:
        return "-"
    return fmt.format(s.median * k) if s.low == s.high else f"{fmt.format(s.low * k)}–{fmt.format(s.high * k)}"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _table(head: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]


def _dates(runs: Sequence[Run]) -> str:
    stamps = sorted(str(r.get("timestamp", ""))[:16].replace("T", " ") for r in runs)
    return stamps[0] if stamps[0] == stamps[-1] else f"{stamps[0]} – {stamps[-1]}"


def _distinct(runs: Sequence[Run], section: str, key: str) -> str:
    values = list(dict.fromkeys(str(r.get(section, {}).get(key)) for r in runs if r.get(section, {}).get(key) is not None))
    return ", ".join(values) or "-"


# -- one run, as printed by the worker -----------------------------------------------------------------
def run_text(record: Run) -> str:
    """One run's figures with its machine, versions and settings (what a worker prints)."""
    case, settings = record.get("case", {}), record.get("settings", {})
    title = " · ".join(f"{v}" if k == "model" else f"{k} {v}" for k, v in case.items())
    lines = [f"{record['suite']} run {record.get('run')}/{record.get('runs')} · {title}", describe(record),
             "settings: " + " · ".join(f"{k} {v}" for k, v in settings.items()) + f" · command: {record.get('command')}"]  # fmt: skip
    if record.get("error"):
        return "\n".join(lines + [f"  FAILED: {record['error']}"])
    base = record["variants"].get("original", {}).get("median_s")
    for name, v in record["variants"].items():
        speedup = f"{base / v['median_s']:5.2f}×" if base else "     -"
        size = f"  params {v['params'] / 1e6:7.2f} M" if v.get("params") else ""
        macs = f"  GMACs/sample {v['macs'] / 1e9:6.2f}" if v.get("macs") else ""
        lines.append(f"  {name:24s} {v['median_s'] * 1e3:10.2f} ms [{v['min_s'] * 1e3:.2f}–{v['max_s'] * 1e3:.2f}]"
                     f"  {speedup}{size}{macs}")  # fmt: skip
    lines += [f"  {name:24s} skipped: {why}" for name, why in record.get("skipped", {}).items()]
    lines += [f"  {name:24s} FAILED: {why}" for name, why in record.get("failed", {}).items()]
    return "\n".join(lines)


# -- one case ------------------------------------------------------------------------------------------
def _runs_cell(s: VariantSummary) -> str:
    """The runs a row's figures come from: those of its speed-up (the runs where the original
    ran too), and the runs of its latency beside them where there were more."""
    if not s.speedup or s.speedup.n == s.latency_s.n:
        return str(s.latency_s.n)
    return f"{s.speedup.n} (latency: {s.latency_s.n})"


def _variant_row(s: VariantSummary, training: bool, commits: int = 1) -> list[str]:
    row = [s.name, _range(s.params, 1e-6)]
    if training:
        row.append(_range(s.extra.get("trainable_params"), 1e-6))
    spans = f" · {commits} commits" if commits > 1 else ""  # runs of other code pooled: said where it happened
    row += [_range(s.macs, 1e-9), _fmt(s.mac_ratio, suffix="×"), _fmt(_scaled(s.latency_s, 1e3)),
            _fmt(s.speedup, suffix="×"), _fmt(s.speedup_per_mac_ratio), _runs_cell(s) + spans]  # fmt: skip
    return row


def _commits(runs: Sequence[Run]) -> list[str]:
    """The code versions ``runs`` ran from, as recorded (``abc1234+dirty`` apart from ``abc1234``)."""
    return list(dict.fromkeys(r_git(r) for r in runs))


def _settings_text(group_: CaseRuns) -> str:
    """The settings every run of a case shares (they are part of what pools runs)."""
    settings = group_.settings or {k: _distinct(group_.runs + group_.failed, "settings", k) for k in ("repeats", "warmup")}
    parts = [f"repeats {settings.get('repeats', '-')}, warmup {settings.get('warmup', '-')} per run"]
    backend = str(group_.case.get("backend") or "")
    for field_, label, expected in (("compile_settings", "compile", backend == "compile"),
                                    ("gpu_settings", "GPU", is_gpu_backend(backend))):  # fmt: skip
        if settings.get(field_):
            parts.append(f"{label}: " + ", ".join(f"{k} {v}" for k, v in settings[field_].items()))
        elif expected:
            parts.append(f"{label} settings not recorded")
    return " · ".join(parts)


def _equal_params(group_: CaseRuns, summaries: Mapping[str, VariantSummary]) -> list[str]:
    """Every pair of variants within ±3 % of each other's parameters, one against the other."""
    comparisons = equal_param_comparisons(group_.runs)
    paired = {n for c in comparisons for n in (c.a, c.b)}
    lonely = [n for n, s in summaries.items() if n != "original" and s.params and n not in paired]
    lines = [f"At equal parameters (±{EQUAL_PARAMS_TOLERANCE:.0%}, matched within each run):", ""]
    if comparisons:
        rows = [(c.a, c.b, f"{_range(c.params_a, 1e-6)} / {_range(c.params_b, 1e-6)}", _fmt(c.speedup, suffix="×"),
                 str(c.speedup.n)) for c in comparisons]  # fmt: skip
        lines += _table(("variant", "peer", "params (M)", "speed-up over peer", "runs"), rows) + [""]
    if lonely:
        lines += [f"No peer within ±{EQUAL_PARAMS_TOLERANCE:.0%} in the same run: {', '.join(lonely)}.", ""]
    return lines


def _over_int8(group_: CaseRuns) -> list[str]:
    """The int8 variants of compressed models against the original in the same int8 scheme
    (``+int8`` against ``int8``, ``+int8_dynamic`` against ``int8_dynamic``), run by run."""
    lines = []
    for baseline in ("int8", "int8_dynamic"):
        summaries = summarize(group_.runs, baseline=baseline)
        rows = [(s.name, _range(s.params, 1e-6), _fmt(s.mac_ratio, suffix="×"), _fmt(s.speedup, suffix="×"),
                 str(s.speedup.n)) for s in summaries.values()
                if base_name(s.name).endswith(f"+{baseline}") and s.speedup]  # fmt: skip
        if baseline not in summaries or not rows:
            continue
        lines += [f"LRD + {baseline} against {baseline} alone (both quantized the same way, matched within each run):", ""]
        lines += _table(("variant", "params (M)", "MAC ratio", f"speed-up over {baseline}", "runs"), rows) + [""]
    return lines


def _not_timed(group_: CaseRuns) -> list[str]:
    notes: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for run in group_.runs:
        for kind in ("skipped", "failed"):
            for name, why in run.get(kind, {}).items():
                notes[f"{kind}: {name}"][why] += 1
    lines = [f"- {what} ({why}; {n} of {len(group_.runs)} runs)" for what, c in notes.items() for why, n in c.items()]
    lines += [f"- failed run {r.get('timestamp')}: {r['error']}" for r in group_.failed]
    return lines + [""] if lines else []


def case_markdown(group_: CaseRuns, training: bool = False) -> list[str]:
    """The table of one case: per variant its size, MACs, latency and speed-up, then the
    comparisons at equal parameters, then what was skipped or failed."""
    head = [f"### {group_.title}", ""]
    if not group_.runs:
        unmatched = "" if "inputs" in group_.case or group_.case.get("backend") is None else (
            " The runs failed before their case was described (no input shapes recorded), so they could not be "
            "matched to one table of this case.")  # fmt: skip
        return head + [f"No successful run ({len(group_.failed)} failed).{unmatched}"] + _not_timed(group_)
    runs = group_.runs
    commits = _commits(runs)
    spans = f" from {len(commits)} commits (git {', '.join(commits)})" if len(commits) > 1 else ""
    failed = f" and {len(group_.failed)} failed (listed below)" if group_.failed else ""
    head += [f"inputs {group_.case.get('inputs', '?')} · {group_.threads} threads · {_plural(len(runs), 'run')} "
             f"({_dates(runs)}){spans}{failed} · {_settings_text(group_)}", ""]  # fmt: skip
    summaries = summarize(runs, extra=("trainable_params",) if training else ())
    cols = ["variant", "params (M)"] + (["trainable (M)"] if training else [])
    cols += ["GMACs/sample", "MAC ratio", "step (ms)" if training else "latency (ms)", "speed-up", "speed-up ÷ MAC ratio",
             "runs"]  # fmt: skip
    rows = (_variant_row(s, training, len(_commits([r for r in runs if s.name in r.get("variants", {})])))
            for s in summaries.values())  # fmt: skip
    body = _table(cols, rows) + [""]
    return head + body + _equal_params(group_, summaries) + _over_int8(group_) + _not_timed(group_)


def transform_table(groups: Sequence[CaseRuns]) -> list[str]:
    """The transform suite's table: one row per model (and config) of one machine kind and
    per version of the code (the git commit it ran from, as recorded: ``abc1234+dirty``, with
    uncommitted changes, is a row of its own, apart from ``abc1234``): what is timed is fxlrd
    itself, so runs of different code are never pooled. Oldest code first."""
    rows = []
    for g in groups:
        by_code: dict[str, list[Run]] = {}
        for run in sorted(g.runs, key=lambda r: str(r.get("timestamp", ""))):
            by_code.setdefault(r_git(run), []).append(run)  # "+dirty" as recorded: other code than the commit
        if not by_code:
            rows.append((g.case.get("model", "?"), "-", "-", "-", "-", "-", f"0 ({len(g.failed)} failed)"))
        for runs in by_code.values():
            s = next(s for s in summarize(runs, baseline=None, extra=("params_before", "layers_decomposed")).values()
                     if base_name(s.name) == "quantized")  # fmt: skip
            quantum = g.case.get("rank_quantum")
            code = ", ".join(dict.fromkeys(r_git(r) for r in runs))
            rows.append((g.case.get("model", "?"), f"α = {g.case.get('ratio', 2)}, quantum {quantum}", code,
                         _range(s.extra["layers_decomposed"], 1, "{:.0f}"),
                         f"{_range(s.extra['params_before'], 1e-6)} → {_range(s.params, 1e-6)}", _fmt(s.latency_s),
                         f"{s.latency_s.n} ({_dates(runs)})"))  # fmt: skip
    head = ("model", "config", "code (git)", "layers decomposed", "params (M)", "transform (s)", "runs")
    return _table(head, rows) + [""]


def r_git(run: Run) -> str:
    """The commit a run's code came from (``+dirty``: with changes not committed), or ``-``."""
    return run.get("versions", {}).get("git") or "-"


# -- a whole suite -------------------------------------------------------------------------------------
_INTRO = {
    "speed": "Inference latency of every variant of each (model, backend, batch) case.",
    "training": "Training step time (forward, backward, SGD step) of the original and of compressed variants under "
                "each freezing policy; every variant runs in the same memory layout as the original it is "
                "compared with.",  # fmt: skip
    "transform": "Time of `fxlrd.transform` (median of the repeats within a run).",
}


_COMPARED = (
    "A run is one fresh Python process in which the variants of a case took turns. Each figure is the median across "
    "runs of the per-run figure (the per-run median of the repeats), [min–max] across runs; speed-ups and ratios are "
    "formed within each run, then aggregated. Sizes that differed between runs (ranks searched again by another "
    "command) show their range. MACs per sample."
)


def _versions(runs: Sequence[Run]) -> str:
    names = ("python", "torch", "onnxruntime", "transformers", "fxlrd", "git")
    return " · ".join(f"{n} {_distinct(runs, 'versions', n)}" for n in names)


_METHOD = {
    "speed": _COMPARED, "training": _COMPARED,
    "transform": "A run is one fresh Python process that transformed the model `warmup` times untimed, then `repeats` "
                 "times; each figure is the median across runs of the per-run median, [min–max] across runs.",
}  # fmt: skip


def suite_markdown(suite: str, records: Sequence[Run]) -> str:
    """The whole report of a suite from all its records, one section per machine kind."""
    groups = group(records)
    lines = [f"# {suite}", "", f"Generated by `python -m benchmarks report` from all {len(records)} records of "
             f"`{suite}.jsonl`; do not edit by hand. {_INTRO[suite]}", "", _METHOD[suite], ""]  # fmt: skip
    kinds = list(dict.fromkeys(g.kind for g in groups))
    for kind in kinds:
        members = [g for g in groups if g.kind == kind]
        runs = [r for g in members for r in g.runs + g.failed]
        lines += [f"## {kind}", "", f"Versions: {_versions(runs)}.", ""]
        imported = list(dict.fromkeys(str(r["imported_from"]) for r in runs if r.get("imported_from")))
        if imported:
            lines += [f"Includes runs imported from earlier result files: {', '.join(imported)}.", ""]
        if suite == "transform":
            lines += transform_table(members)
        else:
            for g in members:
                lines += case_markdown(g, training=suite == "training")
    return "\n".join(lines).rstrip() + "\n"


# -- the README's table ---------------------------------------------------------------------------------
def _pick_kind(groups: Sequence[CaseRuns], machine: str | None) -> str:
    """The machine kind named by ``machine`` (the whole kind, or a substring of one kind only),
    else the one of the newest run."""
    kinds = list(dict.fromkeys(g.kind for g in groups if g.runs))
    if not kinds:
        raise ValueError("no successful speed run to tabulate")
    if machine is None:
        return max(((r.get("timestamp", ""), g.kind) for g in groups for r in g.runs))[1]
    matches = [k for k in kinds if machine.lower() == k.lower()] or [k for k in kinds if machine.lower() in k.lower()]
    if len(matches) != 1:
        raise ValueError(f"--machine {machine!r} matches {len(matches)} machine kinds; choose among: {'; '.join(kinds)}")
    return matches[0]


def _most_common(values: Iterable[Any]) -> Any:
    return collections.Counter(values).most_common(1)[0][0]


def _cell(s: VariantSummary) -> str:
    """A README cell: the speed-up [range], its share of the MAC ratio, and the run count
    when it is below the suite's minimum."""
    if not s.speedup:
        return "-"
    text = _fmt(s.speedup, suffix="×")
    if s.speedup_per_mac_ratio:
        text += f" ({s.speedup_per_mac_ratio.median:.2f})"
    return text + (f" n={s.speedup.n}" if s.speedup.n < MIN_RUNS else "")


def per_sample_inputs(case: Mapping[str, Any]) -> str:
    """A case's input shapes without the batch (``3×224×224``, ``input_ids 128, ...``)."""
    return re.sub(r"(^|[\s=,])\d+[×x]", r"\1", str(case.get("inputs", "")))


def _selected(groups: Sequence[CaseRuns], kind: str, filters: Mapping[str, Sequence[Any] | None]) -> list[CaseRuns]:
    def keep(g: CaseRuns) -> bool:
        return g.kind == kind and bool(g.runs) and all(not allowed or g.case.get(f) in allowed for f, allowed in filters.items())

    return [g for g in groups if keep(g)]


def readme_table(records: Sequence[Run], *, machine: str | None = None, models: Sequence[str] | None = None,
                 variants: Sequence[str] | None = None, backends: Sequence[str] | None = None,
                 batches: Sequence[int] | None = None, gpu: bool = False) -> str:  # fmt: skip
    """The README's table: speed-up per model and variant (rows) on each backend and batch
    (columns), for one machine kind, with the machine and the command that reproduces it.

    Args:
        records: the speed suite's records.
        machine: a substring of the machine kind (default: the kind of the newest run that
            ``models``, ``backends`` and ``batches`` keep).
        models, variants, backends, batches: keep only these (default: all there are).
        gpu: the GPU table (GPU backends only) rather than the CPU one (no GPU backend).

    Raises:
        ValueError: no run to show, or ``machine`` names no single machine kind.
    """
    groups = [g for g in group(records) if is_gpu_backend(g.case.get("backend")) == gpu]
    wanted = {"model": models, "backend": backends, "batch": batches}
    # the machine is picked among the runs the filters keep (the newest of those by default)
    kind = _pick_kind([g for g in groups if _selected([g], g.kind, wanted)], machine)
    chosen = _selected(groups, kind, wanted)
    # a column per backend, batch and settings (threads, repeats, warmup, compile and GPU settings);
    # a row per model, its input shapes per sample where it ran at several, and variant
    column_of = {id(g): (g.case["backend"], g.case["batch"], json.dumps(g.settings, sort_keys=True, default=str))
                 for g in chosen}  # fmt: skip
    first: dict[tuple, CaseRuns] = {}
    for g in chosen:
        first.setdefault(column_of[id(g)], g)
    columns = sorted(first, key=lambda c: (BACKEND_ORDER.index(c[0]) if c[0] in BACKEND_ORDER else 99, c[1],
                                           first[c].threads or 0, c[2]))  # fmt: skip
    labels = dict(zip(columns, case_labels([first[c] for c in columns], lambda g: f"{g.case['backend']} b{g.case['batch']}")))
    shapes: dict[str, set[str]] = collections.defaultdict(set)
    for g in chosen:
        shapes[g.case["model"]].add(per_sample_inputs(g.case))
    cells: dict[tuple[str, str], dict[tuple, VariantSummary]] = collections.defaultdict(dict)
    for g in chosen:
        model = g.case["model"]
        if len(shapes[model]) > 1:  # the same model at other input shapes is another row, never the same cell
            model += f" · inputs {per_sample_inputs(g.case) or '?'}"
        for name, s in summarize(g.runs).items():
            if not variants or base_name(name) in variants:
                if column_of[id(g)] in cells[(model, name)]:
                    raise ValueError(f"two cases of {model} · {name} fall in the README column {labels[column_of[id(g)]]}")
                cells[(model, name)][column_of[id(g)]] = s
    model_order = list(dict.fromkeys(model for model, _ in cells))
    cells = dict(sorted(cells.items(), key=lambda item: model_order.index(item[0][0])))  # each model's rows together
    rows = []
    for (model, name), by_column in cells.items():
        params = {round(s.params.median / 1e4) / 100 for s in by_column.values() if s.params}
        size = "-" if not params else f"{min(params):.2f}" if len(params) == 1 else f"{min(params):.2f}–{max(params):.2f}"
        macs = {round(s.mac_ratio.median, 2) for s in by_column.values() if s.mac_ratio}
        mac_ratio = "-" if not macs else f"{min(macs):.2f}×" if len(macs) == 1 else f"{min(macs):.2f}–{max(macs):.2f}×"
        rows.append([model, name, size, mac_ratio] + [_cell(by_column[c]) if c in by_column else "-" for c in columns])
    runs = [r for g in chosen for r in g.runs]
    fewest = min(s.speedup.n for by_column in cells.values() for s in by_column.values() if s.speedup)
    head = ["model", "variant", "params (M)", "MAC ratio"] + [labels[c] for c in columns]
    suite = "gpu" if gpu else "speed"
    commands = []  # one per thread count, repeats and warmup (a command runs at one of each)
    by_command: dict[tuple, list[CaseRuns]] = {}
    for g in chosen:
        by_command.setdefault(tuple(g.settings.get(k) for k in ("threads", "repeats", "warmup")), []).append(g)
    for (threads, repeats, warmup), members in by_command.items():
        names = list(dict.fromkeys(base_name(n) for g in members for n in summarize(g.runs) if not variants or base_name(n) in variants))
        backends_ = sorted(dict.fromkeys(g.case["backend"] for g in members),
                           key=lambda b: BACKEND_ORDER.index(b) if b in BACKEND_ORDER else 99)  # fmt: skip
        member_runs = [r for g in members for r in g.runs]
        commands.append(f"python -m benchmarks {suite} --models {' '.join(dict.fromkeys(g.case['model'] for g in members))} "
                        f"--variants {','.join(names)} --backends {' '.join(backends_)} "
                        f"--batch {' '.join(map(str, sorted({g.case['batch'] for g in members})))} --repeats {repeats} "
                        f"--runs {max(MIN_RUNS, _most_common(r.get('runs') for r in member_runs))} --warmup {warmup} "
                        f"--threads {threads}")  # fmt: skip
    given = {"models": models, "variants": variants, "backends": backends, "batch": batches}
    filters = "".join(f" --{k} {' '.join(map(str, v)) if k != 'variants' else ','.join(v)}" for k, v in given.items() if v)
    machine_flag = (f" --machine '{machine}'" if machine else "") + (" --gpu" if gpu else "")
    thin = f" A figure from fewer than {MIN_RUNS} runs says how many (`n=2`)." if fewest < MIN_RUNS else ""
    text = _table(head, rows) + [
        "",
        f"Speed-up over the original, timed in the same process taking turns: median over runs [min–max across "
        f"runs], and in parentheses the speed-up ÷ MAC ratio (1.00: all of the FLOP cut turned into time); at least "
        f"{_plural(fewest, 'run')} per figure ({_dates(runs)}).{thin} Machine: {kind}; "
        f"{_distinct(runs, 'settings', 'threads')} threads; {_distinct(runs, 'settings', 'repeats')} timed repeats "
        f"per run after {_distinct(runs, 'settings', 'warmup')} untimed (warmup). Versions: {_versions(runs)}.",
        "",
        f"Reproduce: `{'`, `'.join(commands)}`, then `python -m benchmarks report --readme{filters}{machine_flag}`; every "
        f"table, the comparisons at equal parameters and the plots are in `benchmarks/results/speed.md`.",
    ]  # fmt: skip
    return "\n".join(text)


def _section_end(lines: Sequence[str], heading: str) -> int | None:
    """The index of the line that ends the ``heading`` section (the next heading of its level
    or higher, outside code fences), len(lines) at the end; None when there is no such heading."""
    level = len(heading) - len(heading.lstrip("#"))
    start, fenced = None, False
    for i, line in enumerate(lines):
        if line.startswith("```"):
            fenced = not fenced
        if fenced:
            continue
        if start is None and line.rstrip() == heading:
            start = i
        elif start is not None and line.startswith("#"):
            if len(line) - len(line.lstrip("#")) <= level:
                return i
    return None if start is None else len(lines)


REGIONS = {"bench": README_SECTION, "bench-gpu": "### Benchmark suite on a GPU"}  # README region -> its heading


def replace_region(text: str, body: str, section: str = "## Measured", region: str = "bench") -> str:
    """``text`` with ``body`` between the README markers of ``region``; everything else byte-identical.

    Without the markers, a section (``REGIONS[region]``, ``### Benchmark suite`` for the CPU
    table) holding them is inserted at the end of ``section`` (the README's benchmarks part),
    or at the end of the text without one.
    """
    start_marker, end_marker = f"<!-- {region}:start -->", f"<!-- {region}:end -->"
    start, end = text.find(start_marker), text.find(end_marker)
    if start != -1 and end > start:
        return text[: start + len(start_marker)] + "\n" + body.strip("\n") + "\n" + text[end:]
    block = f"{REGIONS[region]}\n\n{start_marker}\n{body.strip(chr(10))}\n{end_marker}\n"
    lines = text.splitlines(keepends=True)
    where = _section_end([ln.rstrip("\r\n") for ln in lines], section)
    if where is None or where == len(lines):
        sep = "" if text.endswith("\n\n") or not text else ("\n" if text.endswith("\n") else "\n\n")
        return text + sep + block
    return "".join(lines[:where]) + block + "\n" + "".join(lines[where:])


# -- files ---------------------------------------------------------------------------------------------
def write_reports(results: Path) -> list[Path]:
    """Regenerate ``<suite>.md`` of every suite with a log in ``results``, and the speed plots."""
    from .plots import speed_plots

    written = []
    for suite in SUITES:
        records = read(log_path(results, suite))
        if not records:
            continue
        path = Path(results) / f"{suite}.md"
        path.write_text(suite_markdown(suite, records))
        written.append(path)
        if suite == "speed":
            written += speed_plots(group(records), Path(results))
    return written

