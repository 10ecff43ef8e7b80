"""The one tolerance table of the test suite: for each kind of comparison, by dtype.

Every numeric test takes its ``rtol``/``atol`` from here (``**tol(kind, dtype)``), so how
close "close" is, and why, is stated once. Kinds:

- ``exact``: the same ops in the same order: bit for bit.
- ``step``: one optimizer step against the SR-STE equations written out (fp32 rounding of
  one update).
- ``reorder``: the same math with the reduction order changed (DDP/FSDP ranks against one
  process, fused masks against the reference, fp32 references of lower-precision runs).
- ``kernel``: nmfx's N:M kernels against an fp32 reference (outputs rounded to the dtype;
  bf16/fp16 accumulate in fp32 but round inputs and outputs).
- ``fuzz``: sparsify -> finalize outputs on random models (hypothesis), by dtype.
- ``lowered_layer``: one lowered or compiled layer against its dense reference.
- ``lowered_model``: a whole lowered or compiled model (errors add up over layers).
"""

from __future__ import annotations

import torch

__all__ = ["TOL", "tol"]

_F32, _F16, _BF16, _F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64

TOL: dict[str, dict[torch.dtype, dict[str, float]]] = {
    "exact": {d: {"rtol": 0.0, "atol": 0.0} for d in (_F64, _F32, _F16, _BF16)},
    "step": {_F32: {"rtol": 0.0, "atol": 1e-7}},
    "reorder": {
        _F32: {"rtol": 1e-5, "atol": 1e-6},
        _F16: {"rtol": 1e-3, "atol": 1e-3},
        _BF16: {"rtol": 1e-2, "atol": 1e-2},
    },
    "kernel": {
        _F32: {"rtol": 1e-5, "atol": 1e-4},
        _BF16: {"rtol": 1.6e-2, "atol": 2e-2},
        _F16: {"rtol": 2e-3, "atol": 2e-3},
    },
    "fuzz": {
        _F64: {"rtol": 1e-12, "atol": 1e-12},
        _F32: {"rtol": 1e-5, "atol": 1e-6},
        _BF16: {"rtol": 1.6e-2, "atol": 1e-2},
    },
    "lowered_layer": {_F32: {"rtol": 1e-4, "atol": 1e-5}},
    "lowered_model": {_F32: {"rtol": 1e-4, "atol": 1e-4}},
}


def tol(kind: str, dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """``{"rtol": ..., "atol": ...}`` for ``kind`` and ``dtype`` (a KeyError names both)."""
    try:
        return dict(TOL[kind][dtype])
    except KeyError:
        raise KeyError(f"no tolerance for kind={kind!r}, dtype={dtype}: add it to TOL") from None
