"""glibc's heap trimming, which decides which of two interleaved models pays page faults.

A training step with ``zero_grad(set_to_none=True)`` frees its weight gradients and the
backward allocates them again. When the freed gradients sit at the top of glibc's heap,
``free`` returns them to the OS (the top chunk exceeds ``M_TRIM_THRESHOLD``) and the next
backward faults every page back in (11-13 ms per 16 MB of fresh pages, measured on the
shared Zen 4 host). With two models stepped in one process (dense and sparse, interleaved), whichever
model's gradients end up on top pays it, step after step; which one that is depends on
the order of the first allocations, not on what the model computes. ``--malloc no-trim``
turns trimming off for the whole process, so neither side faults and the ratio measures
the steps' own work; the default leaves glibc as it is. Every step's minor faults are
counted either way and saved with the timings.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import resource
from collections.abc import Callable
from typing import Any

MALLOC_MODES = ("default", "no-trim")
_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
_M_MMAP_THRESHOLD = -3
_NO_TRIM = 1 << 30  # never trim: the heap keeps its high-water mark
_MMAP_MAX = 32 << 20  # glibc's largest mmap threshold on 64-bit: 4 MB gradients stay on the heap


def minor_faults() -> int:
    """Minor page faults of this process so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def set_malloc(mode: str) -> dict[str, Any]:
    """Apply ``mode`` ("default": nothing; "no-trim": glibc stops returning heap memory to
    the OS) to this process; returns what was done, for the JSON. Must run before the
    models are built so their first allocations already see it."""
    if mode not in MALLOC_MODES:
        raise ValueError(f"--malloc {mode!r}: expected one of {MALLOC_MODES}")
    if mode == "default":
        return {"mode": mode}
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is None or not hasattr(libc, "mallopt"):
        raise RuntimeError(
            f"--malloc no-trim needs glibc's mallopt, not found in {name!r}; run with --malloc "
            f"default on this system"
        )
    ok = [libc.mallopt(_M_TRIM_THRESHOLD, _NO_TRIM), libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_MAX)]
    if not all(ok):
        raise RuntimeError(f"mallopt refused the no-trim settings (returned {ok})")
    return {"mode": mode, "trim_threshold": _NO_TRIM, "mmap_threshold": _MMAP_MAX}


def counting_faults(
    fns: dict[str, Callable[[], Any]],
) -> tuple[dict[str, Callable[[], Any]], dict[str, list[int]]]:
    """``fns`` wrapped so that each call's minor page faults are appended to a list per name."""
    counts: dict[str, list[int]] = {k: [] for k in fns}

    def wrap(name: str, fn: Callable[[], Any]) -> Callable[[], Any]:
        def call() -> Any:
            before = minor_faults()
            out = fn()
            counts[name].append(minor_faults() - before)
            return out

        return call

    return {k: wrap(k, f) for k, f in fns.items()}, counts
