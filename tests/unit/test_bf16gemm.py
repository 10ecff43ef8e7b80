"""The AVX512-BF16 pair GEMM (``avx512bf16-pairs``, nmfx/csrc/nm_bf16pairs.cpp): against F.linear
on hosts with avx512_bf16 (every pattern it has, odd shapes, 1-300 rows of x, strided x, NaN and
Inf), what the path bit does where it does not apply (the ISA's own pick), which choices offer
it, and what a host without it does with a table or an override naming it (falls back with a
warning / refuses; never an illegal instruction)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_bf16dot import (  # noqa: F401
    KTOL,
    _fresh_warnings,
    assert_matches_linear,
    assert_offered_where_cpuid_has_it,
    assert_overrides_accept,
    assert_path_bit_is_no_bit_elsewhere,
    assert_path_bits_stay_exclusive,
    assert_table_falls_back,
    needs_bf16dot,
    own_path_fallback,
)
from test_cpu_kernels import _no_calibration, random_nm, reference  # noqa: F401

from nmfx.kernels import _autotune, _build
from nmfx.packed import pack

PAIRS = _build.ISA_CODES["avx512bf16"] | _build.PATH_PAIRS


def _gemm(x, p, bias, rows: int, cols: int, pattern: str, code: int) -> torch.Tensor:
    assert _build.extension_available()  # loads the kernels (a test may run first)
    n, m = (int(v) for v in pattern.split(":"))
    return torch.ops.nmfx_cpu.nm_gemm(x, p.values, p.mask, bias, rows, cols, n, m, code)


# Odd rows (tails of the 4-row tiles); cols that end mid-window (2:4 and 1:4 at a multiple of 4
# but not of 8: the last window holds half its values) or mid-block of windows; one column
# group only.
CASES = [
    ("2:4", 37, 1032), ("2:4", 5, 100), ("2:4", 3, 4), ("4:8", 23, 264), ("4:8", 9, 8),
    ("1:4", 21, 1100), ("1:4", 6, 12), ("1:8", 17, 1288), ("1:8", 4, 72),
]  # fmt: skip
# Tails of the 16-row vectors and 64-row blocks of x, and more than one block.
BATCHES = [1, 3, 16, 17, 33, 64, 65, 130, 300]


@needs_bf16dot
@pytest.mark.parametrize(
    ("pattern", "rows", "cols"), CASES, ids=[f"{c[0]}-{c[1]}x{c[2]}" for c in CASES]
)
def test_pairs_path_matches_linear(pattern: str, rows: int, cols: int) -> None:
    assert_matches_linear(pattern, rows, cols, PAIRS, BATCHES)


@needs_bf16dot
def test_pairs_path_reads_strided_x_and_threads_agree() -> None:
    """x as a column slice of a wider tensor and as a transpose (the staging's gather and its
    plain loop); a weight tall enough that both threads take rows gives the same bits on one
    thread (each output is one thread's sums, in one order)."""
    w = random_nm(1000, 320, "2:4", torch.bfloat16, seed=3)
    p = pack(w, "2:4")
    wide = torch.randn(40, 330).bfloat16()
    for x in (wide[:, 5:325], torch.randn(320, 12).bfloat16().t()):
        y = _gemm(x, p, None, 1000, 320, "2:4", PAIRS)
        torch.testing.assert_close(y.float(), reference(x, w, None), **KTOL)
    x = torch.randn(70, 320).bfloat16()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _gemm(x, p, None, 1000, 320, "2:4", PAIRS)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, _gemm(x, p, None, 1000, 320, "2:4", PAIRS))


@needs_bf16dot
@pytest.mark.parametrize("pattern", ["1:4", "2:4"])
def test_pairs_path_writes_the_fp32_paths_bits(pattern: str) -> None:
    """The kernel writes bf16(sum + bias) itself where x is finite; where x holds a NaN the call
    takes the fp32 path (y in fp32, the NaN propagated, then converted): the rows without it
    are bit-identical between the two. Columns span 3 staging items (64 windows each) and
    weight rows 4 chunks, on one thread and two (each output is one thread's sums, in order)."""
    w = random_nm(1000, 1100, pattern, torch.bfloat16, seed=4)
    p = pack(w, pattern)
    bias = torch.randn(1000).bfloat16()
    x = torch.randn(70, 1100).bfloat16()
    bad = x.clone()
    bad[0, 7] = float("nan")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _gemm(x, p, bias, 1000, 1100, pattern, PAIRS)
    finally:
        torch.set_num_threads(threads)
    direct = _gemm(x, p, bias, 1000, 1100, pattern, PAIRS)
    fallback = _gemm(bad, p, bias, 1000, 1100, pattern, PAIRS)
    assert torch.equal(one, direct)
    assert torch.equal(direct[1:], fallback[1:])
    assert bool(fallback[0].float().isnan().any())
    torch.testing.assert_close(direct.float(), reference(x, w, bias), **KTOL)


@needs_bf16dot
def test_pairs_path_stages_x_in_blocks() -> None:
    """Rows of x past what one staging block holds (4 MB of staged x: 256 rows at 8192
    columns) run in more than one block."""
    w = random_nm(8, 8192, "4:8", torch.bfloat16, seed=2)
    p = pack(w, "4:8")
    x = torch.randn(300, 8192).bfloat16()
    y = _gemm(x, p, None, 8, 8192, "4:8", PAIRS)
    torch.testing.assert_close(y.float(), reference(x, w, None), **KTOL)


