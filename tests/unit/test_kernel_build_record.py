"""A process whose kernels were built before loads the library directly (no
``torch.utils.cpp_extension``, which pulls in setuptools: ~5 MB resident) when nmfx's record
names the very file built for the same sources, flags and torch; anything else builds/loads as
before and rewrites the record."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from nmfx.kernels import _build

pytestmark = pytest.mark.skipif(
    not _build.extension_available(), reason="the C++ kernels are unavailable here"
)

# Loads the kernels in a fresh process; prints whether cpp_extension was imported and whether
# a lowered layer's output matches F.linear on its dense weight.
_SCRIPT = """
import json, sys
import torch
from nmfx.kernels import _build
ok = _build.extension_available()
from nmfx.lowering.cpu import NMLinear
torch.manual_seed(0)
lin = torch.nn.Linear(64, 16)
with torch.no_grad():
    lin.weight.mul_(torch.tensor([1.0, 0.0, 1.0, 0.0]).repeat(16, 16))  # 2:4 along dim 1
    x = torch.randn(3, 64)
    match = torch.allclose(NMLinear.from_linear(lin, "2:4")(x), lin(x), rtol=1e-5, atol=1e-5)
print(json.dumps({"ok": ok, "cpp_extension": "torch.utils.cpp_extension" in sys.modules,
                  "match": bool(match)}))
"""


def _load_in_fresh_process(cache) -> dict:
    env = {**os.environ, "NMFX_CACHE_DIR": str(cache)}
    run = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True,
                         env=env, check=True)  # fmt: skip
    return json.loads(run.stdout.splitlines()[-1])


def _record(cache) -> dict:
    return json.loads((cache / _build.BUILT_RECORD).read_text())


def test_second_process_loads_the_recorded_library_without_cpp_extension(tmp_path) -> None:
    first = _load_in_fresh_process(tmp_path)
    assert first == {"ok": True, "cpp_extension": True, "match": True}
    record = _record(tmp_path)
    assert record["key"] == _build.build_key() and record["path"].endswith(".so")
    second = _load_in_fresh_process(tmp_path)
    assert second == {"ok": True, "cpp_extension": False, "match": True}


@pytest.mark.parametrize("stale", ["key", "stat", "path"])
def test_a_stale_record_builds_and_loads_as_before(monkeypatch, tmp_path, stale) -> None:
    """Other sources, flags or torch (key), a library rebuilt since (size/mtime), a missing
    file: never loaded from the record; the normal build/load runs and records anew."""
    monkeypatch.setenv("NMFX_CACHE_DIR", str(tmp_path))
    _build._record_built()  # this process's library, as a first process records it
    record = _record(tmp_path)
    good = dict(record)
    record[stale] = {"key": "0" * 20, "stat": [1, 2], "path": str(tmp_path / "gone.so")}[stale]
    (tmp_path / _build.BUILT_RECORD).write_text(json.dumps(record))
    assert _load_in_fresh_process(tmp_path) == {"ok": True, "cpp_extension": True, "match": True}
    assert _record(tmp_path) == good


def test_the_build_key_follows_the_sources(monkeypatch, tmp_path) -> None:
    key = _build.build_key()
    (tmp_path / "nm_ops.cpp").write_text((_build.CSRC / "nm_ops.cpp").read_text() + "\n// x\n")
    monkeypatch.setattr(_build, "CSRC", tmp_path)
    assert _build.build_key() != key
