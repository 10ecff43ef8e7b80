"""nm_linear's dense branch (``nmfx_cpu::nm_dense``): F.linear's result from the packed weight,
on every ISA this host runs, at 1 to 512 rows of x, whatever the blocks W is expanded in.

One or two rows of x run the AVX2 register-expanding kernel (where the CPU has AVX2); more rows
expand W a block of rows at a time into per-thread scratch and run torch's GEMM per block, in
blocks whose count is a multiple of the threads. ``isa`` caps the ISA the branch may use, so the
AVX2 and portable code run on an AVX-512 host too.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tolerances import TOL as TOLERANCES

import nmfx.kernels as K
from nmfx.kernels import _build
from nmfx.packed import pack

TOL = TOLERANCES["kernel"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (pattern, rows, cols): cols not all multiples of 16/32 (the expansion's part vectors).
CASES = [("2:4", 40, 264), ("1:8", 13, 136), ("5:16", 7, 80), ("3:4", 6, 12)]
ROWS_OF_X = [1, 2, 3, 17, 64, 512]
BLOCK_LIMIT = 2 << 20  # largest dense block (bytes) nm_dense expands, bf16/fp16 and fp32 >16 rows


@pytest.fixture(autouse=True)
def _kernels(kernel_defaults):
    if not K.kernels_available():
        pytest.skip(f"the C++ kernels did not build here: {K.build_error()}")


def isas() -> list[str]:
    """Every ISA the dense branch can be capped at on this host (portable always)."""
    return [isa for isa in _build.ISA_CODES if isa in _build.supported_isas()]


def random_nm(rows: int, cols: int, pattern: str, dtype: torch.dtype, seed: int = 0):
    n, m = (int(v) for v in pattern.split(":"))
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols // m, m, generator=g)
    idx = torch.rand(rows, cols // m, m, generator=g).argsort(-1)[..., :n]
    keep = torch.zeros_like(w, dtype=torch.bool).scatter_(-1, idx, True)
    return (w * keep).reshape(rows, cols).to(dtype)


def nm_dense(x, p, bias=None, block_rows: int = 0, isa: str | int = 0) -> torch.Tensor:
    code = _build.ISA_CODES[isa] if isinstance(isa, str) else isa
    n, m = p.pattern.n, p.pattern.m
    return torch.ops.nmfx_cpu.nm_dense(
        x, p.values, p.mask, bias, p.rows, p.cols, n, m, block_rows, code
    )


@pytest.mark.parametrize("isa", isas())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("pattern", "rows", "cols"), CASES, ids=lambda v: str(v))
def test_dense_branch_matches_linear_on_every_isa(isa, dtype, pattern, rows, cols) -> None:
    w = random_nm(rows, cols, pattern, dtype, seed=rows)
    p = pack(w, pattern)
    bias = torch.randn(rows, dtype=dtype)
    for batch in ROWS_OF_X:
        x = torch.randn(batch, cols, dtype=dtype)
        ref = F.linear(x.float(), w.float(), bias.float())
        y = nm_dense(x, p, bias, isa=isa)
        assert y.dtype == dtype and y.shape == (batch, rows)
        torch.testing.assert_close(y.float(), ref, **TOL[dtype], msg=f"{isa} batch {batch}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block_rows", [1, 7, 16, 40, 1000])
def test_forced_block_sizes_cover_every_row(dtype, block_rows) -> None:
    """Blocks of any size (the last one short, one block larger than W) give F.linear's result,
    with and without bias, at few and many rows of x."""
    w = random_nm(40, 264, "2:4", dtype, seed=3)
    p = pack(w, "2:4")
    bias = torch.randn(40, dtype=dtype)
    for batch in (1, 3, 64):
        x = torch.randn(batch, 264, dtype=dtype)
        for b in (None, bias):
            ref = F.linear(x.float(), w.float(), None if b is None else b.float())
            y = nm_dense(x, p, b, block_rows=block_rows)
            torch.testing.assert_close(y.float(), ref, **TOL[dtype], msg=f"batch {batch}")


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_one_or_two_rows_run_the_register_expanding_kernel(batch, dtype) -> None:
    """With AVX2, 1-2 rows of x run nm_gemm's AVX2 expand path (bit for bit); capped at the
    portable ISA they run the expand-and-GEMM blocks (bit for bit one forced block of all rows)."""
    w = random_nm(40, 264, "2:4", dtype, seed=4)
    p = pack(w, "2:4")
    x = torch.randn(batch, 264, dtype=dtype)
    blocked = nm_dense(x, p, isa="portable", block_rows=40)
    assert torch.equal(nm_dense(x, p, isa="portable"), blocked)
    if "avx2" not in _build.supported_isas():
        return
    n, m = p.pattern.n, p.pattern.m
    code = _build.ISA_CODES["avx2"] | _build.PATH_EXPAND
    fused = torch.ops.nmfx_cpu.nm_gemm(x, p.values, p.mask, None, 40, 264, n, m, code)
    assert torch.equal(nm_dense(x, p), fused)
    assert torch.equal(nm_dense(x, p, isa="avx2"), fused)


def plan(rows: int, cols: int, batch: int, dtype: torch.dtype, threads: int) -> tuple[int, int]:
    per_block, count = torch.ops.nmfx_cpu.dense_block_plan(rows, cols, batch, dtype, threads)
    return per_block, count


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch", [3, 8, 64, 256])
@pytest.mark.parametrize(("rows", "cols"), [(11008, 4096), (4096, 4096), (1024, 1024)])
def test_block_plan_fits_the_scratch_and_splits_evenly(dtype, batch, rows, cols) -> None:
    """Blocks hold at most 2 MB of dense rows (256 KB for fp32 GEMVs at <= 16 rows of x), cover
    W with no empty block, and on two threads come in an even count (no thread left alone with
    a last block); bf16/fp16 blocks are 2 MB at any batch (oneDNN costs ~20 us a call)."""
    row_bytes = cols * dtype.itemsize
    limit = 256 << 10 if dtype == torch.float32 and batch <= 16 else BLOCK_LIMIT
    one_rows, one_count = plan(rows, cols, batch, dtype, 1)
    assert one_rows * row_bytes <= limit and one_count == -(-rows // (limit // row_bytes))
    per_block, count = plan(rows, cols, batch, dtype, 2)
    assert per_block * row_bytes <= limit
    assert count % 2 == 0 and per_block * count >= rows > per_block * (count - 1)


def test_block_plan_of_a_small_problem_stays_on_one_block() -> None:
    """Below 64k multiply-adds the blocks run on the calling thread: no split for threads."""
    assert plan(64, 64, 3, torch.float32, 2) == (64, 1)
    assert plan(64, 64, 64, torch.bfloat16, 2) == (32, 2)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"isa": 99}, r"isa 99 is unknown"), ({"block_rows": -1}, r"block_rows must be >= 0")],
)
def test_bad_arguments_are_errors(kwargs, match) -> None:
    p = pack(random_nm(8, 16, "2:4", torch.float32), "2:4")
    with pytest.raises(RuntimeError, match=match):
        nm_dense(torch.randn(4, 16), p, **kwargs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_blocks_after_a_stall_run_on_one_thread_and_restore_the_thread_count(dtype) -> None:
    """After a detected stall (``mark_contended``) the blocks run on the calling thread, with
    oneDNN/MKL kept to it too (no barrier per block), and torch's thread count is restored."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        w = random_nm(2048, 512, "2:4", dtype, seed=5)
        p = pack(w, "2:4")
        x = torch.randn(8, 512, dtype=dtype)
        assert plan(2048, 512, 8, dtype, 2)[1] >= 2
        torch.ops.nmfx_cpu.mark_contended(10_000.0)
        before = torch.ops.nmfx_cpu.parallel_stats()[1]
        y = nm_dense(x, p)
        assert torch.ops.nmfx_cpu.parallel_stats()[1] == before + 1
        assert torch.get_num_threads() == 2
        torch.testing.assert_close(y.float(), F.linear(x.float(), w.float()), **TOL[dtype])
    finally:
        torch.ops.nmfx_cpu.mark_contended(0.0)
        torch.set_num_threads(threads)
