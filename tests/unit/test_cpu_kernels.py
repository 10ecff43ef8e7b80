"""CPU N:M kernels: every ISA path against F.linear, dispatch, errors, compile and export."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tolerances import TOL as TOLERANCES

import nmfx.kernels as K
from nmfx.kernels import _build, _dispatch
from nmfx.packed import pack

REPO = Path(__file__).resolve().parents[2]


def _cpu_flags() -> set[str]:
    """cpuinfo's flags, less those above ``NMFX_ISA_CAP``: a run emulating an AVX2-only or a
    portable-only host (``NMFX_ISA_CAP=avx2 pytest``) expects what that host's cpuinfo says."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    flags = set(line.split(":", 1)[-1].split())
    cap = _build.ISA_CODES.get(os.environ.get(_build.ISA_CAP_ENV) or "avx512bf16", 4)
    if cap < _build.ISA_CODES["avx512bf16"]:
        flags.discard("avx512_bf16")
    if cap < _build.ISA_CODES["avx512"]:
        flags = {f for f in flags if not f.startswith("avx512")}
    if cap < _build.ISA_CODES["avx2"]:
        flags -= {"avx2", "fma"}
    return flags


_FLAGS = _cpu_flags()
_HAS_AVX2 = {"avx2", "fma"} <= _FLAGS
_HAS_AVX512 = {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vbmi2"} <= _FLAGS
_HAS_AVX512BF16 = _HAS_AVX512 and {"avx512vbmi", "avx512_bf16"} <= _FLAGS

ISAS = [
    pytest.param("portable", id="portable"),
    pytest.param(
        "avx2", id="avx2", marks=pytest.mark.skipif(not _HAS_AVX2, reason="CPU lacks AVX2/FMA")
    ),
    pytest.param(
        "avx512",
        id="avx512",
        marks=pytest.mark.skipif(
            not _HAS_AVX512,
            reason="CPU lacks AVX-512 F/BW/VL/DQ/VBMI2: the AVX-512 path is built but not run",
        ),
    ),
    # The AVX-512 kernels plus bf16 dot products: bf16 weights of its patterns take the
    # dot-product path under PATH_PANELS and from 8 rows of x; everything else as "avx512".
    pytest.param(
        "avx512bf16",
        id="avx512bf16",
        marks=pytest.mark.skipif(
            not _HAS_AVX512BF16,
            reason="CPU lacks AVX512-BF16 (or AVX-512): the bf16 dot-product path is built but "
            "not run",
        ),
    ),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Tolerances vs an fp32 reference, by dtype: the suite's one table (tests/tolerances.py).
TOL = TOLERANCES["kernel"]
# (pattern, rows, cols): odd rows; cols multiples of M that are not all multiples of 8/16/64.
CASES = [
    ("2:4", 37, 52),
    ("1:4", 9, 76),
    ("3:4", 6, 12),
    ("4:8", 11, 72),
    ("1:8", 13, 136),
    ("3:8", 5, 24),
    ("2:16", 7, 80),
    ("8:16", 3, 48),
    ("5:16", 2, 16),
]
BATCHES = [1, 2, 3, 4, 5, 7, 8, 9, 16, 33, 64]


def random_nm(rows: int, cols: int, pattern: str, dtype: torch.dtype, seed: int = 0):
    n, m = (int(v) for v in pattern.split(":"))
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols // m, m, generator=g)
    idx = w.abs().topk(n, dim=-1).indices
    return torch.zeros_like(w).scatter_(-1, idx, w.gather(-1, idx)).reshape(rows, cols).to(dtype)


def reference(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x.float(), w.float(), None if bias is None else bias.float())


@pytest.fixture(autouse=True)
def _no_calibration(kernel_defaults):
    """Tests never calibrate: the dispatch table is the built-in default in a private cache."""


def test_import_does_not_build() -> None:
    code = (
        "import torch, nmfx, nmfx.kernels, nmfx.packed\n"
        "assert not hasattr(torch.ops.nmfx_cpu, 'nm_gemm')\n"
        "assert not nmfx.kernels._build._state['tried']\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=120)


def test_kernels_build_and_report_isas() -> None:
    assert K.kernels_available(), f"kernel build failed: {K.build_error()}"
    isas = K.available_isas()
    assert isas[0] == "portable"
    assert ("avx2" in isas) == _HAS_AVX2
    assert ("avx512" in isas) == _HAS_AVX512
    assert ("avx512bf16" in isas) == _HAS_AVX512BF16


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("pattern", "rows", "cols"), CASES, ids=[c[0] for c in CASES])
def test_kernel_matches_linear(isa: str, dtype: torch.dtype, pattern: str, rows: int, cols: int):
    w = random_nm(rows, cols, pattern, dtype)
    p = pack(w, pattern)
    bias = torch.randn(rows, dtype=dtype)
    with K.use_isa(isa), K.force_dispatch("sparse"):
        for batch in BATCHES:
            x = torch.randn(batch, cols, dtype=dtype)
            for b in (None, bias):
                y = K.nm_linear(x, p, b)
                assert y.dtype == dtype and y.shape == (batch, rows)
                torch.testing.assert_close(y.float(), reference(x, w, b), **TOL[dtype])


@pytest.mark.parametrize("isa", ISAS)
def test_noncontiguous_and_3d_inputs(isa: str) -> None:
    w = random_nm(19, 40, "2:4", torch.float32)
    p = pack(w, "2:4")
    x3 = torch.randn(3, 5, 40)
    xt = torch.randn(40, 6).t()  # non-contiguous [6, 40]
    xs = torch.randn(4, 80)[:, ::2]  # strided last dim
    with K.use_isa(isa), K.force_dispatch("sparse"):
        for x in (x3, xt, xs, x3.transpose(0, 1)):
            y = K.nm_linear(x, p)
            assert y.shape == (*x.shape[:-1], 19)
            torch.testing.assert_close(y, F.linear(x, w), **TOL[torch.float32])


def test_bias_is_not_modified() -> None:
    p = pack(random_nm(8, 16, "2:4", torch.float32), "2:4")
    bias = torch.randn(8)
    before = bias.clone()
    with K.force_dispatch("sparse"):
        K.nm_linear(torch.randn(1, 16), p, bias)
    assert torch.equal(bias, before)


def test_empty_batch() -> None:
    p = pack(random_nm(8, 16, "2:4", torch.float32), "2:4")
    with K.force_dispatch("sparse"):
        assert K.nm_linear(torch.randn(0, 16), p).shape == (0, 8)


@pytest.mark.parametrize("mode", ["sparse", "dense"])
def test_forced_modes_agree(mode: str) -> None:
    w = random_nm(24, 64, "1:4", torch.bfloat16)
    p = pack(w, "1:4")
    x = torch.randn(2, 7, 64, dtype=torch.bfloat16)
    with K.force_dispatch(mode):
        y = K.nm_linear(x, p)
    torch.testing.assert_close(y.float(), reference(x, w, None), **TOL[torch.bfloat16])


def _dense_sized_tensors(rows: int, cols: int) -> list[torch.Tensor]:
    gc.collect()
    return [
        o for o in gc.get_objects()
        if type(o) in (torch.Tensor, torch.nn.Parameter) and tuple(o.shape) == (rows, cols)
    ]  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dense_branch_keeps_no_dense_copy(dtype: torch.dtype) -> None:
    """Forced dense, at 1 to 300 rows of x, matches F.linear and leaves no [rows, cols] tensor
    behind (W is expanded per call into per-thread scratch, not cached)."""
    rows, cols = 200, 264  # an odd shape: 16-column blocks past cols, blocks of rows
    w = random_nm(rows, cols, "2:4", dtype, seed=9)
    p = pack(w, "2:4")
    bias = torch.randn(rows, dtype=dtype)
    xs = [torch.randn(batch, cols, dtype=dtype) for batch in (1, 2, 7, 64, 300)]
    refs = [reference(x, w, bias) for x in xs]
    del w
    assert _dense_sized_tensors(rows, cols) == []
    with K.force_dispatch("dense"):
        for x, ref in zip(xs, refs, strict=True):
            torch.testing.assert_close(K.nm_linear(x, p, bias).float(), ref, **TOL[dtype])
    assert _dense_sized_tensors(rows, cols) == []


@pytest.mark.parametrize("pattern", ["2:4", "1:8", "3:4", "5:16"])
def test_dense_branch_matches_linear_for_any_values_storage(pattern: str) -> None:
    """nm_dense with values that have no slack (the last rows read a padded copy), x strided."""
    assert K.kernels_available()
    n, m = (int(v) for v in pattern.split(":"))
    w = random_nm(35, 16 * m + m, pattern, torch.float32, seed=10)
    p = pack(w, pattern)
    values = p.values.clone()  # exactly [rows, kept]: no slack
    x = torch.randn(9, 2 * w.shape[1])[:, ::2]
    y = torch.ops.nmfx_cpu.nm_dense(x, values, p.mask, None, 35, w.shape[1], n, m)
    torch.testing.assert_close(y, reference(x, w, None), **TOL[torch.float32])


def test_dense_branch_sees_weights_loaded_under_inference_mode() -> None:
    """Issue: under inference_mode a cached dense copy was served after load_state_dict (the
    cache keyed inference tensors as never modified). Nothing is cached now."""
    from nmfx.lowering.cpu import NMLinear

    a = torch.nn.Sequential(NMLinear(pack(random_nm(32, 64, "2:4", torch.float32, 1), "2:4"), None))
    b = torch.nn.Sequential(NMLinear(pack(random_nm(32, 64, "2:4", torch.float32, 2), "2:4"), None))
    x = torch.randn(8, 64)
    with torch.inference_mode(), K.force_dispatch("dense"):
        ya = a(x)
        a.load_state_dict(b.state_dict())
        torch.testing.assert_close(a(x), b(x))
        assert not torch.allclose(a(x), ya)


@pytest.mark.parametrize(
    ("args", "exc", "match"),
    [
        (lambda p: (torch.randn(2, 15), p), ValueError, r"x.shape\[-1\] == cols=16"),
        (lambda p: (torch.randn(2, 16, dtype=torch.float64), p), TypeError, r"cast x"),
        (lambda p: (torch.randn(2, 16), p, torch.randn(7)), ValueError, r"bias has shape"),
        (lambda p: (torch.randn(2, 16), torch.randn(8, 16)), TypeError, r"PackedNM"),
    ],
    ids=["features", "dtype", "bias", "not-packed"],
)
def test_nm_linear_errors(args, exc: type, match: str) -> None:
    p = pack(random_nm(8, 16, "2:4", torch.float32), "2:4")
    with pytest.raises(exc, match=match):
        K.nm_linear(*args(p))


def test_isa_errors(monkeypatch) -> None:
    with pytest.raises(ValueError, match=r"not one of"):
        K.set_isa("sse9")
    if not _HAS_AVX512:
        with pytest.raises(ValueError, match=r"not supported on this CPU"):
            K.set_isa("avx512")
    assert K.current_isa() == "auto"
    monkeypatch.setenv("NMFX_ISA", "portable")
    assert K.current_isa() == "portable"


def test_per_call_env_reads_follow_os_environ(monkeypatch) -> None:
    """The per-call reads of NMFX_DISPATCH / NMFX_ISA skip os.environ.get's cost, not its
    answers: set, changed, removed, and set by assigning os.environ directly."""
    monkeypatch.delenv(_dispatch.DISPATCH_ENV, raising=False)
    assert _dispatch.env(_dispatch.DISPATCH_ENV) is None
    monkeypatch.setenv(_dispatch.DISPATCH_ENV, "dense")
    assert _dispatch.env(_dispatch.DISPATCH_ENV) == "dense"
    monkeypatch.setitem(os.environ, _dispatch.DISPATCH_ENV, "sparse")
    assert _dispatch.env(_dispatch.DISPATCH_ENV) == "sparse"
    p = pack(random_nm(8, 16, "2:4", torch.float32), "2:4")
    with pytest.raises(ValueError, match="'bogus' is not one of"):  # read per call by the op
        monkeypatch.setenv(_dispatch.DISPATCH_ENV, "bogus")
        K.nm_linear(torch.ones(1, 16), p)
    monkeypatch.delenv(_dispatch.DISPATCH_ENV)
    assert _dispatch.env(_dispatch.DISPATCH_ENV) is None
    K.nm_linear(torch.ones(1, 16), p)


def test_fallback_without_kernels(monkeypatch) -> None:
    monkeypatch.setattr(_build, "_state", {"tried": False, "ok": False, "error": None})
    monkeypatch.setenv(_build.DISABLE_ENV, "1")
    with pytest.warns(RuntimeWarning, match=r"falling back to dense"):
        assert not K.kernels_available()
    w = random_nm(8, 16, "2:4", torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        with K.force_dispatch("sparse"):
            y = K.nm_linear(torch.ones(3, 16), pack(w, "2:4"))
    torch.testing.assert_close(y, F.linear(torch.ones(3, 16), w))


class _PackedLinear(torch.nn.Module):
    """What a lowering pass emits: packed tensors as buffers, the op in forward."""

    def __init__(self, w: torch.Tensor, bias: torch.Tensor, pattern: str) -> None:
        super().__init__()
        p = pack(w, pattern)
        self.register_buffer("values", p.values)
        self.register_buffer("mask", p.mask)
        self.register_buffer("bias", bias)
        self.meta = (p.rows, p.cols, p.pattern.n, p.pattern.m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.nmfx.nm_linear(x, self.values, self.mask, self.bias, *self.meta)
        return torch.relu(y)


def _model_and_input():
    w = random_nm(32, 64, "2:4", torch.float32)
    bias = torch.randn(32)
    return _PackedLinear(w, bias, "2:4"), torch.randn(2, 3, 64), lambda x: F.linear(x, w, bias)


def test_torch_compile_has_no_graph_breaks() -> None:
    model, x, ref = _model_and_input()
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0
    assert explanation.graph_count == 1

    packed = pack(random_nm(32, 64, "2:4", torch.float32), "2:4")

    def uses_op(x: torch.Tensor) -> torch.Tensor:
        return K.nm_linear(x, packed)

    assert torch._dynamo.explain(uses_op)(x).graph_break_count == 0

    torch._dynamo.reset()
    compiled = torch.compile(model, backend="inductor", fullgraph=True)
    with K.force_dispatch("sparse"):
        torch.testing.assert_close(compiled(x), torch.relu(ref(x)), **TOL[torch.float32])


def test_torch_export_round_trip() -> None:
    model, x, ref = _model_and_input()
    ep = torch.export.export(model, (x,))
    targets = {str(node.target) for node in ep.graph.nodes if node.op == "call_function"}
    assert "nmfx.nm_linear.default" in targets
    with K.force_dispatch("sparse"):
        y = ep.module()(x)
    torch.testing.assert_close(y, torch.relu(ref(x)), **TOL[torch.float32])


def test_autograd_reaches_input() -> None:
    w = random_nm(8, 16, "2:4", torch.float32)
    p = pack(w, "2:4")
    x = torch.randn(3, 16, requires_grad=True)
    with K.force_dispatch("sparse"):
        K.nm_linear(x, p).sum().backward()
    torch.testing.assert_close(x.grad, w.sum(0).expand(3, 16))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("batch", [3, 40])
def test_values_without_slack_use_padded_copy(isa: str, batch: int) -> None:
    """Raw op callers may pass values with no spare storage; the kernel copies the last rows."""
    w = random_nm(9, 32, "1:8", torch.bfloat16)
    p = pack(w, "1:8")
    tight = p.values.clone()  # storage holds exactly rows * kept elements
    assert tight.untyped_storage().nbytes() == tight.numel() * tight.element_size()
    code = _build.ISA_CODES[isa]
    x = torch.randn(batch, 32, dtype=torch.bfloat16)
    y = torch.ops.nmfx_cpu.nm_gemm(x, tight, p.mask, None, 9, 32, 1, 8, code)
    torch.testing.assert_close(y.float(), reference(x, w, None), **TOL[torch.bfloat16])


X86_ISAS = [param for param in ISAS if param.id != "portable"]
# Batches around the 32-row panels: one short panel, whole panels, a short last panel of at most
# 16 rows (computed 16 wide) and of more; 300 needs two passes of 256 rows.
PANEL_BATCHES = [1, 5, 16, 31, 32, 33, 48, 49, 64, 97, 300]
PANEL_CASES = [*CASES, ("2:4", 70, 264), ("1:8", 9, 1032), ("2:16", 5, 400)]


@pytest.mark.parametrize("isa", X86_ISAS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    ("pattern", "rows", "cols"), PANEL_CASES, ids=[f"{c[0]}-{c[2]}" for c in PANEL_CASES]
)
def test_both_x86_paths_match_linear_at_any_batch(isa, dtype, pattern, rows, cols) -> None:
    """The expanding and the batched (x panel) paths, each forced at every batch, incl. passes of
    128 columns (cols 264, 400, 1032) that end mid-way and a bias."""
    n, m = (int(v) for v in pattern.split(":"))
    w = random_nm(rows, cols, pattern, dtype, seed=1)
    p = pack(w, pattern)
    bias = torch.randn(rows, dtype=dtype)
    for path in (_build.PATH_EXPAND, _build.PATH_PANELS):
        code = _build.ISA_CODES[isa] | path
        for batch in PANEL_BATCHES:
            x = torch.randn(batch, cols, dtype=dtype)
            y = torch.ops.nmfx_cpu.nm_gemm(x, p.values, p.mask, bias, rows, cols, n, m, code)
            torch.testing.assert_close(y.float(), reference(x, w, bias), **TOL[dtype])


@pytest.mark.parametrize("isa", X86_ISAS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_batched_path_reads_row_strided_x(isa: str, dtype: torch.dtype) -> None:
    """fp32 x whose rows are a column slice of a wider tensor is staged into panels straight
    from x (no fp32 copy); other dtypes go through the copy. Both must see only x's columns."""
    assert K.kernels_available()
    w = random_nm(70, 264, "2:4", dtype, seed=4)
    p = pack(w, "2:4")
    wide = torch.randn(97, 264 + 7, generator=torch.Generator().manual_seed(5)).to(dtype)
    x = wide[:, 3 : 3 + 264]
    assert x.stride() == (271, 1)
    code = _build.ISA_CODES[isa] | _build.PATH_PANELS
    y = torch.ops.nmfx_cpu.nm_gemm(x, p.values, p.mask, None, 70, 264, 2, 4, code)
    torch.testing.assert_close(y.float(), reference(x, w, None), **TOL[dtype])


@pytest.mark.parametrize("isa", X86_ISAS)
@pytest.mark.parametrize(
    ("pattern", "batch", "paths"),
    [
        ("2:4", 64, ("expand", "panels")),
        ("2:4", 1, ("expand", "select")),
        ("4:8", 1, ("expand", "select")),
        ("1:8", 1, ("expand", "select")),
        ("1:4", 1, ("expand", "select")),
    ],
)
def test_path_bits_switch_the_path(isa: str, pattern: str, batch: int, paths) -> None:
    """A forced path runs that path on every x86 ISA: the paths sum in another order, so fp32
    results differ in the last bits (fixed seed), while both match F.linear."""
    assert K.kernels_available()
    n, m = (int(v) for v in pattern.split(":"))
    w = random_nm(64, 1032, pattern, torch.float32, seed=2)
    p = pack(w, pattern)
    x = torch.randn(batch, 1032, generator=torch.Generator().manual_seed(3))
    ys = [
        torch.ops.nmfx_cpu.nm_gemm(
            x, p.values, p.mask, None, 64, 1032, n, m, _build.ISA_CODES[isa] | PATH_BITS[path]
        )
        for path in paths
    ]
    assert not torch.equal(ys[0], ys[1])
    for y in ys:
        torch.testing.assert_close(y, reference(x, w, None), **TOL[torch.float32])


PATH_BITS = {
    "auto": 0,
    "expand": _build.PATH_EXPAND,
    "panels": _build.PATH_PANELS,
    "select": _build.PATH_SELECT,
    "gemv": _build.PATH_GEMV,  # the bf16 dot-product GEMV under avx512bf16; elsewhere "auto"
}


@pytest.mark.parametrize("isa", X86_ISAS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("pattern", sorted(f"{n}:{m}" for n, m in _build.SELECT_PATTERNS))
def test_forced_select_matches_linear(isa: str, dtype: torch.dtype, pattern: str) -> None:
    """The selecting GEMV, forced, on every x86 ISA (the AVX-512 kernel by default expands 2:4
    and 4:8), incl. a tail of fewer than 8 groups and a bias."""
    n, m = (int(v) for v in pattern.split(":"))
    cols = 8 * m * 3 + 2 * m
    w = random_nm(13, cols, pattern, dtype, seed=6)
    p = pack(w, pattern)
    bias = torch.randn(13, dtype=dtype)
    x = torch.randn(1, cols, dtype=dtype)
    code = _build.ISA_CODES[isa] | _build.PATH_SELECT
    y = torch.ops.nmfx_cpu.nm_gemm(x, p.values, p.mask, bias, 13, cols, n, m, code)
    torch.testing.assert_close(y.float(), reference(x, w, bias), **TOL[dtype])


@pytest.mark.parametrize("path", ["select", "expand", "panels"])
def test_forced_paths_accept_an_empty_batch(path: str) -> None:
    """Found by the fuzzer: the untuned default (select at the 1-row bucket, which holds 0 rows
    too) raised on x of shape [0, cols]."""
    assert K.kernels_available()
    isa = _build.supported_isas()[-1]
    if isa == "portable":
        pytest.skip("no x86 SIMD ISA on this CPU")
    p = pack(random_nm(8, 32, "1:4", torch.float32), "1:4")
    code = _build.ISA_CODES[isa] | PATH_BITS[path]
    y = torch.ops.nmfx_cpu.nm_gemm(torch.randn(0, 32), p.values, p.mask, torch.randn(8), 8, 32,
                                   1, 4, code)  # fmt: skip
    assert y.shape == (0, 8)


def test_path_bits_are_checked() -> None:
    assert K.kernels_available()
    p = pack(random_nm(4, 8, "2:4", torch.float32), "2:4")
    both = _build.ISA_CODES["portable"] | _build.PATH_EXPAND | _build.PATH_PANELS
    with pytest.raises(RuntimeError, match="bad path bits"):
        torch.ops.nmfx_cpu.nm_gemm(torch.randn(2, 8), p.values, p.mask, None, 4, 8, 2, 4, both)


@pytest.mark.parametrize(
    ("isa", "batch", "pattern"),
    [("portable", 1, "2:4"), ("best", 2, "2:4"), ("best", 1, "3:4"), ("best", 1, "2:8")],
)
def test_forced_select_where_it_cannot_run_is_an_error(isa: str, batch: int, pattern: str):
    """PATH_SELECT never silently runs another path."""
    assert K.kernels_available()
    n, m = (int(v) for v in pattern.split(":"))
    p = pack(random_nm(4, 16, pattern, torch.float32), pattern)
    name = _build.supported_isas()[-1] if isa == "best" else isa
    if name == "portable" and isa == "best":
        pytest.skip("no x86 SIMD ISA on this CPU")
    code = _build.ISA_CODES[name] | _build.PATH_SELECT
    with pytest.raises(RuntimeError, match="PATH_SELECT needs"):
        torch.ops.nmfx_cpu.nm_gemm(torch.randn(batch, 16), p.values, p.mask, None, 4, 16, n, m, code)


def _paths_for(isa: str, batch: int, pattern: str) -> list[str]:
    """Every path an ISA can be forced to at this batch (portable has one)."""
    if isa == "portable":
        return ["auto"]
    n, m = (int(v) for v in pattern.split(":"))
    paths = ["auto", "expand", "panels", "gemv"]
    if batch == 1 and (n, m) in _build.SELECT_PATTERNS:
        paths.append("select")
    return paths


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("pattern", ["2:4", "1:4", "4:8", "1:8", "3:4", "2:16"])
def test_nonfinite_x_propagates_as_in_linear(isa: str, pattern: str) -> None:
    """NaN and +-Inf in x give the NaN/Inf of F.linear on the dense weight on every path (the
    selecting, batched and portable paths skip the pruned zeros, and 0 * Inf is NaN)."""
    assert K.kernels_available()
    n, m = (int(v) for v in pattern.split(":"))
    cols = 4 * m * 9
    w = random_nm(45, cols, pattern, torch.float32, seed=7)
    p = pack(w, pattern)
    g = torch.Generator().manual_seed(8)
    for batch in (1, 3, 40):
        x = torch.randn(batch, cols, generator=g)
        x[batch - 1, cols - 1] = float("inf")  # -> Inf where kept, NaN where pruned
        if batch > 1:
            x[0, 5] = float("nan")
            x[1, 2] = float("-inf")
        ref = F.linear(x, w)
        assert ref.isinf().any() and ref.isnan().any() and not ref.isnan().all()
        for path in _paths_for(isa, batch, pattern):
            code = _build.ISA_CODES[isa] | PATH_BITS[path]
            y = torch.ops.nmfx_cpu.nm_gemm(x, p.values, p.mask, None, 45, cols, n, m, code)
            assert torch.equal(y.isnan(), ref.isnan()), (batch, path)
            assert torch.equal(y.isinf(), ref.isinf()), (batch, path)
            torch.testing.assert_close(y, ref, equal_nan=True, **TOL[torch.float32])


# Runs in a subprocess: a kernel that reads past the packed values faults on a guard page.
_GUARDED = r"""
import ctypes, mmap, sys
import torch
import nmfx.kernels as K
from nmfx.kernels import _build
from nmfx.packed import pack

assert K.kernels_available()
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                      ctypes.c_long]
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
PAGE = mmap.PAGESIZE
SLACK = 16  # elements the kernels may read past the last kept value (nm_ops.cpp kValuePad)


def guarded_values(v):
    # v's elements plus SLACK zeros, ending exactly where a PROT_NONE page begins.
    nbytes = (v.numel() + SLACK) * v.element_size()
    size = (nbytes + PAGE - 1) // PAGE * PAGE + PAGE
    addr = libc.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE,
                     mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    assert addr not in (None, ctypes.c_void_p(-1).value)
    assert libc.mprotect(addr + size - PAGE, PAGE, 0) == 0  # PROT_NONE
    buf = (ctypes.c_char * nbytes).from_address(addr + size - PAGE - nbytes)
    flat = torch.frombuffer(buf, dtype=v.dtype)
    flat.zero_()
    flat[: v.numel()].copy_(v.reshape(-1))
    return flat[: v.numel()].view(v.shape)


BITS = {"auto": 0, "expand": _build.PATH_EXPAND, "panels": _build.PATH_PANELS,
        "select": _build.PATH_SELECT, "gemv": _build.PATH_GEMV}
isa = sys.argv[1]
g = torch.Generator().manual_seed(0)
for pattern, dtype in [(pt, dt) for pt in sys.argv[2:] for dt in (torch.float32, torch.bfloat16)]:
    n, m = (int(t) for t in pattern.split(":"))
    rows, cols = 40, 8 * 16 * m + 4 * m  # a tail of mask bytes past the last whole 64 columns
    w = torch.randn(rows, cols // m, m, generator=g)
    w[..., n:] = 0
    p = pack(w.reshape(rows, cols).to(dtype), pattern)
    values = guarded_values(p.values)
    for fill in ("ones", "random", "one_extra_bit", "zeros"):
        mask = p.mask.clone()
        if fill == "ones":
            mask.fill_(255)
        elif fill == "random":
            mask.copy_(torch.randint(0, 256, mask.shape, generator=g, dtype=torch.uint8))
        elif fill == "one_extra_bit":
            byte = int(mask[-1, 0])
            mask[-1, 0] = byte | (~byte & (byte + 1) & 0xFF)  # its lowest clear bit set
        else:
            mask.zero_()
        for batch in (1, 2, 5, 33):
            x = torch.randn(batch, cols, generator=g).to(dtype)
            paths = ["auto"] if isa == "portable" else ["auto", "expand", "panels", "gemv"]
            if batch == 1 and (n, m) in _build.SELECT_PATTERNS and isa != "portable":
                paths.append("select")
            for path in paths:
                code = _build.ISA_CODES[isa] | BITS[path]
                y = torch.ops.nmfx_cpu.nm_gemm(x, values, mask, None, rows, cols, n, m, code)
                assert y.shape == (batch, rows) and bool(y.float().isfinite().all()), (fill, path)
print("ok")
"""


@pytest.mark.parametrize("isa", ISAS)
def test_corrupt_mask_never_reads_past_the_values(isa: str) -> None:
    """Whatever a mask holds (all bits set, random bytes, one extra bit, none), no path reads
    more than the 16 elements of slack past the packed values (a guard page follows them) and
    finite inputs give finite outputs. The mask is edited after packing, as a user could."""
    proc = subprocess.run(
        [sys.executable, "-c", _GUARDED, isa, "2:4", "1:4", "4:8", "1:8", "3:4", "2:16", "5:16"],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), (
        f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    )
