"""The benchmark suite's pure logic: aggregation across runs, the append-only log, matching at
equal parameters, CPU flags, the reports and the README region. Nothing here times anything."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ is a directory of the checkout

from benchmarks import __main__ as cli  # noqa: E402
from benchmarks.aggregate import Spread, equal_param_comparisons, equal_params, group, spread, summarize  # noqa: E402
from benchmarks.build import rotated  # noqa: E402
from benchmarks.machine import machine, machine_kind  # noqa: E402
from benchmarks.records import FORMAT, append, log_path, read  # noqa: E402
from benchmarks.report import (  # noqa: E402
    README_END,
    README_START,
    readme_table,
    replace_region,
    suite_markdown,
    write_reports,
)

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu vme sse sse2 avx avx2 fma avx512f avx512dq avx512_vnni amx_bf16 amx_tile amx_int8
processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu vme sse sse2 avx avx2 fma avx512f avx512dq avx512_vnni amx_bf16 amx_tile amx_int8
"""
MACHINE = {"cpu": "Test CPU", "vector_extensions": ["AVX2"], "cpus": 2, "logical_cpus": 2, "arch": "x86_64", "gpu": None}


def make_run(times_ms: dict[str, float], params: dict[str, int] | None = None, *, run: int = 1, threads: int = 2,
             cpu: str = "Test CPU", model: str = "resnet50", backend: str = "onnxruntime", batch: int = 1,
             macs: dict[str, int] | None = None) -> dict:  # fmt: skip
    """A synthetic speed run record."""
    params = params or {}
    macs = macs or {}
    # repeats spread ±10 % around each run's median: a spread across runs must not be taken from them
    variants = {n: {"median_s": t / 1e3, "min_s": 0.9 * t / 1e3, "max_s": 1.1 * t / 1e3, "params": params.get(n),
                    "macs": macs.get(n)} for n, t in times_ms.items()}  # fmt: skip
    return {
        "format": FORMAT, "suite": "speed", "timestamp": f"2026-01-01T00:0{run}:00+00:00", "invocation": "test",
        "run": run, "runs": 3, "command": "python -m benchmarks speed --models resnet50", "machine": MACHINE | {"cpu": cpu},
        "versions": {"python": "3.11", "torch": "2.13.0", "onnxruntime": "1.32.0", "fxlrd": "0.1.0", "git": "abc1234"},
        "settings": {"threads": threads, "repeats": 20, "warmup": 3},
        "case": {"model": model, "backend": backend, "batch": batch, "inputs": f"{batch}×3×224×224"},
        "variants": variants, "skipped": {}, "failed": {},
    }  # fmt: skip


THREE_RUNS = [
    make_run({"original": 10.0, "quantized": 5.0}, {"original": 100, "quantized": 50}, run=1, macs={"original": 40, "quantized": 20}),
    make_run({"original": 12.0, "quantized": 4.0}, {"original": 100, "quantized": 50}, run=2, macs={"original": 40, "quantized": 20}),
    make_run({"original": 8.0, "quantized": 8.0}, {"original": 100, "quantized": 50}, run=3, macs={"original": 40, "quantized": 20}),
]


# -- aggregation across runs -----------------------------------------------------------------------------
def test_spread_is_median_min_max_of_the_values():
    assert spread([3.0, 1.0, 2.0, None]) == Spread(2.0, 1.0, 3.0, 3)
    assert spread([]) is None
    assert Spread(2.0, 1.0, 3.0, 3).format("{:.1f}", "×") == "2.0× [1.0–3.0]"
    assert Spread(2.0, 2.0, 2.0, 3).format("{:.1f}") == "2.0"


def test_summarize_forms_ratios_within_each_run_then_aggregates():
    s = summarize(THREE_RUNS)["quantized"]
    assert s.latency_s.median == pytest.approx(5e-3) and s.latency_s.low == pytest.approx(4e-3)
    assert s.latency_s.high == pytest.approx(8e-3) and s.latency_s.n == 3
    # per run 2, 3 and 1: the median of ratios, not the ratio of medians (10 / 5 = 2 here too, but 3 and 1 are its range)
    assert (s.speedup.median, s.speedup.low, s.speedup.high) == pytest.approx((2.0, 1.0, 3.0))
    assert s.mac_ratio.median == pytest.approx(2.0)
    assert (s.speedup_per_mac_ratio.low, s.speedup_per_mac_ratio.high) == pytest.approx((0.5, 1.5))
    assert summarize(THREE_RUNS)["original"].speedup == Spread(1.0, 1.0, 1.0, 3)


def test_mac_ratios_come_from_runs_counted_as_the_newest_run_counted():
    # an older counter read fused attention as zero MACs (ViT's original 11.3 G instead of 17.6 G): its runs' MAC
    # ratios were pooled with the current ones; their timings still count
    old = make_run({"original": 10.0, "quantized": 5.0}, run=1, macs={"original": 113, "quantized": 84})
    new = [make_run({"original": 10.0, "quantized": 4.0}, run=r, macs={"original": 176, "quantized": 92}) for r in (2, 3)]
    s = summarize([old, *new])["quantized"]
    assert s.speedup.n == 3 and s.mac_ratio.n == 2 and s.mac_ratio.low == pytest.approx(176 / 92)
    assert s.macs.n == 2 and s.speedup_per_mac_ratio.n == 2


def test_mac_ratios_of_another_input_size_are_not_an_older_counter():
    # the same model timed at 160 and 224 pixels counts other MACs per sample: both counts stay
    small = make_run({"original": 10.0, "quantized": 5.0}, run=1, macs={"original": 50, "quantized": 25})
    small["case"]["inputs"] = "8×3×160×160"
    large = make_run({"original": 10.0, "quantized": 5.0}, run=2, macs={"original": 100, "quantized": 50})
    groups = group([small, large])
    assert [summarize(g.runs)["quantized"].mac_ratio.median for g in groups] == [2.0, 2.0]


def test_speedup_skips_runs_without_the_baseline():
    runs = THREE_RUNS[:2] + [make_run({"quantized": 1.0}, {"quantized": 50}, run=3)]
    s = summarize(runs)["quantized"]
    assert s.latency_s.n == 3 and s.speedup.n == 2


def test_runs_column_counts_the_runs_the_speedup_comes_from():
    runs = [THREE_RUNS[0]] + [make_run({"quantized": 5.0 + r}, {"quantized": 50}, run=r) for r in (2, 3)]
    for r in runs[1:]:
        r["failed"] = {"original": "RuntimeError: out of memory"}  # the variant ran, the original did not
    row = next(line for line in suite_markdown("speed", runs).splitlines() if line.startswith("| quantized |"))
    assert row.endswith("| 2.00× | 1.00 | 1 (latency: 3) |")  # a speed-up from 1 run, not "3"
    full = next(line for line in suite_markdown("speed", THREE_RUNS).splitlines() if line.startswith("| quantized |"))
    assert full.endswith("| 3 |")


def test_runs_are_pooled_only_per_machine_kind_and_case():
    runs = THREE_RUNS + [make_run({"original": 1.0}, cpu="Other CPU"), make_run({"original": 1.0}, threads=1),
                         make_run({"original": 1.0}, batch=8), {**make_run({"original": 1.0}), "error": "boom"}]  # fmt: skip
    groups = group(runs)
    assert [(len(g.runs), len(g.failed)) for g in groups] == [(3, 1), (1, 0), (1, 0), (1, 0)]
    assert groups[0].threads == 2 and groups[2].threads == 1 and groups[3].case["batch"] == 8
    assert {g.kind for g in groups} == {machine_kind(MACHINE), machine_kind(MACHINE | {"cpu": "Other CPU"})}


def test_runs_of_other_settings_are_not_pooled_and_other_commits_are_pooled_and_said():
    params = {"original": 100, "quantized": 50}
    plain = [make_run({"original": 20.0, "quantized": 18.2}, params, run=r, backend="compile") for r in (1, 2, 3)]
    frozen = [make_run({"original": 16.0, "quantized": 10.0}, params, run=r, backend="compile") | {"compile_settings": {"freezing": True}}
              for r in (1, 2, 3)]  # fmt: skip
    fewer = [make_run({"original": 20.0, "quantized": 10.0}, params, run=r, backend="compile") for r in (1, 2, 3)]
    for r in fewer:
        r["settings"] = r["settings"] | {"repeats": 10, "warmup": 1}
    gpu = []
    for tf32 in (False, True):
        for r in (1, 2, 3):
            run = make_run({"original": 4.0 if tf32 else 10.0, "quantized": 2.0}, params, run=r, backend="cuda")
            gpu.append(run | {"gpu_settings": {"matmul_tf32": tf32, "dtype": "float32"}, "machine": MACHINE | {"gpu": "H100"}})
    groups = group(plain + frozen + fewer + gpu)
    assert [len(g.runs) for g in groups] == [3, 3, 3, 3, 3]
    assert [summarize(g.runs)["quantized"].speedup.format() for g in groups[:3]] == ["1.10", "1.60", "2.00"]
    assert groups[1].settings["compile_settings"] == {"freezing": True} and groups[2].settings["repeats"] == 10
    text = suite_markdown("speed", plain + frozen + fewer + gpu)
    assert "compile: freezing True" in text and "repeats 10, warmup 1 per run" in text
    assert "GPU: matmul_tf32 False" in text and "GPU: matmul_tf32 True" in text
    # the same settings from another commit: pooled, and the table says it spans two commits
    other = [make_run({"original": 20.0, "quantized": 12.0}, params, run=r) for r in (4, 5)]
    for r in other:
        r["versions"] = r["versions"] | {"git": "def5678+dirty"}
    (pooled,) = group(THREE_RUNS + other)
    assert len(pooled.runs) == 5
    text = suite_markdown("speed", THREE_RUNS + other)
    assert "5 runs (2026-01-01 00:01 – 2026-01-01 00:05) from 2 commits (git abc1234, def5678+dirty)" in text
    assert next(ln for ln in text.splitlines() if ln.startswith("| quantized |")).endswith("| 5 · 2 commits |")
    assert "commits" not in suite_markdown("speed", THREE_RUNS)


