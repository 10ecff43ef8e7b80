"""Timing helpers shared by the benchmark scripts: interleaved runs, medians, machine facts.

The project machine has 2 cores that other jobs may share, so every comparison runs its
contenders interleaved (A B, B A, ...) and reports medians: contention then hits both
sides of a ratio alike. Not quite alike, though: when another process holds a core, each
multi-threaded op waits for a descheduled thread, so code made of many small ops suffers
far more than a few big GEMMs. Hence each round also records the CPU share other
processes took, tables use the clean rounds when there are enough of them, and the load
(load average, other processes' share, a small-op latency probe) is saved with the
numbers, never guessed afterwards.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

# One implementation of the machine facts and the load probe, shared with nmfx.report;
# LoadMonitor and parallel_op_latency_us are re-exported to the benchmark scripts.
from nmfx.reporting.timing import (  # noqa: F401
    LoadMonitor,
    cpu_flags,
    cpu_jiffies,
    cpu_model,
    parallel_op_latency_us,
)

RESULTS_DIR = Path(__file__).resolve().parent / "results"  # committed: the README's figures
# Where runs write by default: untracked (.gitignore: /out/), so a run never overwrites the
# committed results the README quotes; refresh those only with an explicit --out.
OUT_DIR = Path(__file__).resolve().parent.parent / "out" / "benchmarks"
CONTENDED_OP_US = 500.0  # parallel_op_latency_us above this: other jobs hold the cores
CLEAN_SHARE = 0.10  # a round is clean when other processes took <= 10% of all CPU time


def base_parser(description: str) -> argparse.ArgumentParser:
    """An argparse parser with the flags every benchmark takes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="smaller run (< 1 minute)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON output path (default out/benchmarks/<script>.json, untracked; pass "
        "benchmarks/results/<script>.json to replace the committed result)",
    )
    return parser


def add_contend_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--contend", type=int, default=0, metavar="N",
        help="run N busy-looping processes beside the measurement (stopped at exit, and after "
        "an hour at most) to see how the kernels degrade when the cores are shared",
    )  # fmt: skip


def _busy_loop(deadline: float) -> None:
    while time.time() < deadline:
        pass


class Contention:
    """``n`` busy-looping processes for the duration of the block (bounded by ``max_s``)."""

    def __init__(self, n: int, max_s: float = 3600.0) -> None:
        if n < 0:
            raise ValueError(f"--contend {n}: the number of busy processes must be >= 0")
        self.n, self.max_s = n, max_s
        self.procs: list[Any] = []

    def __enter__(self) -> Contention:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        for _ in range(self.n):
            proc = ctx.Process(target=_busy_loop, args=(time.time() + self.max_s,), daemon=True)
            proc.start()
            self.procs.append(proc)
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            proc.join(timeout=5)
        self.procs.clear()


def source_fingerprint() -> dict[str, Any]:
    """Which nmfx code was measured: git HEAD, whether nmfx/ had local edits, a content hash.

    Others edit the tree while benchmarks run, so HEAD alone does not identify the code.
    """
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for path in sorted((root / "nmfx").rglob("*")):
        if path.suffix in (".py", ".cpp", ".h") and path.is_file():
            digest.update(path.relative_to(root).as_posix().encode())
            digest.update(path.read_bytes())
    out: dict[str, Any] = {"nmfx_sha256": digest.hexdigest()[:16]}
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "nmfx"],
            cwd=root, capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        out.update(git_head=head, nmfx_locally_modified=bool(dirty))
    except (OSError, subprocess.CalledProcessError):
        pass
    return out


