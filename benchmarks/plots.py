"""Small PNGs of the speed suite, one pair per machine kind and backend, one panel per batch.

- ``speedup_<machine>_<backend>.png``: speed-up per variant per model, bars at the median
  across runs, whiskers from min to max.
- ``speedup_vs_macs_<machine>_<backend>.png``: speed-up against MAC reduction, with the line
  y = x: a variant on it turns every MAC saved into time saved (the FLOP limit).
"""

from __future__ import annotations

import hashlib
import re
import textwrap
from pathlib import Path
from typing import Any, Sequence

from .aggregate import CaseRuns, VariantSummary, case_labels, summarize

__all__ = ["speed_plots", "slug", "distinct_colors"]

Cases = Sequence[tuple[str, dict[str, VariantSummary]]]  # (case label, variant -> summary) per case
MARKERS = "osD^v<>ph*"


def slug(text: str, limit: int = 40) -> str:
    """A short file-name-safe form of a machine kind: lowercase words joined by dashes, cut at
    ``limit`` characters and then told apart by a hash of the whole text."""
    words = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    if len(words) <= limit:
        return words
    return f"{words[:limit].rstrip('-')}-{hashlib.sha1(text.encode()).hexdigest()[:6]}"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _compressed(cases: Cases) -> list[str]:
    return list(dict.fromkeys(n for _, s in cases for n, v in s.items() if n != "original" and v.speedup))


def _bars(ax, cases: Cases, colors: dict[str, tuple], title: str) -> None:
    names = _compressed(cases)
    width = min(0.8 / max(len(names), 1), 0.25)
    for i, name in enumerate(names):
        found = [(x, s[name].speedup) for x, (_, s) in enumerate(cases) if name in s and s[name].speedup]
        xs = [x + (i + 0.5 - len(names) / 2) * width for x, _ in found]
        errors = [[sp.median - sp.low for _, sp in found], [sp.high - sp.median for _, sp in found]]
        ax.bar(xs, [sp.median for _, sp in found], width, yerr=errors, color=colors[name], label=name,
               capsize=1.5, error_kw={"lw": 0.6})  # fmt: skip
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xticks(range(len(cases)), [m for m, _ in cases], fontsize=7)
    ax.set_ylabel("speed-up ×", fontsize=8)
    ax.set_title(title, fontsize=8)
    ax.tick_params(labelsize=7)


def _scatter(ax, cases: Cases, colors: dict[str, tuple], markers: dict[str, str], title: str) -> None:
    top = 1.0
    for model, summaries in cases:
        for name, s in summaries.items():
            if name != "original" and s.speedup and s.mac_ratio:
                ax.scatter(s.mac_ratio.median, s.speedup.median, s=14, color=colors[name], marker=markers[model])
                top = max(top, s.mac_ratio.median, s.speedup.median)
    ax.plot([0, top * 1.05], [0, top * 1.05], color="gray", lw=0.8, ls="--", label="y = x (FLOP limit)")
    for name, color in colors.items():
        ax.scatter([], [], color=color, s=14, label=name)
    for model, marker in markers.items():
        ax.scatter([], [], color="black", marker=marker, s=14, label=model)
    ax.set_xlim(0, top * 1.05)
    ax.set_ylim(0, top * 1.05)
    ax.set_xlabel("MAC reduction (original / variant)", fontsize=8)
    ax.set_ylabel("speed-up ×", fontsize=8)
    ax.set_title(title, fontsize=8)
    ax.tick_params(labelsize=7)


def _figure(plt, panels: int, width: float, height: float, kind: str):
    fig, axes = plt.subplots(1, panels, figsize=(width * panels, height), dpi=100, squeeze=False)
    fig.suptitle(textwrap.fill(kind, 90), fontsize=6)
    return fig, axes[0]


def _save(plt, fig, axes, path: Path) -> Path:
    """Save with one legend below the panels, holding every panel's entries once."""
    entries: dict[str, object] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    rows = -(-len(entries) // 6)
    if entries:  # none when only the original ran (every compressed variant failed)
        fig.legend(list(entries.values()), list(entries), loc="lower center", ncol=min(len(entries), 6), fontsize=6,
                   frameon=False)  # fmt: skip
    fig.tight_layout(rect=(0, 0.045 * rows + 0.02, 1, 1))
    fig.savefig(path)
    plt.close(fig)
    return path


def distinct_colors(plt: Any, n: int) -> list[Any]:
    """``n`` colours, no two alike: tab10, tab20, then tab20 + tab20b + tab20c (60), then
    evenly spaced hues (31 variants on tab20 gave 11 colours to two variants each)."""
    if n <= 20:
        palette = plt.get_cmap("tab10" if n <= 10 else "tab20")
        return [palette(i) for i in range(n)]
    if n <= 60:
        return [plt.get_cmap(name)(i) for name in ("tab20", "tab20b", "tab20c") for i in range(20)][:n]
    hues = plt.get_cmap("hsv")
    return [hues(i / n) for i in range(n)]


def speed_plots(groups: Sequence[CaseRuns], out: Path) -> list[Path]:
    """Write both plots for every machine kind and backend with speed runs.

    Args:
        groups: the speed suite's runs grouped by `benchmarks.aggregate.group`.
        out: the directory they go to.

    Returns:
        The paths written.
    """
    plt = _pyplot()
    # imported runs whose machine is not known well enough to pool them are tables only (a kind per source)
    keys = list(dict.fromkeys((g.kind, g.case.get("backend")) for g in groups if g.runs and "imported from" not in g.kind))
    written = []
    for kind, backend in keys:
        members = [g for g in groups if g.runs and g.kind == kind and g.case.get("backend") == backend]
        batches = sorted({g.case.get("batch") for g in members})
        by_batch = {}
        for b in batches:  # a bar per case: one model's cases at other threads, inputs or settings are labelled apart
            cases = [g for g in members if g.case.get("batch") == b]
            by_batch[b] = [(label, summarize(g.runs)) for label, g in zip(case_labels(cases, lambda g: g.case["model"]), cases)]
        every = [case for cases in by_batch.values() for case in cases]
        names = _compressed(every)
        colors = dict(zip(names, distinct_colors(plt, len(names))))
        markers = {m: MARKERS[i % len(MARKERS)] for i, m in enumerate(dict.fromkeys(m for m, _ in every))}
        fig, axes = _figure(plt, len(batches), 4.2, 3.4, kind)
        for ax, batch in zip(axes, batches):
            _bars(ax, by_batch[batch], colors, f"{backend}, batch {batch}")
        written.append(_save(plt, fig, axes, out / f"speedup_{slug(kind)}_{backend}.png"))
        fig, axes = _figure(plt, len(batches), 4.0, 4.2, kind)
        for ax, batch in zip(axes, batches):
            _scatter(ax, by_batch[batch], colors, markers, f"{backend}, batch {batch}")
        written.append(_save(plt, fig, axes, out / f"speedup_vs_macs_{slug(kind)}_{backend}.png"))
    return written