def _searched(run: dict, name: str = "optimized") -> dict:
    """``run`` with ``name`` marked as a decomposed variant (its build config recorded)."""
    run["variants"][name]["config"] = {"rank_quantum": 16}
    return run


def test_a_variant_built_at_other_sizes_is_reported_once_per_size():
    # "optimized" searched twice: 5.0 M and 5.1 M parameters (within ±3 %: one model) in runs 1-2, 8 M in run 3
    sizes = [5_000_000, 5_100_000, 8_000_000]
    runs = [_searched(make_run({"original": 10.0, "optimized": 5.0 + i}, {"original": 10**7, "optimized": p}, run=i + 1))
            for i, p in enumerate(sizes)]  # fmt: skip
    runs.append(_searched(make_run({"original": 10.0, "optimized": 5.0}, {"optimized": 8_000_000}, model="vit_b_16")))
    resnet, vit = group(runs)
    assert [list(r["variants"]) for r in resnet.runs] == [["original", "optimized · 5.05 M"]] * 2 + [["original", "optimized · 8.00 M"]]
    assert list(vit.runs[0]["variants"]) == ["original", "optimized"]  # one size for that model: the name as it was
    table = readme_table(runs, variants=["original", "optimized"])
    assert "| resnet50 | optimized · 5.05 M | 5.05 | - | 1.83× [1.67–2.00] n=2 |" in table  # runs 1-2 pooled: 10/5, 10/6
    assert "| resnet50 | optimized · 8.00 M | 8.00 | - | 1.43× n=1 |" in table  # one run: says so
    assert "fewer than 3 runs says how many" in table
    assert "--variants original,optimized " in table  # the command names the variant as the suite knows it
    assert runs[2]["variants"].keys() == {"original", "optimized"}  # the records themselves are not changed


def test_sizes_are_grouped_within_3_percent_of_the_smallest_and_undecomposed_variants_keep_their_names():
    # a search drifting 9.27 → 9.54 M stays one model; 9.68 M is more than 3 % above 9.27 M (steps under 3 %
    # used to chain into one row spanning 4.4 %); 12 M is another
    sizes = [9_270_000, 9_400_000, 9_540_000, 9_680_000, 12_000_000]
    runs = [_searched(make_run({"original": 10.0, "optimized": 5.0, "int8": 4.0},
                               {"original": 10**7, "optimized": p, "int8": 10**7 + i * 10**6}, run=i + 1))
            for i, p in enumerate(sizes)]  # fmt: skip
    (g,) = group(runs)
    names = [n for r in g.runs for n in r["variants"] if n.startswith("optimized")]
    assert names == ["optimized · 9.40 M"] * 3 + ["optimized · 9.68 M", "optimized · 12.0 M"]
    assert all("int8" in r["variants"] for r in g.runs)  # not decomposed (no build config): never split
    # the same variant on another backend or batch gets the same names (one row per size in the README table)
    other = [_searched(make_run({"original": 10.0, "optimized": 4.0}, {"optimized": p}, backend="eager", batch=8)) for p in sizes[::4]]
    table = readme_table(runs + other, variants=["original", "optimized"])
    assert table.count("| resnet50 | optimized · ") == 3


def test_each_run_starts_with_another_variant():
    names = ["original", "vanilla", "quantized"]
    assert [rotated(names, run)[0] for run in (1, 2, 3, 4)] == ["original", "vanilla", "quantized", "original"]
    assert sorted(rotated(names, 2)) == sorted(names) and rotated([], 3) == []


# -- the append-only log ---------------------------------------------------------------------------------
def test_a_second_run_appends_and_keeps_the_first(tmp_path):
    path = log_path(tmp_path / "results", "speed")
    append(path, THREE_RUNS[0])
    first = path.read_bytes()
    append(path, THREE_RUNS[2])  # a worse run is kept as well
    assert path.read_bytes().startswith(first)
    assert read(path) == [json.loads(json.dumps(THREE_RUNS[0])), json.loads(json.dumps(THREE_RUNS[2]))]
    assert len(path.read_text().splitlines()) == 2


def test_reading_skips_a_torn_line_with_a_warning(tmp_path):
    path = tmp_path / "speed.jsonl"
    append(path, THREE_RUNS[0])
    with open(path, "a") as f:
        f.write('{"format": "fxlrd.bench-run/1", "suite"')
    with pytest.warns(UserWarning, match="not a JSON record"):
        assert len(read(path)) == 1
    assert read(tmp_path / "missing.jsonl") == []


def test_a_record_appended_after_a_torn_line_starts_a_line_of_its_own(tmp_path):
    path = tmp_path / "speed.jsonl"
    append(path, THREE_RUNS[0])
    with open(path, "a") as f:  # run 2 killed in the middle of its line
        f.write(json.dumps(THREE_RUNS[1])[:12])
    append(path, THREE_RUNS[2])  # run 3, written whole, must not be glued to the fragment
    with pytest.warns(UserWarning, match="not a JSON record"):
        assert [r["run"] for r in read(path)] == [1, 3]
    assert path.read_text().endswith("\n") and len(path.read_text().splitlines()) == 3


# -- equal parameters ------------------------------------------------------------------------------------
@pytest.mark.parametrize("a, b, expected", [(100, 103, True), (103, 100, True), (100, 103.1, False), (100, 97.1, True),
                                            (100, 97, False), (50, 50, True)])  # fmt: skip
def test_equal_params_is_within_three_percent_of_the_smaller(a, b, expected):
    assert equal_params(a, b) is expected


def test_equal_param_comparisons_match_within_each_run():
    runs = [
        make_run({"original": 10, "vanilla": 8, "global@vanilla": 4, "quantized": 6},
                 {"original": 200, "vanilla": 100, "global@vanilla": 99, "quantized": 90}, run=1),  # fmt: skip
        make_run({"original": 10, "vanilla": 8, "global@vanilla": 2, "quantized": 6},
                 {"original": 200, "vanilla": 100, "global@vanilla": 110, "quantized": 90}, run=2),  # fmt: skip
        make_run({"original": 10, "vanilla": 9, "global@vanilla": 3, "quantized": 6},
                 {"original": 200, "vanilla": 100, "global@vanilla": 101, "quantized": 90}, run=3),  # fmt: skip
    ]
    comparisons = equal_param_comparisons(runs)
    assert [(c.a, c.b) for c in comparisons] == [("global@vanilla", "vanilla")]  # quantized is 10 % smaller
    c = comparisons[0]
    assert c.speedup.n == 2  # run 2's global@vanilla was 10 % larger: not a match there
    assert (c.speedup.low, c.speedup.high) == pytest.approx((2.0, 3.0))
    assert (c.params_a.low, c.params_a.high) == (99, 101)


def test_imported_runs_without_vector_extensions_are_not_pooled_across_sources():
    # without the extensions, two imports from different machines of one CPU name fell into one kind
    runs = []
    for source, t in (("a.json@1", 19.4), ("b.json@2", 24.0)):
        run = make_run({"original": t, "quantized": t / 2})
        run["machine"] = {**run["machine"], "vector_extensions": None}
        runs.append({**run, "imported_from": f"benchmarks/results/{source}"})
    kinds = [g.kind for g in group(runs)]
    assert len(kinds) == 2 and kinds[0].endswith("imported from a.json@1") and "vector extensions unknown" in kinds[0]
    assert len(group([runs[0], make_run({"original": 10.0})])) == 2  # nor with runs that know their machine


@pytest.mark.parametrize("n", [3, 10, 20, 31, 60, 75])
def test_plots_give_every_variant_its_own_colour(n):
    # 31 variants on the 20-colour palette gave 11 colours to two variants each
    from benchmarks.plots import _pyplot, distinct_colors

    colors = distinct_colors(_pyplot(), n)
    assert len(colors) == n and len({tuple(round(x, 4) for x in c) for c in colors}) == n


def test_onnxruntime_sessions_are_made_without_spinning(tmp_path):
    # idle spinning sessions steal the cores of the one being timed: every session fxlrd and the suite time
    # comes from onnx_session (or, in the profiler, sets the option itself)
    import re

    from fxlrd.export import onnx_session

    import torch

    import fxlrd

    path = fxlrd.export_onnx(torch.nn.Linear(4, 4).eval(), torch.randn(2, 4), tmp_path / "m.onnx")
    options = onnx_session(path, threads=1).get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    root = Path(__file__).resolve().parents[1]
    for source in [*(root / "fxlrd").rglob("*.py"), *(root / "benchmarks").rglob("*.py")]:
        text = source.read_text()
        if re.search(r"InferenceSession\(", text):
            assert '"session.intra_op.allow_spinning", "0"' in text, source


