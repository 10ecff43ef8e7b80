"""Property tests (hypothesis) over shapes, patterns, dtypes, values and batch sizes.

1. ``nm_mask`` (C++ kernel and tensor-op paths) equals the mask written from the definition.
2. ``pack`` -> ``unpack`` is exact, bit for bit, and ``pack`` refuses weights that are not N:M.
3. ``nm_linear`` (every ISA path, sparse and dense dispatch) equals ``F.linear`` within a
   bound derived from the dtypes' unit roundoffs (``TOL_OUT`` below); with NaN/Inf in x, every
   forced kernel path has F.linear's NaN and Inf; a mask corrupted after packing is refused on
   entry exactly when it is invalid and never crashes a kernel path.
4. ``sparsify`` -> train -> ``finalize``: the finalized model's output equals the sparsified
   model's eval output, bit for bit, and its recorded weights are exactly N:M.

CI runs ``DEFAULT_EXAMPLES`` examples per property (the file in well under a minute). The
long run: ``NMFX_FUZZ_EXAMPLES=10000 NMFX_FUZZ_THREADS=1 python -m pytest -q
tests/unit/test_fuzz.py`` (``NMFX_FUZZ_THREADS`` caps the kernels' threads on a shared
machine; see docs/fuzzing.md for the last result).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from tolerances import TOL
from torch import nn

import nmfx
from nmfx.masks import masked_with_mask, reference_nm_mask
from nmfx.packed import PackedNM, pack, unpack
from nmfx.pattern import NMPattern

DEFAULT_EXAMPLES = {
    "mask": 150, "pack": 150, "linear": 150, "sparsify": 40, "nonfinite": 40, "corrupt": 40,
}  # fmt: skip


def fuzz(kind: str):
    """Settings for one property: ``NMFX_FUZZ_EXAMPLES`` overrides the CI count."""
    examples = int(os.environ.get("NMFX_FUZZ_EXAMPLES") or DEFAULT_EXAMPLES[kind])
    return settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


FLOATS = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
PACKED_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
STYLES = ["normal", "ties", "specials", "tiny", "huge"]


@st.composite
def patterns(draw, ms=(2, 3, 4, 5, 8, 16)) -> NMPattern:
    m = draw(st.sampled_from(ms))
    return NMPattern(draw(st.integers(1, m - 1)), m)


def values(shape: tuple[int, ...], dtype: torch.dtype, style: str, seed: int) -> torch.Tensor:
    """Random weights of one style: ``ties`` (few distinct magnitudes, both signs and -0.0),
    ``specials`` (NaN, +/-Inf, +/-0 sprinkled in), ``tiny`` (subnormal), ``huge``."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g, dtype=torch.float64)
    if style == "ties":
        w = torch.randint(-2, 3, shape, generator=g).double()
        w[torch.rand(shape, generator=g) < 0.1] = -0.0
    elif style == "specials":
        pick = torch.rand(shape, generator=g)
        w[pick < 0.08] = float("nan")
        w[(pick >= 0.08) & (pick < 0.12)] = float("inf")
        w[(pick >= 0.12) & (pick < 0.16)] = -float("inf")
        w[(pick >= 0.16) & (pick < 0.2)] = -0.0
        w[(pick >= 0.2) & (pick < 0.24)] = 0.0
    elif style == "tiny":
        w = w * torch.finfo(dtype).tiny / 4  # subnormal in the weight's dtype (or zero)
    elif style == "huge":
        w = w * torch.finfo(dtype).max / 8
    return w.to(dtype)


def definition_mask(w: torch.Tensor, n: int, m: int, dim: int) -> torch.Tensor:
    """The mask's definition (nmfx/masks.py), stated directly: per group of M along ``dim``, keep the N largest |w|;
    NaN ranks as +Inf; ties go to the lower index (a stable descending sort)."""
    moved = w.movedim(dim, -1)
    key = moved.reshape(-1, m).double().abs()
    key = torch.where(key.isnan(), float("inf"), key)
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices
    keep = torch.zeros_like(key, dtype=torch.bool).scatter_(-1, order[:, :n], True)
    return keep.reshape(moved.shape).movedim(-1, dim)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])


