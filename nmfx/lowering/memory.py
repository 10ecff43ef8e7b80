"""Hand the memory that lowering freed back to the OS.

Lowering to CPU frees every dense weight it packs. glibc's ``malloc`` serves blocks below its
dynamic mmap threshold (which grows up to 32 MiB as large blocks are freed) from its heap and
keeps them there once freed, so without this step the process stays resident at about its
dense size: a 4-layer TinyLlama-sized Llama in bf16 stayed at 1558 MB after lowering and
decoded at 1.04x the dense model's resident memory; after ``malloc_trim(0)``, 979 MB.
Elsewhere than glibc (macOS, musl without the symbol) this does nothing.

What a step dropped is freed at once unless a reference cycle still holds it: ``torch.export``'s
leftovers of sparsify's capture (HF models) hold the model's modules and weights until Python's
cyclic GC next runs, so a lowered 1024-wide Llama still held the dense weights it had replaced.
:func:`release_dropped` collects first when 64 MB or more of what was dropped is still alive.

Autotuning leaves memory of its own: the kernels keep per-thread staging buffers sized by the
largest call a thread ran, and the tuner probes up to 512 rows of x. On a 4-layer TinyLlama-sized
Llama (fp32, one thread) that was ~90 MB resident in a model that then decodes one row at a
time; :func:`release_kernel_scratch` frees them once tuning is done.

Lowering also decides where the packed weights live. Once a process has freed a large block
(finalize's masks, the dense weights), glibc's dynamic mmap threshold has risen to up to 32 MiB
and every packed buffer, and every temporary of packing and tuning, comes from the heap. Each
temporary freed between two buffers that stay leaves a hole: after lowering a 22-layer
TinyLlama-sized Llama (fp32) the heap held 1.2 GB of holes between the packed weights.
``malloc_trim`` hands their pages back, but ``generate`` then reuses them for its activations
and faults them in again: with tuning off, its peak RSS rose 23 MB over the trimmed RSS, 11-12 MB
with :func:`large_blocks_mapped` around lowering, which gives each block of 128 KiB or more
(glibc's initial threshold) that no free heap chunk fits its own mapping while lowering runs,
unmapped when freed. In the 22-layer benchmark (cold tuning cache) the peak of ``generate``
fell from 2818 to 2806 MB and the peak of ``lower`` from 9.3 to 7.7 GB.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import os
import sys
import weakref
from collections.abc import Iterator

import torch

__all__ = [
    "large_blocks_mapped",
    "release_dropped",
    "release_freed_memory",
    "release_kernel_scratch",
]

log = logging.getLogger("nmfx.lowering")

# When this many bytes of what a step dropped are still alive, a full garbage collection runs
# first (0.1-0.3 s with torch and transformers imported; 0.9 GB of masks or 4.4 GB of dense
# weights on a 22-layer TinyLlama-sized Llama are worth it, a small model's are not).
COLLECT_FROM_BYTES = 64 << 20

# glibc's mallopt parameters (malloc.h) and thresholds on 64-bit: its initial mmap threshold,
# the most its dynamic threshold rises to (DEFAULT_MMAP_THRESHOLD_MAX) and the trim threshold
# it then sets (twice that).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
LOWERING_MMAP_THRESHOLD = 128 << 10
MMAP_THRESHOLD_MAX = 32 << 20
TRIM_THRESHOLD_AT_MAX = 2 * MMAP_THRESHOLD_MAX
# A process that set glibc's thresholds itself keeps them.
_USER_MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def release_dropped(dropped: list[tuple[weakref.ref, int]]) -> bool:
    """Hand what a step dropped (``(weakref, bytes)`` of each object) back to the OS: a full
    collection first when ``COLLECT_FROM_BYTES`` or more of it is still alive (only cycles
    hold it by then), then ``malloc_trim``. True when it collected."""
    alive = sum(nbytes for ref, nbytes in dropped if ref() is not None)
    collect = bool(alive) and alive >= COLLECT_FROM_BYTES
    if collect:
        log.debug("%.0f MB dropped but still alive: collecting", alive / 2**20)
        gc.collect()
    release_freed_memory()
    return collect


def release_freed_memory() -> bool:
    """``malloc_trim(0)`` where the C library has it; True when it returned memory."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    released = bool(trim(0))
    log.debug("malloc_trim(0): %s", "released memory" if released else "nothing")
    return released


def release_kernel_scratch() -> bool:
    """Free the C++ kernels' per-thread buffers (``nmfx_cpu::release_scratch``) when they hold
    any; True when they did. Later calls grow them again to what those calls need."""
    from nmfx.kernels import _build

    if not _build.loaded() or torch.ops.nmfx_cpu.scratch_stats()[0] == 0:
        return False
    torch.ops.nmfx_cpu.release_scratch()
    return True


def _mallopt() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    """glibc's ``mallopt``, or None (not Linux/glibc, or the process tuned malloc itself)."""
    if not sys.platform.startswith("linux"):
        return None
    if any(os.environ.get(k) for k in _USER_MALLOC_ENV) or "glibc.malloc" in os.environ.get(
        "GLIBC_TUNABLES", ""
    ):
        return None
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt


@contextlib.contextmanager
def large_blocks_mapped() -> Iterator[bool]:
    """While inside, glibc serves each block of ``LOWERING_MMAP_THRESHOLD`` or more that no
    free heap chunk fits with its own mapping, unmapped when freed: the packed weights and the
    temporaries of packing and tuning leave no holes in the heap. Yields whether it applied
    (glibc, and no malloc tuning of the process's own).

    After it, the thresholds are those glibc's dynamic threshold reaches once a process has
    freed a 32 MiB block (mmap 32 MiB, trim 64 MiB), fixed: glibc stops adjusting them once
    set. A process that lowers a model of TinyLlama's size has freed such blocks before."""
    mallopt = _mallopt()
    if mallopt is None:
        yield False
        return
    applied = bool(mallopt(_M_MMAP_THRESHOLD, LOWERING_MMAP_THRESHOLD))
    try:
        yield applied
    finally:
        if applied:
            mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)
            mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_AT_MAX)