def test_fidelity_speedups_are_ratios_within_each_round():
    # the fidelity benchmark divided the medians across rounds; the suite forms ratios within a run
    from benchmarks.fidelity import _speedup, round_ratios

    base, other = {"rounds_ms": [10.0, 12.0, 8.0]}, {"rounds_ms": [5.0, 4.0, 8.0]}
    r = round_ratios(base, other)
    assert (r["median"], r["min"], r["max"], r["rounds"]) == (2.0, 1.0, 3.0, 3)
    assert _speedup({"speedup": 2.0, "speedup_rounds": r}) == "2.00x [1.00–3.00]"
    assert _speedup({"speedup": 2.0}) == "2.00x ᵐ"  # an older run: the ratio of medians, marked
    with pytest.raises(SystemExit):
        __import__("benchmarks.fidelity", fromlist=["main"]).main(["--runs", "2"])  # 3 rounds at least


def test_int8_variants_are_compared_at_equal_parameters_only_with_int8_variants():
    # quantized+int8 against merged_optimized (float) at one size was listed as an LRD comparison
    run = make_run({"original": 10, "quantized": 6, "quantized+int8": 3, "merged_optimized": 5, "merged_optimized+int8": 2},
                   {"original": 200, "quantized": 100, "quantized+int8": 100, "merged_optimized": 101,
                    "merged_optimized+int8": 101})  # fmt: skip
    pairs = {(c.a, c.b) for c in equal_param_comparisons([run])}
    assert pairs == {("merged_optimized", "quantized"), ("merged_optimized+int8", "quantized+int8")}


# -- CPU flags -------------------------------------------------------------------------------------------
def test_machine_reads_cpu_model_and_vector_extensions():
    info = machine(cpuinfo=CPUINFO)
    assert info["cpu"] == "Intel(R) Xeon(R) Platinum 8480+"
    for name in ("AVX2", "AVX-512F", "AVX-512 VNNI", "AMX"):
        assert name in info["vector_extensions"]
    assert machine(cpuinfo="processor\t: 0\nflags\t: fpu sse2\n")["vector_extensions"] == []


def test_machine_kind_names_cpu_cores_extensions_and_gpu_only_when_asked():
    info = {"cpu": "X", "cpus": 16, "vector_extensions": ["AVX2", "AVX-512F"], "gpu": "H100"}
    assert machine_kind(info) == "X · 16 CPUs · AVX2, AVX-512F"
    assert machine_kind(info, gpu=True).endswith("· H100")
    assert "unknown" in machine_kind({"cpu": "AMD EPYC", "cpus": 2, "vector_extensions": None})


# -- reports ---------------------------------------------------------------------------------------------
def test_report_from_a_synthetic_log(tmp_path):
    params = {"original": 25_560_000, "vanilla": 12_750_000, "global@vanilla": 12_500_000}
    macs = {"original": 4_000_000_000, "vanilla": 2_000_000_000, "global@vanilla": 1_600_000_000}
    runs = [make_run({"original": t0, "vanilla": t1, "global@vanilla": t2}, params, run=i + 1, macs=macs)
            for i, (t0, t1, t2) in enumerate([(10, 8, 5), (12, 8, 6), (9, 9, 3)])]  # fmt: skip
    runs[2]["skipped"] = {"merged": "no layer decomposed with this config"}
    for run in runs + [{**make_run({}, run=4), "error": "RuntimeError: out of memory"}]:
        append(log_path(tmp_path, "speed"), run)
    text = suite_markdown("speed", read(log_path(tmp_path, "speed")))
    assert f"## {machine_kind(MACHINE)}" in text
    assert "### resnet50 · onnxruntime · batch 1" in text and "3 runs" in text
    assert "| vanilla | 12.75 | 2.00 | 2.00× | 8.00 [8.00–9.00] | 1.25× [1.00–1.50] |" in text
    assert "| global@vanilla | vanilla | 12.50 / 12.75 | 1.60× [1.33–3.00] | 3 |" in text  # 8/5, 8/6, 9/3
    assert "skipped: merged (no layer decomposed with this config; 1 of 3 runs)" in text
    assert "failed run" in text and "out of memory" in text
    written = write_reports(tmp_path)
    assert tmp_path / "speed.md" in written and any(p.suffix == ".png" and p.stat().st_size > 0 for p in written)


def _transform_run(run: int, seconds: float, git: str, day: int = 1) -> dict:
    """A synthetic transform run record."""
    record = make_run({}, run=run)
    record["timestamp"] = f"2026-01-0{day}T00:0{run}:00+00:00"
    record |= {"suite": "transform", "case": {"model": "resnet50", "ratio": 2, "rank_quantum": 16, "example_inputs": False},
               "versions": record["versions"] | {"git": git},
               "variants": {"quantized": {"median_s": seconds, "min_s": seconds, "max_s": seconds, "params": 12_000_000,
                                          "params_before": 25_000_000, "layers_decomposed": 54}}}  # fmt: skip
    return record


def test_transform_rows_keep_uncommitted_code_apart_from_its_commit():
    runs = [_transform_run(r, 2.0, "abc1234") for r in (1, 2, 3)]  # committed code: 2.0 s
    runs += [_transform_run(r, 1.0, "abc1234+dirty", day=2) for r in (1, 2, 3)]  # uncommitted changes: 1.0 s
    rows = [line for line in suite_markdown("transform", runs).splitlines() if line.startswith("| resnet50 |")]
    assert len(rows) == 2
    assert "| abc1234 |" in rows[0] and "| 2.00 | 3 (" in rows[0]
    assert "| abc1234+dirty |" in rows[1] and "| 1.00 | 3 (" in rows[1]


def test_lrd_plus_int8_is_compared_with_int8_alone_run_by_run():
    params = {"original": 100, "int8": 100, "quantized": 50, "quantized+int8": 50}
    runs = [make_run({"original": 10.0, "int8": t8, "quantized": 6.0, "quantized+int8": tq}, params, run=i + 1)
            for i, (t8, tq) in enumerate([(4.0, 2.0), (5.0, 4.0), (4.0, 3.0)])]  # fmt: skip
    text = suite_markdown("speed", runs)
    section = text.split("LRD + int8 against int8 alone")[1]
    row = next(line for line in section.splitlines() if line.startswith("| quantized+int8 |"))
    assert "1.33× [1.25–2.00]" in row  # 4/2, 5/4, 4/3: the median of the per-run ratios
    no_int8 = suite_markdown("speed", [make_run({"original": 10.0, "quantized": 5.0}, params, run=1)])
    assert "LRD + int8" not in no_int8
    # a searched LRD + int8 variant built at two sizes: a row per size, both still compared with int8
    two = [_searched(make_run({"original": 10.0, "int8": 4.0, "global+int8": 2.0}, {"int8": 100, "global+int8": p}, run=i + 1),
                     "global+int8") for i, p in enumerate([50, 80])]  # fmt: skip
    section = suite_markdown("speed", two).split("LRD + int8 against int8 alone")[1]
    assert section.count("| global+int8 · ") == 2


def test_lrd_plus_dynamic_int8_is_compared_with_dynamic_int8_alone():
    params = {"original": 100, "int8": 100, "quantized+int8": 50, "int8_dynamic": 100, "quantized+int8_dynamic": 50}
    runs = [make_run({"original": 10.0, "int8": 4.0, "quantized+int8": 2.0, "int8_dynamic": 6.0,
                      "quantized+int8_dynamic": 4.0}, params, run=i + 1) for i in range(3)]  # fmt: skip
    text = suite_markdown("speed", runs)
    static = text.split("LRD + int8 against int8 alone")[1].split("LRD + int8_dynamic")[0]
    assert "| quantized+int8 | 0.00 | - | 2.00× | 3 |" in static and "int8_dynamic |" not in static
    dynamic = text.split("LRD + int8_dynamic against int8_dynamic alone")[1]
    assert "| quantized+int8_dynamic | 0.00 | - | 1.50× | 3 |" in dynamic  # 6 / 4, not 4 / 4 against static int8
    from benchmarks.variants import get

    assert get("int8_dynamic").int8 == "int8-dynamic" and get("int8").int8 == "int8"


def test_readme_table_names_the_machine_and_the_command():
    table = readme_table(THREE_RUNS)
    assert table.splitlines()[0] == "| model | variant | params (M) | MAC ratio | onnxruntime b1 |"
    # 50 parameters: 0.00 M; MAC ratio 40 / 20; speed-up ÷ MAC ratio 1.00 (median of 1.5, 0.5, 1.0)
    assert "| resnet50 | quantized | 0.00 | 2.00× | 2.00× [1.00–3.00] (1.00) |" in table
    assert "speed-up ÷ MAC ratio" in table and "n=" not in table and "20 timed repeats per run" in table
    assert machine_kind(MACHINE) in table
    assert "python -m benchmarks speed --models resnet50 --variants original,quantized --backends onnxruntime --batch 1 " \
           "--repeats 20 --runs 3" in table  # fmt: skip
    with pytest.raises(ValueError, match="matches 0 machine kinds"):
        readme_table(THREE_RUNS, machine="no such cpu")