def machine_info() -> dict[str, Any]:
    """What the numbers depend on: torch build, CPU, threads, load, the nmfx code measured."""
    return {
        **source_fingerprint(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_model": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg": list(os.getloadavg()),
    }


def time_once(fn: Callable[[], Any]) -> float:
    """Wall seconds of one call of ``fn`` (CPU only: nothing to synchronise)."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@dataclass
class Rounds:
    """Raw seconds per contender, plus how busy other processes kept the CPU each round."""

    seconds: dict[str, list[float]]
    others_share: list[float | None] = field(default_factory=list)

    def clean(self, threshold: float = CLEAN_SHARE) -> list[int]:
        """Indices of the rounds during which other processes used <= ``threshold``."""
        return [i for i, s in enumerate(self.others_share) if s is not None and s <= threshold]

    def pick(self, min_clean: int = 3) -> tuple[dict[str, list[float]], str]:
        """The clean rounds when there are ``min_clean`` of them, else all; and a label."""
        idx = self.clean()
        n = len(self.others_share)
        if len(idx) < min_clean:
            return self.seconds, f"all {n} (only {len(idx)} clean)"
        return {k: [v[i] for i in idx] for k, v in self.seconds.items()}, f"{len(idx)}/{n} clean"

    def as_json(self) -> dict[str, Any]:
        return {"seconds": self.seconds, "others_cpu_share_per_round": self.others_share}


def _others_share(before: tuple[int, int, int] | None) -> tuple[float | None, Any]:
    """CPU share other processes took since ``before`` (a ``cpu_jiffies()``), and a new sample."""
    try:
        now = cpu_jiffies()
    except (OSError, ValueError, IndexError):
        return None, None
    if before is None:
        return None, now
    span = max(now[1] - before[1], 1)
    return max(now[0] - before[0] - (now[2] - before[2]), 0) / span, now


def interleaved(
    fns: Mapping[str, Callable[[], Any]],
    repeats: int,
    warmup: int = 1,
    budget_s: float | None = None,
    min_repeats: int = 3,
) -> Rounds:
    """Time every function ``repeats`` times, alternating the order each round.

    Round r runs the functions forwards when r is even and backwards when odd (A B, B A,
    ...), so neither side always runs first after the other (cache, allocator, turbo).
    ``warmup`` untimed rounds come first. With ``budget_s``, rounds stop once the timed
    rounds took that long, after at least ``min_repeats``. Each round also records the CPU
    share other processes took meanwhile, so contended rounds can be set aside.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    rounds = Rounds({name: [] for name in names})
    start = time.perf_counter()
    for r in range(repeats):
        if budget_s is not None and r >= min_repeats and time.perf_counter() - start > budget_s:
            break
        _, sample = _others_share(None)
        for name in names if r % 2 == 0 else reversed(names):
            rounds.seconds[name].append(time_once(fns[name]))
        share, _ = _others_share(sample)
        rounds.others_share.append(share)
    return rounds


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def paired_ratios(num: list[float], den: list[float]) -> list[float]:
    """Per-round ratios num[i] / den[i] of two interleaved series (same round, same load)."""
    return [a / b for a, b in zip(num, den, strict=True)]


def spread(xs: list[float]) -> float:
    """Relative interquartile range, (q3 - q1) / median: how noisy a series was."""
    if len(xs) < 4:
        return (max(xs) - min(xs)) / median(xs)
    q = statistics.quantiles(xs, n=4)
    return (q[2] - q[0]) / median(xs)


def ms(seconds: float) -> float:
    return round(seconds * 1e3, 3)


def default_out(script: str) -> Path:
    """The untracked default output of a benchmark script."""
    return OUT_DIR / f"{script}.json"


def write_json(script: str, payload: dict[str, Any], out: Path | None = None) -> Path:
    """Write ``payload`` to ``out``, by default ``out/benchmarks/<script>.json`` (untracked)."""
    path = out or default_out(script)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


def setup_threads(threads: int | None) -> None:
    if threads is not None:
        torch.set_num_threads(threads)


def describe(info: dict[str, Any], load: dict[str, Any]) -> str:
    """One line on the machine and how busy it was, printed under every table."""
    before = ", ".join(f"{x:.2f}" for x in load["loadavg_before"])
    after = ", ".join(f"{x:.2f}" for x in load["loadavg_after"])
    others = load.get("others_cpu_share")
    share = f"{others:.0%}" if others is not None else "unknown"
    worst = max(load["parallel_op_us_before"], load["parallel_op_us_after"])
    warning = ""
    if worst > CONTENDED_OP_US:
        warning = (
            f"\nWARNING: the machine was contended (a small parallel op took up to {worst:.0f} "
            "us): every multi-threaded op waits for a descheduled thread, which penalises "
            "code made of many small ops (eager masking) far more than a few large GEMMs. "
            "Rerun on an idle machine, or with --threads 1, before trusting ratios."
        )
    return (
        f"machine: {info['cpu_model']} ({info['cpu_count']} CPUs), {info['torch_threads']} "
        f"torch threads, torch {info['torch']}; load average {before} -> {after}; other "
        f"processes used {share} of all CPU time during the run ({load['wall_s']:.0f} s); "
        f"one small parallel op took {load['parallel_op_us_before']} us before, "
        f"{load['parallel_op_us_after']} us after" + warning
    )
