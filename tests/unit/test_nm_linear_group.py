"""``nmfx_cpu::nm_linear_group`` (and ``nm_gemm_group`` below it): several bias-free packed
weights on the same x in one call, each output bit-identical to that member's own
``nmfx_cpu::nm_linear`` call, on every ISA this host runs (``NMFX_ISA_CAP`` lowers it), for
members on the same tuned path (fused: x staged once, one parallel region) and on different
ones (each runs its own call)."""

from __future__ import annotations

import pytest
import torch

import nmfx.kernels as K
from nmfx.kernels import _autotune, _build, _cpp_linear
from nmfx.packed import pack, unpack

pytestmark = pytest.mark.skipif(not K.kernels_available(), reason="nmfx kernels unavailable")

SHAPES = ((200, 256), (24, 256), (40, 256))  # q-, k-, v-like; rows not multiples of 8


def _op_ready() -> None:
    assert _cpp_linear.ready()


def weights(dtype: torch.dtype, pattern: str = "2:4", shapes=SHAPES) -> list:
    torch.manual_seed(0)
    out = []
    for rows, cols in shapes:
        w = torch.randn(rows, cols)
        n, m = (int(v) for v in pattern.split(":"))
        g = w.view(rows, cols // m, m)
        keep = g.abs().topk(n, dim=-1).indices
        w = torch.zeros_like(g).scatter_(-1, keep, g.gather(-1, keep)).view(rows, cols)
        out.append(pack(w.to(dtype), pattern))
    return out


def code(choice: str) -> int:
    """A dispatch code running ``choice`` at every bucket of rows."""
    return _autotune.encode([choice] * len(_autotune.BUCKETS))


def one_by_one(x, ps, dispatch) -> list[torch.Tensor]:
    return [
        torch.ops.nmfx_cpu.nm_linear(x, p.values, p.mask, None, p.shape[0], p.shape[1],
                                     p.pattern.n, p.pattern.m, d)
        for p, d in zip(ps, dispatch, strict=True)
    ]  # fmt: skip


def group(x, ps, dispatch) -> list[torch.Tensor]:
    p0 = ps[0]
    return torch.ops.nmfx_cpu.nm_linear_group(
        x, [p.values for p in ps], [p.mask for p in ps], [p.shape[0] for p in ps],
        p0.shape[1], p0.pattern.n, p0.pattern.m, dispatch,
    )  # fmt: skip


def sparse_choices(dtype: torch.dtype, rows_of_x: int = 1) -> list[str]:
    name = str(dtype).removeprefix("torch.")
    return [c for c in _autotune.host_choices(2, 4, rows_of_x, name) if c != "dense"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows_of_x", [1, 3])
@pytest.mark.parametrize("threads", [1, 2])
def test_same_path_equals_each_call(dtype, rows_of_x, threads) -> None:
    _op_ready()
    ps = weights(dtype)
    x = torch.randn(1, rows_of_x, 256).to(dtype)  # 3-D, as a decoder's hidden state
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for choice in sparse_choices(dtype, rows_of_x):
            dispatch = [code(choice)] * len(ps)
            got, want = group(x, ps, dispatch), one_by_one(x, ps, dispatch)
            for g, w in zip(got, want, strict=True):
                assert g.shape == w.shape == (1, rows_of_x, w.shape[-1]), choice
                assert torch.equal(g, w), choice
    finally:
        torch.set_num_threads(before)


def test_members_on_different_paths_and_dense() -> None:
    _op_ready()
    ps = weights(torch.bfloat16)
    x = torch.randn(2, 256).to(torch.bfloat16)
    choices = sparse_choices(torch.bfloat16, 2)
    dispatch = [code(choices[-1]), code("dense"), code(choices[0])]
    for g, w in zip(group(x, ps, dispatch), one_by_one(x, ps, dispatch), strict=True):
        assert torch.equal(g, w)


@pytest.mark.skipif("avx512bf16" not in _build.supported_isas(), reason="no AVX512-BF16 here")
@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4"])
def test_fused_gemv_matches_nm_gemm_bit_for_bit(pattern) -> None:
    """The fused path itself (nm_gemm_group on the bf16 GEMV), large enough to go parallel, a
    member smaller than a chunk, and a non-finite x (NaN/Inf propagated as F.linear does)."""
    shapes = ((1032, 512), (8, 512), (264, 512))
    ps = weights(torch.bfloat16, pattern, shapes)
    n, m = ps[0].pattern.n, ps[0].pattern.m
    isa = _autotune.path_code("avx512bf16-gemv")
    x = torch.randn(3, 512).to(torch.bfloat16)
    x[1, 7] = float("inf")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        got = torch.ops.nmfx_cpu.nm_gemm_group(
            x, [p.values for p in ps], [p.mask for p in ps], [r for r, _ in shapes], 512, n, m, isa
        )
        for g, p, (r, c) in zip(got, ps, shapes, strict=True):
            w = torch.ops.nmfx_cpu.nm_gemm(x, p.values, p.mask, None, r, c, n, m, isa)
            torch.testing.assert_close(g, w, rtol=0, atol=0, equal_nan=True)
            ref = torch.nn.functional.linear(x.float(), unpack(p).float())
            torch.testing.assert_close(g[0].float(), ref[0], rtol=2e-2, atol=2e-2)
        assert got[0][1].isnan().any()  # the Inf row
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda a: a.update(rows=a["rows"][:2]), "as many values, masks, rows and dispatch"),
        (lambda a: a.update(values=[], masks=[], rows=[], dispatch=[]), "at least one"),
        (lambda a: a.update(cols=128), "x's last dim must be cols=128"),
    ],
)
def test_bad_arguments(change, match) -> None:
    _op_ready()
    ps = weights(torch.float32)
    args = {"values": [p.values for p in ps], "masks": [p.mask for p in ps],
            "rows": [p.shape[0] for p in ps], "cols": 256, "dispatch": [code("portable")] * 3}  # fmt: skip
    change(args)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.nmfx_cpu.nm_linear_group(
            torch.randn(1, 256), args["values"], args["masks"], args["rows"], args["cols"], 2,
            4, args["dispatch"],
        )  # fmt: skip


def test_refuses_grad() -> None:
    _op_ready()
    ps = weights(torch.float32)
    x = torch.randn(1, 256, requires_grad=True)
    with pytest.raises(RuntimeError, match="no backward"):
        group(x, ps, [code("portable")] * 3)