def test_readme_cells_of_other_threads_or_inputs_never_replace_each_other(tmp_path, monkeypatch):
    params, macs = {"original": 100, "quantized": 50}, {"original": 40, "quantized": 20}
    two = [make_run({"original": 20.0, "quantized": 10.0}, params, run=r, macs=macs) for r in (1, 2, 3)]  # 2.00x
    one = [make_run({"original": 40.0, "quantized": 32.0}, params, run=r, threads=1, macs=macs) for r in (4, 5, 6)]  # 1.25x
    table = readme_table(two + one)
    assert table.splitlines()[0] == "| model | variant | params (M) | MAC ratio | onnxruntime b1 · 1 thread | onnxruntime b1 · 2 threads |"
    assert "| resnet50 | quantized | 0.00 | 2.00× | 1.25× (0.62) | 2.00× (1.00) |" in table
    # the command names the threads and the warmup, one command per thread count
    assert "--repeats 20 --runs 3 --warmup 3 --threads 2`" in table and "--repeats 20 --runs 3 --warmup 3 --threads 1`" in table
    assert "after 3 untimed (warmup)" in readme_table(two)
    # the same model at other input shapes: a row of its own, never the same cell
    small = [make_run({"original": 5.0, "quantized": 4.0}, params, run=r, macs=macs) for r in (4, 5, 6)]
    for r in small:
        r["case"]["inputs"] = "1×3×160×160"
    table = readme_table(two + small)
    assert "| resnet50 · inputs 3×224×224 | quantized | 0.00 | 2.00× | 2.00× (1.00) |" in table
    assert "| resnet50 · inputs 3×160×160 | quantized | 0.00 | 2.00× | 1.25× (0.62) |" in table
    # the plots: a bar per case, labelled apart
    from benchmarks import plots

    seen = []
    real = plots._bars
    monkeypatch.setattr(plots, "_bars", lambda ax, cases, *a: (seen.append([label for label, _ in cases]), real(ax, cases, *a)))
    plots.speed_plots(group(two + one), tmp_path)
    assert seen == [["resnet50 · 2 threads", "resnet50 · 1 thread"]]


def test_readme_default_machine_is_the_newest_among_the_runs_the_filters_keep():
    other = []
    for r in (1, 2, 3):  # newer runs of another model on another machine, and an older resnet50 run there
        run = make_run({"original": 1.0, "quantized": 0.5}, {"original": 100, "quantized": 50}, run=r, model="bert_base",
                       cpu="Other CPU")  # fmt: skip
        other.append(run | {"timestamp": f"2026-03-01T00:0{r}:00+00:00"})
    old = make_run({"original": 1.0, "quantized": 0.9}, {"original": 100, "quantized": 50}, run=1, cpu="Other CPU")
    old["timestamp"] = "2025-01-01T00:00:00+00:00"
    table = readme_table(THREE_RUNS + other, models=["resnet50"])
    assert f"Machine: {machine_kind(MACHINE)};" in table
    table = readme_table(THREE_RUNS + other + [old], models=["resnet50"])
    assert f"Machine: {machine_kind(MACHINE)};" in table and "| resnet50 | quantized | 0.00 | 2.00× | 2.00×" in table


README = """# project

intro

## Measured

Headline table.

```
## not a heading (code)
```

## Layout

tree
"""


def test_readme_region_is_inserted_at_the_end_of_the_benchmarks_part():
    out = replace_region(README, "| a | b |")
    head, tail = README.split("## Layout")
    assert out.startswith(head) and out.endswith("## Layout" + tail)
    assert f"### Benchmark suite\n\n{README_START}\n| a | b |\n{README_END}\n\n## Layout" in out


def test_readme_region_replacement_leaves_the_rest_byte_identical():
    once = replace_region(README, "old table")
    twice = replace_region(once, "new\ntable\n")
    start, end = once.index(README_START) + len(README_START), once.index(README_END)
    assert twice[:start] == once[:start] and twice.endswith(once[end:])
    assert twice[start:twice.index(README_END)] == "\nnew\ntable\n"
    assert replace_region(twice, "new\ntable\n") == twice


def test_readme_region_without_the_section_goes_at_the_end():
    text = "# project\r\n\r\nno benchmarks part"
    out = replace_region(text, "t")
    assert out.startswith(text) and out.endswith(f"{README_START}\nt\n{README_END}\n")


# -- command line ----------------------------------------------------------------------------------------
def test_names_accept_commas_and_spaces():
    assert cli._names(["original,quantized", "vanilla", "quantized"]) == ["original", "quantized", "vanilla"]


@pytest.mark.parametrize("argv", [["speed", "--runs", "2"], ["speed", "--models", "resnet5"], ["speed", "--variants", "fast"],
                                  ["speed", "--batch", "0"]])  # fmt: skip
def test_command_line_refuses_too_few_runs_and_unknown_names(argv, capsys):
    p = cli.parser()
    args = p.parse_args(argv)
    args.models, args.variants = cli._names(args.models), cli._names(args.variants)
    with pytest.raises(SystemExit):
        cli._check(p, args)


def test_script_results_keep_every_run_and_the_file_written_before_the_log(tmp_path, monkeypatch):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import _common

    monkeypatch.setattr(_common, "RESULTS", tmp_path)
    (tmp_path / "demo.json").write_text(json.dumps({"benchmark": "demo", "results": "the old run"}))
    _common.write("demo", {"results": "worse"}, "first")
    _common.write("demo", {"results": "better"}, "second")
    log = [json.loads(line) for line in (tmp_path / "demo.jsonl").read_text().splitlines()]
    assert [r["results"] for r in log] == ["the old run", "worse", "better"]
    assert json.loads((tmp_path / "demo.json").read_text())["results"] == "better"
    assert "second" in (tmp_path / "demo.md").read_text() and "demo.jsonl" in (tmp_path / "demo.md").read_text()


def test_calibration_is_rebatched_to_the_exported_batch_size():
    import torch

    from benchmarks.build import _rebatched

    images = [torch.arange(8.0).reshape(4, 2), torch.arange(8.0, 16.0).reshape(4, 2)]
    out = _rebatched(images, 3)
    assert [b.shape[0] for b in out] == [3, 3] and torch.equal(torch.cat(out), torch.cat(images)[:6])
    tokens = [{"input_ids": torch.arange(4).reshape(2, 2), "attention_mask": torch.ones(2, 2)}] * 2
    out = _rebatched(tokens, 1)
    assert len(out) == 4 and all(b["input_ids"].shape == (1, 2) and set(b) == set(tokens[0]) for b in out)
    # token batches padded to different lengths: each batch keeps its own length, nothing is mixed
    ragged = [{"input_ids": torch.arange(6).reshape(2, 3), "attention_mask": torch.ones(2, 3)},
              {"input_ids": torch.arange(10).reshape(2, 5), "attention_mask": torch.ones(2, 5)}]  # fmt: skip
    out = _rebatched(ragged, 1)
    assert [tuple(b["input_ids"].shape) for b in out] == [(1, 3), (1, 3), (1, 5), (1, 5)]
    assert torch.equal(out[3]["input_ids"], ragged[1]["input_ids"][1:])
    out = _rebatched(ragged + [ragged[1]], 3)  # two runs of one shape in a row join; a short run is dropped
    assert [tuple(b["input_ids"].shape) for b in out] == [(3, 5)]


