"""Per-call choice between the sparse kernel and dense ``F.linear``, from measured thresholds.

Decompress-in-register pays while a linear is memory-bound (few rows of x); from 32 rows of x the
kernels switch to a batched path that does only the kept multiply-adds, which usually keeps
sparse ahead of dense GEMM at any batch, but not on every machine, dtype and shape, so the
crossover (if any) is measured once per machine by :func:`calibrate`
(about ten seconds: for a cache-resident 1024x1024 and a memory-bound 4096x4096 weight, fp32
and bf16, patterns 2:4, 1:4, 1:8 and 4:8, batches 1, 2, 4, ... until sparse stops winning) and cached as
JSON in ``~/.cache/nmfx`` (or ``$NMFX_CACHE_DIR``). Other patterns use the calibrated pattern of
the nearest density at or above theirs (denser than 1/2: dense unless forced); fp16 uses bf16's. ``NMFX_DISPATCH`` or
:func:`force_dispatch` overrides the choice ("sparse", "dense" or "auto").
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from nmfx.kernels import _build
from nmfx.packed import PackedNM, _mask_bits_to_bytes
from nmfx.pattern import NMPattern

logger = logging.getLogger(__name__)

TABLE_VERSION = 4  # 2: per pattern as measured; 3: unbounded wins probed at 256; 4: 4:8 too
MODES = ("auto", "sparse", "dense")
_MODE_SET = frozenset(MODES)
DISPATCH_ENV = "NMFX_DISPATCH"
CACHE_ENV = "NMFX_CACHE_DIR"
# Sparse must beat dense by this factor at calibration to be chosen (noise margin).
WIN_MARGIN = 0.9
# Size classes by dense weight bytes: up to SMALL_MAX_BYTES the weight tends to stay in the
# last-level cache between calls and dense GEMV is fast; above it, GEMV is memory-bound.
SMALL_MAX_BYTES = 16 * 2**20
CALIB_SHAPES = {"small": (1024, 1024), "large": (4096, 4096)}
CALIB_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# Below this many weights sparse is not reliably faster, whatever the batch: the kernel's fixed
# cost per call (thread wake-up, staging) and, at large batches, staging x are a large share of
# a small weight's time. Measured on the 2-core AVX2 machine, 2:4 fp32, 1 to 1024 rows of x
# interleaved with F.linear: 128K weights (128x1024) ran 0.73-0.83x at 1 and 32 rows; 256K
# (512x512, 1024x256, 256x1024) 0.81-0.95x at 1 or 16 rows in some runs; from 512K (512x1024,
# 1024x512, 768x768) every batch ran 1.00-2.78x.
MIN_SPARSE_NUMEL = 1 << 19
CALIB_PATTERNS = ((2, 4), (1, 4), (1, 8), (4, 8))
CALIB_DTYPES = (torch.float32, torch.bfloat16)
# Seconds per (class, dtype, pattern) before calibration stops going to larger batches.
CALIB_BUDGET_S = 0.35
# max_sparse_batch of a pattern that still won at the largest calibrated batch.
UNBOUNDED_BATCH = 2**62
# A small parallel op slower than this (us) means other processes hold the cores.
CONTENDED_PROBE_US = 500.0
# Used when calibration is impossible (no kernels) or skipped with NMFX_CALIBRATE=0.
DEFAULT_MAX_SPARSE_BATCH = 4

# fp16 runs the same kernels as bf16 (16-bit loads, fp32 math) and uses its thresholds.
_DTYPE_KEYS = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "bfloat16"}

_local = threading.local()
_table_lock = threading.Lock()
_table: dict[str, Any] | None = None
_limits: dict[tuple[str, str, int, int], int] = {}


def _forced_mode() -> str:
    mode = getattr(_local, "mode", None) or os.environ.get(DISPATCH_ENV) or "auto"
    if mode not in _MODE_SET:
        raise ValueError(f"{DISPATCH_ENV}={mode!r} is not one of {MODES}")
    return mode


@contextlib.contextmanager
def force_dispatch(mode: str) -> Iterator[None]:
    """Within the block, run every nm_linear ``"sparse"``, ``"dense"`` or ``"auto"``."""
    if mode not in MODES:
        raise ValueError(f"dispatch mode {mode!r} is not one of {MODES}")
    previous = getattr(_local, "mode", None)
    _local.mode = mode
    try:
        yield
    finally:
        _local.mode = previous


def cache_dir() -> Path:
    """Where nmfx keeps its calibration table."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "nmfx")


