"""Per-call choice of kernel path or dense for a packed weight, and its overrides.

A lowered module carries its per-bucket choices as one int (``dispatch`` code, see
:mod:`nmfx.kernels._autotune`), set by :func:`nmfx.kernels.autotune` at lowering; a packed weight
called without one (``nm_linear(x, packed)``) is tuned on its first call (cached on disk like
any other). ``NMFX_DISPATCH`` or :func:`force_dispatch` overrides the choice: ``"auto"``,
``"sparse"`` (the best ISA's own path), ``"dense"``, or one named path (e.g. ``"avx2-select"``).
A code naming an ISA this CPU lacks (a module tuned elsewhere) runs the nearest supported path,
with one warning; never an illegal instruction.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from typing import Any

import torch

from nmfx.kernels import _autotune, _build
from nmfx.kernels._autotune import BUCKETS, CHOICES, UNTUNED, ShapeKey

MODES = ("auto", "sparse", *CHOICES)
_MODE_SET = frozenset(MODES)
DISPATCH_ENV = "NMFX_DISPATCH"

_local = threading.local()
# The choice and bucket lookups below run on every eager call (dozens per decoded token), so
# they are table lookups: bucket by rows of x up to the last bucket's start, ISA by choice.
_BUCKET_BY_ROWS = tuple(_autotune.bucket_of(rows) for rows in range(BUCKETS[-1][0] + 1))
_LAST_BUCKET = len(BUCKETS) - 1
_CHOICE_ISA = {c: _autotune.choice_isa(c) for c in CHOICES}
# Per-call memo of tuned choices by shape, for weights called without a dispatch code
# (``None``: rebuilt on demand; tests reset it).
_table: dict[ShapeKey, list[str]] | None = None


def env(name: str) -> str | None:
    """``os.environ.get(name)`` without its cost on a missing name (a raised and caught
    KeyError, microseconds; read per call here). Same result: CPython's ``os.environ`` writes
    through to ``_data``, keyed by the encoded name."""
    if _ENV_DATA is None:
        return os.environ.get(name)
    key = _ENV_KEYS.get(name)
    if key is None:
        key = _ENV_KEYS[name] = os.environ.encodekey(name)  # type: ignore[attr-defined]
    raw = _ENV_DATA.get(key)
    return None if raw is None else os.environ.decodevalue(raw)  # type: ignore[attr-defined]


_ENV_DATA = getattr(os.environ, "_data", None)
if not isinstance(_ENV_DATA, dict) or not hasattr(os.environ, "encodekey"):
    _ENV_DATA = None
_ENV_KEYS: dict[str, object] = {}


def _forced_mode() -> str:
    mode = getattr(_local, "mode", None) or env(DISPATCH_ENV) or "auto"
    if mode not in _MODE_SET:
        raise ValueError(
            f"{DISPATCH_ENV}={mode!r} is not one of {list(MODES)}; unset it or pick one"
        )
    return mode


@contextlib.contextmanager
def force_dispatch(mode: str) -> Iterator[None]:
    """Within the block, run every nm_linear ``"sparse"``, ``"dense"``, ``"auto"`` or one path
    (``"avx2-expand"``, ``"avx2-select"``, ``"avx2-panels"``, ``"avx512-expand"``,
    ``"avx512-select"`` (the AVX-512 selecting GEMV for fp32 2:4 and 4:8 at one row of x; other
    weights run ``"avx2-select"``), ``"avx512-panels"``, ``"avx512bf16-panels"`` (bf16 dot
    products for bf16 weights; other weights run ``"avx512-panels"``), ``"avx512bf16-gemv"``
    (the bf16 dot-product GEMV for bf16 weights; other weights run the AVX-512 kernel's own
    pick), ``"avx512bf16-pairs"`` (the bf16 pair GEMM for bf16 weights of 2:4, 4:8, 1:4 and
    1:8; others as for the GEMV),
    ``"avx512bf16-vnni"`` (the bf16 slab GEMM for bf16 weights of patterns whose M divides 32;
    others as for the GEMV),
    ``"portable"``; one this CPU lacks is an error at the call)."""
    if mode not in _MODE_SET:
        raise ValueError(f"dispatch mode {mode!r} is not one of {list(MODES)}")
    from nmfx.kernels import _cpp_linear  # compiled graphs' C++ op defers to Python meanwhile

    previous = getattr(_local, "mode", None)
    _local.mode = mode
    _cpp_linear.force_block(+1)
    try:
        yield
    finally:
        _local.mode = previous
        _cpp_linear.force_block(-1)


def dispatch_table() -> dict[str, Any]:
    """Every shape tuned in this process: host key, cache file, buckets, per-shape choices and
    the times measured (ms per choice per bucket)."""
    return _autotune.table()


def dispatch_choices(code: int) -> dict[str, str]:
    """A module's dispatch code as ``{bucket: choice}`` (e.g. ``{"1": "avx2-select", ...}``)."""
    if code == UNTUNED:
        return {}
    labels = _autotune.table()["buckets"]
    return dict(zip(labels, _autotune.decode(code), strict=True))


