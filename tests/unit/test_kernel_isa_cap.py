"""``NMFX_ISA_CAP`` / ``use_isa_cap``: an AVX-512 host runs what an AVX2-only or portable-only
host runs (CI runs on all three kinds; this is how one host checks the others' paths).

Under a cap the kernels see a CPU without the ISAs above it: the automatic picks of nm_gemm,
nm_dense and the mask kernels, forced ISAs and paths, ``available_isas`` and the autotuner's
host key (so its cache file) all follow."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import nmfx
import nmfx.kernels as K
from nmfx.kernels import _autotune, _build
from nmfx.lowering.cpu import NMLinear
from nmfx.packed import pack

ORDER = list(_build.ISA_CODES)


def _caps() -> list[str]:
    """Every host kind this CPU can stand in for (itself included)."""
    return [isa for isa in ORDER if K.kernels_available() and isa in K.available_isas()]


def _random_nm(rows: int, cols: int) -> torch.Tensor:
    w = torch.randn(rows, cols // 4, 4)
    idx = w.abs().topk(2, dim=-1).indices
    return torch.zeros_like(w).scatter_(-1, idx, w.gather(-1, idx)).reshape(rows, cols)


@pytest.fixture(autouse=True)
def _private(kernel_defaults) -> None:
    assert K.kernels_available()


@pytest.mark.parametrize("cap", _caps())
def test_cap_hides_every_isa_above_it(cap: str) -> None:
    real = K.available_isas()
    with K.use_isa_cap(cap):
        assert K.available_isas() == ORDER[: ORDER.index(cap) + 1]
        assert _autotune.host_key()["isas"] == K.available_isas()
        for above in ORDER[ORDER.index(cap) + 1 :]:
            with pytest.raises(ValueError, match=f"ISA path '{above}' is not supported"):
                K.set_isa(above)
            with pytest.raises(RuntimeError, match="not supported by this CPU"):
                torch.ops.nmfx_cpu.nm_dense(
                    torch.randn(1, 16), *_buffers(8, 16), None, 8, 16, 2, 4,
                    isa=_build.ISA_CODES[above],
                )  # fmt: skip
        if cap in ("portable", "avx2"):  # the mask kernels' own AVX-512 code is hidden too
            with pytest.raises(RuntimeError, match="lacks AVX-512"):
                torch.ops.nmfx_cpu.set_mask_isa(3)
    assert K.available_isas() == real


def _buffers(rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    p = pack(_random_nm(rows, cols), "2:4")
    return p.values, p.mask


@pytest.mark.parametrize("cap", _caps())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_lowered_layer_under_each_cap_matches_linear_at_every_bucket(cap, dtype, tol) -> None:
    """Tuned (for real, briefly) and run under the cap: every choice it makes is runnable
    there, and every bucket's result matches F.linear."""
    w = _random_nm(40, 96).to(dtype)
    bias = torch.randn(40).to(dtype)
    with K.use_isa_cap(cap), _calibrated():
        layer = NMLinear(pack(w, "2:4"), bias)
        table = K.autotune([layer], progress=False)
        allowed = {None, *K.available_isas()}
        assert all(_autotune.choice_isa(c) in allowed for c in next(iter(table.values())).values())
        for rows_x in (1, 2, 3, 8, 33, 300):
            x = torch.randn(rows_x, 96).to(dtype)
            ref = F.linear(x.float(), w.float(), bias.float()).to(dtype)
            torch.testing.assert_close(layer(x), ref, **tol("kernel", dtype))


class _calibrated:
    """Tuning on, with few rounds (a correctness test, not a timing)."""

    def __enter__(self) -> None:
        self._env = os.environ.get("NMFX_CALIBRATE")
        self._budget = _autotune.CELL_BUDGET_S
        os.environ["NMFX_CALIBRATE"] = "1"
        _autotune.CELL_BUDGET_S = 0.0
        _autotune.clear_memory()

    def __exit__(self, *exc: object) -> None:
        os.environ["NMFX_CALIBRATE"] = self._env or "0"
        _autotune.CELL_BUDGET_S = self._budget
        _autotune.clear_memory()


def test_cap_changes_the_cache_file_and_restores_on_exit() -> None:
    if len(_caps()) < 2:
        pytest.skip("this CPU has one ISA path only")
    full = _autotune.cache_path(_autotune.host_key())
    with K.use_isa_cap(_caps()[-2]):
        assert _autotune.cache_path(_autotune.host_key()) != full
    assert _autotune.cache_path(_autotune.host_key()) == full


def test_bad_cap_names_the_value_and_the_allowed_ones() -> None:
    with pytest.raises(ValueError, match=r"NMFX_ISA_CAP='avx9' is not one of \['portable', 'avx2'"):
        K.set_isa_cap("avx9")


@pytest.mark.parametrize("value", ["avx2", "avx9"])
def test_cap_from_the_environment(value: str) -> None:
    """Read when the kernels load: a process started with NMFX_ISA_CAP=avx2 runs as an
    AVX2-only host; a bad value is an error naming it."""
    if value == "avx2" and "avx2" not in K.available_isas():
        pytest.skip("this CPU lacks AVX2")
    code = (
        "import torch, nmfx, nmfx.kernels as K\n"
        "from nmfx.packed import pack\n"
        "print(K.available_isas())\n"
        "w = torch.randn(8, 32) * (torch.arange(32) % 4 < 2)\n"
        "x = torch.randn(1, 32)\n"
        "torch.testing.assert_close(K.nm_linear(x, pack(w, '2:4')), x @ w.T)\n"
    )
    env = {**os.environ, "NMFX_ISA_CAP": value, "NMFX_CALIBRATE": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    if value == "avx2":
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "['portable', 'avx2']"
    else:
        assert out.returncode != 0
        assert "NMFX_ISA_CAP='avx9' is not one of ['portable', 'avx2', 'avx512'" in out.stderr


def test_lowering_under_a_cap_runs_there(tol) -> None:
    if "avx2" not in _caps():
        pytest.skip("this CPU lacks AVX2")
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    model = nmfx.finalize(nmfx.sparsify(model))
    x = torch.randn(5, 64)
    with K.use_isa_cap("avx2"):
        low = nmfx.lower(model, "cpu")
        torch.testing.assert_close(low(x), model(x), **tol("lowered_model", torch.float32))


def test_compiled_graphs_cpp_op_follows_the_cap(monkeypatch, python_calls) -> None:
    """The C++ op compiled graphs call (nmfx_cpu::nm_linear) decides from tables of runnable
    choices: under a cap a choice above it goes to the Python op, which warns and runs the
    nearest path; without the cap C++ runs it again."""
    from nmfx.kernels import _cpp_linear

    if "avx512" not in _caps() or not _cpp_linear.ready():
        pytest.skip("needs AVX-512 and the C++ op")
    calls = python_calls
    monkeypatch.setattr(_autotune, "_warned", set())
    w = _random_nm(16, 64)
    p = pack(w, "2:4")
    x = torch.randn(3, 64)
    code = _autotune.encode(["avx512-expand"] * len(_autotune.BUCKETS))
    args = (x, p.values, p.mask, None, 16, 64, 2, 4, code)
    with K.use_isa_cap("avx2"), pytest.warns(RuntimeWarning, match="'avx512-expand', which"):
        y = torch.ops.nmfx_cpu.nm_linear(*args)
    assert calls[0] == 1
    torch.testing.assert_close(y, F.linear(x, w), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(torch.ops.nmfx_cpu.nm_linear(*args), y, rtol=1e-5, atol=1e-4)
    assert calls[0] == 1
