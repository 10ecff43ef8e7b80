"""Per-shape dispatch for target ``cuda``: dense or semi-structured, chosen per rows-of-x bucket.

Semi-structured 2:4 GEMMs pay only once the multiply is compute-bound: at decode sizes (a few
rows of x) the weight is read once either way and the sparse kernels' fixed costs make them
slower than cuBLAS (0.11x in a public report), while prefill-sized inputs can gain 1.1-1.7x.
So a layer is timed dense vs sparse at each bucket of :data:`ROW_BUCKETS` and

- converted (dense weight dropped) where sparse wins at every bucket,
- kept dense where it wins at none,
- otherwise turned into a :class:`RowDispatchLinear` that holds both weights and runs, per
  call, the kernel that won at the call's bucket (``keep_dense=False`` keeps it dense instead).

A call with ``rows`` rows of x (``x.numel() // in_features``: batch times tokens) takes the
verdict of the smallest bucket ``>= rows``, or of the largest bucket beyond it (both kernels are
compute-bound there and scale alike). The buckets live here and nowhere else.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ROW_BUCKETS", "BucketTiming", "RowDispatchLinear", "row_bucket", "time_buckets"]

# Decode (1-16 rows) and prefill (256-4096 rows) sizes, in powers of 4.
ROW_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096)
_WARMUP, _ITERS, _REPEATS = 5, 20, 3

BucketTiming = dict[str, float]  # {"dense_ms", "sparse_ms", "speedup"}


def row_bucket(rows: int, buckets: Sequence[int] = ROW_BUCKETS) -> int:
    """The bucket whose verdict a call with ``rows`` rows of x takes."""
    i = bisect.bisect_left(buckets, rows)
    return buckets[min(i, len(buckets) - 1)]


def time_ms(fn: Callable[[], Any]) -> float:
    """Median over repeats of the mean time of ``fn()`` in ms, by CUDA events after warm-up."""
    for _ in range(_WARMUP):
        fn()
    times = []
    for _ in range(_REPEATS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(_ITERS):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / _ITERS)
    return sorted(times)[len(times) // 2]


@torch.no_grad()
def time_buckets(
    weight: torch.Tensor,
    sparse_weight: torch.Tensor,
    bias: torch.Tensor | None,
    buckets: Sequence[int],
    cache: dict[tuple, BucketTiming],
    timer: Callable[[Callable[[], Any]], float] = time_ms,
) -> dict[int, BucketTiming]:
    """Dense vs sparse ``F.linear`` time at each bucket, on random x of ``weight``'s dtype.

    Layers of one shape, dtype and bias-ness share timings through ``cache`` (a Llama has
    four distinct linear shapes), so lowering a deep model costs a few shapes' timings."""
    out: dict[int, BucketTiming] = {}
    for rows in buckets:
        key = (tuple(weight.shape), weight.dtype, bias is not None, rows)
        if key not in cache:
            x = torch.randn(rows, weight.shape[1], device=weight.device).to(weight.dtype)
            dense_ms = timer(lambda x=x: F.linear(x, weight, bias))
            sparse_ms = timer(lambda x=x: F.linear(x, sparse_weight, bias))
            cache[key] = {
                "dense_ms": dense_ms,
                "sparse_ms": sparse_ms,
                "speedup": dense_ms / sparse_ms if sparse_ms > 0 else float("inf"),
            }
        out[rows] = cache[key]
    return out


def describe(timings: dict[int, BucketTiming], sparse_rows: Sequence[int]) -> str:
    """``"sparse at rows 256-4096 (A-Bx), dense at rows 1-64 (sparse C-Dx)"``: the buckets
    each kernel runs and the range of measured dense/sparse time ratios there."""
    parts = []
    for label, group in (
        ("sparse", [r for r in timings if r in sparse_rows]),
        ("dense", [r for r in timings if r not in sparse_rows]),
    ):
        if not group:
            continue
        lo, hi = (f"{f(timings[r]['speedup'] for r in group):.2f}" for f in (min, max))
        span = f"{lo}x" if lo == hi else f"{lo}-{hi}x"
        rows = str(group[0]) if len(group) == 1 else f"{min(group)}-{max(group)}"
        what = span if label == "sparse" else f"sparse {span}"
        parts.append(f"{label} at rows {rows} ({what})")
    return ", ".join(parts)


class RowDispatchLinear(nn.Linear):
    """An ``nn.Linear`` that holds its dense weight and a semi-structured copy and runs, per
    call, the one that measured faster at the call's rows bucket.

    Made by swapping the class of an existing ``nn.Linear`` (as ``torch.nn.utils.parametrize``
    does), so references, hooks and ``isinstance(m, nn.Linear)`` checks keep working."""

    weight_sparse: nn.Parameter
    row_buckets: tuple[int, ...]
    sparse_buckets: frozenset[int]

    @classmethod
    def convert(
        cls,
        linear: nn.Linear,
        sparse_weight: torch.Tensor,
        buckets: Sequence[int],
        sparse_buckets: Sequence[int],
    ) -> RowDispatchLinear:
        """Turn ``linear`` (in place) into a dispatching layer; returns it."""
        linear.__class__ = cls
        linear.weight_sparse = nn.Parameter(sparse_weight, requires_grad=False)
        linear.row_buckets = tuple(buckets)
        linear.sparse_buckets = frozenset(sparse_buckets)
        return linear

    def uses_sparse(self, rows: int) -> bool:
        return row_bucket(rows, self.row_buckets) in self.sparse_buckets

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // max(x.shape[-1], 1)
        weight = self.weight_sparse if self.uses_sparse(rows) else self.weight
        return F.linear(x, weight, self.bias)

    def extra_repr(self) -> str:
        sparse = sorted(self.sparse_buckets)
        return f"{super().extra_repr()}, sparse_rows_buckets={sparse}"
