"""The README's quick start runs as written (issue 13 item 19)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def first_python_block() -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(r"```python\n(.*?)```", text, re.S)
    assert match, "README.md has no python block"
    return match.group(1)


def test_readme_quick_start_runs_and_lowers_layers():
    code = first_python_block()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=600, cwd=ROOT, env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "nmfx report: target=cpu" in out and "end to end (measured, not summed)" in out
    sparse_rows = [line for line in out.splitlines() if re.search(r"\s2:4\s+sparse\s", line)]
    assert len(sparse_rows) >= 3, out[-3000:]  # the quick start lowers real layers, not none
