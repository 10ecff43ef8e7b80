"""What a call leaves resident: bounded per-thread scratch, large outputs given back at once.

Asserted through ``nmfx_cpu::scratch_stats`` (bytes the per-thread scratch keeps, its limit per
buffer, bytes of per-call mappings alive, mappings made), not through RSS, which depends on
glibc and on whatever else the process did.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tolerances import TOL as TOLERANCES

import nmfx.kernels as K
from nmfx.packed import pack

TOL = TOLERANCES["kernel"]
SLOTS = 4  # per-thread scratch slots (nm_scratch.h)
MAPPED_BYTES = 16 << 20  # outputs from this size on are mapped per call (nm_scratch.h)


@pytest.fixture(autouse=True)
def _no_calibration(kernel_defaults):
    if not K.kernels_available():
        pytest.skip(f"the C++ kernels did not build here: {K.build_error()}")


def stats() -> dict[str, int]:
    kept, limit, mapped_live, mapped_total = torch.ops.nmfx_cpu.scratch_stats()
    return {"kept": kept, "limit": limit, "mapped_live": mapped_live, "mapped_total": mapped_total}


def nm_weight(rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    w = torch.randn(rows, cols // 4, 4, generator=torch.Generator().manual_seed(1))
    w[..., 2:] = 0
    return w.reshape(rows, cols).to(dtype)


def paths() -> list[str]:
    isas = K.available_isas()
    out = ["dense", "portable"]
    for isa in ("avx2", "avx512"):
        if isa in isas:
            out += [f"{isa}-expand", f"{isa}-panels"]
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_large_calls_keep_bounded_scratch_and_match_linear(dtype: torch.dtype) -> None:
    """x of 1100x4096 (17.6 MB as fp32, over the 4 MB keep limit) through every path this host
    runs: staged a block of rows at a time, so no kept buffer exceeds the limit; a NaN in a
    late block still makes its whole output row NaN, as in F.linear."""
    rows, cols, batch = 40, 4096, 1100
    w = nm_weight(rows, cols, dtype)
    p = pack(w, "2:4")
    bias = torch.randn(rows, dtype=dtype)
    x = torch.randn(batch, cols, dtype=dtype)
    x[1000, 5] = float("nan")
    ref = F.linear(x.float(), w.float(), bias.float())
    ref[1000] = float("nan")  # F.linear multiplies every weight by x[1000, 5], zeros included
    # 4096-long sums in another order than F.linear's: a wider fp32 tolerance than the table's
    tol = {"rtol": 1e-4, "atol": 2e-3} if dtype == torch.float32 else TOL[dtype]
    limit = stats()["limit"]
    assert limit == 4 << 20
    with torch.inference_mode():
        for path in paths():
            with K.force_dispatch(path):
                y = K.nm_linear(x, p, bias)
            torch.testing.assert_close(y.float(), ref, **tol, equal_nan=True, msg=path)
            assert stats()["kept"] <= torch.get_num_threads() * SLOTS * limit, path


def test_a_large_output_is_mapped_and_given_back() -> None:
    """An output of 16 MB or more comes from its own mapping, returned when the tensor dies (so
    glibc keeps no freed copy); it still resizes and matches F.linear."""
    rows, cols, batch = 4096, 16, 1024  # fp32 output: exactly 16 MB
    w = nm_weight(rows, cols, torch.float32)
    p = pack(w, "2:4")
    x = torch.randn(batch, cols)
    ref = F.linear(x, w)
    for path in ("dense", "sparse"):
        before = stats()
        with K.force_dispatch(path):
            y = K.nm_linear(x, p)
        during = stats()
        assert y.numel() * 4 >= MAPPED_BYTES
        assert during["mapped_total"] == before["mapped_total"] + 1, path
        assert during["mapped_live"] >= before["mapped_live"] + MAPPED_BYTES, path
        torch.testing.assert_close(y, ref, **TOL[torch.float32])
        del y
        assert stats()["mapped_live"] == before["mapped_live"], path
    with K.force_dispatch("sparse"):
        y = K.nm_linear(x, p)
    y.resize_(batch + 1, rows)  # reallocates through torch's allocator, keeps the values
    torch.testing.assert_close(y[:batch], ref, **TOL[torch.float32])
