"""N:M masks: patterns, exact-N groups, magnitude order, ties, NaN/Inf, layouts, dtypes."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from nmfx import NMPattern, is_nm, nm_mask, parse_pattern
from nmfx.masks import masked_with_mask

PATTERNS = [(1, 2), (2, 4), (1, 4), (3, 4), (4, 8), (1, 8), (2, 16)]


def reference_mask(w: torch.Tensor, n: int, m: int, dim: int) -> torch.Tensor:
    """Written from the definition: per group, stable-sort by descending |w| (NaN largest),
    keep the first N. Slow on purpose."""
    moved = w.detach().movedim(dim, -1)
    flat = moved.reshape(-1, m).float()
    key = torch.nan_to_num(flat.abs(), nan=float("inf"))
    keep = torch.zeros_like(flat, dtype=torch.bool)
    for g in range(flat.shape[0]):
        order = sorted(range(m), key=lambda i: (-key[g, i].item(), i))
        keep[g, order[:n]] = True
    return keep.reshape(moved.shape).movedim(-1, dim)


@pytest.mark.parametrize("text,expected", [("2:4", (2, 4)), (" 1 : 8 ", (1, 8)), ((4, 8), (4, 8))])
def test_parse_pattern_accepts(text, expected):
    p = parse_pattern(text)
    assert (p.n, p.m) == expected


@pytest.mark.parametrize("bad", ["3:2", "0:4", "2:3x", "4:4", "2", "a:b", "-1:4"], ids=repr)
def test_parse_pattern_rejects_with_value_error(bad):
    with pytest.raises(ValueError, match=r"N:M|0 < N < M"):
        parse_pattern(bad)


def test_parse_pattern_rejects_wrong_types():
    with pytest.raises(TypeError):
        parse_pattern(2.5)
    with pytest.raises(TypeError):
        NMPattern(2.0, 4)


@given(
    nm=st.sampled_from(PATTERNS),
    rows=st.integers(1, 9),
    groups=st.integers(1, 6),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    ties=st.booleans(),
)
def test_mask_matches_definition(nm, rows, groups, dtype, ties):
    n, m = nm
    w = torch.randn(rows, groups * m)
    if ties:  # few distinct magnitudes with both signs: many ties
        w = torch.randint(-2, 3, w.shape).float()
    w = w.to(dtype)
    mask = nm_mask(w, nm, dim=1)
    assert mask.dtype == torch.bool and mask.shape == w.shape
    assert (mask.view(rows, groups, m).sum(-1) == n).all()
    assert torch.equal(mask, reference_mask(w, n, m, 1))


def test_ties_prefer_lower_index():
    w = torch.tensor([[1.0, -1.0, 1.0, 1.0]])
    assert nm_mask(w, "2:4").tolist() == [[True, True, False, False]]


def test_nan_and_inf_rank_largest_and_groups_keep_exactly_n():
    nan, inf = float("nan"), float("inf")
    w = torch.tensor([[0.1, nan, 0.2, 5.0], [nan, nan, nan, 1.0], [-inf, 0.0, inf, nan]])
    mask = nm_mask(w, "2:4")
    assert mask.tolist() == [
        [False, True, False, True],
        [True, True, False, False],
        [True, False, True, False],
    ]


@pytest.mark.parametrize("conv_dims", [1, 2, 3], ids=["conv1d", "conv2d", "conv3d"])
def test_conv_groups_run_over_input_channels_at_each_kernel_position(conv_dims):
    kernel = (3,) * conv_dims
    w = torch.randn(6, 8, *kernel)
    mask = nm_mask(w, "2:4", dim=1)
    # channels-last view [out, *k, in]: every run of 4 input channels keeps exactly 2
    last = mask.movedim(1, -1)
    assert (last.reshape(-1, 4).sum(-1) == 2).all()
    # and it is exactly the per-position Linear mask
    for pos in torch.cartesian_prod(*[torch.arange(3)] * conv_dims).view(-1, conv_dims).tolist():
        idx = (slice(None), slice(None), *pos)
        assert torch.equal(mask[idx], nm_mask(w[idx], "2:4", dim=1))


def test_transposed_weight_groups_along_dim0():
    w = torch.randn(16, 5)  # [in, out] as in x @ W
    assert torch.equal(nm_mask(w, "2:4", dim=0), nm_mask(w.t(), "2:4", dim=1).t())


def test_non_divisible_dim_and_integer_weights_raise():
    with pytest.raises(ValueError, match="not a multiple of M=4"):
        nm_mask(torch.randn(3, 30), "2:4")
    with pytest.raises(TypeError, match="floating-point"):
        nm_mask(torch.ones(4, 4, dtype=torch.int32), "2:4")


@pytest.mark.parametrize("fn", [nm_mask, is_nm, masked_with_mask], ids=lambda f: f.__name__)
@pytest.mark.parametrize("dim", [2, 5, -3, 7])
def test_dim_out_of_range_names_dim_and_ndim(fn, dim):
    w = torch.randn(8, 16)  # 16 along dim 1: dim % 2 == 1 used to group there silently
    with pytest.raises(IndexError, match=rf"dim={dim} is out of range for a weight with ndim=2 "
                       r"\(shape \(8, 16\)\); pass a dim in \[-2, 1\]"):  # fmt: skip
        fn(w, "2:4", dim=dim)


@pytest.mark.parametrize("fn", [nm_mask, is_nm, masked_with_mask], ids=lambda f: f.__name__)
def test_scalar_and_non_tensor_weights_raise_clearly(fn):
    with pytest.raises(ValueError, match=r"the weight is a 0-dim tensor \(a scalar\)"):
        fn(torch.tensor(1.0), "2:4")
    with pytest.raises(TypeError, match=r"expects a torch\.Tensor weight, got list; wrap it"):
        fn([[1.0, 0.0, 0.0, 0.0]], "2:4")


def test_is_nm():
    w = torch.randn(4, 16)
    assert not is_nm(w, "2:4")
    assert is_nm(torch.where(nm_mask(w, "2:4"), w, 0), "2:4")
    assert not is_nm(torch.randn(4, 6), "2:4")


@given(
    nm=st.sampled_from(PATTERNS),
    rows=st.integers(1, 40),
    groups=st.integers(1, 40),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    special=st.booleans(),
)
def test_cpu_kernel_mask_equals_tensor_op_mask(nm, rows, groups, dtype, special):
    from nmfx.kernels import _build
    from nmfx.masks import reference_nm_mask

    if not _build.extension_available():
        pytest.skip(f"C++ kernels unavailable: {_build.build_error()}")
    w = torch.randint(-3, 4, (rows, groups * nm[1])).to(dtype)  # many ties
    if special:
        w.view(-1)[:: max(1, w.numel() // 3)] = float("nan")
        w.view(-1)[1] = float("inf")
    fast = torch.ops.nmfx_cpu.nm_mask(w, *nm)
    assert torch.equal(fast, reference_nm_mask(w, NMPattern(*nm), 1))
