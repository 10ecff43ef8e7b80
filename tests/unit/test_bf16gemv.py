"""The AVX512-BF16 dot-product GEMV (``avx512bf16-gemv``, nmfx/csrc/nm_bf16gemv.cpp): against
F.linear on hosts with avx512_bf16 (every pattern it supports, odd rows, column tails, 1-9 rows of
x, bias, strided and transposed x, 1 and 2 threads), proof that it runs the dot products, which
choices offer it, and what a host, dtype or pattern without it does with a path bit, a table or an
override naming it (the ISA's own path / a fallback with a warning / an error; never an illegal
instruction). The ISA-parametrized tests of test_cpu_kernels.py run it too (ISA ``avx512bf16``
below 8 rows of x, and its path bit in the corrupt-mask and non-finite tests)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

# The dot-product path's skip mark, tolerance, check against F.linear and autouse fixture (fresh
# fallback warnings).
from test_bf16dot import (  # noqa: F401
    KTOL,
    _fresh_warnings,
    assert_matches_linear,
    assert_offered_where_cpuid_has_it,
    assert_path_bit_is_no_bit_elsewhere,
    assert_path_bits_stay_exclusive,
    assert_table_falls_back,
    needs_bf16dot,
    own_path_fallback,
)

# The kernel tests' helpers and their autouse fixture (no calibration, private cache, no
# overrides from the environment).
from test_cpu_kernels import _HAS_AVX512BF16, _no_calibration, random_nm, reference  # noqa: F401
from tolerances import TOL

import nmfx.kernels as K
from nmfx.kernels import _autotune, _build
from nmfx.packed import pack

GEMV = _build.ISA_CODES["avx512bf16"] | _build.PATH_GEMV


def _gemm(x, p, bias, rows, cols, pattern, code):
    assert K.kernels_available()
    n, m = (int(v) for v in pattern.split(":"))
    return torch.ops.nmfx_cpu.nm_gemm(x, p.values, p.mask, bias, rows, cols, n, m, code)


# Odd rows (tails of the 4-row tiles, and of the 8-row prefetch distance); cols ending mid-way
# through a vector of 32 kept values (64 columns for 2:4 / 4:8 / 8:16, 128 for 1:4 / 2:8, 256
# for 1:8 / 2:16) and mid-way through its 8-byte mask load.
CASES = [
    ("2:4", 37, 1032), ("2:4", 3, 72), ("2:4", 13, 64), ("4:8", 23, 264), ("8:16", 5, 208),
    ("1:4", 21, 1100), ("2:8", 9, 136), ("1:8", 17, 1288), ("2:16", 6, 400), ("4:16", 11, 96),
]  # fmt: skip
BATCHES = [1, 2, 3, 4, 5, 7, 8, 9]


@needs_bf16dot
@pytest.mark.parametrize(
    ("pattern", "rows", "cols"), CASES, ids=[f"{c[0]}-{c[1]}x{c[2]}" for c in CASES]
)
def test_gemv_matches_linear(pattern: str, rows: int, cols: int) -> None:
    assert_matches_linear(pattern, rows, cols, GEMV, BATCHES)


@needs_bf16dot
@pytest.mark.parametrize("threads", [1, 2])
def test_gemv_reads_strided_x_on_one_and_two_threads(threads: int) -> None:
    """x as a column slice of a wider tensor and as a transpose, at 1 and 3 rows; a weight tall
    enough that two threads split its rows."""
    w = random_nm(1001, 320, "2:4", torch.bfloat16, seed=3)
    p = pack(w, "2:4")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for batch in (1, 3):
            wide = torch.randn(batch, 330).bfloat16()
            for x in (wide[:, 5:325], torch.randn(320, batch).bfloat16().t()):
                assert x.stride() != (320, 1)
                y = _gemm(x, p, None, 1001, 320, "2:4", GEMV)
                torch.testing.assert_close(y.float(), reference(x, w, None), **KTOL)
    finally:
        torch.set_num_threads(before)


def _subnormal_case() -> tuple[torch.Tensor, object]:
    """x = a bf16 subnormal times a huge weight: vdpbf16ps flushes it to zero, the fp32 paths
    give 2**-30 (an observable proof of which path ran)."""
    w = torch.zeros(8, 64)
    w[:, 0] = 2.0**100
    w[:, 1] = 1.0
    x = torch.zeros(1, 64)
    x[0, 0] = 2.0**-130  # below the smallest normal, 2**-126
    return x.bfloat16(), pack(w.bfloat16(), "2:4")


@needs_bf16dot
def test_gemv_runs_dot_products_forced_and_by_default_below_8_rows() -> None:
    x, p = _subnormal_case()
    assert x[0, 0].item() == 2.0**-130
    expand = _build.ISA_CODES["avx512"] | _build.PATH_EXPAND
    assert torch.equal(
        _gemm(x, p, None, 8, 64, "2:4", expand).float(), torch.full((1, 8), 2.0**-30)
    )
    for code in (GEMV, _build.ISA_CODES["avx512bf16"]):  # forced; the ISA's pick at one row
        assert torch.equal(_gemm(x, p, None, 8, 64, "2:4", code).float(), torch.zeros(1, 8))


@needs_bf16dot
def test_nonfinite_x_gives_the_nan_and_inf_of_linear() -> None:
    w = random_nm(45, 256, "2:4", torch.bfloat16, seed=7)
    p = pack(w, "2:4")
    for batch in (1, 3):
        x = torch.randn(batch, 256).bfloat16()
        x[batch - 1, 255] = float("inf")  # Inf where kept, NaN where pruned
        x[0, 5] = float("nan")
        ref = F.linear(x.float(), w.float())
        y = _gemm(x, p, None, 45, 256, "2:4", GEMV).float()
        assert torch.equal(y.isnan(), ref.isnan()) and torch.equal(y.isinf(), ref.isinf())
        torch.testing.assert_close(y, ref, equal_nan=True, **KTOL)


@pytest.mark.parametrize(
    ("isa", "dtype", "pattern"),
    [
        ("avx512bf16", torch.float32, "2:4"),  # not bf16
        ("avx512bf16", torch.bfloat16, "3:4"),  # a pattern it lacks
        ("avx512", torch.bfloat16, "2:4"),  # another ISA
        ("avx2", torch.bfloat16, "2:4"),
        ("portable", torch.bfloat16, "2:4"),
    ],
)
def test_path_bit_elsewhere_runs_the_isas_own_path(isa: str, dtype, pattern: str) -> None:
    """PATH_GEMV where the GEMV does not apply is no bit: the same result as the ISA's own pick,
    at one row and at 40 (where the ISA's own pick is the batched path)."""
    assert_path_bit_is_no_bit_elsewhere(isa, dtype, pattern, _build.PATH_GEMV)


def test_path_bits_stay_exclusive() -> None:
    assert_path_bits_stay_exclusive(_build.PATH_GEMV, "PATH_GEMV")


def test_choices_offer_it_for_bf16_its_patterns_and_few_rows(monkeypatch) -> None:
    rows = (1, 2, 8, _autotune.GEMV_MAX_ROWS)
    assert_offered_where_cpuid_has_it(
        monkeypatch,
        "avx512bf16-gemv",
        offered=[(2, 4, b, "bfloat16") for b in rows] + [(1, 8, 1, "bfloat16")],
        refused=[(2, 4, 64, "bfloat16"), (2, 4, 1, "float32"), (3, 4, 1, "bfloat16")],
        code=GEMV,
    )


def test_a_table_naming_it_falls_back_where_the_cpu_lacks_it(monkeypatch) -> None:
    """A module tuned on an AVX512-BF16 host, run where the CPU lacks it: the best ISA's own
    path ("sparse"; "portable" on a CPU without AVX2) with one warning, and the right result;
    an override naming it is an error there."""
    assert_table_falls_back(monkeypatch, "avx512bf16-gemv", own_path_fallback(), 1)


@needs_bf16dot
def test_force_dispatch_runs_it_for_bf16_and_the_isas_pick_for_fp32() -> None:
    for dtype in (torch.bfloat16, torch.float32):
        w = random_nm(24, 128, "2:4", dtype, seed=1)
        p = pack(w, "2:4")
        x = torch.randn(1, 128).to(dtype)
        with K.force_dispatch("avx512bf16-gemv"):
            y = K.nm_linear(x, p)
        torch.testing.assert_close(y.float(), reference(x, w, None), **TOL["kernel"][dtype])
