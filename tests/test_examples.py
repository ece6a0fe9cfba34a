"""The examples run as written and print what the prefill did."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_prune_tiny_llava_prints_the_prefills_per_layer_counts():
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "prune_tiny_llava.py")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(": ", 1) for line in result.stdout.splitlines() if ": " in line)
    counts = ast.literal_eval(lines["visual tokens per decoder layer"])
    # fastv before layer 2 keeps round(576 * 0.25) = 144 of LLaVA-1.5's 576 visual tokens
    assert counts == [576, 576] + [144] * 6
    assert float(lines["average visual tokens per layer"]) == (2 * 576 + 6 * 144) / 8
