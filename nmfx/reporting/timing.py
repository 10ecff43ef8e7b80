"""Honest timing: warm-up, interleaved contenders, medians and spread, machine facts.

Contenders run interleaved (A B A B ...) in one process so that load from other jobs on
a shared machine hits both sides of a ratio alike; the median is reported with the
inter-quartile range. On CUDA, times come from CUDA events after synchronisation.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "CONTENDED_SHARE",
    "LoadMonitor",
    "Timing",
    "cpu_flags",
    "cpu_jiffies",
    "cpu_model",
    "machine_info",
    "time_interleaved",
]

# Share of all cores' time taken by other processes above which a measurement is contended.
CONTENDED_SHARE = 0.10


@dataclass(frozen=True)
class Timing:
    """Seconds of each repeat, with the summary figures used in reports."""

    seconds: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def iqr(self) -> float:
        if len(self.seconds) < 4:
            return max(self.seconds) - min(self.seconds)
        q = statistics.quantiles(self.seconds, n=4)
        return q[2] - q[0]


def _timer(device: str) -> Callable[[Callable[[], object]], float]:
    if device == "cuda":

        def cuda_time(fn: Callable[[], object]) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3

        return cuda_time

    def cpu_time(fn: Callable[[], object]) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    return cpu_time


@torch.no_grad()
def time_interleaved(
    fns: Mapping[str, Callable[[], object]],
    *,
    warmup: int = 3,
    repeats: int = 10,
    min_seconds: float = 0.0,
    device: str = "cpu",
) -> dict[str, Timing]:
    """Time each callable ``repeats`` times, interleaved, after ``warmup`` calls of each.

    With ``min_seconds``, repeats continue (up to 10x) until the total time of the first
    contender reaches it, so very fast layers get enough samples.
    """
    timer = _timer(device)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    i = 0
    while i < repeats or (sum(samples[names[0]]) < min_seconds and i < 10 * repeats):
        order = names if i % 2 == 0 else names[::-1]
        for name in order:
            samples[name].append(timer(fns[name]))
        i += 1
    return {name: Timing(tuple(s)) for name, s in samples.items()}


def parallel_op_latency_us(numel: int = 1 << 18, calls: int = 50) -> float:
    """Median microseconds of one small multi-threaded op (an add of 256K floats).

    A few tens of microseconds on an idle machine; when another process holds a core, every
    parallel region waits for a descheduled thread and this jumps to milliseconds.
    """
    a, b = torch.randn(numel), torch.randn(numel)
    out = torch.empty(numel)
    samples = []
    for _ in range(calls):
        start = time.perf_counter()
        torch.add(a, b, out=out)
        samples.append(time.perf_counter() - start)
    return round(statistics.median(samples) * 1e6, 1)


def cpu_jiffies() -> tuple[int, int, int]:
    """(system busy, system total, this process's CPU time) in clock ticks, from /proc."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already counted in user
    with open("/proc/self/stat") as f:
        stat = f.read().rsplit(")", 1)[1].split()
    # utime, stime, and cutime, cstime of waited-for children (fields 14-17 of proc(5)):
    # child processes a benchmark starts count as its own work, not as other load.
    own = sum(int(x) for x in stat[11:15])
    return total - idle, total, own


class LoadMonitor:
    """Context manager recording how busy the machine was while something was measured.

    ``result["others_cpu_share"]`` is the fraction of all cores' time spent by *other*
    processes (0 on an idle machine, 0.5 when a single-threaded job kept one of 2 cores
    busy); absent where /proc cannot be read. :attr:`contended` says whether that share
    passed :data:`CONTENDED_SHARE`, or the small parallel op ran 5x slower after than before.
    """

    def __init__(self) -> None:
        self.result: dict[str, Any] = {}

    def __enter__(self) -> LoadMonitor:
        self._probe0 = parallel_op_latency_us()
        self._load0 = _loadavg()
        self._wall0 = time.perf_counter()
        try:
            self._j0: tuple[int, int, int] | None = cpu_jiffies()
        except (OSError, ValueError, IndexError):
            self._j0 = None
        return self

    def __exit__(self, *exc: object) -> None:
        self.result = {
            "loadavg_before": self._load0,
            "loadavg_after": _loadavg(),
            "wall_s": time.perf_counter() - self._wall0,
            "parallel_op_us_before": self._probe0,
            "parallel_op_us_after": parallel_op_latency_us(),
        }
        try:
            busy1, total1, own1 = cpu_jiffies()
        except (OSError, ValueError, IndexError):
            return
        if self._j0 is not None:
            busy0, total0, own0 = self._j0
            span = max(total1 - total0, 1)
            self.result["own_cpu_share"] = (own1 - own0) / span
            self.result["others_cpu_share"] = max(busy1 - busy0 - (own1 - own0), 0) / span

    @property
    def others_share(self) -> float | None:
        share = self.result.get("others_cpu_share")
        return None if share is None else float(share)

    @property
    def contended(self) -> bool:
        share = self.others_share
        before = float(self.result.get("parallel_op_us_before") or 0.0)
        after = float(self.result.get("parallel_op_us_after") or 0.0)
        return (share is not None and share > CONTENDED_SHARE) or (0 < 5 * before < after)


def _loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else []


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> list[str]:
    """SIMD flags of interest (fma, avx2, avx512*, amx*) from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    return sorted(
                        f for f in flags if f.startswith(("avx2", "avx512", "amx", "fma"))
                    )
    except OSError:
        pass
    return []


def machine_info(device: str = "cpu") -> dict[str, object]:
    """What a measurement ran on: CPU, threads, SIMD, torch, load, GPU name where used."""
    info: dict[str, object] = {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "simd": cpu_flags(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if hasattr(os, "getloadavg"):
        info["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info
