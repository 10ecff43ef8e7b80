"""A lowered layer's eager call runs the C++ op ``nmfx_cpu::nm_linear`` (its tuned choice settled
in C++, no Python op wrapper), gives what the Python op gives, and falls back to the Python op
under every override, for an untuned layer, under grad and without the C++ op."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tolerances import tol

import nmfx.kernels as K
from nmfx.kernels import _autotune, _cpp_linear
from nmfx.lowering.cpu import NMLinear
from nmfx.masks import nm_mask
from nmfx.packed import pack

ROWS, COLS = 24, 64


@pytest.fixture(autouse=True)
def _kernels(kernel_defaults) -> None:
    assert K.kernels_available() and _cpp_linear.ready()


def _layer(bias: bool = True, tuned: bool = True) -> tuple[NMLinear, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(ROWS, COLS, generator=g)
    w = torch.where(nm_mask(w, "2:4", -1), w, 0)
    layer = NMLinear(pack(w, "2:4"), torch.randn(ROWS, generator=g) if bias else None)
    if tuned:
        key = _autotune.shape_key(ROWS, COLS, torch.float32, 2, 4)
        layer.dispatch = _autotune.encode(_autotune.default_entry(key)["choices"])
    return layer, w


def _python_op(layer: NMLinear, x: torch.Tensor) -> torch.Tensor:
    return torch.ops.nmfx.nm_linear(
        x, layer.values, layer.mask, layer.bias, ROWS, COLS, 2, 4, layer.dispatch
    )


@pytest.mark.parametrize("shape", [(1, COLS), (5, COLS), (2, 3, COLS), (COLS,)], ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_eager_call_runs_the_cpp_op_and_matches_the_python_op(shape, bias, python_calls) -> None:
    layer, _ = _layer(bias)
    x = torch.randn(shape)
    y = layer(x)  # grad mode on: x and the bias buffer need no grad, so the fast path applies
    assert python_calls[0] == 0
    want = _python_op(layer, x)
    assert python_calls[0] == 1
    assert y.shape == want.shape and torch.equal(y, want)


@pytest.mark.parametrize(
    "case", ["force_dispatch", "NMFX_DISPATCH", "use_isa", "untuned", "no_cpp_op", "grad"]
)
def test_eager_call_falls_back_to_the_python_op(case, python_calls, monkeypatch) -> None:
    layer, w = _layer(tuned=case != "untuned")
    x = torch.randn(3, COLS, requires_grad=case == "grad")
    if case == "NMFX_DISPATCH":
        monkeypatch.setenv("NMFX_DISPATCH", "dense")
    elif case == "no_cpp_op":
        monkeypatch.setattr(_cpp_linear, "EAGER_OP", [None])
    if case == "force_dispatch":
        with K.force_dispatch("dense"):
            y = layer(x)
    elif case == "use_isa":
        with K.use_isa("portable"):
            y = layer(x)
    else:
        y = layer(x)
    assert python_calls[0] == 1
    torch.testing.assert_close(y, F.linear(x, w, layer.bias), **tol("kernel", torch.float32))
    if case == "grad":
        y.sum().backward()
        torch.testing.assert_close(x.grad, w.sum(0).expand(3, COLS), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(
    "avx512" not in K.available_isas(), reason="needs an AVX-512 host to cap below its tuning"
)
def test_eager_call_under_an_isa_cap_below_the_tuned_path(python_calls) -> None:
    """Tuned on AVX-512, run capped at AVX2: the C++ op hands the call to Python, which warns
    and runs the nearest path the capped CPU has; never an illegal-ISA error."""
    layer, w = _layer()
    layer.dispatch = _autotune.encode(["avx512-expand"] * len(_autotune.BUCKETS))
    x = torch.randn(2, COLS)
    with K.use_isa_cap("avx2"), pytest.warns(RuntimeWarning, match="'avx512-expand', which"):
        y = layer(x)
    assert python_calls[0] == 1
    torch.testing.assert_close(y, F.linear(x, w, layer.bias), **tol("kernel", torch.float32))
    layer(x)  # cap lifted: C++ settles it again
    assert python_calls[0] == 1
