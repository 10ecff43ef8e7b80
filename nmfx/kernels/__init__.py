"""CPU execution of packed N:M weights: ``nm_linear`` and its controls.

``nm_linear(x, p, bias)`` equals ``F.linear(x, unpack(p), bias)`` within dtype tolerance. It runs
one of the C++ kernel paths in ``nmfx/csrc`` (AVX-512, AVX2 or portable; built on first use) or
the dense branch (W expanded per call, block by block, then torch's GEMM; no dense copy is
kept), whichever :func:`autotune` measured fastest on this host for the weight's shape and the
call's rows of x (see :func:`dispatch_table`). Importing this module builds nothing.

Controls: ``NMFX_ISA`` / :func:`use_isa` force an ISA; ``NMFX_ISA_CAP`` / :func:`use_isa_cap` run
as a CPU without the ISAs above one would (tests emulate AVX2-only and portable hosts with it);
``NMFX_DISPATCH`` / :func:`force_dispatch` force sparse, dense or one path; ``NMFX_CALIBRATE=0``
skips timing (each ISA's default paths); ``NMFX_DISABLE_KERNELS=1`` skips the build.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch

from nmfx.kernels import _build, _cpp_linear, _dispatch, _ops
from nmfx.kernels._autotune import BUCKETS, CHOICES, shape_key
from nmfx.kernels._dispatch import (
    dispatch_choices,
    dispatch_summary,
    dispatch_table,
    force_dispatch,
    path_for,
)
from nmfx.packed import PackedNM

__all__ = [
    "BUCKETS",
    "CHOICES",
    "autotune",
    "available_isas",
    "build_error",
    "current_isa",
    "dense_call_reason",
    "dispatch_choices",
    "dispatch_summary",
    "dispatch_table",
    "encode_choices",
    "force_dispatch",
    "kernels_available",
    "nm_linear",
    "path_for",
    "set_isa",
    "set_isa_cap",
    "use_isa",
    "use_isa_cap",
]


def nm_linear(x: torch.Tensor, p: PackedNM, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``y = x @ W.T + bias`` for a packed N:M weight ``W = unpack(p)``; x is ``[..., cols]``."""
    if not isinstance(p, PackedNM):
        raise TypeError(f"nm_linear expects a PackedNM weight, got {type(p).__name__}; use pack(w)")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"nm_linear expects x to be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 0 or x.shape[-1] != p.cols:
        raise ValueError(
            f"x has shape {tuple(x.shape)} but the packed weight {p.shape} needs "
            f"x.shape[-1] == cols={p.cols}; pass x with {p.cols} features in its last dim"
        )
    if x.dtype != p.dtype:
        raise TypeError(
            f"x is {x.dtype} but the packed weight is {p.dtype}; cast x with x.to({p.dtype})"
        )
    if x.device.type != "cpu":
        raise ValueError(f"nm_linear runs on CPU; x is on {x.device}, move it with x.cpu()")
    if bias is not None:
        if tuple(bias.shape) != (p.rows,):
            raise ValueError(
                f"bias has shape {tuple(bias.shape)}, expected ({p.rows},) = rows of the weight"
            )
        if bias.dtype != p.dtype:
            raise TypeError(f"bias is {bias.dtype} but the weight is {p.dtype}; cast the bias")
    n, m = p.pattern.n, p.pattern.m
    if _ops.eager_fast_path_ok(x, bias):
        return _ops.compute(x, p.values, p.mask, bias, p.rows, p.cols, n, m)
    return torch.ops.nmfx.nm_linear(x, p.values, p.mask, bias, p.rows, p.cols, n, m)


def autotune(weights: Iterable[object], progress: bool = True) -> dict[str, dict[str, str]]:
    """Tune (or load from the cache) every distinct shape among ``weights`` and return
    ``{"<rows>x<cols>/<dtype>/<N>:<M>": {bucket of rows of x: choice}}``.

    ``weights``: lowered modules (``NMLinear``; each gets its per-bucket choices as its
    ``dispatch`` attribute, which travels with it through ``torch.save``, ``deepcopy`` and
    ``torch.export``) or :class:`PackedNM` weights. A tqdm bar shows when tuning takes over 2 s.
    """
    from nmfx.kernels import _autotune
    from nmfx.kernels.module import PackedLinearBase

    items = list(weights)
    keys = []
    for w in items:
        if isinstance(w, PackedLinearBase):
            keys.append(shape_key(w.out_features, w.in_features, w.values.dtype, w.n, w.m))
        elif isinstance(w, PackedNM):
            keys.append(shape_key(w.rows, w.cols, w.dtype, w.pattern.n, w.pattern.m))
        else:
            raise TypeError(f"autotune expects lowered modules or PackedNM, got {type(w).__name__}")
    entries = _autotune.autotune(keys, progress=progress)
    for w, key in zip(items, keys, strict=True):
        if isinstance(w, PackedLinearBase):
            w.dispatch = _autotune.encode(entries[key]["choices"])
    labels = _autotune.table()["buckets"]
    return {
        str(k): dict(zip(labels, e["choices"], strict=True)) for k, e in entries.items()
    }


