"""What nmfx's contention guard (nmfx/csrc/nm_parallel.h) saw over a stretch of a benchmark.

The guard counts parallel calls that waited on a late second thread (stalls) or whose second
thread started late, and keeps calls on one thread for a window when that evidence persists. A
benchmark records, per case, the counters' deltas and the evidence itself (when, how long, which
window it opened) so a sweep's JSON shows whether the guard fired on a quiet host, and why.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from nmfx.reporting.timing import cpu_jiffies

KEYS = ("stalls", "serial_calls", "late_starts", "window_ns", "left_ns", "one_offs", "calls")
COUNTED = ("stalls", "serial_calls", "late_starts", "one_offs", "calls")
FIELDS = 9  # nm_parallel.h's kEventFields
KINDS = {1: "stall", 2: "late start"}
MAX_EVIDENCE = 200  # per stretch, in the JSON


def stats() -> dict[str, int]:
    """The guard's counters so far in this process (nmfx_cpu::parallel_guard_stats)."""
    values = [int(v) for v in torch.ops.nmfx_cpu.parallel_guard_stats()]
    return dict(zip(KEYS, values, strict=True))


def events(clear: bool = True) -> list[list[int]]:
    """The calls logged since the last clearing read: [t_ns, kind, wait_ns, late_ns, busy_ns,
    items, caller_items, idle, window_ns] each (kind 0: a wait or late start >= 50 us that the
    guard did not count)."""
    flat = [int(v) for v in torch.ops.nmfx_cpu.parallel_guard_events(clear)]
    return [flat[i : i + FIELDS] for i in range(0, len(flat), FIELDS)]


class GuardWatch:
    """Context manager: ``result`` holds the counters' deltas over the block, the evidence
    (stalls and late starts: ms since ``origin_ns``, kind, delay in us, window opened in ms) and
    how many other calls waited or started >= 50 us late (``near_misses``) and the CPU share
    other processes took meanwhile (``others_share``: a quiet stretch or not)."""

    def __init__(self, origin_ns: int | None = None) -> None:
        self.origin_ns = time.monotonic_ns() if origin_ns is None else origin_ns
        self.result: dict[str, Any] = {}

    def __enter__(self) -> GuardWatch:
        events(clear=True)
        self.before = stats()
        self.jiffies = cpu_jiffies()
        return self

    def __exit__(self, *exc: object) -> None:
        after = stats()
        busy, total, own = (b - a for a, b in zip(self.jiffies, cpu_jiffies(), strict=True))
        logged = events(clear=True)
        evidence = [e for e in logged if e[1] != 0]
        self.result = {k: after[k] - self.before[k] for k in COUNTED}
        self.result["near_misses"] = len(logged) - len(evidence)
        self.result["others_share"] = round(max(busy - own, 0) / max(total, 1), 3)
        # steady_clock (C++) and time.monotonic_ns are both CLOCK_MONOTONIC on Linux.
        self.result["evidence"] = [
            {
                "t_ms": round((e[0] - self.origin_ns) / 1e6, 3),
                "kind": KINDS[e[1]],
                "delay_us": round((e[2] if e[1] == 1 else e[3]) / 1e3, 1),
                "busy_us": round(e[4] / 1e3, 1),
                "window_ms": round(e[8] / 1e6, 1),
            }
            for e in evidence[:MAX_EVIDENCE]
        ]