def _merge_case(tmp_path, monkeypatch, first_kernel: int):
    """A small conv net (first conv ``first_kernel``×``first_kernel``), its input and a build
    context, with a synthetic cost timer installed: nothing is timed for real."""
    import torch
    from torch import nn

    from benchmarks.variants import BuildContext
    import test_context
    import test_rank_search as rank_search

    rank_search.install_timer(monkeypatch, test_context.CostTimer())
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 64, first_kernel, padding=first_kernel // 2), nn.BatchNorm2d(64), nn.ReLU(),
                          nn.Conv2d(64, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(), nn.Conv2d(128, 64, 1), nn.ReLU(),
                          nn.Conv2d(64, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(), nn.Conv2d(128, 256, 1)).eval()  # fmt: skip
    x = torch.randn(1, 3, 16, 16)
    return model, x, BuildContext(None, model, x, "onnxruntime", 1, tmp_path / "latency.json")


def test_merged_global_at_vanilla_size_meets_the_size_after_merging(tmp_path, monkeypatch):
    """The bisection's model, merged, has at most vanilla LRD's parameters and keeps more of
    them than the fastest target tried (synthetic timer: nothing is timed for real)."""
    import fxlrd
    from benchmarks.variants import get
    from fxlrd import LRDConfig

    model, x, ctx = _merge_case(tmp_path, monkeypatch, first_kernel=1)
    variant = get("merged_global@vanilla_size_ctx")
    config = variant.config(ctx)
    assert config.merge == "approximate" and config.latency.context == "neighbours"
    gm = variant.build(ctx)
    assert gm.fxlrd_plan.decomposed and any(getattr(m, "fxlrd_merge", None) for m in gm.modules())
    params = fxlrd.count_params(gm)
    fastest = fxlrd.transform(model, LRDConfig(target_speedup=3.0, merge="approximate", latency=config.latency), example_inputs=x)
    assert fxlrd.count_params(fastest) < params <= ctx.vanilla_params, (fxlrd.count_params(fastest), params, ctx.vanilla_params)
    assert variant.config(ctx) is config  # found once per case


@pytest.mark.parametrize("name", ["merged_global@vanilla_size_ctx", "merged_fastest@vanilla_size_ctx",
                                  "merged_optimized@vanilla_ctx"])
def test_a_bisected_variant_returns_the_model_its_bisection_sized(tmp_path, monkeypatch, name):
    """Global mode's closed loop times whole models, which no cache holds: building the config
    again may give another model than the one the bisection sized (ResNet-50 came back 5 %
    above vanilla's size). The variant returns the bisection's own model."""
    import fxlrd
    from benchmarks.variants import get

    _, _, ctx = _merge_case(tmp_path, monkeypatch, first_kernel=3)
    variant = get(name)
    variant.config(ctx)
    assert len(ctx.memo["built"]) == 1  # the steps it did not choose are dropped
    monkeypatch.setattr(fxlrd, "transform", lambda *a, **k: pytest.fail("built again"))
    gm = variant.build(ctx)
    assert fxlrd.count_params(gm) <= ctx.vanilla_params


def test_merged_fastest_at_vanilla_size_is_faster_than_the_least_error_model_of_that_size(tmp_path, monkeypatch):
    """At vanilla LRD's size after merging, the fastest model global mode finds is at least as
    fast (synthetic cost timer) as the least-error one, and no larger than vanilla."""
    import fxlrd
    from benchmarks.variants import get

    _, _, ctx = _merge_case(tmp_path, monkeypatch, first_kernel=3)
    fastest = get("merged_fastest@vanilla_size_ctx")
    config = fastest.config(ctx)
    assert config.merge == "approximate" and config.latency.context == "neighbours" and config.target_params >= ctx.vanilla_params
    gm_fast, gm_least = fastest.build(ctx), get("merged_global@vanilla_size_ctx").build(ctx)
    assert fxlrd.count_params(gm_fast) <= ctx.vanilla_params
    speed = lambda gm: gm.fxlrd_plan.settings["global_search"]["measured_speedup"]  # noqa: E731
    assert speed(gm_fast) >= speed(gm_least)
    assert fastest.config(ctx) is config  # found once per case


def test_merged_optimized_at_vanilla_size_spends_vanilla_s_budget(tmp_path, monkeypatch):
    """The bisected ratio gives a merged, latency-searched model of at most vanilla LRD's
    parameters and more than the search keeps at α = 2 (synthetic cost timer)."""
    import fxlrd
    from benchmarks.variants import get

    model, x, ctx = _merge_case(tmp_path, monkeypatch, first_kernel=3)
    variant = get("merged_optimized@vanilla_ctx")
    config = variant.config(ctx)
    assert config.merge == "approximate" and config.latency.context == "neighbours" and 1.2 <= config.ratio <= 2.0
    gm = variant.build(ctx)
    assert gm.fxlrd_plan.decomposed and any(getattr(m, "fxlrd_merge", None) for m in gm.modules())
    at_two = get("merged_optimized_ctx").build(ctx)
    assert fxlrd.count_params(at_two) < fxlrd.count_params(gm) <= ctx.vanilla_params
    assert variant.config(ctx) is config  # found once per case


def test_merged_optimized_at_vanilla_size_is_skipped_where_nothing_merges(tmp_path, monkeypatch):
    import torch
    from torch import nn

    from benchmarks.variants import BuildContext, get

    _merge_case(tmp_path, monkeypatch, first_kernel=1)  # installs the synthetic timer
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32)).eval()
    ctx = BuildContext(None, model, torch.randn(2, 32), "onnxruntime", 1, tmp_path / "latency.json")
    variant = get("merged_optimized@vanilla_ctx")
    assert variant.config(ctx).ratio == 2.0
    assert variant.skip_reason(variant.build(ctx)) == "no layer decomposed with this config"


def test_quantum_variants_round_ranks_to_their_quantum(tmp_path):
    import torch
    from torch import nn

    from benchmarks.variants import BuildContext, get

    model = nn.Sequential(nn.Linear(256, 384), nn.ReLU(), nn.Linear(384, 256)).eval()  # α = 2: rank 76.8
    ctx = BuildContext(None, model, torch.randn(2, 256), "onnxruntime", 1, tmp_path / "latency.json")
    for name, rank in (("quantized_q8", 72), ("quantized_q32", 64)):
        assert [lp.ranks for lp in get(name).build(ctx).fxlrd_plan.decomposed] == [(rank,), (rank,)], name


def test_narrowed_variant_narrows_mlp_blocks_and_is_skipped_without_them(tmp_path):
    import torch
    from torch import nn

    from benchmarks.models import ModelSpec
    from benchmarks.variants import BuildContext, get

    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(32, 128), nn.GELU(), nn.Linear(128, 32)).eval()
    spec = ModelSpec("mlp", "test", lambda: mlp, lambda b: torch.randn(b, 32), lambda: [torch.randn(16, 32) for _ in range(4)])
    ctx = BuildContext(spec, mlp, torch.randn(2, 32), "onnxruntime", 1, tmp_path / "latency.json")
    variant = get("narrowed")
    gm = variant.build(ctx)
    (block,) = gm.fxlrd_plan.settings["narrowed"]
    assert 32 <= block["width"] <= 64  # α = 2: at most half the hidden neurons, rounded down to the rank quantum
    assert fxlrd_params(gm) < fxlrd_params(mlp) and variant.skip_reason(gm) is None
    assert get("narrowed+int8_dynamic").int8 == "int8-dynamic"

    plain = nn.Sequential(nn.Linear(32, 64), nn.Linear(64, 32)).eval()  # no activation between: not a block
    ctx = BuildContext(spec, plain, torch.randn(2, 32), "onnxruntime", 1, tmp_path / "latency.json")
    assert variant.skip_reason(variant.build(ctx)).startswith("no MLP block to narrow")


def test_searched_narrowed_variants_narrow_and_search_the_other_layers(tmp_path):
    """`narrowed_optimized_ctx` times the other layers' ranks in context; `narrowed_global@vanilla_ctx`
    runs global mode after narrowing, within vanilla's parameters."""
    import torch
    from torch import nn

    from benchmarks.models import ModelSpec
    from benchmarks.variants import BuildContext, get

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64)).eval()
    spec = ModelSpec("mlp", "test", lambda: model, lambda b: torch.randn(b, 64), lambda: [torch.randn(32, 64) for _ in range(4)])
    ctx = BuildContext(spec, model, torch.randn(8, 64), "eager", 1, tmp_path / "latency.json")
    for name in ("narrowed_optimized_ctx", "narrowed_global@vanilla_ctx"):
        gm = get(name).build(ctx)
        plan = gm.fxlrd_plan
        assert [(b["up"], b["down"]) for b in plan.settings["narrowed"]] == [("1", "3")], name
        assert plan.settings["latency"]["context"] == "neighbours", name
        assert plan["0"].latency is not None, name  # the layer that is not in a block was timed
        if name == "narrowed_optimized_ctx":
            assert "timed in a window" in plan["0"].latency["note"]
    assert name == "narrowed_global@vanilla_ctx" and fxlrd_params(gm) <= ctx.vanilla_params  # global mode's size budget
    assert plan.settings["global_search"]["narrowing_speedup"] > 0

    plain = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64)).eval()  # no MLP block: skipped without a search
    ctx = BuildContext(spec, plain, torch.randn(8, 64), "eager", 1, tmp_path / "latency.json")
    for name in ("narrowed_optimized_ctx", "narrowed_global@vanilla_ctx"):
        variant = get(name)
        assert variant.config(ctx).latency is None and variant.config(ctx).target_speedup is None, name
        assert variant.skip_reason(variant.build(ctx)).startswith("no MLP block to narrow"), name


def test_int8_twins_quantize_their_base_variant_s_model(tmp_path):
    import torch
    from torch import nn

    from benchmarks.variants import VARIANTS, BuildContext, get

    twins = [v for v in VARIANTS.values() if v.base]
    assert {v.name for v in twins} >= {"quantized+int8", "narrowed+int8", "narrowed+int8_dynamic", "global@vanilla+int8",
                                       "global_in_int8@vanilla+int8", "global@vanilla_ctx+int8"}  # fmt: skip
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32)).eval()
    ctx = BuildContext(None, model, torch.randn(2, 32), "onnxruntime", 1, tmp_path / "latency.json")
    for v in twins:
        base = get(v.base)
        assert v.int8 and not base.int8 and (v.searched, v.data_aware, v.narrows) == (base.searched, base.data_aware, base.narrows)
        assert (v.times_int8, v.retired) == (base.times_int8, base.retired), v.name
        if not v.retired:  # (a retired one's config raises its reason)
            assert repr(v.config(ctx)) == repr(base.config(ctx)), v.name



def fxlrd_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_docstring_corpus_reads_submodules_and_leaves_out_what_it_is_told():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import inspect
    import json.decoder

    import _real

    corpus = _real.docstring_corpus(("json",))
    paragraphs = (" ".join(p.split()) for p in inspect.getdoc(json.decoder.JSONDecoder).split("\n\n"))
    decoder = next(p for p in paragraphs if len(p.split()) >= 5)
    assert decoder in corpus  # a class of a submodule
    assert len(corpus) == len(set(corpus)) and all(len(p.split()) >= 5 and not p.startswith(">>>") for p in corpus)
    assert decoder not in _real.docstring_corpus(("json",), exclude={decoder})