def dense_call_reason(p: PackedNM) -> str | None:
    """Why lowering should keep this weight's layer as ``nn.Linear``: the autotuner timed
    ``F.linear`` at least as fast as the lowered call (kernel plus the lowered module's call
    overhead) at every bucket of rows of x, which happens for small layers only. None
    otherwise, and always when tuning is off or ``NMFX_DISPATCH`` forces a mode."""
    from nmfx.kernels import _autotune, _callcost

    if not _autotune.tuning_enabled() or _dispatch._forced_mode() != "auto":
        return None
    key = shape_key(p.rows, p.cols, p.dtype, p.pattern.n, p.pattern.m)
    entry = _autotune.autotune([key], progress=False)[key]
    if not entry.get("linear_ms"):
        return None
    return _callcost.dense_call_reason(entry, _callcost.module_call_overhead_ms())


def encode_choices(choices: dict[str, str]) -> int:
    """``{bucket: choice}`` (as :func:`autotune` returns per shape) as a layer's ``dispatch``."""
    from nmfx.kernels import _autotune

    return _autotune.encode(list(choices.values()))


def kernels_available() -> bool:
    """Build (first call only) and load the C++ kernels; ``False`` means nmfx runs dense."""
    return _build.extension_available()


def build_error() -> BaseException | None:
    """The build/load error when :func:`kernels_available` is ``False``."""
    return _build.build_error()


def available_isas() -> list[str]:
    """ISA paths runnable here, from ``"portable"``, ``"avx2"``, ``"avx512"``, ``"avx512bf16"``
    (AVX-512 plus the bf16 dot-product path; never picked by ``"auto"``) (builds first)."""
    return _build.supported_isas()


def current_isa() -> str:
    """The forced ISA path, or ``"auto"`` (best supported)."""
    return _ops.current_isa()


def set_isa(name: str | None) -> None:
    """Force an ISA path for every later call (``None`` or ``"auto"``: back to automatic)."""
    if name not in (None, "auto", *_build.ISA_CODES):
        raise ValueError(f"ISA {name!r} is not one of {['auto', *_build.ISA_CODES]}")
    if name not in (None, "auto") and name not in _build.supported_isas():
        raise ValueError(
            f"ISA path {name!r} is not supported on this CPU (supported: "
            f"{_build.supported_isas()}); use one of those or 'auto'"
        )
    _ops._isa_override[0] = None if name == "auto" else name
    _cpp_linear.overrides_changed()


@contextlib.contextmanager
def use_isa(name: str) -> Iterator[None]:
    """Force an ISA path within the block."""
    previous = _ops._isa_override[0]
    set_isa(name)
    try:
        yield
    finally:
        _ops._isa_override[0] = previous
        _cpp_linear.overrides_changed()


def set_isa_cap(name: str | None) -> str:
    """Run every later call as on a CPU without the ISAs above ``name`` (``"portable"``,
    ``"avx2"``, ``"avx512"``, ``"avx512bf16"``; ``None``: no cap, what cpuid says): kernel
    choices, :func:`available_isas`, the autotuner and its cache file all follow. Returns the
    previous cap. ``NMFX_ISA_CAP`` sets it for a whole process (read when the kernels load)."""
    previous = _build.set_isa_cap(name)
    _dispatch._table = None  # per-shape choices tuned under the old cap
    if _cpp_linear.READY[0]:  # the C++ op's choice codes: a path above the cap goes to Python
        torch.ops.nmfx_cpu.set_linear_table(*_cpp_linear.tables())
    return previous


@contextlib.contextmanager
def use_isa_cap(name: str | None) -> Iterator[None]:
    """:func:`set_isa_cap` within the block."""
    previous = set_isa_cap(name)
    try:
        yield
    finally:
        set_isa_cap(previous)
