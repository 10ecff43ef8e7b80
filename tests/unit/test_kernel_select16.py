"""The AVX-512 selecting GEMV (``avx512-select``: fp32 2:4 and 4:8 at one row of x,
nm_avx512.cpp ``select16``) against F.linear, at every tail length, and where it is offered."""

from __future__ import annotations

import pytest
import torch
from test_cpu_kernels import (  # noqa: F401
    _FLAGS,
    _HAS_AVX2,
    _HAS_AVX512,
    _no_calibration,
    random_nm,
    reference,
)
from tolerances import TOL as TOLERANCES

import nmfx.kernels as K
from nmfx.kernels import _autotune, _build
from nmfx.packed import pack

TOL = TOLERANCES["kernel"][torch.float32]
_HAS_SELECT16 = _HAS_AVX512 and "avx512vbmi" in _FLAGS
needs_select16 = pytest.mark.skipif(
    not _HAS_SELECT16, reason="CPU lacks AVX-512 with VBMI: avx512-select runs the AVX2 code"
)
SELECT = _build.ISA_CODES["avx512"] | _build.PATH_SELECT


def _gemv(x, p, bias, rows, cols, n, m, code=SELECT):
    return torch.ops.nmfx_cpu.nm_gemm(x, p.values, p.mask, bias, rows, cols, n, m, code)


@needs_select16
@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_matches_linear_at_every_tail_and_row_count(pattern: str) -> None:
    """Columns of 1 to 2 whole 64-column chunks plus every tail (0-60 columns, masked loads of
    x, values and the FMA), rows in tiles of 4 plus 1-3 left, with a bias."""
    assert K.kernels_available()
    n, m = (int(v) for v in pattern.split(":"))
    g = torch.Generator().manual_seed(11)
    for cols in range(m, 2 * 64 + 64, m):
        rows = 1 + cols % 9
        w = random_nm(rows, cols, pattern, torch.float32, seed=cols)
        p = pack(w, pattern)
        x = torch.randn(1, cols, generator=g)
        bias = torch.randn(rows, generator=g)
        y = _gemv(x, p, bias, rows, cols, n, m)
        torch.testing.assert_close(y, reference(x, w, bias), **TOL, msg=f"{rows}x{cols}")


@needs_select16
@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_is_its_own_path_for_fp32(pattern: str) -> None:
    """fp32 2:4/4:8 run the AVX-512 code (it sums in another order than the AVX2 selecting
    GEMV: the last bits differ, fixed seed); bf16 runs the AVX2 code, bit for bit."""
    n, m = (int(v) for v in pattern.split(":"))
    avx2 = _build.ISA_CODES["avx2"] | _build.PATH_SELECT
    w = random_nm(64, 1032, pattern, torch.float32, seed=2)
    x = torch.randn(1, 1032, generator=torch.Generator().manual_seed(3))
    p = pack(w, pattern)
    assert not torch.equal(
        _gemv(x, p, None, 64, 1032, n, m), _gemv(x, p, None, 64, 1032, n, m, avx2)
    )
    pb, xb = pack(w.bfloat16(), pattern), x.bfloat16()
    assert torch.equal(
        _gemv(xb, pb, None, 64, 1032, n, m), _gemv(xb, pb, None, 64, 1032, n, m, avx2)
    )


@needs_select16
@pytest.mark.parametrize("col", [5, 64 + 9])
def test_nonfinite_x_gives_linears_nan_and_inf(col: int) -> None:
    """Inf in x (a whole chunk's column, a tail's column): Inf where a row keeps that column,
    NaN where it prunes it (F.linear's 0 * Inf), as on every other path."""
    cols = 64 + 12
    w = random_nm(8, cols, "2:4", torch.float32, seed=5)
    p = pack(w, "2:4")
    x = torch.randn(1, cols, generator=torch.Generator().manual_seed(6))
    x[0, col] = float("inf")
    ref = reference(x, w, None)
    assert ref.isinf().any() and ref.isnan().any()
    y = _gemv(x, p, None, 8, cols, 2, 4)
    assert torch.equal(y.isnan(), ref.isnan()) and torch.equal(y.isinf(), ref.isinf())


@pytest.mark.parametrize(
    ("dtype", "pattern", "batch", "offered"),
    [
        ("float32", (2, 4), 1, True),
        ("float32", (4, 8), 1, True),
        ("float32", (2, 4), 2, False),
        ("bfloat16", (2, 4), 1, False),
        ("float32", (1, 4), 1, False),
    ],
)
def test_tuner_offers_it_where_it_runs_its_own_code(dtype, pattern, batch, offered) -> None:
    choices = _autotune.host_choices(*pattern, batch, dtype)
    assert ("avx512-select" in choices) == (offered and _HAS_AVX512)
    assert ("avx2-select" in choices) == (batch == 1 and _HAS_AVX2)


def test_untuned_default_picks_the_best_isas_selecting_gemv() -> None:
    key = _autotune.ShapeKey(64, 256, "float32", 2, 4)
    first = _autotune.default_entry(key)["choices"][0]
    want = "avx512-select" if _HAS_AVX512 else "avx2-select" if _HAS_AVX2 else "portable"
    assert first == want
    assert _autotune.default_entry(key._replace(dtype="bfloat16"))["choices"][0] in (
        "avx2-select",
        "portable",
    )


@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
@pytest.mark.parametrize("code", [0, SELECT], ids=["auto", "select"])
def test_values_without_slack_give_the_same_bits(pattern: str, code: int) -> None:
    """A lowered layer's values are cloned to their exact size: the last rows then come from a
    padded copy made per call, which must change nothing."""
    if code and not _HAS_AVX512:
        pytest.skip("CPU lacks AVX-512")
    n, m = (int(v) for v in pattern.split(":"))
    w = random_nm(9, 200, pattern, torch.float32, seed=8)
    p = pack(w, pattern)
    tight = p.values.clone()
    assert tight.untyped_storage().nbytes() == tight.numel() * tight.element_size()
    x = torch.randn(1, 200, generator=torch.Generator().manual_seed(9))
    want = torch.ops.nmfx_cpu.nm_gemm(x, p.values, p.mask, None, 9, 200, n, m, code)
    got = torch.ops.nmfx_cpu.nm_gemm(x, tight, p.mask, None, 9, 200, n, m, code)
    assert torch.equal(got, want)