def test_error_groups_puts_back_exactly_the_layers_left_out():
    """`benchmarks/error_groups.py` compresses one group alone: every other decomposed layer
    computes its original weight again."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import torch
    from torch import nn

    import error_groups
    import fxlrd
    from fxlrd import LRDConfig

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16)).eval()
    x = torch.randn(8, 16)
    gm = fxlrd.transform(model, LRDConfig(rank_rule="fixed", rank=2, rank_quantum=1), example_inputs=x)
    with torch.no_grad():
        assert torch.allclose(error_groups._only(gm, model, lambda n: False)(x), model(x), atol=1e-5)
        first_only = error_groups._only(gm, model, lambda n: n == "0")(x)
        expected = model[2](model[1](gm.get_submodule("0")(x)))
        assert torch.allclose(first_only, expected, atol=1e-5) and not torch.allclose(first_only, model(x), atol=1e-3)


def test_fidelity_methods_map_to_their_configs():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import fidelity

    class Case:
        include, sensitivity = ["encoder.*"], staticmethod(lambda outputs, inputs: outputs)

    narrow, calibrated = fidelity._config(Case(), "narrow+global+seq", 1.5)
    plain, _ = fidelity._config(Case(), "global+seq", 1.5)
    assert calibrated and narrow.mlp == "narrow" and plain.mlp == "factorize"
    assert (narrow.allocation, narrow.sequential, narrow.ratio) == ("global", True, 1.5)
    assert (plain.allocation, plain.sequential, plain.ratio) == ("global", True, 1.5)
    assert set(fidelity.METHODS) >= {"narrow+global+seq", "narrow+global+seq+distill", "global+seq+distill"}


def test_fidelity_int8_rows_run_the_quantized_files_and_compare_with_int8_alone():
    """``--int8``: the original and the chosen method's model are quantized by onnxruntime, their
    fidelity measured by running the int8 files (close to the float models', not identical)
    and timed with the others; a small CNN stands in for the real models."""
    import torch
    from torch import nn

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import fidelity

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()  # fmt: skip

    class Case(fidelity.EfficientNetCase):
        include, sensitivity, distill_loss = None, "kl", "kl"

        def __init__(self):
            self.model = model
            self.calibration = [torch.randn(8, 3, 16, 16) for _ in range(4)]
            self.held_out = torch.randn(64, 3, 16, 16)
            self.example = self.timing_input = self.calibration[0][:1]
            self.reference = self._logits(model)

    case = Case()
    out = fidelity.run_case(case, [2.0], ["whitened"], None, None, rounds=1, repeats=2, threads=1, int8=["whitened"])
    rows = {r["method"]: r for r in out["rows"]}
    assert set(rows) == {"int8", "whitened", "whitened+int8"}
    assert rows["int8"]["ratio"] == 1.0 and rows["int8"]["params"] == out["original"]["params"]
    assert rows["int8"]["int8_scheme"] == rows["whitened+int8"]["int8_scheme"] == "static"
    assert rows["whitened+int8"]["params"] == rows["whitened"]["params"] < rows["int8"]["params"]
    assert 0 < rows["int8"]["kl"] < 0.05 and rows["int8"]["top1_agreement"] >= 0.8  # int8, not the float model
    assert rows["whitened+int8"]["kl"] != rows["whitened"]["kl"]
    assert all(r["latency_ms"]["median_ms"] > 0 and r["speedup"] > 0 for r in rows.values())
    assert "| 1 | int8 |" in fidelity.report([{"date": "d", "command": "c", "environment": {"processor": "p", "cpus": 1,
                                                "torch": "t"}, "settings": {}, "cases": [out]}])  # fmt: skip


def test_fidelity_local_rows_refit_the_narrowed_blocks_and_skip_models_without_them():
    """``narrow+global+seq+local``: the narrowed model's MLP blocks refitted by
    `fxlrd.recover.reconstruct_mlps` on the distillation batches, reported per block; a model
    without MLP blocks has no such row."""
    import torch
    from torch import nn

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import fidelity

    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10)).eval()
    no_mlp = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 10)).eval()

    def case_of(model):
        class Case(fidelity.EfficientNetCase):
            include, sensitivity, distill_loss = None, "kl", "kl"
            local_steps, local_lr, local_batches = 50, 3e-3, 4

            def __init__(self):
                self.model = model
                self.calibration = [torch.randn(32, 16) for _ in range(4)]
                self.distill_batches = [torch.randn(32, 16) for _ in range(6)]
                self.held_out = torch.randn(128, 16)
                self.example = self.timing_input = self.calibration[0][:1]
                self.reference = self._logits(model)

        return Case()

    methods = ["narrow+global+seq", "narrow+global+seq+local"]
    out = fidelity.run_case(case_of(mlp), [2.0], methods, None, None, rounds=1, repeats=2, threads=1)
    rows = {r["method"]: r for r in out["rows"]}
    assert set(rows) == set(methods)
    local = rows["narrow+global+seq+local"]
    assert local["params"] == rows["narrow+global+seq"]["params"] and local["local_batches"] == 4
    (block,) = local["local_blocks"].values()
    assert block["positions"] == 4 * 32 and block["train_after"] < block["train_before"]
    assert local["kl"] != rows["narrow+global+seq"]["kl"] and local["speedup"] > 0
    out = fidelity.run_case(case_of(no_mlp), [2.0], methods, None, None, rounds=1, repeats=2, threads=1)
    assert [r["method"] for r in out["rows"]] == ["narrow+global+seq"]


# -- the GPU leg (run here on the CPU: the logic, not the speed) -------------------------------------------
def test_gpu_models_cast_once_per_dtype_and_reuse_the_model_at_every_batch(monkeypatch):
    import torch

    from benchmarks import speed

    monkeypatch.setenv(speed.GPU_DEVICE_VARIABLE, "cpu")
    torch.manual_seed(0)
    master = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3)).eval()
    gpu = speed.GpuModels({"m": master})
    for backend in ("cuda", "cuda_bf16"):
        for batch in (1, 4):
            gpu.runner("m", backend, torch.randn(batch, 6))()
    assert sorted(k[1] for k in gpu.ready) == ["torch.bfloat16", "torch.float32"]  # one model per dtype, any batch
    assert next(gpu.ready[("m", "torch.bfloat16")].parameters()).dtype == torch.bfloat16
    assert next(master.parameters()).dtype == torch.float32  # the master copy is never cast
    assert speed.gpu_dtype("cuda_compile_bf16") == torch.bfloat16 and speed.gpu_dtype("cuda_compile") == torch.float32


def test_gpu_channels_last_backends_put_weights_and_images_in_channels_last(monkeypatch):
    import torch

    from benchmarks import speed

    monkeypatch.setenv(speed.GPU_DEVICE_VARIABLE, "cpu")
    torch.manual_seed(0)
    master = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1)).eval()
    gpu = speed.GpuModels({"m": master})
    x = torch.randn(2, 3, 8, 8)
    gpu.runner("m", "cuda", x)()
    gpu.runner("m", "cuda_cl", x)()
    gpu.runner("m", "cuda_bf16_cl", x)()
    assert set(gpu.ready) == {("m", "torch.float32"), ("m", "torch.float32", "channels_last"),
                              ("m", "torch.bfloat16", "channels_last")}  # fmt: skip
    nhwc = gpu.ready[("m", "torch.float32", "channels_last")]
    assert nhwc[0].weight.is_contiguous(memory_format=torch.channels_last) and not nhwc[0].weight.is_contiguous()
    assert gpu.ready[("m", "torch.float32")][0].weight.is_contiguous()  # NCHW stays NCHW
    assert master[0].weight.is_contiguous()  # the master copy is never changed
    image = speed._to(x, "cpu", torch.float32, speed.gpu_layout("cuda_compile_bf16_cl"))
    assert image.is_contiguous(memory_format=torch.channels_last) and not image.is_contiguous()
    assert speed._to(torch.ones(2, 3), "cpu", torch.float32, torch.channels_last).is_contiguous()  # only 4-d tensors
    with torch.no_grad():
        torch.testing.assert_close(nhwc(image), master(x))
    assert speed.gpu_dtype("cuda_bf16_cl") == torch.bfloat16 and speed.gpu_dtype("cuda_compile_cl") == torch.float32
    assert speed.gpu_layout("cuda_bf16") == torch.contiguous_format


def test_gpu_inputs_keep_token_ids_integer():
    import torch

    from benchmarks import speed

    ids = torch.tensor([[1, 2, 3]])
    assert speed._to(ids, "cpu", torch.bfloat16).dtype == torch.int64
    assert speed._to(torch.ones(2), "cpu", torch.bfloat16).dtype == torch.bfloat16


def test_gpu_records_group_by_the_gpu_and_order_after_the_cpu_backends():
    gpu_machine = MACHINE | {"gpu": "NVIDIA H200"}
    runs = [make_run({"original": 2.0, "quantized": 1.0}, {"original": 100, "quantized": 50}, run=r, backend=b)
            for r in (1, 2, 3) for b in ("cuda", "cuda_compile_bf16")]  # fmt: skip
    for r in runs:
        r["machine"] = gpu_machine
    cpu = [make_run({"original": 2.0, "quantized": 1.5}, {"original": 100, "quantized": 50}, run=r) for r in (1, 2, 3)]
    groups = group(runs + cpu)
    assert {g.kind for g in groups if g.case["backend"].startswith("cuda")} == {"Test CPU · 2 CPUs · AVX2 · NVIDIA H200"}
    assert [g.kind for g in groups if g.case["backend"] == "onnxruntime"] == ["Test CPU · 2 CPUs · AVX2"]
    table = readme_table(runs + cpu, machine="H200", gpu=True)
    assert "cuda b1 | cuda_compile_bf16 b1" in table and "2.00×" in table and "onnxruntime b1" not in table
    assert "`python -m benchmarks gpu --models resnet50" in table and "report --readme --machine 'H200' --gpu`" in table
    cpu_table = readme_table(runs + cpu)  # the newest runs are the GPU ones: the CPU table still shows none of them
    assert "onnxruntime b1" in cpu_table and "cuda" not in cpu_table.split("Machine:")[0]


@pytest.mark.slow
def test_gpu_compiled_variant_keeps_its_graphs_across_batches_and_runners(monkeypatch):
    import torch
    from torch._dynamo.utils import counters

    from benchmarks import speed

    monkeypatch.setenv(speed.GPU_DEVICE_VARIABLE, "cpu")
    torch.manual_seed(0)
    torch._dynamo.reset()
    counters.clear()
    master = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.GELU(), torch.nn.Linear(5, 3)).eval()
    gpu = speed.GpuModels({"m": master})
    for batch in (1, 4, 7, 1, 4):  # one run's cases, then the same shapes again
        gpu.runner("m", "cuda_compile", torch.randn(batch, 6))()
    # batch 1 static, then one graph with a dynamic batch for 4 and 7; nothing recompiled after
    assert counters["stats"]["unique_graphs"] == 2
    x = torch.randn(5, 6)
    with torch.no_grad():
        torch.testing.assert_close(gpu.ready[("m", "torch.float32")](x), master(x))


def test_gpu_variant_that_failed_is_not_tried_again(monkeypatch):
    import torch

    from benchmarks import speed

    monkeypatch.setenv(speed.GPU_DEVICE_VARIABLE, "cpu")
    gpu = speed.GpuModels({"m": torch.nn.Linear(6, 3)})
    with pytest.raises(RuntimeError):
        gpu.runner("m", "cuda", torch.randn(2, 5))  # wrong width
    with pytest.raises(RuntimeError, match="failed before in this process"):
        gpu.runner("m", "cuda", torch.randn(2, 6))


def test_plots_of_a_case_where_only_the_original_ran(tmp_path):
    from benchmarks.plots import speed_plots

    runs = [make_run({"original": 2.0}, {"original": 100}, run=r) for r in (1, 2, 3)]
    for r in runs:
        r["failed"] = {"quantized": "RuntimeError: Tensor device mismatch"}
    written = speed_plots(group(runs), tmp_path)
    assert len(written) == 2 and all(p.stat().st_size > 0 for p in written)


def test_the_gpu_region_is_its_own_and_leaves_the_cpu_table_alone():
    cpu = replace_region(README, "cpu table")
    both = replace_region(cpu, "gpu table", region="bench-gpu")
    assert both.startswith(cpu[: cpu.index(README_END)]) and "### Benchmark suite on a GPU" in both
    again = replace_region(both, "new gpu table", region="bench-gpu")
    assert "cpu table" in again and "new gpu table" in again and "\ngpu table" not in again


def test_gpu_backends_search_eagerly_on_the_gpu_in_their_dtype(tmp_path, monkeypatch):
    import torch

    from benchmarks.variants import BuildContext

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # LatencyConfig(backend="cuda") checks for a GPU
    searched = {b: BuildContext(None, None, None, b, 1, tmp_path / "c.json").latency() for b in
                ("cuda", "cuda_compile", "cuda_bf16", "cuda_compile_bf16", "onnxruntime", "compile")}  # fmt: skip
    assert {b: (c.backend, c.dtype) for b, c in searched.items()} == {
        "cuda": ("cuda", None), "cuda_compile": ("cuda", None), "cuda_bf16": ("cuda", "bfloat16"),
        "cuda_compile_bf16": ("cuda", "bfloat16"), "onnxruntime": ("onnxruntime", None), "compile": ("compile", None)}  # fmt: skip


def test_variant_key_tells_searched_builds_apart():
    from benchmarks.speed import variant_key

    assert variant_key("optimized", {"dir": "/w/resnet50/cuda-b1/optimized"}) != variant_key(
        "optimized", {"dir": "/w/resnet50/cuda_bf16-b1/optimized"})
    assert variant_key("original", {}) == "original"


def test_gpu_suite_builds_once_per_dtype_and_times_the_backends_in_the_order_asked(tmp_path, monkeypatch):
    from benchmarks import suite

    spawned = []

    def fake_spawn(task):
        spawned.append(task)
        return 1 if task["step"] == "prepare" and task["backend"] == "cuda_bf16" and task["model"] == "vit_b_16" else 0

    monkeypatch.setattr(suite, "spawn", fake_spawn)
    monkeypatch.setattr(suite, "_summary", lambda *a, **k: None)
    inv = suite.Invocation.create(tmp_path, tmp_path / "work", ["gpu"], threads=1, runs=3, repeats=2, warmup=1)
    suite.run_gpu(inv, ["resnet50", "vit_b_16"], ["quantized"], ["cuda_compile_bf16", "cuda_compile", "cuda_bf16"], [1, 64])
    prepares = [(t["model"], t["backend"], t["search_backend"]) for t in spawned if t["step"] == "prepare"]
    assert prepares == [("resnet50", "cuda_bf16", "cuda_bf16"), ("resnet50", "cuda", "cuda"),
                        ("vit_b_16", "cuda_bf16", "cuda_bf16"), ("vit_b_16", "cuda", "cuda")]  # fmt: skip
    runs = [t for t in spawned if t["step"] == "speed_cases"]
    assert [t["backends"] for t in runs] == [["cuda_compile_bf16", "cuda_compile", "cuda_bf16"]] * 3 + [["cuda_compile"]] * 3
    assert runs[0]["manifests"]["cuda_compile_bf16"] == runs[0]["manifests"]["cuda_bf16"] != runs[0]["manifests"]["cuda_compile"]
    crashes = [r["case"]["backend"] for r in read(log_path(tmp_path, "speed"))]  # vit_b_16's bfloat16 build died
    assert crashes == ["cuda_compile_bf16", "cuda_bf16"]


def test_a_failed_run_is_shown_with_its_case(tmp_path, monkeypatch):
    from benchmarks import suite, worker

    monkeypatch.setattr(worker, "machine", lambda: MACHINE)
    monkeypatch.setattr(worker, "versions", lambda: THREE_RUNS[0]["versions"])
    good = THREE_RUNS[:2]
    task = {"step": "speed", "invocation": "test", "command": "c", "results": str(tmp_path), "workdir": str(tmp_path),
            "threads": 2, "runs": 3, "repeats": 20, "warmup": 3, "run": 3, "model": "resnet50", "backend": "onnxruntime",
            "batch": 1, "manifest": "m.json"}  # fmt: skip
    suite._record_crash(task, -9, "run 3")  # run 3 of the same case was killed: logged under its case, inputs and all
    (crash,) = read(log_path(tmp_path, "speed"))
    assert crash["case"] == good[0]["case"] and crash["error"]
    (g,) = group(good + [crash])
    assert (len(g.runs), len(g.failed)) == (2, 1)
    text = suite_markdown("speed", good + [crash])
    assert text.count("### resnet50 · onnxruntime · batch 1") == 1 and "2 runs (" in text and "and 1 failed" in text
    # a record of a run that died before its case was described (no input shapes, as older crash records):
    # with the one case it agrees with
    old = {**crash, "case": {"model": "resnet50", "backend": "onnxruntime", "batch": 1}}
    (g,) = group(good + [old])
    assert (len(g.runs), len(g.failed)) == (2, 1)
    # it agrees with two tables (2 and 1 threads recorded, but it names none): a section of its own, said so
    one = [make_run({"original": 1.0}, run=r, threads=1) for r in (1, 2)]
    unsure = old | {"settings": {"repeats": 20, "warmup": 3}}
    assert [(len(g.runs), len(g.failed)) for g in group(good + one + [unsure])] == [(2, 0), (2, 0), (0, 1)]
    assert "failed before their case was described" in suite_markdown("speed", good + one + [unsure])


def test_a_gpu_run_that_died_is_logged_under_each_case_it_left_without_a_record(tmp_path, monkeypatch):
    from benchmarks import suite, worker

    monkeypatch.setattr(worker, "machine", lambda: MACHINE | {"gpu": "H100"})
    monkeypatch.setattr(worker, "versions", lambda: THREE_RUNS[0]["versions"])
    monkeypatch.setattr(suite, "_summary", lambda *a, **k: None)

    def fake_spawn(task):
        if task["step"] == "speed_cases":  # the first case's record is written, then the process dies
            rec = make_run({"original": 1.0}, run=task["run"], backend="cuda", batch=1)
            append(log_path(tmp_path, "speed"), rec | {"invocation": task["invocation"]})
            return -9
        return 0

    monkeypatch.setattr(suite, "spawn", fake_spawn)
    inv = suite.Invocation.create(tmp_path, tmp_path / "work", ["gpu"], threads=1, runs=3, repeats=2, warmup=1)
    suite.run_gpu(inv, ["resnet50"], ["quantized"], ["cuda", "cuda_bf16"], [1, 8])
    crashes = [(r["run"], r["case"]["backend"], r["case"]["batch"], r["case"].get("inputs"))
               for r in read(log_path(tmp_path, "speed")) if r.get("error")]  # fmt: skip
    assert crashes == [(run, b, n, f"{n}×3×224×224") for run in (1, 2, 3) for b, n in
                       (("cuda", 8), ("cuda_bf16", 1), ("cuda_bf16", 8))]  # fmt: skip


def test_a_gpu_run_of_a_later_model_that_died_is_logged_too(tmp_path, monkeypatch):
    """The 'already logged' cases of a run were read from every model's records: once the first
    model had written run k for every case, a later model's process dying in run k left no record."""
    from benchmarks import suite, worker

    monkeypatch.setattr(worker, "machine", lambda: MACHINE | {"gpu": "H100"})
    monkeypatch.setattr(worker, "versions", lambda: THREE_RUNS[0]["versions"])
    monkeypatch.setattr(suite, "_summary", lambda *a, **k: None)

    def fake_spawn(task):
        if task["step"] == "speed_cases":
            if task["model"] == "resnet50":  # every case recorded
                for backend in task["backends"]:
                    for batch in task["batches"]:
                        rec = make_run({"original": 1.0}, run=task["run"], backend=backend, batch=batch)
                        rec["case"]["model"] = "resnet50"
                        append(log_path(tmp_path, "speed"), rec | {"invocation": task["invocation"]})
                return 0
            return -9  # the second model's process dies before writing anything
        return 0

    monkeypatch.setattr(suite, "spawn", fake_spawn)
    inv = suite.Invocation.create(tmp_path, tmp_path / "work", ["gpu"], threads=1, runs=3, repeats=2, warmup=1)
    suite.run_gpu(inv, ["resnet50", "vit_b_16"], ["quantized"], ["cuda"], [1])
    crashes = [(r["case"].get("model"), r["run"]) for r in read(log_path(tmp_path, "speed")) if r.get("error")]
    assert crashes == [("vit_b_16", run) for run in (1, 2, 3)]


def test_int8_variants_export_their_scheme(tmp_path, monkeypatch):
    """``prepare`` writes static int8 (QuantizeLinear, calibrated) and dynamic int8
    (DynamicQuantizeLinear, no calibration) ONNX files for the int8 variants of a BERT."""
    transformers = pytest.importorskip("transformers")
    import onnx
    import torch

    from benchmarks import models
    from benchmarks.build import prepare

    def bert():
        torch.manual_seed(0)
        cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                      intermediate_size=64, max_position_embeddings=64)  # fmt: skip
        return transformers.BertModel(cfg).eval()

    def tokens(batch, seed=0):
        ids = torch.randint(0, 100, (batch, 16), generator=torch.Generator().manual_seed(seed))
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    spec = models.ModelSpec("tiny_bert", "a tiny BERT", bert, tokens, lambda: [tokens(4, seed=s) for s in (1, 2)], tokens=True)
    monkeypatch.setitem(models.MODELS, "tiny_bert", spec)
    task = {"model": "tiny_bert", "backend": "onnxruntime", "search_backend": "onnxruntime", "batch": 1, "threads": 1,
            "variants": ["quantized", "int8", "int8_dynamic", "quantized+int8_dynamic"], "workdir": str(tmp_path)}  # fmt: skip
    from benchmarks import variants

    transforms = []
    real_transform = variants.fxlrd.transform
    monkeypatch.setattr(variants.fxlrd, "transform", lambda *a, **k: transforms.append(1) or real_transform(*a, **k))
    entries = json.loads(prepare(task).read_text())["variants"]
    assert len(transforms) == 1 and entries["quantized+int8_dynamic"]["dir"] == entries["quantized"]["dir"]  # built once
    ops = {name: {n.op_type for n in onnx.load(e["onnx"]).graph.node} for name, e in entries.items()}
    assert "QuantizeLinear" not in ops["quantized"] and "DynamicQuantizeLinear" not in ops["quantized"]
    assert "QuantizeLinear" in ops["int8"] and "DynamicQuantizeLinear" not in ops["int8"]
    for name in ("int8_dynamic", "quantized+int8_dynamic"):
        assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops[name] and "QuantizeLinear" not in ops[name], name
    transforms.clear()
    task["variants"] = ["quantized+int8"]  # its base already built in this case: read back, not built again
    assert json.loads(prepare(task).read_text())["variants"]["quantized+int8"]["dir"] == entries["quantized"]["dir"]
    assert not transforms


