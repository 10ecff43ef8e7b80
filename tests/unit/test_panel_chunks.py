"""The batched (x panel) path works chunk by chunk of 1024 columns and tile by tile of weight
rows (``nmfx/csrc/nm_panels.h``): offsets decoded once per tile and chunk, accumulators kept over
a chunk, chunks narrowed to 128-512 columns when many rows of x would not fit L2.

What could break there and the kernel sweep's shapes would not show: a chunk boundary (columns
past 1024, a last chunk that is not whole 128-column slices), the chunk narrowing (hundreds of
rows of x), tiles cut short (rows not a multiple of the 3/6-row tile), several panels of x
sharing one decode, and threads splitting x as well as W. Every case is checked against
``F.linear`` on each x86 ISA this host runs (AVX2 and AVX-512; the portable kernel has no
panel path and must still match), and the thread split must not change a bit.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tolerances import TOL

import nmfx.kernels as K
from nmfx.kernels import _build
from nmfx.packed import pack


def _isas() -> list:
    """Each ISA path this host runs under the cap (``NMFX_ISA_CAP``), the portable one too."""
    out = []
    for isa in ("portable", "avx2", "avx512"):
        runs = K.kernels_available() and isa in K.available_isas()
        out.append(pytest.param(isa, id=isa, marks=pytest.mark.skipif(
            not runs, reason=f"this CPU (or NMFX_ISA_CAP) does not run the {isa} kernels")))  # fmt: skip
    return out


def _random_nm(rows: int, cols: int, pattern: str, dtype: torch.dtype, seed: int) -> torch.Tensor:
    n, m = (int(v) for v in pattern.split(":"))
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols // m, m, generator=g)
    idx = w.abs().topk(n, dim=-1).indices
    return torch.zeros_like(w).scatter_(-1, idx, w.gather(-1, idx)).reshape(rows, cols).to(dtype)


def _panels(x, p, bias, rows: int, cols: int, pattern: str, isa: str) -> torch.Tensor:
    n, m = (int(v) for v in pattern.split(":"))
    code = _build.ISA_CODES[isa] | _build.PATH_PANELS
    return torch.ops.nmfx_cpu.nm_gemm(x, p.values, p.mask, bias, rows, cols, n, m, code)


@pytest.fixture(autouse=True)
def _private(kernel_defaults) -> None:
    assert K.kernels_available()


# (pattern, weight rows, columns): 2:4 over 2 whole chunks and a 48-column tail; 1:8 and 4:8
# just past one chunk; 2:16 (no fixed count per mask byte: the popcount decode) over 2 chunks;
# rows leave a short tile (70 = 11 x 6 + 4 = 23 x 3 + 1).
CHUNK_CASES = [("2:4", 70, 2096), ("1:8", 13, 1032), ("4:8", 37, 1040), ("2:16", 9, 2064)]
# Rows of x: a short last panel (17), one panel, one plus a 1-row and a 16-row panel, two
# panels, and 300 (chunks narrowed to 128-256 columns).
BATCHES = [17, 32, 33, 48, 64, 300]


@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    ("pattern", "rows", "cols"), CHUNK_CASES, ids=[f"{c[0]}-{c[2]}" for c in CHUNK_CASES]
)
def test_panel_chunks_match_linear(isa: str, dtype, pattern: str, rows: int, cols: int) -> None:
    w = _random_nm(rows, cols, pattern, dtype, seed=7)
    p = pack(w, pattern)
    bias = torch.randn(rows, dtype=dtype)
    for batch in BATCHES:
        x = torch.randn(batch, cols, generator=torch.Generator().manual_seed(batch)).to(dtype)
        y = _panels(x, p, bias, rows, cols, pattern, isa)
        ref = F.linear(x.float(), w.float(), bias.float())
        torch.testing.assert_close(y.float(), ref, **TOL["kernel"][dtype], msg=f"batch {batch}")


@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("batch", [32, 64, 300])
def test_panel_chunks_same_bits_on_one_and_two_threads(isa: str, batch: int) -> None:
    """Two threads split W's rows (and, with few rows, x's): each output still sums its kept
    products in column order, chunk after chunk, so the bits equal one thread's."""
    rows, cols = 200, 2096  # few rows: 2 threads split x too at 300 rows of x
    w = _random_nm(rows, cols, "2:4", torch.float32, seed=3)
    p = pack(w, "2:4")
    x = torch.randn(batch, cols, generator=torch.Generator().manual_seed(4))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _panels(x, p, None, rows, cols, "2:4", isa)
        torch.set_num_threads(2)
        two = _panels(x, p, None, rows, cols, "2:4", isa)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(two, one, **TOL["exact"][torch.float32])
    torch.testing.assert_close(one, F.linear(x, w), **TOL["kernel"][torch.float32])


@pytest.mark.parametrize("isa", _isas())
def test_one_thread_keeps_accumulators_for_256_rows_of_x_at_most(isa: str) -> None:
    """On one thread the batched path goes 256 rows of x at a time, as two threads' work items
    do: its kept per-thread y^T buffer is weight rows x 256, not x all rows of x (a 2048-row
    prompt through 512 weight rows would keep 4 MB; a 4096-row one through 11008 rows, 180 MB)."""
    rows, cols, batch = 512, 256, 2048
    w = _random_nm(rows, cols, "2:4", torch.float32, seed=5)
    p = pack(w, "2:4")
    x = torch.randn(batch, cols, generator=torch.Generator().manual_seed(6))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        torch.ops.nmfx_cpu.release_scratch()  # this thread's; other threads' stay counted
        base = torch.ops.nmfx_cpu.scratch_stats()[0]
        y = _panels(x, p, None, rows, cols, "2:4", isa)
        grown = torch.ops.nmfx_cpu.scratch_stats()[0] - base
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(y, F.linear(x, w), **TOL["kernel"][torch.float32])
    assert grown < rows * batch * 4, f"{grown} bytes more kept after a {batch}-row call"
