"""The AVX512-BF16 slab GEMM (``avx512bf16-vnni``, nmfx/csrc/nm_bf16vnni.cpp): against F.linear on
hosts with avx512_bf16 (patterns whose M divides 32, tails of every blocking: rows of x past the
16/32-row tiles and the 256-row blocks, weight rows past the 14/28-row tiles (every tail tile
height), groups and runs, columns past a 32-column chunk and each slab of a run's first group,
K = M), strided x, NaN/Inf/subnormals, masks not of the pattern, the same bits on one thread
and two; what the path bit does where it does not apply (the ISA's own pick), which choices
offer it, and what a host without it does with a table or an override naming it (falls back
with a warning / refuses; never an illegal instruction)."""

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

VNNI = _build.ISA_CODES["avx512bf16"] | _build.PATH_VNNI


def _gemm(x, p, bias, rows: int, cols: int, pattern: str, code: int = VNNI) -> torch.Tensor:
    n, m = (int(v) for v in pattern.split(":"))
    return torch.ops.nmfx_cpu.nm_gemm(x, p.values, p.mask, bias, rows, cols, n, m, code)


# Weight rows: below one tile, past a 64-row group (130); columns: K = M (4, 8), mid-chunk
# (100, 264, 1032: a last chunk of 8-16 columns), past a 1024-column slab (1032, 2080), patterns
# beyond the other bf16 paths' (3:8, 1:16, 8:16).
CASES = [
    ("2:4", 61, 1032), ("2:4", 5, 100), ("2:4", 3, 4), ("4:8", 23, 264), ("4:8", 9, 8),
    ("1:4", 21, 1100), ("1:8", 17, 1288), ("8:16", 5, 208), ("3:8", 19, 136), ("1:16", 7, 48),
    ("2:4", 130, 2080),
]  # fmt: skip
# Tails of the 16-row vectors, 32-row blocks and 256-row calls of the kernel.
BATCHES = [1, 3, 16, 17, 31, 33, 64, 65, 130, 300]


@needs_bf16dot
@pytest.mark.parametrize(
    ("pattern", "rows", "cols"), CASES, ids=[f"{c[0]}-{c[1]}x{c[2]}" for c in CASES]
)
def test_vnni_path_matches_linear(pattern: str, rows: int, cols: int) -> None:
    assert_matches_linear(pattern, rows, cols, VNNI, BATCHES, _build.bf16vnni_supports)


@needs_bf16dot
def test_vnni_path_reads_strided_x() -> None:
    """x as a column slice of a wider tensor and as a transpose."""
    w = random_nm(1000, 2080, "2:4", torch.bfloat16, seed=3)
    p = pack(w, "2:4")
    wide = torch.randn(40, 2090).bfloat16()
    for x in (wide[:, 5:2085], torch.randn(2080, 12).bfloat16().t()):
        y = _gemm(x, p, None, 1000, 2080, "2:4")
        torch.testing.assert_close(y.float(), reference(x, w, None), **KTOL)


# (weight rows, columns, rows of x): runs of many groups; the prefill's k/v projection (few
# weight rows: 2 runs of 128 rows on one thread, 4 of 64 on two); runs of 16-18 rows with tail
# tiles, one 16-row vector of x.
THREAD_CASES = [(1000, 2080, 70), (256, 2048, 32), (70, 600, 16)]


@needs_bf16dot
@pytest.mark.parametrize(("rows", "cols", "batch"), THREAD_CASES, ids=str)
def test_vnni_path_gives_the_same_bits_on_one_thread_and_two(rows: int, cols: int, batch: int) -> None:
    """The runs, groups and slabs differ with the thread count, the sums do not: each output
    is one thread's sums over the columns in one order (fp32 partial sums stored and reloaded
    exactly between slabs)."""
    w = random_nm(rows, cols, "2:4", torch.bfloat16, seed=rows)
    p = pack(w, "2:4")
    x = torch.randn(batch, cols).bfloat16()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _gemm(x, p, None, rows, cols, "2:4")
        torch.set_num_threads(2)
        two = _gemm(x, p, None, rows, cols, "2:4")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    torch.testing.assert_close(one.float(), reference(x, w, None), **KTOL)


# Weight rows past the 14- and 28-row tiles by every tail height class (1-27 rows), runs of odd
# and unequal length and groups split in two (66, 127, 258); 1800 columns run a run's first
# group in slabs of 256, 512 and 1024 columns and a last one of 32.
TAIL_ROWS = [1, 2, 7, 13, 15, 27, 29, 45, 66, 127, 258]


@needs_bf16dot
def test_vnni_tail_tiles_runs_and_first_slabs_match_linear() -> None:
    for rows in TAIL_ROWS:
        assert_matches_linear("2:4", rows, 1800, VNNI, [16, 32, 47], _build.bf16vnni_supports)


@needs_bf16dot
def test_vnni_path_handles_empty_inputs_any_bias_dtype_and_tight_values() -> None:
    assert _build.extension_available()
    w = random_nm(40, 64, "2:4", torch.bfloat16, seed=2)
    p = pack(w, "2:4")
    assert _gemm(torch.zeros(0, 64).bfloat16(), p, None, 40, 64, "2:4").shape == (0, 40)
    x = torch.randn(20, 64).bfloat16()
    bias = torch.randn(40)
    y = _gemm(x, p, bias, 40, 64, "2:4")  # fp32 bias with bf16 x and weight
    torch.testing.assert_close(y.float(), reference(x, w, bias), **KTOL)
    # Values without the packed format's slack past the last row (the last rows read a copy).
    tight = torch.ops.nmfx_cpu.nm_gemm(x, p.values.clone(), p.mask, None, 40, 64, 2, 4, VNNI)
    torch.testing.assert_close(tight.float(), reference(x, w, None), **KTOL)


