"""The SR-STE benchmarks' heap control (``benchmarks/_heap.py``).

With glibc's default heap trimming, a step that frees its gradients (``zero_grad``) and
allocates them again (the backward) can fault every page of them back in, step after step;
``--malloc no-trim`` is how the SR-STE benchmarks take that out of a dense/sparse ratio.
These tests pin the mechanism the README's figures rest on: the fault counter counts, and
under no-trim a freed and reallocated 16 MB costs no page faults.
"""

from __future__ import annotations

import importlib
import mmap
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))  # the scripts import their helpers as top-level
_heap = importlib.import_module("_heap")

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def test_counting_faults_counts_the_pages_a_call_touches_first():
    size = 4 << 20

    def touch() -> None:
        buf = mmap.mmap(-1, size)  # fresh anonymous pages: each first write faults
        for off in range(0, size, mmap.PAGESIZE):
            buf[off] = 1
        buf.close()

    fns, counts = _heap.counting_faults({"touch": touch, "nothing": lambda: None})
    fns["touch"]()
    fns["nothing"]()
    fns["touch"]()
    assert len(counts["touch"]) == 2 and len(counts["nothing"]) == 1
    assert min(counts["touch"]) >= size // mmap.PAGESIZE // 2
    assert counts["nothing"][0] < size // mmap.PAGESIZE // 8


def test_default_mode_changes_nothing_and_unknown_modes_are_errors():
    assert _heap.set_malloc("default") == {"mode": "default"}
    with pytest.raises(ValueError, match=r"--malloc 'trim-less'.*'default', 'no-trim'"):
        _heap.set_malloc("trim-less")


_REALLOC = textwrap.dedent(
    """
    import ctypes, ctypes.util, json, sys
    sys.path.insert(0, {bench!r})
    import _heap
    done = _heap.set_malloc({mode!r})
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    size, page = 4 << 20, 4096

    def round_trip():
        ptrs = [libc.malloc(size) for _ in range(4)]  # 16 MB, like 4 gradients
        before = _heap.minor_faults()
        for p in ptrs:
            ctypes.memset(p, 1, size)
        faults = _heap.minor_faults() - before
        for p in ptrs:
            libc.free(p)
        return faults

    faults = [round_trip() for _ in range(4)]
    print(json.dumps({{"done": done, "faults": faults}}))
    """
)


@pytest.mark.skipif(not GLIBC, reason="mallopt's trim settings are glibc's")
def test_no_trim_keeps_freed_gradients_resident():
    """Each process: 4 rounds of malloc 16 MB, write it, free it. Under no-trim the heap
    keeps the pages, so the rounds after the first fault nothing in."""
    import json

    out = {}
    for mode in ("no-trim", "default"):
        code = _REALLOC.format(bench=str(ROOT / "benchmarks"), mode=mode)
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        out[mode] = json.loads(run.stdout)
    pages = (16 << 20) // 4096
    no_trim = out["no-trim"]
    assert no_trim["done"]["mode"] == "no-trim"
    assert no_trim["faults"][0] >= pages // 2  # the first round grows the heap
    assert max(no_trim["faults"][1:]) < pages // 16
    # With glibc's defaults the same rounds fault the pages in again at least once
    # (the freed chunks are unmapped or trimmed): what no-trim takes away.
    assert max(out["default"]["faults"][1:]) >= pages // 2
