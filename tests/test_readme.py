"""Every ```python block of the README runs as written: a newcomer copies them.

The blocks run in order in one namespace (a later block may use an earlier block's names,
as in one script), in a fresh interpreter in the repository root, so a pruner that a block
registers does not leak into the other tests. Shell blocks (```bash) are not executed.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTHON_FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.DOTALL | re.MULTILINE)

RUNNER = textwrap.dedent(
    """
    import json, sys, traceback
    blocks = json.load(sys.stdin)
    namespace = {"__name__": "__main__"}
    for number, code in enumerate(blocks, 1):
        try:
            exec(compile(code, f"<README python block {number}>", "exec"), namespace)
        except BaseException:
            traceback.print_exc()
            sys.exit(f"README python block {number} of {len(blocks)} raised (traceback above).")
    """
)


def python_blocks(markdown: str) -> list[str]:
    """The bodies of the ```python fenced blocks of `markdown`, in order."""
    return PYTHON_FENCE.findall(markdown)


def run_blocks(blocks: list[str]) -> subprocess.CompletedProcess:
    """Execute `blocks` in order in one namespace of a fresh interpreter (cwd: the repository)."""
    env = dict(os.environ, WANDB_MODE="disabled")
    return subprocess.run(
        [sys.executable, "-c", RUNNER],
        input=json.dumps(blocks),
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
    )


def test_extractor_takes_python_blocks_only():
    markdown = "text\n```bash\nmake test\n```\n```python\nx = 1\n```\nmore\n```python\ny = x + 1\n```\n"
    assert python_blocks(markdown) == ["x = 1\n", "y = x + 1\n"]


def test_a_raising_block_fails_the_check():
    result = run_blocks(["x = 1\n", "raise ValueError('boom')\n"])
    assert result.returncode != 0
    assert "README python block 2 of 2 raised" in result.stderr
    assert "ValueError: boom" in result.stderr


def test_every_readme_python_block_runs():
    blocks = python_blocks((ROOT / "README.md").read_text())
    assert len(blocks) >= 2, "the README should show the API in runnable python blocks"
    result = run_blocks(blocks)
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