# ---- 1. masks ---------------------------------------------------------------------------


@fuzz("mask")
@given(
    pattern=patterns(),
    lead=st.lists(st.integers(1, 12), min_size=0, max_size=3),
    groups=st.integers(1, 40),
    dim_pick=st.integers(0, 3),
    dtype=st.sampled_from(FLOATS),
    style=st.sampled_from(STYLES),
    seed=st.integers(0, 2**31 - 1),
)
def test_mask_equals_the_definition(pattern, lead, groups, dim_pick, dtype, style, seed):
    n, m = pattern.n, pattern.m
    ndim = len(lead) + 1
    dim = dim_pick % ndim  # the reduction dim anywhere: Linear 1, x @ W 0, conv 1 of 4
    shape = list(lead)
    shape.insert(dim, groups * m)
    w = values(tuple(shape), dtype, style, seed)
    want = definition_mask(w, n, m, dim)
    mask = nmfx.nm_mask(w, pattern, dim)  # the C++ kernel where eligible (numel >= 4096)
    assert mask.dtype == torch.bool and mask.shape == w.shape
    assert torch.equal(reference_nm_mask(w, pattern, dim), want)  # the tensor-op path
    assert (want.movedim(dim, -1).reshape(-1, m).sum(-1) == n).all()
    fused_mask, masked = masked_with_mask(w, pattern, dim)
    assert torch.equal(mask, want)
    assert torch.equal(fused_mask, want)
    assert torch.equal(bits(masked), bits(torch.where(want, w, 0)))
    assert nmfx.is_nm(masked, pattern, dim)


def test_float64_masks_rank_in_float64():
    """Found by this fuzzer: the C++ mask kernel ranked fp64 magnitudes in fp32 (fixed in
    eec2178: fp64 masks take the tensor-op path)."""
    w = torch.ones(1024, 8, dtype=torch.float64)  # 8192 weights: above the kernel size floor
    w[:, 1::2] += 1e-12  # larger in fp64, equal once rounded to fp32
    assert torch.equal(nmfx.nm_mask(w, "1:2"), definition_mask(w, 1, 2, 1))


# ---- 2. pack / unpack -------------------------------------------------------------------


