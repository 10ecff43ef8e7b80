"""Small layers whose lowered call loses to ``nn.Linear`` once its Python overhead is counted.

The autotuner times the C++ ops. A lowered layer's call also runs Python that ``nn.Linear``'s
does not (``NMLinear.forward`` and its checks): since its eager call runs the C++ op
``nmfx_cpu::nm_linear`` (the tuned choice settled in C++) instead of the Python op and its
dispatch lookup, about a microsecond, down from ~4 (the demo MLP's 1024x64 layer had run 0.54x,
0.041 vs 0.022 ms, as "sparse"); still as much as part of a small layer's GEMV. So for layers the autotuner also timed as ``F.linear``
(``linear_ms``, up to ``LINEAR_REF_MAX_BYTES``), lowering keeps the layer as ``nn.Linear`` when,
at every bucket of rows of x, the tuned choice's time plus :func:`module_call_overhead_ms` is
not faster than ``F.linear`` (within the tuner's noise margin). The overhead is measured once
per process on a tiny layer: the lowered module's call over its op, less ``nn.Linear``'s call
over ``F.linear``.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nmfx.kernels import _autotune, _dispatch, _ops

_overhead: list[float] = []  # ms, measured once per process
OVERHEAD_ROUNDS = 300


def module_call_overhead_ms() -> float:
    """What a lowered layer's call costs over its kernel, beyond ``nn.Linear``'s over
    ``F.linear`` (ms; measured on the first use in a process, then remembered)."""
    if not _overhead:
        _overhead.append(_measure_overhead_ms())
    return _overhead[0]


def _measure_overhead_ms() -> float:
    from nmfx.lowering.cpu import NMLinear
    from nmfx.packed import pack

    rows, cols = 16, 64
    linear = nn.Linear(cols, rows)
    with torch.no_grad():
        linear.weight.view(rows, -1, 4)[..., 2:] = 0
    layer = NMLinear(pack(linear.weight.detach(), "2:4"), linear.bias)
    key = _autotune.shape_key(rows, cols, torch.float32, 2, 4)
    layer.dispatch = _autotune.encode(_autotune.default_entry(key)["choices"])
    choice = _dispatch.choose(1, torch.float32, 2, 4, rows, cols, layer.dispatch)
    x = torch.randn(1, cols)
    args = (x, layer.values, layer.mask, layer.bias, rows, cols, 2, 4)
    if choice == "dense":
        op, extra = torch.ops.nmfx_cpu.nm_dense.default, ()
    else:
        op, extra = torch.ops.nmfx_cpu.nm_gemm.default, (_ops._kernel_code(choice),)
    fns = {
        "lowered": lambda: layer(x),
        "op": lambda: op(*args, *extra),
        "nn.Linear": lambda: linear(x),
        "F.linear": lambda: F.linear(x, linear.weight, linear.bias),
    }
    best = dict.fromkeys(fns, float("inf"))
    with torch.no_grad():
        for fn in fns.values():
            fn()
        for _ in range(OVERHEAD_ROUNDS):  # interleaved; the fastest round of each
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                best[name] = min(best[name], time.perf_counter() - t0)
    extra_s = (best["lowered"] - best["op"]) - (best["nn.Linear"] - best["F.linear"])
    return max(extra_s, 0.0) * 1e3


def dense_call_reason(entry: dict[str, Any], overhead_ms: float) -> str | None:
    """Why the layer of this tuned ``entry`` should stay ``nn.Linear`` (``F.linear`` measured
    at least as fast as the lowered call at every bucket, overhead included), or None."""
    linear, timings = entry.get("linear_ms"), entry.get("ms")
    if not linear or not timings or len(linear) != len(timings):
        return None
    lowered = []
    for choice, ms in zip(entry["choices"], timings, strict=True):
        lowered.append(ms.get(choice, min(ms.values())) + overhead_ms)
    if any(low * (1 + _autotune.NOISE_MARGIN) < lin for low, lin in zip(lowered, linear, strict=True)):
        return None
    return (
        f"kept as nn.Linear: measured no slower than the lowered layer at every bucket of rows "
        f"of x, call overhead included (1 row: F.linear {linear[0] * 1e3:.1f} us vs "
        f"{lowered[0] * 1e3:.1f} us, {overhead_ms * 1e3:.1f} us of it the lowered call's "
        f"overhead)"
    )
