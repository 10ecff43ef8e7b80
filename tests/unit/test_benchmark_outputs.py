"""Benchmark scripts write to an untracked folder unless told otherwise.

A plain run used to overwrite the committed ``benchmarks/results/*.json`` that the README
quotes (after one run, ``--render`` no longer reproduced the README's table).
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

from benchmarks.accuracy import render as accuracy_render
from benchmarks.accuracy import run as accuracy_run
from benchmarks.oneshot import permutation_search, sparsegpt_layer, tinyllama, wanda_check
from benchmarks.oneshot import render as oneshot_render
from benchmarks.oneshot import run as oneshot_run

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))  # the scripts import their helpers as top-level
_timing = importlib.import_module("_timing")
cpu_kernels = importlib.import_module("cpu_kernels")
SCRIPTS = ["cpu_kernels", "decode_linears", "kernel_paths", "mask_speed", "onerow_bandwidth",
           "sparsify_time", "srste_step"]  # fmt: skip


def _untracked(path: Path) -> bool:
    """Under /out/, which .gitignore lists."""
    ignored = (ROOT / ".gitignore").read_text().split()
    rel = path.resolve().relative_to(ROOT)
    return "/out/" in ignored and rel.parts[0] == "out"


def test_default_outputs_are_untracked():
    defaults = [_timing.default_out(s) for s in SCRIPTS]
    defaults.append(cpu_kernels.build_parser().parse_args([]).out)
    defaults += [accuracy_run.DEFAULT_OUT, accuracy_run.TUNE_OUT, accuracy_render.DEFAULT_OUT]
    defaults += [oneshot_run.DEFAULT_OUT, oneshot_render.DEFAULT_OUT, sparsegpt_layer.OUT]
    defaults += [tinyllama.OUT, permutation_search.OUT, wanda_check.OUT]
    for path in defaults:
        assert _untracked(path), path
        assert "results" not in path.parts and "docs" not in path.parts, path


def test_write_json_uses_the_default_and_an_explicit_out(tmp_path, monkeypatch):
    monkeypatch.setattr(_timing, "OUT_DIR", tmp_path / "default")
    assert _timing.write_json("x", {"a": 1}) == tmp_path / "default" / "x.json"
    explicit = tmp_path / "results" / "x.json"
    assert _timing.write_json("x", {"a": 2}, explicit) == explicit
    assert json.loads(explicit.read_text()) == {"a": 2}


def test_render_reprints_the_committed_result(capsys):
    committed = ROOT / "benchmarks" / "results" / "cpu_kernels.json"
    cpu_kernels.main(["--render", str(committed)])
    assert "2:4" in capsys.readouterr().out


def test_timing_scripts_take_contend() -> None:
    """Every timing script that compares with dense can run beside N busy-looping processes."""
    import subprocess

    for script in ("contention", "cpu_kernels", "decode_linears", "kernel_paths", "mask_speed",
                   "onerow_bandwidth", "srste_step"):
        out = subprocess.run(
            [sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), "--help"],
            capture_output=True, text=True, check=True, cwd=ROOT,
        ).stdout  # fmt: skip
        assert "--contend N" in out, script