@fuzz("pack")
@given(
    pattern=patterns(ms=(4, 8, 16)),
    rows=st.integers(1, 64),
    groups=st.integers(1, 24),
    dtype=st.sampled_from(PACKED_DTYPES),
    style=st.sampled_from(STYLES),
    sparser=st.floats(0, 1),
    seed=st.integers(0, 2**31 - 1),
    break_at=st.none() | st.integers(0, 2**31 - 1),
)
def test_pack_unpack_round_trip_is_exact(
    pattern, rows, groups, dtype, style, sparser, seed, break_at
):
    n, m = pattern.n, pattern.m
    cols = groups * m
    w = values((rows, cols), dtype, style, seed)
    w = torch.where(nmfx.nm_mask(w, pattern), w, 0)
    g = torch.Generator().manual_seed(seed + 1)
    w[torch.rand(w.shape, generator=g) < sparser * 0.5] = 0.0  # groups with fewer than N
    p = pack(w, pattern)
    assert p.values.shape == (rows, cols // m * n) and p.mask.shape == (rows, (cols + 7) // 8)
    assert p.nbytes == rows * cols * n // m * w.element_size() + rows * ((cols + 7) // 8)
    back = unpack(p)
    assert back.dtype == dtype and back.shape == w.shape
    # exact, bit for bit, NaN payloads and signs included; the one documented exception:
    # a -0.0 that the packer did not keep comes back as +0.0 (equal by value)
    neg_zero = bits(w) == bits(torch.tensor(-0.0, dtype=dtype))
    same = bits(back) == bits(w)
    assert (same | (neg_zero & (back == 0))).all()
    q = PackedNM(p.values.clone(), p.mask.clone(), p.shape, p.pattern)  # re-validation passes
    assert torch.equal(bits(unpack(q)), bits(back))
    if break_at is not None:  # one group too dense: refused, naming that group
        row, grp = break_at % rows, (break_at // rows) % groups
        w[row, grp * m : grp * m + m] = 1.0
        with pytest.raises(ValueError, match=rf"weight is not {n}:{m}: row {row}, group {grp} "):
            pack(w, pattern)


# ---- 3. nm_linear vs F.linear -------------------------------------------------------------

# Unit roundoff of the output dtype. The kernels and F.linear multiply exactly and accumulate
# in fp32 (fp64 reference), so for K products, whatever the summation order,
#   |y - ref| <= (K + 2) u32 S + u_out |ref| + eta_out
# with S = |x| @ |W|^T + |b| and eta_out = u_out * smallest normal (half the subnormal step:
# an fp16 output near zero is off by up to 2^-25 absolute); checked with a factor 2 to spare.
U32 = 2.0**-24
TOL_OUT = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


@pytest.fixture(scope="module", autouse=True)
def _kernel_env(tmp_path_factory):
    """No calibration timing in tests: the built-in dispatch table, in a private cache."""
    from nmfx.kernels import _dispatch

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NMFX_CALIBRATE", "0")
        mp.setenv("NMFX_CACHE_DIR", str(tmp_path_factory.mktemp("nmfx-cache")))
        mp.delenv("NMFX_DISPATCH", raising=False)
        mp.delenv("NMFX_ISA", raising=False)
        mp.setattr(_dispatch, "_table", None)
        yield


def _isas() -> list[str]:
    from nmfx import kernels

    return ["auto", *kernels.available_isas()]


@fuzz("linear")
@given(
    pattern=patterns(ms=(4, 8, 16)),
    rows=st.integers(1, 96),
    tall=st.integers(0, 19),  # 1 in 20: over 8192 rows, more than one thread's chunk
    groups=st.integers(1, 24),
    batch=st.lists(st.integers(0, 40), min_size=1, max_size=2),
    threads=st.sampled_from([1, 2]),
    dtype=st.sampled_from(PACKED_DTYPES),
    with_bias=st.booleans(),
    isa_pick=st.integers(0, 3),
    mode=st.sampled_from(["auto", "sparse", "dense"]),
    transposed=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_nm_linear_equals_f_linear(
    pattern, rows, tall, groups, batch, threads, dtype, with_bias, isa_pick, mode, transposed, seed
):
    from nmfx import kernels

    if tall == 0:
        rows += 8192
        batch = [min(batch[0], 8)]  # keeps the fp64 reference small
    cols = groups * pattern.m
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g).to(dtype)
    w = torch.where(nmfx.nm_mask(w, pattern), w, 0)
    x = torch.randn(*batch, cols, generator=g).to(dtype)
    if transposed and x.dim() == 2:  # a non-contiguous input
        x = x.t().contiguous().t()
    bias = torch.randn(rows, generator=g).to(dtype) if with_bias else None
    isas = _isas()
    isa = isas[isa_pick % len(isas)]
    before = torch.get_num_threads()
    torch.set_num_threads(min(threads, int(os.environ.get("NMFX_FUZZ_THREADS") or threads)))
    try:
        with kernels.use_isa(isa), kernels.force_dispatch(mode):
            y = kernels.nm_linear(x, pack(w, pattern), bias)
    finally:
        torch.set_num_threads(before)
    assert y.dtype == dtype and y.shape == (*batch, rows)
    xd, wd = x.double(), w.double()
    ref = F.linear(xd, wd, None if bias is None else bias.double())
    scale = F.linear(xd.abs(), wd.abs(), None if bias is None else bias.double().abs())
    eta = TOL_OUT[dtype] * torch.finfo(dtype).smallest_normal
    bound = 2 * ((cols + 2) * U32 * scale + TOL_OUT[dtype] * ref.abs() + eta)
    err = (y.double() - ref).abs()
    worst = (err - bound).max().item() if err.numel() else 0.0
    assert worst <= 0, f"{isa}/{mode}: error exceeds the bound by {worst:.3g}"


def _paths(isa: str, batch: int, n: int, m: int) -> list[str]:
    """Every kernel path the op can be forced to for this call (PATH_* bits), plus dense."""
    from nmfx.kernels import _build

    if isa == "portable":
        return ["auto", "dense"]
    paths = ["auto", "expand", "panels", "dense"]
    if batch == 1 and (n, m) in _build.SELECT_PATTERNS:
        paths.append("select")
    return paths


def _run_path(x, p, bias, isa: str, path: str) -> torch.Tensor:
    from nmfx.kernels import _build

    n, m = p.pattern.n, p.pattern.m
    if path == "dense":
        return torch.ops.nmfx_cpu.nm_dense(x, p.values, p.mask, bias, p.rows, p.cols, n, m)
    bits = {"auto": 0, "expand": _build.PATH_EXPAND, "panels": _build.PATH_PANELS,
            "select": _build.PATH_SELECT}[path]  # fmt: skip
    code = _build.ISA_CODES[isa] | bits
    return torch.ops.nmfx_cpu.nm_gemm(x, p.values, p.mask, bias, p.rows, p.cols, n, m, code)


@fuzz("nonfinite")
@given(
    pattern=patterns(ms=(4, 8, 16)),
    rows=st.integers(1, 48),
    groups=st.integers(1, 40),
    batch=st.sampled_from([1, 1, 2, 3, 5, 17, 31, 32, 33, 40]),
    dtype=st.sampled_from(PACKED_DTYPES),
    with_bias=st.booleans(),
    specials=st.lists(st.sampled_from(["nan", "inf", "-inf"]), min_size=1, max_size=4),
    seed=st.integers(0, 2**31 - 1),
)
def test_nonfinite_x_gives_the_nan_and_inf_of_f_linear(
    pattern, rows, groups, batch, dtype, with_bias, specials, seed
):
    """NaN/+-Inf in x: every ISA and path (incl. the dense branch) has NaN and Inf exactly
    where F.linear on the dense weight has them (0 * Inf = NaN at pruned weights), and the
    finite outputs within the bound of the property above."""
    from nmfx import kernels

    assert kernels.kernels_available()
    cols = groups * pattern.m
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g).to(dtype)
    w = torch.where(nmfx.nm_mask(w, pattern), w, 0)
    x = torch.randn(batch, cols, generator=g).to(dtype)
    for special in specials:
        at = torch.randint(0, x.numel(), (1,), generator=g).item()
        x.view(-1)[at] = float(special)
    bias = torch.randn(rows, generator=g).to(dtype) if with_bias else None
    xd, wd = x.double(), w.double()
    ref = F.linear(xd, wd, None if bias is None else bias.double())
    finite = ref.isfinite()
    scale = F.linear(xd.nan_to_num(0, 0, 0).abs(), wd.abs(), None if bias is None else bias.double().abs())
    bound = 2 * ((cols + 2) * U32 * scale + TOL_OUT[dtype] * ref.abs()
                 + TOL_OUT[dtype] * torch.finfo(dtype).smallest_normal)  # fmt: skip
    p = pack(w, pattern)
    for isa in kernels.available_isas():
        for path in _paths(isa, batch, pattern.n, pattern.m):
            y = _run_path(x, p, bias, isa, path).double()
            assert torch.equal(y.isnan(), ref.isnan()), f"{isa}/{path}: NaN positions differ"
            assert torch.equal(y.isinf() & (y > 0), ref.isinf() & (ref > 0)), f"{isa}/{path}: +Inf"
            assert torch.equal(y.isinf() & (y < 0), ref.isinf() & (ref < 0)), f"{isa}/{path}: -Inf"
            err = (y - ref).abs()[finite]
            assert bool((err <= bound[finite]).all()), f"{isa}/{path}: finite outputs off"


@fuzz("corrupt")
@given(
    pattern=patterns(ms=(4, 8, 16)),
    rows=st.integers(1, 40),
    groups=st.integers(1, 40),
    batch=st.sampled_from([1, 2, 5, 32, 33]),
    dtype=st.sampled_from(PACKED_DTYPES),
    edit=st.sampled_from(["random_bytes", "all_ones", "flip_bits", "zeros"]),
    flips=st.integers(1, 8),
    seed=st.integers(0, 2**31 - 1),
)
def test_corrupt_masks_are_refused_on_entry_and_never_crash_the_kernels(
    pattern, rows, groups, batch, dtype, edit, flips, seed
):
    """A mask edited after packing: the entry check (PackedNM, check_mask) refuses it exactly
    when some group no longer keeps N (compared with a per-group count), and every ISA and
    path computes it anyway without a crash, giving finite outputs for finite inputs."""
    from nmfx import kernels
    from nmfx.packed import _mask_problem, check_mask

    assert kernels.kernels_available()
    n, m = pattern.n, pattern.m
    cols = groups * m
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g).to(dtype)
    p = pack(torch.where(nmfx.nm_mask(w, pattern), w, 0), pattern)
    mask = p.mask
    if edit == "random_bytes":
        mask.copy_(torch.randint(0, 256, mask.shape, generator=g, dtype=torch.uint8))
    elif edit == "all_ones":
        mask.fill_(255)
    elif edit == "zeros":
        mask.zero_()
    else:
        for _ in range(flips):
            at = torch.randint(0, mask.numel(), (1,), generator=g).item()
            mask.view(-1)[at] ^= 1 << torch.randint(0, 8, (1,), generator=g).item()
    problem = _mask_problem(mask, cols, n, m)
    assert check_mask(mask, cols, n, m) == problem
    if problem:
        with pytest.raises(ValueError, match="corrupt mask"):
            PackedNM(p.values, mask, p.shape, pattern)
    x = torch.randn(batch, cols, generator=g).to(dtype)
    for isa in kernels.available_isas():
        for path in _paths(isa, batch, n, m):
            y = _run_path(x, p, None, isa, path)
            assert y.shape == (batch, rows) and bool(y.isfinite().all()), f"{isa}/{path}"