def _machine_key() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(
                (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu
            )
    except OSError:
        pass
    return {
        "cpu": cpu,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "isas": _build.supported_isas(),
        "kernel_sources": _sources_digest(),
    }


def _sources_digest() -> str:
    h = hashlib.sha256()
    for name in (*_build.SOURCES, "nm_kernels.h"):
        path = _build.CSRC / name
        if path.exists():
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


def _table_path(machine: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(machine, sort_keys=True).encode()).hexdigest()[:12]
    return cache_dir() / f"dispatch-v{TABLE_VERSION}-{digest}.json"


def _synthetic(
    rows: int, cols: int, n: int, m: int, dtype: torch.dtype
) -> tuple[torch.Tensor, PackedNM]:
    """A dense weight and a packed N:M one of the same shape, built cheaply.

    Neither kernel's speed depends on the values or (for M in {4, 8}) on where the kept ones
    sit, so the packed weight keeps the first N of every M and the two need not match.
    """
    w = torch.randn(rows, cols).to(dtype)
    keep = torch.zeros(rows, cols // m, m, dtype=torch.bool)
    keep[..., :n] = True
    mask = _mask_bits_to_bytes(keep.reshape(rows, cols))
    values = torch.randn(rows, cols // m * n).to(dtype)
    return w, PackedNM(values=values, mask=mask, shape=(rows, cols), pattern=NMPattern(n, m))


def _calibrate_one(
    shape: tuple[int, int], dtype: torch.dtype, n: int, m: int, budget_s: float
) -> dict[str, Any]:
    rows, cols = shape
    w, p = _synthetic(rows, cols, n, m, dtype)
    isa = _build.ISA_CODES[_build.supported_isas()[-1]]
    op = torch.ops.nmfx_cpu.nm_gemm.default
    measured: list[dict[str, Any]] = []
    max_sparse = 0
    t_start = time.perf_counter()

    def race(x: torch.Tensor, min_reps: int = 4) -> dict[str, float]:
        # Interleaved, min over repeats (robust to other load); the first round is warm-up.
        best = {"dense": float("inf"), "sparse": float("inf")}
        t_batch = time.perf_counter()
        rep = 0
        while rep < min_reps or (rep < 25 and time.perf_counter() - t_batch < 0.04):
            for kind in ("dense", "sparse"):
                t0 = time.perf_counter()
                if kind == "dense":
                    F.linear(x, w)
                else:
                    op(x, p.values, p.mask, None, rows, cols, n, m, isa)
                if rep:
                    best[kind] = min(best[kind], time.perf_counter() - t0)
            rep += 1
        return best

    i = 0
    while i < len(CALIB_BATCHES):
        batch = CALIB_BATCHES[i]
        x = torch.randn(batch, cols, dtype=dtype)
        best = race(x)
        for _ in range(2):  # confirm a loss before stopping: one noisy round must not decide
            if best["sparse"] < WIN_MARGIN * best["dense"]:
                break
            again = race(x)
            best = {k: min(best[k], again[k]) for k in best}
        measured.append({"batch": batch, "sparse_s": best["sparse"], "dense_s": best["dense"]})
        if best["sparse"] >= WIN_MARGIN * best["dense"]:
            break
        max_sparse = batch
        elapsed = time.perf_counter() - t_start
        if elapsed > budget_s:
            break
        # Past a third of the budget, step 4x: a win at 4b implies one at 2b (larger batches
        # only favour dense), so skipping 2b loses nothing but the exact crossover.
        i += 1 if elapsed < budget_s / 3 else 2
    unbounded = False
    largest = CALIB_BATCHES[-1]
    if max_sparse and max_sparse < largest and measured[-1]["batch"] == max_sparse:
        # The budget ran out while sparse still won (slow dense kernels, e.g. bf16 without
        # native bf16 math, where sparse stays ~3x faster at 256 rows): probe the largest batch
        # once rather than send every larger batch to dense.
        x = torch.randn(largest, cols, dtype=dtype)
        best = race(x, min_reps=2)
        measured.append({"batch": largest, "sparse_s": best["sparse"], "dense_s": best["dense"]})
        if best["sparse"] < WIN_MARGIN * best["dense"]:
            max_sparse = largest
    if max_sparse == largest:
        # Past the largest batch both kernels are compute-bound and scale alike: a win there
        # holds for every larger batch.
        unbounded = True
        max_sparse = UNBOUNDED_BATCH
    return {"max_sparse_batch": max_sparse, "unbounded": unbounded, "measured": measured}


def calibrate(force: bool = False) -> dict[str, Any]:
    """Measure (or load from the cache) the sparse-vs-dense crossover for this machine."""
    global _table
    with _table_lock:
        machine = _machine_key()
        path = _table_path(machine)
        if not force and _table is not None and _table.get("machine") == machine:
            return _table
        if not force and path.exists():
            try:
                table = json.loads(path.read_text())
                if table.get("version") == TABLE_VERSION and table.get("machine") == machine:
                    _table = table
                    _limits.clear()
                    return table
            except (OSError, ValueError) as exc:
                logger.warning("ignoring unreadable dispatch table %s: %s", path, exc)
        table = _measure(machine)
        _table = table
        _limits.clear()
        if table["source"] == "measured":
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps(table, indent=1))
                tmp.replace(path)
            except OSError as exc:
                logger.warning("could not write dispatch table %s: %s", path, exc)
        return table


def _parallel_probe_us() -> float:
    """A small parallel op's latency: tens of us idle, thousands when contended."""
    from nmfx.reporting.timing import parallel_op_latency_us

    return parallel_op_latency_us(calls=30)


def _measure(machine: dict[str, Any]) -> dict[str, Any]:
    table: dict[str, Any] = {"version": TABLE_VERSION, "machine": machine, "entries": {}}
    if not _build.extension_available() or os.environ.get("NMFX_CALIBRATE", "1") == "0":
        table["source"] = "default"
        return table
    t0 = time.perf_counter()
    probe_us = [_parallel_probe_us()]
    with torch.inference_mode():
        for klass, shape in CALIB_SHAPES.items():
            for dtype in CALIB_DTYPES:
                for n, m in CALIB_PATTERNS:
                    entry = _calibrate_one(shape, dtype, n, m, CALIB_BUDGET_S)
                    table["entries"][f"{klass}/{_DTYPE_KEYS[dtype]}/{n}:{m}"] = entry
    probe_us.append(_parallel_probe_us())
    table["parallel_probe_us"] = probe_us
    # Another process holding a core stalls every parallel region (ms instead of us), which
    # skews the race; such a table serves this process but is not cached for the next.
    table["source"] = "measured" if max(probe_us) <= CONTENDED_PROBE_US else "measured-contended"
    if table["source"] != "measured":
        logger.warning(
            "nmfx dispatch calibrated on a busy machine (a small parallel op took %.0f us); "
            "the table is used by this process only and recalibrated next time",
            max(probe_us),
        )
    table["seconds"] = round(time.perf_counter() - t0, 2)
    logger.info("nmfx dispatch calibrated in %.1f s", table["seconds"])
    return table


def dispatch_table() -> dict[str, Any]:
    """The thresholds in use (calibrating first if this machine has no cached table).

    ``entries["<small|large>/<dtype>/<N>:<M>"]["max_sparse_batch"]``: the largest number of rows
    of x for which the sparse kernel runs; above it nm_linear runs dense ``F.linear``.
    """
    table = calibrate()
    return {**table, "path": str(_table_path(table["machine"]))}


def size_class(rows: int, cols: int, dtype: torch.dtype) -> str:
    """``"small"`` (likely cache-resident) or ``"large"`` (memory-bound) weight."""
    nbytes = rows * cols * dtype.itemsize
    return "small" if nbytes <= SMALL_MAX_BYTES else "large"


def max_sparse_batch(dtype: torch.dtype, n: int, m: int, rows: int, cols: int) -> int:
    """Largest number of rows of x that runs sparse for this weight."""
    klass = size_class(rows, cols, dtype)
    dkey = _DTYPE_KEYS.get(dtype, "float32")
    key = (klass, dkey, n, m)
    hit = _limits.get(key)
    if hit is None:
        table = _table if _table is not None else calibrate()
        hit = _lookup(table, klass, dkey, n, m)
        _limits[key] = hit
    return hit


def _lookup(table: dict[str, Any], klass: str, dkey: str, n: int, m: int) -> int:
    entries = table.get("entries", {})
    if not entries:
        return DEFAULT_MAX_SPARSE_BATCH if n / m <= 0.5 else 0
    exact = entries.get(f"{klass}/{dkey}/{n}:{m}")
    if exact is not None:
        return int(exact["max_sparse_batch"])
    # The calibrated pattern of the nearest density at or above this one (it moves at least as
    # many bytes per weight, so its crossover is a safe bound); none: stay dense.
    density = n / m
    candidates = []
    for name, entry in entries.items():
        k, d, pat = name.split("/")
        pn, pm = (int(v) for v in pat.split(":"))
        if k == klass and d == dkey and pn / pm >= density:
            candidates.append((pn / pm, int(entry["max_sparse_batch"])))
    return min(candidates)[1] if candidates else 0


def choose(batch: int, dtype: torch.dtype, n: int, m: int, rows: int, cols: int) -> str:
    """``"sparse"`` or ``"dense"`` for one call."""
    mode = _forced_mode()
    if mode != "auto":
        return mode
    if rows * cols < MIN_SPARSE_NUMEL:
        return "dense"
    return "sparse" if batch <= max_sparse_batch(dtype, n, m, rows, cols) else "dense"