@needs_bf16dot
def test_pairs_path_runs_the_dot_product_instruction() -> None:
    """vdpbf16ps treats subnormal inputs as zero, the fp32 paths do not: the forced path gives
    the dot product's zero where the AVX-512 kernel gives 2**-30."""
    w = torch.zeros(8, 64)
    w[:, 0] = 2.0**100
    w[:, 1] = 1.0
    p = pack(w.bfloat16(), "2:4")
    x = torch.zeros(20, 64)
    x[:, 0] = 2.0**-130  # below the smallest normal, 2**-126
    x = x.bfloat16()
    widened = _build.ISA_CODES["avx512"] | _build.PATH_PANELS
    assert torch.equal(_gemm(x, p, None, 8, 64, "2:4", widened).float(), torch.full((20, 8), 2.0**-30))
    assert torch.equal(_gemm(x, p, None, 8, 64, "2:4", PAIRS).float(), torch.zeros(20, 8))


@needs_bf16dot
def test_nonfinite_x_gives_the_nan_and_inf_of_linear() -> None:
    w = random_nm(45, 256, "2:4", torch.bfloat16, seed=7)
    p = pack(w, "2:4")
    x = torch.randn(20, 256).bfloat16()
    x[19, 255] = float("inf")  # Inf where kept, NaN where pruned
    x[0, 5] = float("nan")
    x[1, 2] = float("-inf")
    ref = F.linear(x.float(), w.float())
    y = _gemm(x, p, None, 45, 256, "2:4", PAIRS).float()
    assert torch.equal(y.isnan(), ref.isnan()) and torch.equal(y.isinf(), ref.isinf())
    torch.testing.assert_close(y, ref, equal_nan=True, **KTOL)


@needs_bf16dot
@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4", "1:8"])
def test_any_mask_stays_in_bounds(pattern: str) -> None:
    """A mask that is not of the pattern (random bytes) gives some finite result, never a read
    out of bounds (the lookup names slot 0 for bytes the pattern cannot have)."""
    w = random_nm(33, 200 if pattern != "4:8" else 208, pattern, torch.bfloat16, seed=9)
    p = pack(w, pattern)
    g = torch.Generator().manual_seed(1)
    mask = torch.randint(0, 256, p.mask.shape, generator=g, dtype=torch.uint8)
    mask[:, -1] &= 0x0F if w.shape[1] % 8 else 0xFF  # bits past the last column stay zero
    x = torch.randn(40, w.shape[1]).bfloat16()
    n, m = (int(v) for v in pattern.split(":"))
    y = torch.ops.nmfx_cpu.nm_gemm(x, p.values, mask, None, 33, w.shape[1], n, m, PAIRS)
    assert y.shape == (40, 33) and bool(y.float().isfinite().all())


@pytest.mark.parametrize(
    ("isa", "dtype", "pattern"),
    [
        ("avx512bf16", torch.float32, "2:4"),  # not bf16
        ("avx512bf16", torch.bfloat16, "2:8"),  # a pattern it lacks
        ("avx512", torch.bfloat16, "2:4"),  # another ISA
        ("avx2", torch.bfloat16, "2:4"),
        ("portable", torch.bfloat16, "2:4"),
    ],
)
def test_path_bit_elsewhere_runs_the_isas_own_path(isa: str, dtype, pattern: str) -> None:
    """PATH_PAIRS where the pair GEMM does not apply is no bit: the same result as the ISA's
    own pick, at one row and at 40."""
    assert_path_bit_is_no_bit_elsewhere(isa, dtype, pattern, _build.PATH_PAIRS)


def test_path_bits_stay_exclusive() -> None:
    assert_path_bits_stay_exclusive(_build.PATH_PAIRS, "PATH_PAIRS")


def test_choices_offer_it_for_bf16_1_4_and_1_8_and_many_rows(monkeypatch) -> None:
    rows = (_autotune.PAIRS_MIN_ROWS, 64, 512)
    assert_offered_where_cpuid_has_it(
        monkeypatch,
        "avx512bf16-pairs",
        offered=[(n, m, b, "bfloat16") for n, m in ((1, 4), (1, 8)) for b in rows],
        # 2:4 and 4:8 run it when forced only (it measured slower than the dense branch there).
        refused=[
            (2, 4, 64, "bfloat16"),
            (4, 8, 64, "bfloat16"),
            (1, 4, 8, "bfloat16"),
            (1, 4, 64, "float32"),
            (2, 8, 64, "bfloat16"),
        ],
        code=PAIRS,
    )


def test_a_table_naming_it_falls_back_where_the_cpu_lacks_it(monkeypatch) -> None:
    """A module tuned on an AVX512-BF16 host, run where the CPU lacks it: the best ISA's own
    path ("sparse"; "portable" on a CPU without AVX2) with one warning, and the right result;
    an override naming it is an error there."""
    assert_table_falls_back(monkeypatch, "avx512bf16-pairs", own_path_fallback(), 20)


@needs_bf16dot
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_force_dispatch_and_env_accept_the_path(monkeypatch, dtype: torch.dtype) -> None:
    """bf16 weights run the pair GEMM; other dtypes run the ISA's own pick, so one override can
    cover a mixed model."""
    assert_overrides_accept(monkeypatch, "avx512bf16-pairs", dtype, 20)