EMPTY_BATCH_WITH_BIAS = """
import torch, nmfx
from nmfx import kernels
from nmfx.packed import pack
w = torch.randn(8, 16)
w = torch.where(nmfx.nm_mask(w, "2:4"), w, 0)
with kernels.force_dispatch("sparse"):
    y = kernels.nm_linear(torch.randn(0, 16), pack(w, "2:4"), torch.randn(8))
assert y.shape == (0, 8)
"""


def test_empty_batch_with_bias_does_not_crash(tmp_path):
    """Found by this fuzzer: nm_gemm wrote the bias into an empty output (a segfault; fixed in
    eec2178). In a subprocess, so a regression fails this test, not the whole run."""
    import subprocess
    import sys

    env = {**os.environ, "NMFX_CALIBRATE": "0", "NMFX_CACHE_DIR": str(tmp_path)}
    run = subprocess.run([sys.executable, "-c", EMPTY_BATCH_WITH_BIAS], env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, f"exit code {run.returncode}: {run.stderr[-500:]}"


# ---- 4. sparsify -> finalize ------------------------------------------------------------


OUT_TOL = TOL["fuzz"]  # the suite's one tolerance table (tests/tolerances.py)


class XW(nn.Module):
    """``x @ W`` with W ``[in, out]`` (GPT-2 Conv1D layout): groups run along dim 0."""

    def __init__(self, nin: int, nout: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(nin, nout) / nin**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.w


@st.composite
def models(draw) -> tuple[nn.Module, tuple[int, ...]]:
    """A random stack: optional conv front (maybe grouped), Linear and ``x @ W`` layers of
    widths that are and are not multiples of M, maybe a layer called twice."""
    widths = st.sampled_from([3, 4, 6, 8, 12, 16, 24, 30, 32])
    layers: list[nn.Module] = []
    if draw(st.booleans()):
        c_in, c_out = draw(st.sampled_from([3, 4, 8])), draw(st.sampled_from([4, 8]))
        groups = draw(st.sampled_from([1, 1, 2])) if c_in % 2 == 0 else 1
        k, side = draw(st.sampled_from([1, 3])), 4
        layers += [nn.Conv2d(c_in, c_out, k, groups=groups, padding=k // 2), nn.ReLU()]
        layers.append(nn.Flatten())
        shape, width = (c_in, side, side), c_out * side * side
    else:
        width = draw(widths)
        shape = (width,)
    for _ in range(draw(st.integers(1, 4))):
        out = draw(widths)
        layer = XW(width, out) if draw(st.integers(0, 3)) == 0 else nn.Linear(width, out)
        layers += [layer, nn.ReLU()]
        width = out
        if width == out and draw(st.integers(0, 5)) == 0:  # the same module called twice
            layers += [layer if isinstance(layer, nn.Linear) and layer.in_features == out
                       else nn.Identity()]  # fmt: skip
    layers.append(nn.Linear(width, draw(st.sampled_from([2, 4]))))
    return nn.Sequential(*layers), shape


@fuzz("sparsify")
@given(
    spec=models(),
    pattern=patterns(ms=(2, 4, 8)),
    mode=st.sampled_from(["srste", "fixed", "interval"]),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
    lam=st.sampled_from([0.0, 2e-4, 0.5]),
    keep_output_dense=st.booleans(),
    batch=st.integers(1, 8),
    steps=st.integers(0, 2),
    seed=st.integers(0, 2**31 - 1),
)
def test_sparsify_then_finalize_is_the_same_model(
    spec, pattern, mode, dtype, lam, keep_output_dense, batch, steps, seed
):
    model, shape = spec
    torch.manual_seed(seed)
    model = model.to(dtype)
    keys = list(model.state_dict())
    classes = {n: type(m) for n, m in model.named_modules()}
    options = {"mask_mode": "fixed"} if mode == "fixed" else {}
    if mode == "interval":
        options["mask_interval"] = 2
    try:
        nmfx.sparsify(model, pattern=pattern, srste_lambda=lam,
                      keep_output_dense=keep_output_dense, **options)  # fmt: skip
    except ValueError as exc:  # no eligible layer: a documented error, model unchanged
        assert "nothing was changed" in str(exc)
        assert not nmfx.is_sparsified(model)
        assume(False)
    sparse = nmfx.summary(model).plan.sparse
    x = torch.randn(batch, *shape).to(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(batch, *shape).to(dtype)).float().pow(2).mean().backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        want = model(x)
    masks = {c.param: (model.get_parameter(c.param).detach().clone(), c.reduce_dim) for c in sparse}
    maskers = {
        f"{fqn.rpartition('.')[0]}.{m.param_name}".lstrip("."): m.current_mask()
        for fqn, m in model.named_modules()
        if isinstance(m, nmfx.modules.NMMasker)
    }
    nmfx.finalize(model)
    with torch.no_grad():
        got = model(x)
    if all(len(c.shape) == 2 and c.reduce_dim == 1 for c in sparse):
        assert torch.equal(got, want)  # bit for bit: the same masked weights, the same ops
    else:  # the masked weight of an x @ W or conv layer is laid out channels-last: rounding
        torch.testing.assert_close(got, want, **OUT_TOL[dtype])
    assert {n: type(m) for n, m in model.named_modules()} == classes
    assert list(model.state_dict()) == keys
    record = nmfx.nm_weights(model)
    assert set(record) == set(masks)
    for param, (before, dim) in masks.items():
        w = model.get_parameter(param).detach()
        assert record[param].pattern == pattern and record[param].reduce_dim == dim
        assert nmfx.is_nm(w, pattern, dim)
        assert torch.equal(w, torch.where(maskers[param], before, 0))
