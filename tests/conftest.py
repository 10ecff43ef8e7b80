"""Shared test settings: tolerances from one table, seeded RNG, hypothesis profile."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

TOL = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-6},
    torch.float16: {"rtol": 1e-3, "atol": 1e-3},
    torch.bfloat16: {"rtol": 1e-2, "atol": 1e-2},
}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _no_kernel_timing(monkeypatch) -> None:
    """Lowering does not time kernels in tests (each ISA's default paths run): no test depends
    on which path the autotuner would pick here. tests/unit/test_autotune.py turns it on."""
    monkeypatch.setenv("NMFX_CALIBRATE", "0")
