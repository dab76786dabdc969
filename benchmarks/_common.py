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
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": " ".join(sys.argv), **payload}
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=1, default=str) + "\n")
    env = payload.get("environment", {})
    env_line = ", ".join(f"{k}={v}" for k, v in env.items())
    settings = ", ".join(f"{k}={v}" for k, v in payload.get("settings", {}).items())
    text = f"# {name}\n\n{payload['date']} — `{payload['command']}`\n\nEnvironment: {env_line}\n\nSettings: {settings}\n\n{markdown}\n"
    (RESULTS / f"{name}.md").write_text(text)
    print(f"\nwrote {RESULTS / (name + '.json')} and .md")
