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


@pytest.mark.parametrize("isa", VECTOR_ISAS)
@pytest.mark.parametrize("nm", [(2, 4), (1, 4), (3, 4)], ids=str)
@pytest.mark.parametrize("numel", [4, 8, 12, 20, 28, 4 * 4097, 4 * 12_291])  # tails; threads
def test_term_with_mask_in_registers_equals_mask_then_decay_bit_for_bit(isa, nm, numel) -> None:
    """fp32 groups of 4: srste_decay_nm_ ranks each group in registers (no mask in memory);
    the result is bit for bit the portable mask followed by the portable decay, whatever the
    number of groups (the 2- and 4-group vector steps' tails) and with NaN, Inf, ties, -0.0."""
    w = weight(torch.float32, numel // 4, 4, special=True)[1].contiguous()  # ties
    grad = torch.randn(numel, generator=torch.Generator().manual_seed(numel))
    grad[2::9] = -0.0
    torch.ops.nmfx_cpu.set_mask_isa(ISA_CODES["portable"])
    ref = grad.clone()
    torch.ops.nmfx_cpu.srste_decay_(ref, w, torch.ops.nmfx_cpu.nm_mask(w, *nm), 0.5)
    use(isa)
    out = grad.clone()
    torch.ops.nmfx_cpu.srste_decay_nm_(out, w, *nm, 0, 0.5)
    assert torch.equal(out.view(torch.int32), ref.view(torch.int32))
    if numel >= 20:  # a few groups of small integers may prune only zeros
        assert not torch.equal(out.view(torch.int32), grad.view(torch.int32))


def test_set_mask_isa_rejects_unknown_codes() -> None:
    with pytest.raises(RuntimeError, match=r"ISA code 7 is not 0 \(auto\), 1 \(portable\)"):
        torch.ops.nmfx_cpu.set_mask_isa(7)
    assert torch.ops.nmfx_cpu.set_mask_isa(0) == 0


def strided_weight(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Ties (small integers), NaN, +/-Inf and -0.0 at scattered positions."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-3, 4, shape, generator=g).to(dtype)
    flat = w.view(-1)
    flat[::3] = torch.randn(flat[::3].shape, generator=g).to(dtype)
    flat[::7], flat[3::11], flat[5::13], flat[6::17] = (
        float("nan"),
        float("inf"),
        -float("inf"),
        -0.0,
    )
    return w


# (shape, dim): groups along the last dim (chunked mask), along conv input channels (inner
# 9: a tile tail; inner 20: one full tile and a tail), along dim 0 of an [in, out] weight
LAYOUTS = [((200, 92), 1), ((7, 16, 3, 3), 1), ((5, 8, 4, 5), 1), ((16, 40), 0), ((3, 16, 1), 1)]


@pytest.mark.parametrize("isa", ["portable", *VECTOR_ISAS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("nm", [(2, 4), (1, 4), (4, 8), (2, 5)], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_mask_and_term_along_any_dim_equal_the_references_bit_for_bit(isa, dtype, nm, layout):
    """The fused forward (mask + masked weight into given buffers) and the hook's term with the
    mask recomputed (never stored): bit for bit the portable contiguous kernels' results, on a
    weight grouped along its last dim, a conv weight's input channels or dim 0."""
    shape, dim = layout
    if shape[dim] % nm[1]:
        shape = tuple(s * nm[1] if d == dim else s for d, s in enumerate(shape))
    w = strided_weight(dtype, shape, seed=sum(shape))
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    grad.view(-1)[2::9] = -0.0
    torch.ops.nmfx_cpu.set_mask_isa(ISA_CODES["portable"])
    ref_mask, ref_masked = torch.ops.nmfx_cpu.nm_mask_apply(w.movedim(dim, -1), *nm)
    ref_mask, ref_masked = ref_mask.movedim(-1, dim), ref_masked.movedim(-1, dim)
    assert torch.equal(ref_mask, reference_nm_mask(w, NMPattern(*nm), dim))
    ref_term = grad.clone()
    torch.ops.nmfx_cpu.srste_decay_(ref_term, w, ref_mask.contiguous(), 2e-4)
    use(isa)
    mask = torch.zeros(shape, dtype=torch.bool)
    masked, masked_only = torch.full_like(w, 7), torch.full_like(w, 7)
    torch.ops.nmfx_cpu.nm_mask_apply_out(w, *nm, dim, mask, masked)
    torch.ops.nmfx_cpu.nm_mask_apply_out(w, *nm, dim, None, masked_only)  # no mask written
    term = grad.clone()
    torch.ops.nmfx_cpu.srste_decay_nm_(term, w, *nm, dim, 2e-4)
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    assert torch.equal(mask, ref_mask)
    assert torch.equal(masked.view(bits), ref_masked.view(bits))
    assert torch.equal(masked_only.view(bits), ref_masked.view(bits))
    assert torch.equal(term.view(bits), ref_term.view(bits))
    assert not torch.equal(term.view(bits), grad.view(bits))  # the term was added


def test_out_kernels_reject_mismatched_buffers() -> None:
    w, g = torch.randn(8, 16), torch.randn(8, 12)
    with pytest.raises(RuntimeError, match=r"srste_decay_nm_: grad \[8, 12\] and weight \[8, 16\]"):
        torch.ops.nmfx_cpu.srste_decay_nm_(g, w, 2, 4, 1, 1e-3)
    with pytest.raises(RuntimeError, match="srste_decay_nm_: grad and weight must be contiguous"):
        torch.ops.nmfx_cpu.srste_decay_nm_(torch.randn(16, 8).t(), w, 2, 4, 1, 1e-3)
    with pytest.raises(RuntimeError, match="srste_decay_nm_: dim 0 has size 8, not a multiple"):
        torch.ops.nmfx_cpu.srste_decay_nm_(torch.randn(8, 16), w, 3, 16, 0, 1e-3)
    with pytest.raises(RuntimeError, match="nm_mask_apply_out: dim 2 is out of range"):
        torch.ops.nmfx_cpu.nm_mask_apply_out(w, 2, 4, 2, None, torch.empty(8, 16))
    with pytest.raises(RuntimeError, match="masked is Double but the weight is Float"):
        torch.ops.nmfx_cpu.nm_mask_apply_out(
            w, 2, 4, 1, None, torch.empty(8, 16, dtype=torch.float64)
        )
    with pytest.raises(RuntimeError, match="mask must be a contiguous bool tensor"):
        torch.ops.nmfx_cpu.nm_mask_apply_out(w, 2, 4, 1, torch.empty(8, 16), torch.empty(8, 16))