def test_dynamic_int8_is_for_transformers_only(tmp_path, monkeypatch):
    import torch
    from torch import nn

    from benchmarks import models
    from benchmarks.build import prepare
    from benchmarks.variants import Variant

    spec = models.ModelSpec("tiny_cnn", "a tiny CNN", lambda: nn.Sequential(nn.Conv2d(3, 4, 3)).eval(),
                            lambda batch: torch.randn(batch, 3, 8, 8), lambda: [torch.randn(2, 3, 8, 8)])  # fmt: skip
    monkeypatch.setitem(models.MODELS, "tiny_cnn", spec)
    task = {"model": "tiny_cnn", "backend": "onnxruntime", "search_backend": "onnxruntime", "batch": 1, "threads": 1,
            "variants": ["int8_dynamic"], "workdir": str(tmp_path)}  # fmt: skip
    entries = json.loads(prepare(task).read_text())["variants"]
    assert "for transformers" in entries["int8_dynamic"]["skipped"]
    with pytest.raises(ValueError, match="int8 must be None or one of"):
        Variant("typo", "a typo", None, int8="int8_dynamic")


def test_fidelity_plots_one_png_per_machine_kind(tmp_path):
    """Xeons with and without AMX report the same CPU model: the vector extensions tell them apart."""
    pytest.importorskip("matplotlib")
    from benchmarks import fidelity

    def run(extensions, cosine):
        env = {"processor": "Intel(R) Xeon(R) Processor", "vector_extensions": extensions}
        rows = [{"ratio": 1.5, "method": "global", "speedup": 1.2, "cosine": cosine}]
        return {"environment": env, "cases": [{"model": "minilm", "rows": rows}]}

    paths = fidelity.plot_machines([run("AVX2 AVX-512F", 0.9), run("AVX2 AVX-512F AMX", 0.8)], tmp_path)
    assert len(paths) == 2 and len(set(paths)) == 2 and all(p.stat().st_size > 0 for p in paths)


