"""``import nmfx`` stays light: networkx and tabulate load when a graph or a table is built.

A process that only runs a lowered model (loaded with ``torch.load``, say) never builds an op
graph or prints a table; networkx alone is ~10 MB resident (issue 15: peak RSS of a lowered
model's process). Checked in a fresh interpreter, since this one may have imported them already.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LAZY = ("networkx", "tabulate")


def run_python(code: str) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_import_nmfx_loads_neither_networkx_nor_tabulate_until_used() -> None:
    seen = run_python(
        "import json, sys, torch\n"
        f"lazy = {LAZY!r}\n"
        "import nmfx, nmfx.lowering.cpu, nmfx.kernels\n"
        "after_import = [m for m in lazy if m in sys.modules]\n"
        "model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), "
        "torch.nn.Linear(32, 4))\n"
        "nmfx.sparsify(model)\n"
        "table = str(nmfx.summary(model))\n"
        "print(json.dumps({'after_import': after_import, "
        "'after_use': [m for m in lazy if m in sys.modules], 'table': table}))\n"
    )
    assert seen["after_import"] == []
    assert seen["after_use"] == list(LAZY)  # sparsify built the op graph, summary a table
    assert "verdict" in seen["table"]  # the table tabulate rendered
