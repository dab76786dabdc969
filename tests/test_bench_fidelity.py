"""The fidelity benchmark's report and run log (synthetic runs: nothing is timed)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ is a directory of the checkout

from benchmarks import fidelity  # noqa: E402


def _run(threads=2, speedup=1.0, rounds_median=2.0):
    row = {"ratio": 2.0, "method": "whitened", "params": 5e6, "macs": 1e9, "mac_ratio": 2.0, "cosine": 0.9,
           "latency_ms": {"median_ms": 5.0, "min_ms": 4.0, "max_ms": 9.0}, "speedup": speedup,
           "speedup_rounds": {"median": rounds_median, "min": 1.0, "max": 4.0, "rounds": 3}}
    return {"date": "2026-12-06 16:00:00 UTC", "command": "benchmarks/fidelity.py",
            "environment": {"processor": "CPU", "vector_extensions": "AVX2", "cpus": 2, "torch": "2", "onnxruntime": "1"},
            "settings": {"threads": threads},
            "cases": [{"model": "minilm", "rows": [row],
                       "original": {"params": 1e7, "macs": 2e9, "latency_ms": {"median_ms": 10.0}}}]}


def test_speedup_over_mac_ratio_divides_the_speedup_shown_beside_it():
    """The speed-up column is the median of per-round ratios; the column beside it divided the
    ratio of the round medians (1.96× shown beside 1.54 at MAC ratio 1.20)."""
    text = fidelity.report([_run(speedup=1.0, rounds_median=2.0)])
    row = next(line for line in text.splitlines() if line.startswith("| 2 | whitened"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[6].startswith("2.00x") and cells[7] == "1.00"


def test_the_pareto_plot_takes_points_at_one_thread_count(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(fidelity, "_speed", lambda r: seen.append(r["speedup_rounds"]["median"]) or 1.0)
    fidelity.plot([_run(threads=1, rounds_median=3.0), _run(threads=2, rounds_median=2.0)], tmp_path / "p.png",
                  fidelity._machine(_run()))
    assert seen and set(seen) == {2.0}  # the newest run's 2 threads, not the 1-thread run's points


def test_a_machine_without_cpuinfo_records_its_extensions_as_unknown(monkeypatch):
    """Without /proc/cpuinfo the record said no vector extensions and the kind read "no AVX2"."""
    import os

    import fxlrd.timing
    from benchmarks.machine import machine, machine_kind

    info = machine(cpuinfo="")
    assert info["vector_extensions"] is None and "vector extensions unknown" in machine_kind(info)
    monkeypatch.setattr(fxlrd.timing, "_cpuinfo_readable", lambda: False)
    env = fxlrd.timing.environment()
    assert env["vector_extensions"] == "unknown"
    # the CPUs this process may use (fidelity.md prints them as its cores), not the host's count
    assert env["cpus"] == len(os.sched_getaffinity(0)) and env["logical_cpus"] == os.cpu_count()
def test_a_torn_line_in_the_run_log_loses_no_run(tmp_path, monkeypatch):
    """A run killed mid-write leaves a torn line: the next run's record must neither be glued
    to it nor make every later report fail to read the log."""
    monkeypatch.setattr(fidelity, "RESULTS", tmp_path)
    log = tmp_path / "fidelity.jsonl"
    log.write_text(json.dumps(_run()) + "\n" + '{"date": "2026-12-06", "cases": [')  # torn
    from benchmarks.records import append

    append(log, _run(threads=4))
    runs = fidelity._load_runs()
    assert [r["settings"]["threads"] for r in runs] == [2, 4]




def test_two_sets_of_uncommitted_edits_are_two_code_versions(tmp_path):
    """A run from a tree with uncommitted edits was recorded as ``<commit>+dirty`` whatever the
    edits: two different ones shared a row. The marker now carries a hash of the difference."""
    import subprocess

    from benchmarks.machine import _git_commit

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    git("add", "a.py")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "one")
    clean = _git_commit(tmp_path)
    assert clean and "+" not in clean
    (tmp_path / "a.py").write_text("x = 2\n")
    first = _git_commit(tmp_path)
    (tmp_path / "a.py").write_text("x = 3\n")
    second = _git_commit(tmp_path)
    assert first.startswith(clean + "+dirty.") and second.startswith(clean + "+dirty.") and first != second
    (tmp_path / "a.py").write_text("x = 2\n")
    assert _git_commit(tmp_path) == first  # the same edits: the same version
