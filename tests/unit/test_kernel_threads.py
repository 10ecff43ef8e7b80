"""The kernels' contention guard: after a call waited on a descheduled thread, calls run on one.

``nmfx_cpu::mark_contended(ms)`` stands in for a detected stall (a real one needs another
process holding a core at the right moment); ``nmfx_cpu::parallel_stats`` counts the stalls
detected and the calls the guard kept on one thread.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import nmfx.kernels as K
from nmfx.packed import pack


@pytest.fixture(autouse=True)
def _kernels():
    if not K.kernels_available():
        pytest.skip(f"the C++ kernels did not build here: {K.build_error()}")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the suite runs on one; the guard is about several
    yield
    torch.set_num_threads(threads)
    torch.ops.nmfx_cpu.mark_contended(0.0)


def serial_calls() -> int:
    return int(torch.ops.nmfx_cpu.parallel_stats()[1])


def test_calls_after_a_stall_run_on_one_thread_and_stay_correct() -> None:
    w = torch.randn(2048, 128, 4)  # two 2 MB blocks for the dense branch
    w[..., 2:] = 0
    w = w.reshape(2048, 512)
    p = pack(w, "2:4")
    x = torch.randn(8, 512)
    ops = {
        "sparse": lambda: K.nm_linear(x, p),
        "dense": lambda: K.nm_linear(x, p),
        "nm_mask": lambda: torch.ops.nmfx_cpu.nm_mask(torch.randn(256, 1024), 2, 4),
        "srste_decay_": lambda: torch.ops.nmfx_cpu.srste_decay_(
            torch.zeros(1 << 17), torch.ones(1 << 17), torch.zeros(1 << 17, dtype=torch.bool), 0.5
        ),
    }
    for name, op in ops.items():
        with K.force_dispatch(name if name in ("sparse", "dense") else "auto"):
            torch.ops.nmfx_cpu.mark_contended(0.0)
            before = serial_calls()
            op()
            assert serial_calls() == before, f"{name}: ran on one thread while not contended"
            torch.ops.nmfx_cpu.mark_contended(10_000.0)
            op()
            assert serial_calls() == before + 1, f"{name}: not kept on one thread"
    with K.force_dispatch("sparse"):
        torch.testing.assert_close(K.nm_linear(x, p), F.linear(x, w), rtol=1e-4, atol=1e-4)
    g = torch.zeros(1 << 17)
    torch.ops.nmfx_cpu.srste_decay_(
        g, torch.ones(1 << 17), torch.zeros(1 << 17, dtype=torch.bool), 0.5
    )
    assert torch.equal(g, torch.full((1 << 17,), 0.5))


def test_calls_leave_the_thread_count_alone() -> None:
    """No path changes torch's (OpenMP's) thread count behind the caller's back."""
    w = torch.randn(4096, 64, 4)
    w[..., 2:] = 0
    p = pack(w.reshape(4096, 256), "2:4")
    for mode in ("dense", "sparse"):
        for batch in (1, 2, 40):
            with K.force_dispatch(mode):
                K.nm_linear(torch.randn(batch, 256), p)
            assert torch.get_num_threads() == 2, (mode, batch)
