"""Shared by the benchmark scripts: environment header and result files."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from fxlrd.timing import environment

RESULTS = Path(__file__).resolve().parent / "results"


def header(title: str, settings: dict) -> dict:
    env = environment()
    print(f"# {title}")
    print("environment: " + ", ".join(f"{k}={v}" for k, v in env.items()))
    print("settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    return env


def write(name: str, payload: dict, markdown: str) -> None:
    """Append the run to ``results/<name>.jsonl`` (every run is kept there), and write the latest
    run as ``<name>.json`` and ``<name>.md``. A ``<name>.json`` written before the log existed is
    copied into the log first, so no earlier run is lost."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": " ".join(sys.argv), **payload}
    log, latest = RESULTS / f"{name}.jsonl", RESULTS / f"{name}.json"
    with open(log, "a") as f:
        if f.tell() == 0 and latest.exists():
            f.write(json.dumps(json.loads(latest.read_text()), default=str) + "\n")
        f.write(json.dumps(payload, default=str) + "\n")
    latest.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    env = payload.get("environment", {})
    env_line = ", ".join(f"{k}={v}" for k, v in env.items())
    settings = ", ".join(f"{k}={v}" for k, v in payload.get("settings", {}).items())
    text = (f"# {name}\n\n{payload['date']} — `{payload['command']}` (the latest run; every run is in `{name}.jsonl`)"
            f"\n\nEnvironment: {env_line}\n\nSettings: {settings}\n\n{markdown}\n")  # fmt: skip
    (RESULTS / f"{name}.md").write_text(text)
    print(f"\nwrote {RESULTS / (name + '.json')} and .md")