def test_demo_log_appends_every_run(tmp_path):
    """`make demo`'s figures are kept: each run appends a line (an earlier one is never rewritten)
    and the table lists every run with its machine, speed-ups and fidelity."""
    from benchmarks import demo_log

    def report(created: str, speedup: float, cosine: float) -> dict:
        return {"format": "fxlrd.report/1", "created": created, "command": ["fxlrd", "compress", "m"],
                "transform_s": 90.5, "params": {"ratio": 1.19}, "macs": {"ratio": 1.5},
                "latency": {"backend": "onnxruntime", "threads": 2, "repeats": 20, "batch": 8, "speedup": speedup,
                            "speedup_int8": 2.5},
                "fidelity": {"cosine": cosine}, "int8": {"scheme": "dynamic", "fidelity": {"cosine": 0.9548}}}  # fmt: skip

    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(json.dumps(report("2026-12-06T16:22:59+00:00", 1.3267, 0.96052)))
    second.write_text(json.dumps(report("2026-12-06T18:00:00+00:00", 1.2, 0.9)))
    assert demo_log.main([str(first), "--wall-s", "95", "--results", str(tmp_path)]) == 0
    kept = (tmp_path / "demo.jsonl").read_text()
    assert demo_log.main([str(second), "--results", str(tmp_path)]) == 0
    log = (tmp_path / "demo.jsonl").read_text()
    assert log.startswith(kept) and len(log.splitlines()) == 2
    table = (tmp_path / "demo.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| 2026")]
    assert len(rows) == 2 and rows[0].startswith("| 2026-12-06 18:00")  # newest first
    assert "| 95 | 90 | 1.33× | 0.9605 | 2.50× | 0.9548 |" in rows[1]
    assert "| – | 90 | 1.20× | 0.9000 |" in rows[0]
    with pytest.raises(ValueError, match="not an fxlrd compress report"):
        demo_log.record({"format": "other"})


def test_the_suites_dcgan_is_fed_what_the_zoo_says_it_takes():
    from benchmarks import models

    from fxlrd import zoo

    spec = models.get("dcgan")
    assert tuple(spec.inputs(1).shape) == zoo.input_shape("dcgan_generator")
    assert spec.build()(spec.inputs(2)).shape == (2, 3, 64, 64)


def test_the_suites_mixture_of_experts_runs_stacked_experts_that_fxlrd_factorizes():
    """The suite's MoE is built with batched_mm experts (what export captures and fxlrd
    factorizes); its dense-experts variant keeps them, and is skipped where there are none."""
    import warnings

    import torch

    import fxlrd
    from benchmarks import models, variants

    spec = models.get("moe")
    assert spec.tokens and tuple(spec.inputs(2)["input_ids"].shape) == (2, models.MOE_SEQUENCE)
    cfg = variants.get("quantized_dense_experts").config(None)
    assert cfg.experts == "keep" and cfg.ratio == 2
    small = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = fxlrd.transform(small, cfg, example_inputs=torch.randn(2, 4))
    assert "no stacked expert weights" in variants.get("quantized_dense_experts").skip_reason(gm)
    assert variants.get("quantized").skip_reason(gm) is None
    from test_experts import _WithLayer, _inputs  # a budget spent on the experts alone is a variant to time

    from fxlrd import LRDConfig

    model, x = _WithLayer().eval(), _inputs(d=32)
    gm = fxlrd.transform(model, LRDConfig(rank_quantum=8, include=["up", "down"], target_params=0.6), example_inputs=x,
                         capture="fx")  # fmt: skip
    assert not gm.fxlrd_plan.decomposed and variants.get("allocated@vanilla").skip_reason(gm) is None


def test_build_records_name_int8_timing_and_a_global_search_s_samples():
    from benchmarks.build import _config_summary
    from fxlrd import LatencyConfig, LRDConfig

    latency = LatencyConfig(threads=1, quantum=16, context="neighbours", quantize="int8", repeats=10, progress=False)
    summary = _config_summary(LRDConfig(target_speedup=1.5, latency=latency))
    assert summary["latency"] == {"backend": "onnxruntime", "threads": 1, "quantum": 16, "context": "neighbours",
                                  "quantize": "int8", "depth": 3, "model_repeats": 40}  # fmt: skip
    assert "model_repeats" not in _config_summary(LRDConfig(ratio=2, latency=LatencyConfig(threads=1)))["latency"]
