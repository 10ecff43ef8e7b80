"""The C++ mask and SR-STE decay kernels on every ISA this host has, against the portable loops.

``nmfx_cpu::set_mask_isa`` forces one ISA (the default picks the best by cpuid), so the AVX2
and AVX-512 kernels are each checked bit for bit against the portable reference here; an ISA
the CPU lacks is skipped with the reason.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

import nmfx.kernels as K
from nmfx import NMPattern
from nmfx.masks import reference_nm_mask

ISA_CODES = {"portable": 1, "avx2": 2, "avx512": 3}
VECTOR_ISAS = ["avx2", "avx512"]


@pytest.fixture(autouse=True)
def _kernels() -> Iterator[None]:
    if not K.kernels_available():
        pytest.skip(f"the C++ kernels did not build here: {K.build_error()}")
    yield
    torch.ops.nmfx_cpu.set_mask_isa(0)


def use(isa: str) -> None:
    if isa not in K.available_isas():
        pytest.skip(f"this CPU lacks {isa} (runs: {K.available_isas()})")
    torch.ops.nmfx_cpu.set_mask_isa(ISA_CODES[isa])


def weight(dtype: torch.dtype, groups: int, m: int, special: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(groups)
    w = torch.randint(-3, 4, (37, groups * m), generator=g).to(dtype)  # many ties
    w[::3] = torch.randn(w[::3].shape, generator=g).to(dtype)
    if special:
        w.view(-1)[::7] = float("nan")
        w.view(-1)[3::11] = float("inf")
        w.view(-1)[5::13] = float("-inf")
        w.view(-1)[6::17] = -0.0
    return w


@pytest.mark.parametrize("isa", VECTOR_ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("nm", [(2, 4), (1, 4), (3, 4), (4, 8)], ids=str)
@pytest.mark.parametrize("groups", [1, 3, 67, 1000])  # tails after 2 and 4 groups; threads
@pytest.mark.parametrize("special", [False, True])
def test_mask_kernels_equal_portable(isa, dtype, nm, groups, special) -> None:
    w = weight(dtype, groups, nm[1], special)
    torch.ops.nmfx_cpu.set_mask_isa(ISA_CODES["portable"])
    ref_mask, ref_masked = torch.ops.nmfx_cpu.nm_mask_apply(w, *nm)
    use(isa)
    mask = torch.ops.nmfx_cpu.nm_mask(w, *nm)
    mask2, masked = torch.ops.nmfx_cpu.nm_mask_apply(w, *nm)
    assert torch.equal(mask, ref_mask) and torch.equal(mask2, ref_mask)
    assert torch.equal(mask.view(torch.uint8).max(), torch.tensor(1, dtype=torch.uint8))
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    assert torch.equal(masked.view(bits), ref_masked.view(bits))  # NaN, Inf and -0.0 kept as is
    assert torch.equal(ref_mask, reference_nm_mask(w, NMPattern(*nm), 1))


@pytest.mark.parametrize("isa", ["portable", *VECTOR_ISAS])
@pytest.mark.parametrize("numel", [1, 15, 16, 17, 40_000])
def test_srste_decay_equals_portable_bit_for_bit(isa, numel) -> None:
    g = torch.Generator().manual_seed(numel)
    w = torch.randn(numel, generator=g)
    w[::5] = float("nan")
    w[1::7] = float("inf")
    grad = torch.randn(numel, generator=g)
    grad[2::9] = -0.0
    keep = torch.rand(numel, generator=g) < 0.5
    expected = grad + torch.where(keep, 0.0, 2e-4 * w)  # grad + lam * (1 - mask) * w
    torch.ops.nmfx_cpu.set_mask_isa(ISA_CODES["portable"])
    ref = grad.clone()
    torch.ops.nmfx_cpu.srste_decay_(ref, w, keep, 2e-4)
    use(isa)
    out = grad.clone()
    torch.ops.nmfx_cpu.srste_decay_(out, w, keep, 2e-4)
    assert torch.equal(out.view(torch.int32), ref.view(torch.int32))
    torch.testing.assert_close(out, expected, equal_nan=True, rtol=0, atol=0)


def test_set_mask_isa_rejects_unknown_codes() -> None:
    with pytest.raises(RuntimeError, match=r"ISA code 7 is not 0 \(auto\), 1 \(portable\)"):
        torch.ops.nmfx_cpu.set_mask_isa(7)
    assert torch.ops.nmfx_cpu.set_mask_isa(0) == 0


@pytest.mark.parametrize("isa", ["portable", *VECTOR_ISAS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("nm", [(2, 4), (1, 4), (4, 8), (2, 5), (8, 16)], ids=str)
@pytest.mark.parametrize("rows", [3, 200])  # 200 rows: several work items of 16384 elements
def test_srste_decay_nm_equals_decay_with_the_mask_bit_for_bit(isa, dtype, nm, rows) -> None:
    """The hook's term after a compiled forward (mask recomputed chunk by chunk, never stored)
    is the term with the stored mask, bit for bit, NaN/Inf/-0.0 and ties included."""
    use(isa)
    w = weight(dtype, 23, nm[1], special=True)[:1].expand(rows, -1).contiguous()
    w[::2] = weight(dtype, 23, nm[1], special=False)[0]
    grad = torch.randn(w.shape, generator=torch.Generator().manual_seed(rows)).to(dtype)
    grad.view(-1)[2::9] = -0.0
    expected = grad.clone()
    torch.ops.nmfx_cpu.srste_decay_(expected, w, torch.ops.nmfx_cpu.nm_mask(w, *nm), 2e-4)
    out = grad.clone()
    torch.ops.nmfx_cpu.srste_decay_nm_(out, w, *nm, 2e-4)
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    assert torch.equal(out.view(bits), expected.view(bits))
    assert not torch.equal(out.view(bits), grad.view(bits))  # the term was added


@pytest.mark.parametrize("isa", ["portable", *VECTOR_ISAS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("nm", [(2, 4), (4, 8)], ids=str)
def test_mask_apply_out_writes_what_mask_apply_returns(isa, dtype, nm) -> None:
    use(isa)
    w = weight(dtype, 1000, nm[1], special=True)
    ref_mask, ref_masked = torch.ops.nmfx_cpu.nm_mask_apply(w, *nm)
    mask = torch.zeros(w.shape, dtype=torch.bool)
    masked, masked_only = torch.full_like(w, 7), torch.full_like(w, 7)
    torch.ops.nmfx_cpu.nm_mask_apply_out(w, *nm, mask, masked)
    torch.ops.nmfx_cpu.nm_mask_apply_out(w, *nm, None, masked_only)  # no mask written
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    assert torch.equal(mask, ref_mask)
    assert torch.equal(masked.view(bits), ref_masked.view(bits))
    assert torch.equal(masked_only.view(bits), ref_masked.view(bits))


def test_out_kernels_reject_mismatched_buffers() -> None:
    w, g = torch.randn(8, 16), torch.randn(8, 12)
    with pytest.raises(RuntimeError, match=r"srste_decay_nm_: grad \[8, 12\] and weight \[8, 16\]"):
        torch.ops.nmfx_cpu.srste_decay_nm_(g, w, 2, 4, 1e-3)
    with pytest.raises(RuntimeError, match="srste_decay_nm_: grad and weight must be contiguous"):
        torch.ops.nmfx_cpu.srste_decay_nm_(torch.randn(16, 8).t(), w, 2, 4, 1e-3)
    with pytest.raises(RuntimeError, match="does not match the weight"):
        torch.ops.nmfx_cpu.nm_mask_apply_out(w, 2, 4, None, torch.empty(8, 16, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="mask must be a contiguous bool tensor"):
        torch.ops.nmfx_cpu.nm_mask_apply_out(w, 2, 4, torch.empty(8, 16), torch.empty(8, 16))
