"""The append-only run log: one JSON line per run, per suite (``benchmarks/results/<suite>.jsonl``).

A run is one fresh Python process that timed every variant of one case taking turns. Nothing
is ever rewritten or dropped: a worse run stays in the log, a crashed run leaves a record with
its ``error``, and the report aggregates whatever is there.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping

__all__ = ["FORMAT", "RESULTS", "SUITES", "log_path", "append", "read", "now", "is_gpu_backend", "SETTINGS_FIELDS", "run_settings", "case_key",
           "by_invocation"]

FORMAT = "fxlrd.bench-run/1"
RESULTS = Path(__file__).resolve().parent / "results"
SUITES = ("speed", "training", "transform")


def log_path(results: Path, suite: str) -> Path:
    """The JSONL file of ``suite`` in the results directory ``results``."""
    return Path(results) / f"{suite}.jsonl"


def now() -> str:
    """The current UTC time as ISO 8601 (seconds)."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def append(path: Path, record: Mapping[str, Any]) -> None:
    """Append ``record`` as one JSON line to ``path``, under a lock, flushed to disk.

    The file is opened for appending only, so what is there already is never touched, and two
    processes appending at once interleave whole lines. When the file does not end with a
    newline (a run killed mid-write), the record starts on a new line, so it is read back whole.

    Args:
        path: the suite's JSONL file (created with its directory if needed).
        record: a JSON-ready mapping; it must not contain newlines once dumped (JSON never does).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(record, default=str, ensure_ascii=False) + "\n").encode("utf-8")
    with open(path, "ab+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            # a run killed mid-write leaves a torn last line: start on a new line, or this whole
            # record would be glued to the fragment and `read` would skip both
            end = f.seek(0, os.SEEK_END)
            if end:
                f.seek(end - 1)
                if f.read(1) != b"\n":
                    line = b"\n" + line
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def read(path: Path) -> list[dict[str, Any]]:
    """Every record in ``path`` (none if it does not exist), in the order they were written.

    A line that is not JSON (a run killed mid-write) is reported and skipped, not fatal.
    """
    if not Path(path).exists():
        return []
    out = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as exc:
            warnings.warn(f"{path}:{number} is not a JSON record ({exc}); skipped", stacklevel=2)
    return out


def is_gpu_backend(backend: Any) -> bool:
    """Whether a speed case's backend runs on a GPU (``cuda``, ``cuda_bf16``, ``cuda_compile``...)."""
    return str(backend or "").startswith("cuda")


SETTINGS_FIELDS = ("compile_settings", "gpu_settings")  # a run's settings recorded beside its figures


def run_settings(record: Mapping[str, Any]) -> dict[str, Any]:
    """Every setting a run recorded that its figures depend on: threads, repeats and warmup
    (``settings``), and, where recorded, how the backend compiled (``compile_settings``: CPU
    inductor freezing) and the GPU's settings (``gpu_settings``: TF32, cuDNN benchmark, dtype)."""
    out = dict(record.get("settings", {}))
    out |= {k: record[k] for k in SETTINGS_FIELDS if record.get(k) is not None}
    return out


def case_key(record: Mapping[str, Any]) -> str:
    """What must be equal for two runs to be pooled, besides the machine: the case
    (model, backend, batch, input shapes, layout...) and every setting of `run_settings`
    (threads, repeats, warmup, compile and GPU settings). Runs of other code (git commits)
    with equal settings are pooled; the report says how many commits a table spans."""
    return json.dumps({"case": dict(record.get("case", {})), "settings": run_settings(record)}, sort_keys=True, default=str)


def by_invocation(records: Iterable[Mapping[str, Any]], invocation: str) -> list[Mapping[str, Any]]:
    """The records of one command (all its runs)."""
    return [r for r in records if r.get("invocation") == invocation]