def dispatch_summary(code: int) -> str:
    """A module's dispatch code in words: ``"avx2-select at 1 row, avx512-expand at 2-16,
    dense at 17+ rows of x"`` (runs of equal buckets merged)."""
    if code == UNTUNED:
        return "untuned (tuned on first call)"
    runs: list[list] = []
    for (lo, hi), choice in zip(_autotune.BUCKETS, _autotune.decode(code), strict=True):
        if runs and runs[-1][0] == choice:
            runs[-1][2] = hi
        else:
            runs.append([choice, lo, hi])
    parts = []
    for choice, lo, hi in runs:
        span = f"{lo}+" if hi is None else (str(lo) if lo == hi else f"{lo}-{hi}")
        parts.append(f"{choice} at {span}")
    return ", ".join(parts) + " rows of x"


def _untuned_choices(key: ShapeKey) -> list[str]:
    global _table
    memo = _table
    if memo is None:
        memo = _table = {}
    hit = memo.get(key)
    if hit is None:
        hit = memo[key] = list(_autotune.autotune([key], progress=False)[key]["choices"])
    return hit


def _runnable(choice: str) -> str:
    """``choice``, or the nearest one this CPU runs (a table tuned on another host)."""
    isa = _CHOICE_ISA[choice]
    if isa is None or isa in _build.supported_isas():
        return choice
    path = choice.partition("-")[2]
    # The same path on the best ISA that has it, else the best ISA's own pick ("sparse"; e.g.
    # for the bf16 dot-product GEMV, which no other ISA has; on a CPU without AVX2, the one
    # portable path, named as such).
    supported = _build.supported_isas()
    fallback = next(
        (f"{other}-{path}" for other in ("avx512", "avx2")
         if other in supported and f"{other}-{path}" in CHOICES),
        "portable" if supported == ["portable"] else "sparse",
    )  # fmt: skip
    _autotune._warn_once(
        f"isa:{choice}",
        f"nmfx: this module's dispatch table names {choice!r}, which this CPU cannot run "
        f"(supported: {_build.supported_isas()}); running {fallback!r} instead. Lower the "
        f"model again on this host to tune it here",
    )
    return fallback


def choose(
    batch: int, dtype: torch.dtype, n: int, m: int, rows: int, cols: int, code: int = UNTUNED
) -> str:
    """``"dense"``, ``"sparse"`` (the ISA's own path) or a choice of :data:`CHOICES`."""
    mode = _forced_mode()
    if mode == "sparse" or mode == "dense":
        return mode
    if mode != "auto":
        isa = _autotune.choice_isa(mode)
        if isa is not None and isa not in _build.supported_isas():
            raise ValueError(
                f"{DISPATCH_ENV}/force_dispatch {mode!r} needs ISA {isa!r}, which this CPU "
                f"lacks (supported: {_build.supported_isas()}); use 'auto' or another path"
            )
        return mode
    bucket = _BUCKET_BY_ROWS[batch] if batch < len(_BUCKET_BY_ROWS) else _LAST_BUCKET
    if code == UNTUNED:
        choice = _untuned_choices(_autotune.shape_key(rows, cols, dtype, n, m))[bucket]
    else:
        choice = _autotune.choice_at(code, bucket)
    return _runnable(choice)


def path_for(layer: Any, rows_of_x: int) -> str:
    """The path a lowered layer (``NMLinear``) runs for a call with ``rows_of_x`` rows of x now
    (overrides included): ``"dense"``, ``"sparse"`` or a choice of :data:`CHOICES`. For reports
    that must say which path ran."""
    return choose(
        rows_of_x, layer.values.dtype, layer.n, layer.m, layer.out_features, layer.in_features,
        layer.dispatch,
    )  # fmt: skip
