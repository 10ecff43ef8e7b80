"""The kernels' contention guard: when calls keep waiting on a descheduled thread, calls run on one.

``nmfx_cpu::mark_contended(ms)`` stands in for a detected contention (a real one needs another
process holding a core at the right moment); ``nmfx_cpu::parallel_probe`` makes a real stall
(a thread sleeping inside its first item); ``nmfx_cpu::guard_replay`` runs the rule over
evidence at given times, without threads or clocks.
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
    torch.ops.nmfx_cpu.mark_contended(-QUIET_MS)
    yield
    torch.set_num_threads(threads)
    torch.ops.nmfx_cpu.set_guard_active(True)
    torch.ops.nmfx_cpu.mark_contended(-QUIET_MS)  # the last window ended long ago: a clean slate


MS = 1_000_000  # ns
SERIAL, SERIAL_MAX, CONFIRM = 50 * MS, 1600 * MS, 20 * MS  # nm_parallel.h's rule
QUIET_MS = 10_000.0


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
    names = ("stalls", "serial_calls", "late_starts", "window_ns", "left_ns", "one_offs", "calls")
    return dict(
        zip(names, (int(v) for v in torch.ops.nmfx_cpu.parallel_guard_stats()), strict=True)
    )


def stall(
    ended_ms_ago: float | None = QUIET_MS, delay_us: float = 5_000.0, tries: int = 5
) -> dict[str, int]:
    """One parallel call whose other thread sleeps ``delay_us`` in its first item (as if
    preempted there): the caller runs the rest, then waits on it. With ``ended_ms_ago``, first
    places the last window's end that long ago (forgetting any pending one-off). Retried when
    the scheduler held the caller itself that long (no wait seen)."""
    for _ in range(tries):
        if ended_ms_ago is not None:
            torch.ops.nmfx_cpu.mark_contended(-ended_ms_ago)
        before = guard_stats()
        by_caller, by_others = torch.ops.nmfx_cpu.parallel_probe(32, 10.0, delay_us)
        assert by_caller + by_others == 32
        after = guard_stats()
        # A thread the scheduler starts late is counted as a late start (or a stall) instead.
        seen = after["stalls"] + after["late_starts"] - before["stalls"] - before["late_starts"]
        if seen:
            assert seen == 1
            return after
    raise AssertionError(f"no stall seen in {tries} calls that waited {delay_us} us on a thread")


def test_one_stall_on_a_quiet_host_keeps_calls_on_threads() -> None:
    """A one-off (a timer interrupt, hypervisor steal) opens no window: it is counted as such
    and the next call runs on both threads."""
    before = guard_stats()
    after = stall()
    assert after["one_offs"] == before["one_offs"] + 1
    assert after["left_ns"] == 0
    torch.ops.nmfx_cpu.parallel_probe(32, 1.0, 0.0)
    assert guard_stats()["serial_calls"] == after["serial_calls"]


def test_a_second_stall_soon_after_the_first_sends_calls_to_one_thread() -> None:
    """Two stalls within CONFIRM: calls run on the calling thread (all items there) for the
    window; every item runs exactly once."""
    for _ in range(5):
        first = stall()
        second = stall(ended_ms_ago=None)  # ~5 ms later
        if second["one_offs"] == first["one_offs"]:  # not held up by the scheduler in between
            break
    else:
        raise AssertionError("two stalls 5 ms apart never opened a window")
    assert second["left_ns"] > 0 and second["window_ns"] == SERIAL
    assert list(torch.ops.nmfx_cpu.parallel_probe(32, 1.0, 0.0)) == [32, 0]
    assert guard_stats()["serial_calls"] == second["serial_calls"] + 1


def test_the_window_doubles_while_stalls_recur_after_it() -> None:
    """A stall right after a window ended: the contention persists, twice the window at once."""
    first = stall(ended_ms_ago=0.0)["window_ns"]
    assert stall(ended_ms_ago=0.0)["window_ns"] == min(2 * first, SERIAL_MAX)


def test_an_observing_guard_logs_but_keeps_threads() -> None:
    """set_guard_active(False): within a window calls still run on threads (benchmarks compare
    with and without the guard)."""
    assert torch.ops.nmfx_cpu.set_guard_active(False) is True
    torch.ops.nmfx_cpu.mark_contended(10_000.0)
    before = guard_stats()["serial_calls"]
    torch.ops.nmfx_cpu.parallel_probe(32, 1.0, 0.0)
    assert guard_stats()["serial_calls"] == before
    assert torch.ops.nmfx_cpu.set_guard_active(True) is False
    torch.ops.nmfx_cpu.parallel_probe(32, 1.0, 0.0)
    assert guard_stats()["serial_calls"] == before + 1


def test_the_event_log_holds_each_stall_with_its_wait() -> None:
    """parallel_guard_events: one row per call that waited or started >= 50 us late (when, kind,
    wait, late start, busy, items, the caller's items, idle threads, window opened)."""
    torch.ops.nmfx_cpu.parallel_guard_events(True)
    stall(delay_us=5_000.0)
    rows = list(torch.ops.nmfx_cpu.parallel_guard_events(True))
    assert len(rows) % 9 == 0 and rows
    evidence = [rows[i : i + 9] for i in range(0, len(rows), 9) if rows[i + 1] != 0]
    assert len(evidence) == 1  # a stall (1) or, when the thread started that late, a late start
    _, kind, wait, late, _, items, caller_items, _, window = evidence[0]
    assert (wait if kind == 1 else late) > 200_000 and items == 32 and window == 0
    assert 0 < caller_items <= 32
    assert list(torch.ops.nmfx_cpu.parallel_guard_events(False)) == []  # cleared


def replay(times_ms: list[float], rule: list[int] | None = None) -> list[float]:
    """The windows (ms) the rule opens for evidence at these times, from a fresh state."""
    ns = [int(t * MS) for t in times_ms]
    return [w / MS for w in torch.ops.nmfx_cpu.guard_replay(ns, rule or [])]


@pytest.mark.parametrize(
    ("times_ms", "windows_ms"),
    [
        pytest.param([0], [0], id="one-off"),
        pytest.param([0, 47, 150, 400], [0, 0, 0, 0], id="quiet-host-one-offs-47ms-apart"),
        pytest.param([0, 12], [0, 50], id="second-within-20ms-opens-50ms"),
        pytest.param([0, 12, 70, 170, 300], [0, 50, 100, 200, 400], id="recurring-doubles"),
        pytest.param([0, 12, 200, 300], [0, 50, 0, 0], id="after-a-quiet-stretch-one-offs-again"),
        pytest.param([0, 12, 200, 210], [0, 50, 0, 50], id="and-a-new-pair-starts-at-50ms"),
        pytest.param([0, 10, 60, 160, 360, 760, 1560, 3160, 4760],
                     [0, 50, 100, 200, 400, 800, 1600, 1600, 1600], id="capped-at-1.6s"),
    ],
)  # fmt: skip
def test_the_rule_over_evidence_times(times_ms: list[float], windows_ms: list[float]) -> None:
    """One stall or late start opens no window (quiet VMs show isolated ones, >= 47 ms apart);
    a second within 20 ms opens 50 ms; one within a window's length after it ended doubles it."""
    assert replay(times_ms) == windows_ms


def test_the_rule_takes_its_thresholds() -> None:
    """guard_replay under other thresholds (serial, serial max, confirm): the span that confirms
    and the windows follow them; a malformed rule is an error naming the expected form."""
    assert replay([0, 30], [10 * MS, 40 * MS, 50 * MS]) == [0, 10]
    assert replay([0, 30], [10 * MS, 40 * MS, 20 * MS]) == [0, 0]
    assert replay([0, 1, 12, 30, 60], [10 * MS, 40 * MS, 5 * MS]) == [0, 10, 20, 40, 40]
    with pytest.raises(RuntimeError, match=r"\[serial, serial max, confirm\] ns or empty; got 2"):
        torch.ops.nmfx_cpu.guard_replay([0], [1, 2])


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


def test_benchmarks_record_the_guards_evidence_per_case() -> None:
    """benchmarks/_guard.py's GuardWatch (what cpu_kernels.py and contention.py store per
    case): the counters' deltas, each stall with its delay, other processes' CPU share."""
    from benchmarks._guard import GuardWatch

    with GuardWatch() as watch:
        stall()
    r = watch.result
    assert r["stalls"] + r["late_starts"] == 1 and r["one_offs"] == 1 and r["calls"] >= 1
    (evidence,) = r["evidence"]
    assert evidence["kind"] in ("stall", "late start") and evidence["delay_us"] > 200
    assert evidence["window_ms"] == 0 and evidence["t_ms"] >= 0
    assert 0.0 <= r["others_share"] <= 1.0
