"""nmfx_cpu::nm_linear: the C++ op compiled graphs call. Same answer as nmfx::nm_linear, the
per-call choice made in C++ (no Python per call), and the Python op wherever C++ cannot settle
it (untuned layer, overrides, a choice this CPU lacks)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tolerances import tol
from torch import nn

import nmfx
from nmfx import nm_mask
from nmfx.kernels import _autotune, _build, _cpp_linear, force_dispatch, use_isa
from nmfx.packed import pack

pytestmark = pytest.mark.usefixtures("kernel_defaults")


@pytest.fixture(autouse=True)
def _ready() -> None:
    assert _build.extension_available() and _cpp_linear.ready()


def random_nm(rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    w = torch.randn(rows, cols)
    return torch.where(nm_mask(w, "2:4", -1), w, 0).to(dtype)


def code_for(choice: str) -> int:
    """A dispatch code running ``choice`` at every bucket (the selecting GEMV at one row only,
    its one shape; dense elsewhere)."""
    choices = [choice] * len(_autotune.BUCKETS)
    if choice.endswith("-select"):
        choices[1:] = ["dense"] * (len(choices) - 1)
    return _autotune.encode(choices)


def runnable_choices() -> list[str]:
    isas = _build.supported_isas()
    return [c for c in _autotune.CHOICES if _autotune.choice_isa(c) in (None, *isas)]


def test_every_choice_this_cpu_runs_is_settled_in_cpp() -> None:
    bucket_hi, codes = _cpp_linear.tables()
    assert len(bucket_hi) == len(_autotune.BUCKETS) and bucket_hi[-1] == -1
    for choice, code in zip(_autotune.CHOICES, codes, strict=True):
        if choice == "dense":
            assert code == -1
        elif choice in runnable_choices():
            assert code == _autotune.path_code(choice)
        else:
            assert code == -2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(1, 64), (5, 64), (2, 20, 64)], ids=["1row", "5rows", "3d"])
def test_cpp_op_matches_linear_for_every_choice(dtype, shape, python_calls) -> None:
    """Every choice this host runs (the AVX2 ones forced too), with a bias, and no Python."""
    w = random_nm(24, 64, dtype)
    p = pack(w, "2:4")
    bias = torch.randn(24, dtype=dtype)
    x = torch.randn(shape, dtype=dtype)
    want = F.linear(x.float(), w.float(), bias.float())
    for choice in runnable_choices():
        if choice.endswith("-select") and x.numel() != 64:
            continue  # the selecting GEMV takes one row of x; code_for gives it bucket 1 only
        code = code_for(choice)
        got = torch.ops.nmfx_cpu.nm_linear(x, p.values, p.mask, bias, 24, 64, 2, 4, code)
        assert got.shape == want.shape and got.dtype == dtype, choice
        torch.testing.assert_close(got.float(), want, **tol("kernel", dtype), msg=choice)
    assert python_calls[0] == 0


def test_bucket_boundaries_pick_each_buckets_choice(python_calls) -> None:
    """A code naming a different choice per bucket: each row count runs its own bucket's
    choice (the selecting GEMV at 1 row; errors if it ran at 2 rows)."""
    if "avx2" not in _build.supported_isas():
        pytest.skip("needs AVX2 (the selecting GEMV)")
    choices = ["avx2-select", "dense", "avx2-panels", "avx2-expand"] + ["dense"] * 6
    code = _autotune.encode(choices)
    w = random_nm(16, 64, torch.float32)
    p = pack(w, "2:4")
    for rows in (1, 2, 3, 4, 5, 8, 9, 300):
        x = torch.randn(rows, 64)
        y = torch.ops.nmfx_cpu.nm_linear(x, p.values, p.mask, None, 16, 64, 2, 4, code)
        torch.testing.assert_close(y, F.linear(x, w))
    assert python_calls[0] == 0


@pytest.mark.parametrize(
    "defer",
    ["untuned", "force_dispatch", "use_isa", "NMFX_DISPATCH", "NMFX_ISA", "unrunnable"],
)
def test_cpp_op_defers_to_the_python_op(defer, python_calls, monkeypatch) -> None:
    w = random_nm(16, 64, torch.float32)
    p = pack(w, "2:4")
    x = torch.randn(3, 64)
    code = code_for("dense")
    context = None
    if defer == "untuned":
        code = -1
    elif defer == "force_dispatch":
        context = force_dispatch("dense")
    elif defer == "use_isa":
        context = use_isa("portable")
    elif defer in ("NMFX_DISPATCH", "NMFX_ISA"):
        monkeypatch.setenv(defer, "dense" if defer == "NMFX_DISPATCH" else "portable")
    else:  # a table where dense is a choice this CPU cannot run
        bucket_hi, codes = _cpp_linear.tables()
        torch.ops.nmfx_cpu.set_linear_table(bucket_hi, [-2, *codes[1:]])
    try:
        if context is not None:
            with context:
                y = torch.ops.nmfx_cpu.nm_linear(x, p.values, p.mask, None, 16, 64, 2, 4, code)
        else:
            y = torch.ops.nmfx_cpu.nm_linear(x, p.values, p.mask, None, 16, 64, 2, 4, code)
    finally:
        torch.ops.nmfx_cpu.set_linear_table(*_cpp_linear.tables())
    torch.testing.assert_close(y, F.linear(x, w))
    assert python_calls[0] == 1
    # the override is over: C++ settles the next call
    torch.ops.nmfx_cpu.nm_linear(x, p.values, p.mask, None, 16, 64, 2, 4, code_for("dense"))
    assert python_calls[0] == 1 + (defer in ("NMFX_DISPATCH", "NMFX_ISA"))


def test_fake_kernel_and_errors() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    p = pack(random_nm(16, 64, torch.float32), "2:4")
    with FakeTensorMode() as mode:
        x = mode.from_tensor(torch.randn(2, 5, 64))
        v, mk = mode.from_tensor(p.values), mode.from_tensor(p.mask)
        y = torch.ops.nmfx_cpu.nm_linear(x, v, mk, None, 16, 64, 2, 4, 0)
    assert tuple(y.shape) == (2, 5, 16)
    with pytest.raises(RuntimeError, match="x's last dim must be cols=64"):
        torch.ops.nmfx_cpu.nm_linear(torch.randn(4, 32), p.values, p.mask, None, 16, 64, 2, 4, 0)
    x = torch.randn(2, 64, requires_grad=True)
    with pytest.raises(RuntimeError, match="has no backward"):
        torch.ops.nmfx_cpu.nm_linear(x, p.values, p.mask, None, 16, 64, 2, 4, 0)
    with torch.no_grad():
        torch.ops.nmfx_cpu.nm_linear(x, p.values, p.mask, None, 16, 64, 2, 4, 0)


class _MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(64, 96)
        self.down = nn.Linear(96, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


def _lowered_mlp() -> tuple[nn.Module, nn.Module]:
    dense = _MLP()
    with torch.no_grad():
        for lin in (dense.up, dense.down):
            lin.weight.copy_(random_nm(*lin.weight.shape, torch.float32))
    import copy

    return dense, nmfx.lower(copy.deepcopy(dense), "cpu")


def test_compiled_lowered_model_calls_the_cpp_op_and_export_keeps_the_python_op(
    python_calls,
) -> None:
    dense, low = _lowered_mlp()
    x = torch.randn(3, 64)
    torch._dynamo.reset()
    compiled = torch.compile(low, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), dense(x), **tol("lowered_model", torch.float32))
    assert python_calls[0] == 0
    # where a gradient flows to x, the Python op (with its backward) runs
    xg = x.clone().requires_grad_(True)
    torch.compile(low, backend="eager", fullgraph=True)(xg).sum().backward()
    xr = x.clone().requires_grad_(True)
    dense(xr).sum().backward()
    torch.testing.assert_close(xg.grad, xr.grad, **tol("lowered_model", torch.float32))
    assert python_calls[0] > 0
    ep = torch.export.export(low, (x,))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert "nmfx.nm_linear.default" in targets
    assert not any(t.startswith("nmfx_cpu.") for t in targets)


def test_backend_nmfx_calls_the_cpp_op(python_calls) -> None:
    dense, _ = _lowered_mlp()
    x = torch.randn(2, 64)
    torch._dynamo.reset()
    compiled = torch.compile(dense, backend="nmfx", options={"inner": "aot_eager"})
    with torch.no_grad():
        y = compiled(x)
    torch.testing.assert_close(y, dense(x), **tol("lowered_model", torch.float32))
    assert python_calls[0] == 0
    assert all(d.verdict == "sparse" for d in nmfx.lowering_decisions(compiled))
