"""The kernels' contention guard: after a call waited on a descheduled thread, calls run on one.

``nmfx_cpu::mark_contended(ms)`` stands in for a detected stall (a real one needs another
process holding a core at the right moment); ``nmfx_cpu::parallel_stats`` counts the stalls
detected and the calls the guard kept on one thread.
"""

from __future__ import annotations

from pathlib import Path

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


def guard_stats() -> dict[str, int]:
    names = ("stalls", "serial_calls", "late_starts", "window_ns", "left_ns")
    return dict(zip(names, (int(v) for v in torch.ops.nmfx_cpu.parallel_guard_stats()), strict=True))


def stall(ended_ms_ago: float = 0.0, tries: int = 5) -> dict[str, int]:
    """One parallel call whose other thread sleeps 20 ms in its first item (as if preempted
    there): the caller runs the rest, then waits on it. Starts ``ended_ms_ago`` after the last
    window's end. Retried when the scheduler held the caller itself that long (no wait seen)."""
    for _ in range(tries):
        torch.ops.nmfx_cpu.mark_contended(-ended_ms_ago)
        before = guard_stats()
        by_caller, by_others = torch.ops.nmfx_cpu.parallel_probe(32, 10.0, 20_000.0)
        assert by_caller + by_others == 32
        after = guard_stats()
        # A thread the scheduler starts late is counted as a late start (or a stall) instead.
        seen = after["stalls"] + after["late_starts"] - before["stalls"] - before["late_starts"]
        if seen:
            assert seen == 1
            return after
    raise AssertionError(f"no stall seen in {tries} calls that waited 20 ms on a thread")


def test_a_thread_stalled_inside_an_item_is_detected_and_calls_stay_on_one_thread() -> None:
    """The guard counts the stall and keeps the next calls on the calling thread (all items
    there) for the window; every item runs exactly once."""
    after = stall()
    assert after["left_ns"] > 0
    assert list(torch.ops.nmfx_cpu.parallel_probe(32, 1.0, 0.0)) == [32, 0]
    assert guard_stats()["serial_calls"] == after["serial_calls"] + 1


def test_the_window_doubles_while_stalls_recur_and_resets_after_a_quiet_stretch() -> None:
    first = stall()["window_ns"]
    assert stall()["window_ns"] == min(2 * first, 1_600_000_000)  # right after the window's end
    assert stall(ended_ms_ago=10_000.0)["window_ns"] == 50_000_000


@pytest.mark.parametrize(
    ("timing", "kind"),
    [
        # (fork, caller start, caller done, caller items, other start, idle, now) in us
        pytest.param((0, 5, 1000, 8, 10, 0, 1010), 0, id="both-threads-busy"),
        pytest.param((0, 5, 100, 8, 3000, 1, 3010), 1, id="caller-waited-on-an-idle-thread"),
        pytest.param((0, 5, 100, 4, 10, 0, 500), 1, id="caller-waited-on-a-preempted-item"),
        pytest.param((0, 5, 1000, 4, 10, 0, 1300), 0, id="waited-less-than-four-items"),
        pytest.param((0, 5, 1000, 16, 700, 0, 1010), 2, id="other-started-late"),
        pytest.param((0, 5, 2000, 16, 700, 0, 2010), 0, id="late-but-early-enough-to-pay"),
        pytest.param((0, 5, 1000, 16, 150, 0, 1010), 0, id="started-within-the-wake-up-time"),
    ],
)
def test_contention_kind_of_a_call(timing: tuple[int, ...], kind: int) -> None:
    """Which parallel calls the guard reacts to: a wait past 200 us on a thread that took no
    item or longer than four of the caller's items (stall), or another thread that started
    200 us or more after the fork and after half the caller's work (late start)."""
    ns = [v * 1000 if i != 3 and i != 5 else v for i, v in enumerate(timing)]
    assert torch.ops.nmfx_cpu.contention_kind_of(*ns) == kind


def test_no_kernel_loop_bypasses_the_guard() -> None:
    """Every multi-threaded loop of nmfx's kernels goes through parallel_items (nm_parallel.h),
    which measures the join; a bare at::parallel_for would wait on a descheduled thread with no
    guard. The one exception runs a per-thread release on every torch thread on purpose."""
    csrc = Path(K.__file__).resolve().parent.parent / "csrc"
    allowed = {("nm_parallel.h", 1), ("nm_dense.cpp", 1)}  # parallel_items; release_scratch
    found = {
        (f.name, f.read_text().count("at::parallel_for("))
        for f in sorted(csrc.iterdir())
        if f.suffix in (".cpp", ".h") and "at::parallel_for(" in f.read_text()
    }
    assert found == allowed, found