@needs_bf16dot
def test_vnni_path_runs_the_dot_product_instruction() -> None:
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
    assert torch.equal(_gemm(x, p, None, 8, 64, "2:4").float(), torch.zeros(20, 8))


@needs_bf16dot
def test_nonfinite_x_gives_the_nan_and_inf_of_linear() -> None:
    """Pruned weights are multiplied as zeros, so 0 * Inf is NaN as in F.linear, with no scan."""
    w = random_nm(45, 256, "2:4", torch.bfloat16, seed=7)
    p = pack(w, "2:4")
    x = torch.randn(20, 256).bfloat16()
    x[19, 255] = float("inf")  # Inf where kept, NaN where pruned
    x[0, 5] = float("nan")
    x[1, 2] = float("-inf")
    ref = F.linear(x.float(), w.float())
    y = _gemm(x, p, None, 45, 256, "2:4").float()
    assert torch.equal(y.isnan(), ref.isnan()) and torch.equal(y.isinf(), ref.isinf())
    torch.testing.assert_close(y, ref, equal_nan=True, **KTOL)


@needs_bf16dot
@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4", "3:8"])
def test_any_mask_stays_in_bounds(pattern: str) -> None:
    """A mask that is not of the pattern (random bytes) gives some finite result, never a read
    out of bounds: each 32 columns load the pattern's count of kept values (masked loads)."""
    cols = 200 if pattern in ("2:4", "1:4") else 208
    w = random_nm(33, cols, pattern, torch.bfloat16, seed=9)
    p = pack(w, pattern)
    g = torch.Generator().manual_seed(1)
    mask = torch.randint(0, 256, p.mask.shape, generator=g, dtype=torch.uint8)
    mask[:, -1] &= 0x0F if cols % 8 else 0xFF  # bits past the last column stay zero
    x = torch.randn(40, cols).bfloat16()
    n, m = (int(v) for v in pattern.split(":"))
    y = torch.ops.nmfx_cpu.nm_gemm(x, p.values, mask, None, 33, cols, n, m, VNNI)
    assert y.shape == (40, 33) and bool(y.float().isfinite().all())


@pytest.mark.parametrize(
    ("isa", "dtype", "pattern"),
    [
        ("avx512bf16", torch.float32, "2:4"),  # not bf16
        ("avx512", torch.bfloat16, "2:4"),  # another ISA
        ("avx2", torch.bfloat16, "2:4"),
        ("portable", torch.bfloat16, "2:4"),
    ],
)
def test_path_bit_elsewhere_runs_the_isas_own_path(isa: str, dtype, pattern: str) -> None:
    """PATH_VNNI where the slab GEMM does not apply is no bit: the same result as the ISA's own
    pick, at one row and at 40."""
    assert_path_bit_is_no_bit_elsewhere(isa, dtype, pattern, _build.PATH_VNNI)


def test_path_bits_stay_exclusive() -> None:
    assert_path_bits_stay_exclusive(_build.PATH_VNNI, "PATH_VNNI")


def test_choices_offer_it_for_bf16_from_9_rows_where_cpuid_has_it(monkeypatch) -> None:
    assert _autotune.VNNI_MIN_ROWS == 9
    patterns = ((2, 4), (4, 8), (1, 4), (1, 8), (3, 8), (8, 16))
    assert_offered_where_cpuid_has_it(
        monkeypatch,
        "avx512bf16-vnni",
        offered=[(n, m, b, "bfloat16") for n, m in patterns for b in (9, 64, 512)],
        refused=[(2, 4, 8, "bfloat16"), (2, 4, 64, "float32"), (2, 6, 64, "bfloat16")],  # M | 32
        code=VNNI,
    )


def test_a_table_naming_it_falls_back_where_the_cpu_lacks_it(monkeypatch) -> None:
    """A module tuned on an AVX512-BF16 host, run where the CPU lacks it: the best ISA's own
    path ("sparse"; "portable" on a CPU without AVX2) with one warning, and the right result;
    an override naming it is an error there."""
    assert_table_falls_back(monkeypatch, "avx512bf16-vnni", own_path_fallback(), 20)


@needs_bf16dot
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_force_dispatch_and_env_accept_the_path(monkeypatch, dtype: torch.dtype) -> None:
    """bf16 weights run the slab GEMM; other dtypes run the ISA's own pick, so one override can
    cover a mixed model."""
    assert_overrides_accept(monkeypatch, "avx512bf16-vnni", dtype, 20)


@needs_bf16dot
def test_vnni_path_restages_x_after_a_release_and_for_each_call() -> None:
    """With one block of rows of x each thread stages x into its own kept buffer, once per call:
    a new x in the same shape, and a call after release_scratch freed that buffer, must not
    reuse what an earlier call staged."""
    assert _build.extension_available()
    w = random_nm(256, 640, "2:4", torch.bfloat16, seed=4)
    p = pack(w, "2:4")
    for _ in range(2):
        for x in (torch.randn(32, 640).bfloat16(), torch.randn(32, 640).bfloat16()):
            y = _gemm(x, p, None, 256, 640, "2:4")
            torch.testing.assert_close(y.float(), reference(x, w, None), **KTOL)
        torch.ops.nmfx_cpu.release_scratch()
