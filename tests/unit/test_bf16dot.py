"""The AVX512-BF16 dot-product path (``avx512bf16-panels``, nmfx/csrc/nm_bf16dot.cpp): against
F.linear on hosts with avx512_bf16, which choices offer it, forcing it, and what a host without
it does with a table or an override naming it (falls back with a warning / refuses; never an
illegal instruction). The ISA-parametrized tests of test_cpu_kernels.py and the fuzzers run it
too (ISA ``avx512bf16``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

# The kernel tests' helpers and their autouse fixture (no calibration, private cache, no
# overrides from the environment).
from test_cpu_kernels import _HAS_AVX512BF16, _no_calibration, random_nm, reference  # noqa: F401
from tolerances import TOL

import nmfx.kernels as K
from nmfx.kernels import _autotune, _build
from nmfx.lowering.cpu import NMLinear
from nmfx.packed import pack

HAS_BF16DOT = _HAS_AVX512BF16
needs_bf16dot = pytest.mark.skipif(
    not HAS_BF16DOT, reason="CPU lacks AVX512-BF16 (or AVX-512): the path is built but not run"
)
DOT = _build.ISA_CODES["avx512bf16"] | _build.PATH_PANELS
KTOL = TOL["kernel"][torch.bfloat16]


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch):
    monkeypatch.setattr(_autotune, "_warned", set())


def test_isa_is_reported_exactly_where_cpuid_has_it() -> None:
    assert K.kernels_available()
    assert ("avx512bf16" in K.available_isas()) == HAS_BF16DOT


# Odd rows (tails of the 4-row tiles and 16-row panels); cols ending mid-way through a vector
# of 32 kept values (64 columns for 2:4 / 4:8 / 8:16, 128 for 1:4 / 2:8, 256 for 1:8 / 2:16).
CASES = [
    ("2:4", 37, 1032), ("2:4", 19, 72), ("4:8", 23, 264), ("8:16", 5, 208),
    ("1:4", 21, 1100), ("2:8", 9, 136), ("1:8", 17, 1288), ("2:16", 6, 400),
]  # fmt: skip
BATCHES = [1, 2, 3, 4, 5, 7, 8, 9, 17, 33, 64]


@needs_bf16dot
@pytest.mark.parametrize(
    ("pattern", "rows", "cols"), CASES, ids=[f"{c[0]}-{c[1]}x{c[2]}" for c in CASES]
)
def test_dot_path_matches_linear(pattern: str, rows: int, cols: int) -> None:
    assert_matches_linear(pattern, rows, cols, DOT, BATCHES)


def assert_matches_linear(
    pattern: str, rows: int, cols: int, code: int, batches: list[int], supports=None
) -> None:
    """nm_gemm with path ``code`` on a random bf16 N:M weight against F.linear in fp32 maths, with
    and without bias, at every batch of ``batches`` (test_bf16gemv.py runs its path through it);
    ``supports(n, m)`` (default: bf16dot_supports) must hold for the pattern."""
    assert K.kernels_available()
    n, m = (int(v) for v in pattern.split(":"))
    assert (supports or _build.bf16dot_supports)(n, m)
    w = random_nm(rows, cols, pattern, torch.bfloat16, seed=rows)
    p = pack(w, pattern)
    bias = torch.randn(rows).bfloat16()
    g = torch.Generator().manual_seed(cols)
    for batch in batches:
        x = torch.randn(batch, cols, generator=g).bfloat16()
        for b in (None, bias):
            y = torch.ops.nmfx_cpu.nm_gemm(x, p.values, p.mask, b, rows, cols, n, m, code)
            assert y.dtype == torch.bfloat16 and y.shape == (batch, rows)
            torch.testing.assert_close(y.float(), reference(x, w, b), **KTOL)


@needs_bf16dot
def test_dot_path_reads_strided_x_and_threads_split_rows() -> None:
    """x as a column slice of a wider tensor and as a transpose; a weight tall enough that both
    threads take rows (with 2 threads)."""
    w = random_nm(1000, 320, "2:4", torch.bfloat16, seed=3)
    p = pack(w, "2:4")
    wide = torch.randn(40, 330).bfloat16()
    for x in (wide[:, 5:325], torch.randn(320, 12).bfloat16().t()):
        y = torch.ops.nmfx_cpu.nm_gemm(x, p.values, p.mask, None, 1000, 320, 2, 4, DOT)
        torch.testing.assert_close(y.float(), reference(x, w, None), **KTOL)


@needs_bf16dot
def test_forced_path_runs_the_dot_product_instruction() -> None:
    """vdpbf16ps treats subnormal inputs as zero, the fp32 paths do not: a subnormal x times a
    huge weight tells the paths apart (an observable proof that PATH_PANELS under ISA
    avx512bf16 runs the dot products), while ordinary inputs agree with F.linear above."""
    rows, cols = 8, 64
    w = torch.zeros(rows, cols)
    w[:, 0] = 2.0**100
    w[:, 1] = 1.0
    p = pack(w.bfloat16(), "2:4")
    x = torch.zeros(1, cols)
    x[0, 0] = 2.0**-130  # a bf16 subnormal (the smallest normal is 2**-126)
    x = x.bfloat16()
    assert x[0, 0].item() == 2.0**-130
    widened = _build.ISA_CODES["avx512"] | _build.PATH_PANELS
    y_fp32 = torch.ops.nmfx_cpu.nm_gemm(x, p.values, p.mask, None, rows, cols, 2, 4, widened)
    y_dot = torch.ops.nmfx_cpu.nm_gemm(x, p.values, p.mask, None, rows, cols, 2, 4, DOT)
    assert torch.equal(y_fp32.float(), torch.full((1, rows), 2.0**-30))
    assert torch.equal(y_dot.float(), torch.zeros(1, rows))


@needs_bf16dot
def test_nonfinite_x_gives_the_nan_and_inf_of_linear() -> None:
    w = random_nm(45, 256, "2:4", torch.bfloat16, seed=7)
    p = pack(w, "2:4")
    x = torch.randn(9, 256).bfloat16()
    x[8, 255] = float("inf")  # Inf where kept, NaN where pruned
    x[0, 5] = float("nan")
    x[1, 2] = float("-inf")
    ref = F.linear(x.float(), w.float())
    y = torch.ops.nmfx_cpu.nm_gemm(x, p.values, p.mask, None, 45, 256, 2, 4, DOT).float()
    assert torch.equal(y.isnan(), ref.isnan()) and torch.equal(y.isinf(), ref.isinf())
    torch.testing.assert_close(y, ref, equal_nan=True, **KTOL)


@needs_bf16dot
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_force_dispatch_and_env_accept_the_path(monkeypatch, dtype: torch.dtype) -> None:
    """bf16 weights run the dot products; other dtypes (and patterns it lacks) run the AVX-512
    batched path, so one override can cover a mixed model."""
    assert_overrides_accept(monkeypatch, "avx512bf16-panels", dtype, 5)


def assert_overrides_accept(monkeypatch, choice: str, dtype: torch.dtype, rows: int) -> None:
    """``force_dispatch(choice)`` and ``NMFX_DISPATCH=choice`` both give F.linear's result on a
    2:4 weight of ``dtype`` at ``rows`` rows of x (test_bf16gemm.py and test_bf16vnni.py use it
    too)."""
    w = random_nm(24, 128, "2:4", dtype, seed=1)
    p = pack(w, "2:4")
    x = torch.randn(rows, 128).to(dtype)
    tol = KTOL if dtype == torch.bfloat16 else TOL["kernel"][dtype]
    with K.force_dispatch(choice):
        y = K.nm_linear(x, p)
    torch.testing.assert_close(y.float(), reference(x, w, None), **tol)
    monkeypatch.setenv("NMFX_DISPATCH", choice)
    torch.testing.assert_close(K.nm_linear(x, p).float(), reference(x, w, None), **tol)


def test_choices_offer_it_for_bf16_and_its_patterns_only(monkeypatch) -> None:
    assert_offered_where_cpuid_has_it(
        monkeypatch,
        "avx512bf16-panels",
        offered=[(2, 4, 8, "bfloat16"), (1, 8, 1, "bfloat16")],
        refused=[(2, 4, 8, "float32"), (3, 4, 8, "bfloat16"), (5, 16, 8, "bfloat16")],
    )


def assert_offered_where_cpuid_has_it(
    monkeypatch, choice: str, offered: list[tuple], refused: list[tuple], code: int | None = None
) -> None:
    """On a host with AVX512-BF16 the tuner times ``choice`` for every ``(n, m, rows, dtype)`` in
    ``offered`` and for none in ``refused``; its path bit is ``code``; the untuned default never
    names it (it is chosen only where it measured faster); without AVX512-BF16 it is never
    offered (test_bf16gemv.py, test_bf16gemm.py and test_bf16vnni.py use it too)."""
    host = ["portable", "avx2", "avx512", "avx512bf16"]
    monkeypatch.setattr(_build, "supported_isas", lambda: host)
    for case in offered:
        assert choice in _autotune.host_choices(*case), case
    for case in refused:
        assert choice not in _autotune.host_choices(*case), case
    if code is not None:
        assert _autotune.path_code(choice) == code
    key = _autotune.shape_key(16, 64, torch.bfloat16, *offered[0][:2])
    assert choice not in _autotune.default_entry(key)["choices"]
    monkeypatch.setattr(_build, "supported_isas", lambda: host[:-1])
    for case in offered:
        assert choice not in _autotune.host_choices(*case), case


def test_a_table_naming_it_falls_back_where_the_cpu_lacks_it(monkeypatch) -> None:
    """A module tuned on an AVX512-BF16 host, run where the CPU lacks it: the nearest batched
    path with one warning, and the right result; an override naming it is an error there."""
    real = [i for i in _build.supported_isas() if i != "avx512bf16"]
    fallback = next((f"{i}-panels" for i in ("avx512", "avx2") if i in real), "portable")
    assert_table_falls_back(monkeypatch, "avx512bf16-panels", fallback, 9)


def assert_path_bit_is_no_bit_elsewhere(isa: str, dtype: torch.dtype, pattern: str, bit: int) -> None:
    """A path bit where its kernel does not apply (other dtype, pattern or ISA) gives the ISA's
    own pick bit for bit, at one row and at 40 (test_bf16gemv.py and test_bf16gemm.py)."""
    if isa not in _build.supported_isas():
        pytest.skip(f"CPU lacks {isa}")
    n, m = (int(v) for v in pattern.split(":"))
    w = random_nm(24, 128, pattern, dtype, seed=5)
    p = pack(w, pattern)
    for batch in (1, 40):
        x = torch.randn(batch, 128).to(dtype)
        own = torch.ops.nmfx_cpu.nm_gemm(x, p.values, p.mask, None, 24, 128, n, m,
                                         _build.ISA_CODES[isa])  # fmt: skip
        forced = torch.ops.nmfx_cpu.nm_gemm(x, p.values, p.mask, None, 24, 128, n, m,
                                            _build.ISA_CODES[isa] | bit)  # fmt: skip
        assert torch.equal(own, forced)
        torch.testing.assert_close(forced.float(), reference(x, w, None), **TOL["kernel"][dtype])


def assert_path_bits_stay_exclusive(bit: int, name: str) -> None:
    """``bit`` together with PATH_PANELS is refused, naming ``name``."""
    assert K.kernels_available()
    p = pack(random_nm(4, 64, "2:4", torch.bfloat16), "2:4")
    both = _build.ISA_CODES["portable"] | bit | _build.PATH_PANELS
    with pytest.raises(RuntimeError, match=rf"bad path bits .*{name}"):
        torch.ops.nmfx_cpu.nm_gemm(torch.randn(1, 64).bfloat16(), p.values, p.mask, None, 4, 64,
                                   2, 4, both)  # fmt: skip


def own_path_fallback() -> str:
    """What a table naming a missing AVX512-BF16 GEMV/GEMM path runs instead: the best ISA's own
    path ("sparse"), or "portable" on a CPU without AVX2."""
    real = [i for i in _build.supported_isas() if i != "avx512bf16"]
    return "portable" if real == ["portable"] else "sparse"


def assert_table_falls_back(monkeypatch, choice: str, fallback: str, batch: int) -> None:
    """A layer whose table names the AVX512-BF16 path ``choice`` at every bucket, run with
    AVX512-BF16 hidden from the kernels: one warning naming ``fallback``, the right result, and
    ``force_dispatch(choice)`` an error (test_bf16gemv.py and test_bf16gemm.py use it too)."""
    assert K.kernels_available()
    # Capped, the kernels and the C++ op's choice table (which an eager call of the layer
    # consults) see a CPU without AVX512-BF16 (and without what a cap in force hides already).
    with K.use_isa_cap(next(i for i in ("avx512", "avx2", "portable") if i in K.available_isas())):
        w = random_nm(24, 64, "2:4", torch.bfloat16, seed=4)
        layer = NMLinear(pack(w, "2:4"), torch.randn(24).bfloat16())
        layer.dispatch = _autotune.encode([choice] * len(_autotune.BUCKETS))
        x = torch.randn(batch, 64).bfloat16()
        with pytest.warns(RuntimeWarning, match=rf"names '{choice}', which this CPU cannot "
                          rf"run .*running '{fallback}' instead"):  # fmt: skip
            y = layer(x)
        torch.testing.assert_close(y.float(), reference(x, w, layer.bias), **KTOL)
        assert K.dispatch_summary(layer.dispatch) == f"{choice} at 1+ rows of x"
        needs = rf"'{choice}' needs ISA 'avx512bf16'"
        with pytest.raises(ValueError, match=needs), K.force_dispatch(choice):
            K.nm_linear(x, pack(w, "2:4"))


@pytest.mark.skipif(HAS_BF16DOT, reason="this CPU has AVX512-BF16: the op runs it")
def test_the_op_refuses_the_isa_where_the_cpu_lacks_it() -> None:
    assert K.kernels_available()
    p = pack(random_nm(8, 64, "2:4", torch.bfloat16), "2:4")
    with pytest.raises(RuntimeError, match="not supported by this CPU"):
        torch.ops.nmfx_cpu.nm_gemm(torch.randn(8, 64).bfloat16(), p.values, p.mask, None, 8, 64,
                                   2, 4, DOT)  # fmt: skip
