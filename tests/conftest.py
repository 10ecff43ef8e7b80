"""Shared test settings: the tolerance table (tests/tolerances.py), seeded RNG, hypothesis profile."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# The tolerance table lives in tests/tolerances.py (importable as ``tolerances``: this
# directory is on sys.path for every test); the ``tol`` fixture hands it to tests too.


@pytest.fixture
def tol():
    from tolerances import tol as lookup

    return lookup


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _no_kernel_timing(monkeypatch) -> None:
    """Lowering does not time kernels in tests (each ISA's default paths run): no test depends
    on which path the autotuner would pick here. tests/unit/test_autotune.py turns it on."""
    monkeypatch.setenv("NMFX_CALIBRATE", "0")


@pytest.fixture
def kernel_defaults(monkeypatch, tmp_path) -> None:
    """The kernels' built-in default paths: no calibration, a private autotune cache, no
    dispatch/ISA override from the environment, the per-process shape table rebuilt."""
    from nmfx.kernels import _dispatch

    monkeypatch.setenv("NMFX_CALIBRATE", "0")
    monkeypatch.setenv("NMFX_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("NMFX_DISPATCH", raising=False)
    monkeypatch.delenv("NMFX_ISA", raising=False)
    monkeypatch.setattr(_dispatch, "_table", None)


@pytest.fixture
def python_calls(monkeypatch) -> list[int]:
    """Counts the calls that reached nmfx::nm_linear's Python implementation (the C++ op
    nmfx_cpu::nm_linear hands some calls to it)."""
    from nmfx.kernels import _ops

    calls = [0]
    real = _ops.compute

    def counting(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(_ops, "compute", counting)
    return calls
