"""Benchmark nmfx's CPU N:M kernels against dense ``F.linear``, side by side in one run.

For every weight shape, dtype, pattern and number of rows of x it times, interleaved (order
alternating each round; medians of the rounds other processes left clean when there are
enough, else of all rounds):

* dense ``F.linear(x, w)`` on the unpacked weight,
* the same linear under ``torch.compile`` (inductor), compiled once per weight and batch; the baseline of every ratio is the faster of the two dense forms,
* the sparse kernel (dispatch forced to sparse, best ISA),
* ``nmfx.kernels.nm_linear`` as shipped (the dispatcher picks sparse or dense),
* the best sparse path alone (the fastest sparse choice the autotuner measured at that batch),
  forced, where it is not the one ``nm_linear`` runs,

and prints a table, the sparse GEMV's effective weight bandwidth next to this machine's
measured read bandwidth, and writes everything (with the machine's load during the run) to
``out/benchmarks/cpu_kernels.json`` (untracked; ``--out benchmarks/results/cpu_kernels.json``
replaces the committed result the README quotes).

    python benchmarks/cpu_kernels.py            # full sweep (< 15 min on 2 cores)
    python benchmarks/cpu_kernels.py --quick    # < 1 min

The summary checks issue 14's targets: ``nm_linear`` >= 0.97x the best dense at every point,
median >= 1.2x, within 5% of the best sparse path wherever that path beats dense by >= 1.1x,
and the dense branch (forced) at most 3 us over ``F.linear`` at 1024x1024, 1-2 rows of x.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _guard import GuardWatch
from _timing import Contention, LoadMonitor, add_contend_arg, describe, interleaved, machine_info

import nmfx.kernels as K
from nmfx.packed import PackedNM, pack

logger = logging.getLogger("benchmarks.cpu_kernels")

FULL = {
    "shapes": [(1024, 1024), (4096, 4096), (11008, 4096), (4096, 11008)],
    "batches": [1, 2, 4, 8, 16, 64, 256],
    "patterns": ["2:4", "1:4", "4:8", "1:8"],
    "dtypes": ["float32", "bfloat16"],
}
QUICK = {
    "shapes": [(1024, 1024), (4096, 4096)],
    "batches": [1, 8, 64],
    "patterns": ["2:4", "1:4"],
    "dtypes": ["float32", "bfloat16"],
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def random_nm(rows: int, cols: int, pattern: str, dtype: torch.dtype) -> torch.Tensor:
    """A random weight that is exactly N:M along its last dim (N largest |w| of each group)."""
    n, m = (int(v) for v in pattern.split(":"))
    w = torch.randn(rows, cols // m, m)
    idx = w.abs().topk(n, dim=-1).indices
    return torch.zeros_like(w).scatter_(-1, idx, w.gather(-1, idx)).reshape(rows, cols).to(dtype)


def read_bandwidth(gib: float = 1.0, reps: int = 7) -> dict[str, float]:
    """Machine read bandwidth (GB/s) from a large tensor sum, and copy bandwidth (read+write):
    the median and the best of ``reps`` runs (the best is what the machine can do; the memory
    of this VM is shared with other guests, so runs differ by up to a third)."""
    a = torch.ones(int(gib * 2**30) // 4)
    b = torch.empty_like(a)
    out = {}
    for name, fn, nbytes in (
        ("sum_read", lambda: a.sum(), a.numel() * 4),
        ("copy", lambda: b.copy_(a), 2 * a.numel() * 4),
    ):
        fn()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        out[f"{name}_GBps"] = nbytes / statistics.median(times) / 1e9
        out[f"{name}_best_GBps"] = nbytes / min(times) / 1e9
    return out


# A sum over this many bytes (well past the last-level cache), timed right before and right after
# every batch-1 case, gives the read bandwidth of that moment: this VM shares memory with other
# guests, and the sweep-wide figure moved by a third between runs. Not interleaved with the
# case's rounds, where evicting the cache would turn cache-resident cases into cold ones.
READ_PROBE_BYTES = 256 * 2**20
_read_probe: list[torch.Tensor] = []


def probe_read_GBps(reps: int = 3) -> list[float]:
    if not _read_probe:
        _read_probe.append(torch.ones(READ_PROBE_BYTES // 4))
    a = _read_probe[0]
    a.sum()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a.sum()
        out.append(READ_PROBE_BYTES / (time.perf_counter() - t0) / 1e9)
    return out


def _linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.linear(x, w)


def compiled_dense(w: torch.Tensor, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    """``F.linear(x, w)`` compiled by inductor for this shape (the weight an input, not frozen:
    freezing measured no faster here, and frozen constants stay cached for the whole sweep,
    which ran the machine out of memory)."""
    # Its own copy: sharing w with the eager baseline would keep it warm in cache for
    # whichever of the two runs second, an edge the other contenders do not get.
    w2 = w.clone()
    torch._dynamo.reset()  # one compiled function per case; never hit the recompile limit
    fn = torch.compile(_linear, dynamic=False)
    fn(x, w2)  # compile now, not in the timed rounds
    return lambda: fn(x, w2)


# Under --contend every round shares the cores with the busy processes on purpose, so every
# round counts: a round of a few hundred microseconds that the jiffy counter saw no other process
# in is not a clean one (the busy loop held a core all along), and picking those rounds had
# measured the lucky calls of one contender against all calls of another.
def measure(
    fns: dict[str, Callable[[], Any]],
    budget_s: float,
    max_reps: int,
    min_reps: int = 5,
    all_rounds: bool = False,
) -> tuple[dict[str, float], dict[str, list[float]], int, str]:
    """Median seconds per contender over interleaved rounds (clean rounds when possible, all
    under --contend), the per-round seconds used, the number of rounds and which were used."""
    rounds = interleaved(fns, repeats=max_reps, warmup=1, budget_s=budget_s, min_repeats=min_reps)
    if all_rounds:
        times, used = rounds.seconds, f"all {len(rounds.others_share)} (--contend)"
    else:
        times, used = rounds.pick()
    medians = {k: statistics.median(v) for k, v in times.items()}
    return medians, times, len(rounds.others_share), used


def paired_speedup(base: list[float], other: list[float]) -> float:
    """Median over rounds of base/other: both ran in the same round, under the same load."""
    return statistics.median(b / o for b, o in zip(base, other, strict=True))


def best_sparse(entry: dict[str, Any], batch: int) -> tuple[str, float] | None:
    """The fastest sparse choice the autotuner timed at ``batch`` rows of x, and its ms (None
    when the entry holds no timing at that batch, e.g. loaded from an older cache)."""
    probes, timings = entry.get("probe_rows"), entry.get("ms")
    if not probes or not timings or batch not in probes:
        return None
    ms = {c: t for c, t in timings[probes.index(batch)].items() if c != "dense"}
    if not ms:
        return None
    choice = min(ms, key=ms.__getitem__)
    return choice, ms[choice]


def guard_summary(rows: list[dict[str, Any]]) -> str:
    """One line: what the contention guard did over the sweep (per case in the JSON)."""
    total = {k: sum(r["guard"][k] for r in rows) for k in ("stalls", "late_starts", "one_offs",
                                                          "serial_calls")}  # fmt: skip
    fired = sum(1 for r in rows if r["guard"]["serial_calls"])
    return (f"contention guard: {total['stalls']} stalls, {total['late_starts']} late starts "
            f"({total['one_offs']} one-offs that opened no window), {total['serial_calls']} calls "
            f"kept on one thread in {fired} of {len(rows)} cases")  # fmt: skip


def run(
    config: dict[str, Any], budget_s: float, max_reps: int, min_reps: int = 5
) -> list[dict[str, Any]]:
    from nmfx.kernels import _autotune

    rows_out = []
    for rows, cols in config["shapes"]:
        for dtype_name in config["dtypes"]:
            dtype = DTYPES[dtype_name]
            for pattern in config["patterns"]:
                w = random_nm(rows, cols, pattern, dtype)
                p = pack(w, pattern)
                for batch in config["batches"]:
                    x = torch.randn(batch, cols, dtype=dtype)

                    def sparse(x: torch.Tensor = x, p: PackedNM = p) -> torch.Tensor:
                        with K.force_dispatch("sparse"):
                            return K.nm_linear(x, p)

                    def dispatched(x: torch.Tensor = x, p: PackedNM = p) -> torch.Tensor:
                        return K.nm_linear(x, p)

                    def dense(x: torch.Tensor = x, w: torch.Tensor = w) -> torch.Tensor:
                        return F.linear(x, w)

                    fns = {"dense": dense, "sparse": sparse, "dispatched": dispatched}
                    choice = K._dispatch.choose(batch, dtype, p.pattern.n, p.pattern.m, rows, cols)
                    key = _autotune.shape_key(rows, cols, dtype, p.pattern.n, p.pattern.m)
                    tuned = best_sparse(_autotune.table()["entries"].get(str(key), {}), batch)
                    if tuned is not None and tuned[0] != choice:

                        def forced(x=x, p=p, path=tuned[0]) -> torch.Tensor:
                            with K.force_dispatch(path):
                                return K.nm_linear(x, p)

                        fns["best_sparse"] = forced
                    if config.get("compiled", True):
                        fns["dense_compiled"] = compiled_dense(w, x)
                    probes = probe_read_GBps() if batch == 1 else []
                    with GuardWatch(config.get("origin_ns")) as guard:
                        t, per_round, reps, used = measure(
                            fns, budget_s, max_reps, min_reps, config.get("all_rounds", False)
                        )
                    if probes:
                        probes += probe_read_GBps()
                    best = (
                        "dense_compiled" if t.get("dense_compiled", 1e9) < t["dense"] else "dense"
                    )
                    base = t[best]
                    # Where nm_linear runs the best sparse path itself, that is its time.
                    best_sparse_s = t.get("best_sparse", t["dispatched"])
                    row = {
                        "shape": f"{rows}x{cols}",
                        "dtype": dtype_name,
                        "pattern": pattern,
                        "batch": batch,
                        "dense_ms": t["dense"] * 1e3,
                        "dense_compiled_ms": t["dense_compiled"] * 1e3
                        if "dense_compiled" in t
                        else None,
                        "baseline": best,
                        "baseline_ms": base * 1e3,
                        "sparse_ms": t["sparse"] * 1e3,
                        "dispatched_ms": t["dispatched"] * 1e3,
                        "sparse_speedup": base / t["sparse"],
                        "dispatched_speedup": base / t["dispatched"],
                        "sparse_speedup_paired": paired_speedup(
                            per_round[best], per_round["sparse"]
                        ),
                        "dispatched_speedup_paired": paired_speedup(
                            per_round[best], per_round["dispatched"]
                        ),
                        "choice": choice,
                        "best_sparse_choice": tuned[0] if tuned else None,
                        "best_sparse_ms": best_sparse_s * 1e3 if tuned else None,
                        "best_sparse_speedup": base / best_sparse_s if tuned else None,
                        "sparse_weight_GBps": p.nbytes / t["sparse"] / 1e9,
                        "dense_weight_GBps": p.dense_nbytes / t["dense"] / 1e9,
                        "packed_bytes": p.nbytes,
                        "dense_bytes": p.dense_nbytes,
                        "reps": reps,
                        "rounds_used": used,
                        # nmfx's contention guard over the case's rounds (benchmarks/_guard.py):
                        # stalls, calls kept on one thread, late starts, one-offs, evidence.
                        "guard": guard.result,
                    }
                    if probes:
                        # The best of 3 sums before and 3 after the case's rounds.
                        row["read_probe_GBps"] = max(probes)
                        row["read_probe_runs_GBps"] = probes
                        row["sparse_share_of_read"] = row["sparse_weight_GBps"] / max(probes)
                    rows_out.append(row)
                    logger.info(
                        "%s %s %s b=%d dense %.3f ms sparse %.3f ms (%.2fx) dispatched %.2fx",
                        row["shape"],
                        dtype_name,
                        pattern,
                        batch,
                        row["baseline_ms"],
                        row["sparse_ms"],
                        row["sparse_speedup"],
                        row["dispatched_speedup"],
                    )
    return rows_out


def describe_bandwidth(bandwidth: dict[str, Any]) -> str:
    if "before" not in bandwidth:  # results saved before the best-of and after runs
        return (
            f"machine read bandwidth (1 GiB tensor sum): {bandwidth['sum_read_GBps']:.1f} GB/s; "
            f"copy (read+write): {bandwidth['copy_GBps']:.1f} GB/s"
        )
    b, a = bandwidth["before"], bandwidth["after"]
    return (
        "machine read bandwidth (1 GiB tensor sum, median / best of 7), before the sweep: "
        f"{b['sum_read_GBps']:.1f} / {b['sum_read_best_GBps']:.1f} GB/s, after: "
        f"{a['sum_read_GBps']:.1f} / {a['sum_read_best_GBps']:.1f} GB/s; copy (read+write) "
        f"before: {b['copy_GBps']:.1f} / {b['copy_best_GBps']:.1f} GB/s"
    )


def gemv_share(r: dict[str, Any], bandwidth: dict[str, Any]) -> float:
    """The sparse GEMV's share of read bandwidth: against the probe timed around the case when
    recorded, else against the sweep's bandwidth figure."""
    if "sparse_share_of_read" in r:
        return r["sparse_share_of_read"]
    return r["sparse_weight_GBps"] / bandwidth["sum_read_GBps"]


def render(rows: list[dict[str, Any]], bandwidth: dict[str, float]) -> str:
    table = [
        [
            r["shape"],
            r["dtype"],
            r["pattern"],
            r["batch"],
            f"{r['dense_ms']:.3f}",
            "-" if r.get("dense_compiled_ms") is None else f"{r['dense_compiled_ms']:.3f}",
            f"{r['sparse_ms']:.3f}",
            f"{r['sparse_speedup']:.2f}x",
            f"{r['dispatched_ms']:.3f}",
            f"{r['dispatched_speedup']:.2f}x",
            r["choice"],
            f"{r['sparse_weight_GBps']:.1f}",
        ]
        for r in rows
    ]
    headers = [
        "weight",
        "dtype",
        "N:M",
        "rows of x",
        "dense ms",
        "compiled dense ms",
        "sparse ms",
        "sparse/best dense",
        "nm_linear ms",
        "nm_linear/best dense",
        "dispatch",
        "sparse GB/s",
    ]
    lines = [tabulate(table, headers=headers, tablefmt="github")]
    lines.append(f"\n{describe_bandwidth(bandwidth)}")
    gemv = [r for r in rows if r["batch"] == 1]
    if gemv:
        lines.append(
            "sparse GEMV (1 row of x) effective weight bandwidth; its share of the read bandwidth "
            "of that moment (best of 3 sums of 256 MiB right before and 3 right after the case):"
        )
        for r in gemv:
            lines.append(
                f"  {r['shape']:>11} {r['dtype']:>8} {r['pattern']}: "
                f"{r['sparse_weight_GBps']:.1f} GB/s ({gemv_share(r, bandwidth):.0%})"
            )
    for key, label in (
        ("dispatched_speedup", "ratio of medians"),
        ("dispatched_speedup_paired", "median of per-round ratios"),
    ):
        below = [r for r in rows if r[key] < 0.95]
        lines.append(
            f"nm_linear below 0.95x the best dense ({label}): {len(below)} of {len(rows)} cases"
            + "".join(
                f"\n  {r['shape']} {r['dtype']} {r['pattern']} batch {r['batch']}: "
                f"{r[key]:.2f}x, dispatch {r['choice']}"
                for r in below
            )
        )
    worst = min(rows, key=lambda r: r["dispatched_speedup"])
    lines.append(
        f"worst dispatched nm_linear / dense: {worst['dispatched_speedup']:.2f}x at "
        f"{worst['shape']} {worst['dtype']} {worst['pattern']} batch {worst['batch']}"
    )
    return "\n".join(lines)


TARGETS = (  # issue 3, at 4096x4096 and one row of x
    ("float32", "2:4", 2.5),
    ("bfloat16", "2:4", 2.0),
    ("float32", "1:4", 4.0),
)


def readme_summary(result: dict[str, Any]) -> str:
    """The README's table (4096x4096 at 1, 8, 64 and 256 rows of x) and the targets, from a result."""
    rows = [
        r for r in result["results"] if r["shape"] == "4096x4096" and r["batch"] in (1, 8, 64, 256)
    ]
    table = [
        [
            "fp32" if r["dtype"] == "float32" else "bf16",
            r["pattern"],
            r["batch"],
            f"{r['dense_ms']:.2f}",
            "-" if r.get("dense_compiled_ms") is None else f"{r['dense_compiled_ms']:.2f}",
            f"{r['sparse_ms']:.2f}",
            f"{r['sparse_speedup']:.2f}x",
            f"{r['dispatched_speedup']:.2f}x",
            r["choice"],
            f"{r['sparse_weight_GBps']:.1f}",
        ]
        for r in rows
    ]
    headers = [
        "dtype",
        "N:M",
        "rows of x",
        "dense F.linear ms",
        "compiled dense ms",
        "sparse kernel ms",
        "kernel vs best dense",
        "nm_linear vs best dense",
        "dispatch",
        "packed GB/s",
    ]
    lines = [tabulate(table, headers=headers, tablefmt="github"), ""]
    by_key = {(r["dtype"], r["pattern"]): r for r in rows if r["batch"] == 1}
    for dtype, pattern, target in TARGETS:
        r = by_key.get((dtype, pattern))
        if r is None:
            continue
        verdict = "met" if r["sparse_speedup"] >= target else "not met"
        lines.append(
            f"- {pattern} {dtype} >= {target}x: **{verdict}** ({r['sparse_speedup']:.2f}x kernel, "
            f"{r['dispatched_speedup']:.2f}x dispatched)"
        )
    r = by_key.get(("float32", "2:4"))
    if r is not None:
        share = gemv_share(r, result["bandwidth"])
        probe = r.get("read_probe_GBps", result["bandwidth"]["sum_read_GBps"])
        lines.append(
            f"- sparse GEMV >= 80% of read bandwidth ({probe:.1f} GB/s around the case): "
            f"**{'met' if share >= 0.8 else 'not met'}** (2:4 fp32 {r['sparse_weight_GBps']:.1f} "
            f"GB/s, {share:.0%})"
        )
    all_rows = result["results"]
    for key, label in (
        ("dispatched_speedup", "ratio of medians"),
        ("dispatched_speedup_paired", "median of per-round ratios"),
    ):
        if not all(key in r for r in all_rows):
            continue  # results from before the paired estimate was recorded
        below = [r for r in all_rows if r[key] < 0.95]
        worst = min(all_rows, key=lambda r: r[key])
        lines.append(
            f"- nm_linear >= 0.95x the best dense at every point ({label}): "
            f"**{'met' if not below else 'not met'}**: {len(below)} of {len(all_rows)} below, "
            f"worst {worst[key]:.2f}x ({worst['shape']} {worst['dtype']} "
            f"{worst['pattern']} batch {worst['batch']}, dispatch {worst['choice']})"
        )
    lines += issue14_targets(all_rows, result.get("dense_branch_overhead"))
    return "\n".join(lines)


def issue14_targets(rows: list[dict[str, Any]], overhead: list[dict[str, Any]] | None) -> list[str]:
    """Issue 14's verdicts on a sweep: >= 0.97x at every point, median >= 1.2x, within 5% of
    the best sparse path where it beats dense by >= 1.1x, dense branch <= 3 us over F.linear."""
    ratios = [r["dispatched_speedup"] for r in rows]
    below = [r for r in rows if r["dispatched_speedup"] < 0.97]
    median = statistics.median(ratios)
    lines = [
        f"- nm_linear >= 0.97x the best dense at all {len(rows)} points: "
        f"**{'met' if not below else 'not met'}** ({len(below)} below)"
        + "".join(f"\n  - {describe_point(r)}" for r in below),
        f"- median >= 1.2x: **{'met' if median >= 1.2 else 'not met'}** ({median:.2f}x)",
    ]
    fast = [r for r in rows if (r.get("best_sparse_speedup") or 0) >= 1.1]
    missed = [r for r in fast if r["dispatched_ms"] > 1.05 * r["best_sparse_ms"]]
    lines.append(
        f"- within 5% of the best sparse path where it beats dense by >= 1.1x ({len(fast)} "
        f"points): **{'met' if not missed else 'not met'}** ({len(missed)} missed)"
        + "".join(
            f"\n  - {describe_point(r)}; best sparse {r['best_sparse_choice']} "
            f"{r['best_sparse_speedup']:.2f}x"
            for r in missed
        )
    )
    if overhead:
        worst = max(overhead, key=lambda o: o["overhead_us"])
        lines.append(
            f"- dense branch <= 3 us over F.linear (1024x1024, 1-2 rows, forced dense): "
            f"**{'met' if worst['overhead_us'] <= 3 else 'not met'}** ("
            + ", ".join(
                f"{o['dtype']} {o['batch']} row(s) {o['overhead_us']:+.1f} us" for o in overhead
            )
            + ")"
        )
    return lines


def describe_point(r: dict[str, Any]) -> str:
    return (
        f"{r['shape']} {r['dtype']} {r['pattern']} batch {r['batch']}: "
        f"{r['dispatched_speedup']:.2f}x, dispatch {r['choice']}"
    )


def wins_table(rows: list[dict[str, Any]]) -> str:
    """Which path nm_linear ran, by dtype and rows of x (counts over shapes and patterns), and
    the median ratio to the best dense there: the README's "which path wins where"."""
    cells: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in rows:
        cells.setdefault((r["dtype"], r["batch"]), []).append(r)
    table = []
    for (dtype, batch), rs in sorted(cells.items()):
        counts: dict[str, int] = {}
        for r in rs:
            counts[r["choice"]] = counts.get(r["choice"], 0) + 1
        paths = ", ".join(f"{c} {n}" for c, n in sorted(counts.items(), key=lambda kv: -kv[1]))
        ratios = [r["dispatched_speedup"] for r in rs]
        table.append([
            dtype, batch, paths, f"{statistics.median(ratios):.2f}x", f"{min(ratios):.2f}x"
        ])  # fmt: skip
    headers = ["dtype", "rows of x", "nm_linear ran (points)", "median vs best dense", "worst"]
    return tabulate(table, headers=headers, tablefmt="github")


def dense_branch_overhead(reps: int = 400) -> list[dict[str, Any]]:
    """nm_linear forced to its dense branch against F.linear, 1024x1024 2:4 at 1 and 2 rows of x,
    fp32 and bf16, interleaved single calls: the median difference in microseconds."""
    out = []
    for dtype_name in ("float32", "bfloat16"):
        dtype = DTYPES[dtype_name]
        w = random_nm(1024, 1024, "2:4", dtype)
        p = pack(w, "2:4")
        for batch in (1, 2):
            x = torch.randn(batch, 1024, dtype=dtype)

            def forced(x: torch.Tensor = x, p: PackedNM = p) -> torch.Tensor:
                with K.force_dispatch("dense"):
                    return K.nm_linear(x, p)

            fns = {"F.linear": lambda x=x, w=w: F.linear(x, w), "dense branch": forced}
            t, *_ = measure(fns, budget_s=1.0, max_reps=reps, min_reps=50)
            out.append({
                "dtype": dtype_name, "batch": batch,
                "linear_us": t["F.linear"] * 1e6, "dense_branch_us": t["dense branch"] * 1e6,
                "overhead_us": (t["dense branch"] - t["F.linear"]) * 1e6,
            })  # fmt: skip
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sweep, < 1 minute")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent.parent / "out" / "benchmarks" / "cpu_kernels.json",
        help="JSON output (default out/benchmarks/cpu_kernels.json, untracked; the README's "
        "figures are benchmarks/results/cpu_kernels.json, replaced only by an explicit --out)",
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument(
        "--render",
        type=Path,
        default=None,
        metavar="JSON",
        help="print the README table and target verdicts of a saved result, e.g. --render "
        "benchmarks/results/cpu_kernels.json; measure nothing",
    )
    parser.add_argument(
        "--min-rounds",
        type=int,
        default=9,
        help="interleaved rounds per case, at least (the 64-256-row cases of the large shapes "
        "run this many; session 9 ran them at 5, medians of 3-5 clean rounds)",
    )
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="restrict the sweep, e.g. --only shapes=1024x1024 --only batches=1,64 "
        "--only patterns=2:4 --only dtypes=float32 (results go to --out)",
    )
    add_contend_arg(parser)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.render is not None:
        saved = json.loads(args.render.read_text())
        print(f"{readme_summary(saved)}\n\n{wins_table(saved['results'])}")
        return
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = dict(QUICK if args.quick else FULL)
    for item in args.only:
        key, _, values = item.partition("=")
        if key not in config:
            raise SystemExit(f"--only {item!r}: key must be one of {sorted(config)}")
        parsed = [
            tuple(int(d) for d in v.split("x"))
            if key == "shapes"
            else int(v)
            if key == "batches"
            else v
            for v in values.split(",")
        ]
        config[key] = parsed
    budget_s, max_reps = (0.15, 15) if args.quick else (0.6, 30)

    t0 = time.perf_counter()
    if not K.kernels_available():
        raise SystemExit(f"nmfx kernels unavailable: {K.build_error()}")
    info = machine_info()
    print(f"host: {info['cpu_model']}; flags: {' '.join(info['cpu_flags'])}; "
          f"isas: {K.available_isas()}; threads: {torch.get_num_threads()}")  # fmt: skip
    t_tune = time.perf_counter()
    tuned = K.autotune(
        pack(random_nm(r, c, pt, DTYPES[d]), pt)
        for r, c in config["shapes"] for d in config["dtypes"] for pt in config["patterns"]
    )  # fmt: skip
    tune_s = time.perf_counter() - t_tune
    tune_load = K.dispatch_table()["tuning_phases"]  # others' CPU share while tuning; cached?
    print(f"autotuned {len(tuned)} shapes in {tune_s:.1f} s (load: {tune_load}); winning path "
          f"per bucket of rows:")  # fmt: skip
    for key, choices in tuned.items():
        print(f"  {key}: {', '.join(f'{b}: {c}' for b, c in choices.items())}")
    config["all_rounds"] = args.contend > 0
    config["origin_ns"] = time.monotonic_ns()  # the guard's evidence times: ms since here
    with Contention(args.contend), LoadMonitor() as load:
        gib = 0.5 if args.quick else 1.0
        bandwidth = {"before": read_bandwidth(gib)}
        with torch.inference_mode():
            rows = run(config, budget_s, max(max_reps, args.min_rounds), args.min_rounds)
            overhead = dense_branch_overhead(100 if args.quick else 400)
        bandwidth["after"] = read_bandwidth(gib)
        _read_probe.clear()
        # The sweep's figure: the best run before or after (what the machine can do).
        for key in ("sum_read", "copy"):
            bandwidth[f"{key}_GBps"] = max(
                bandwidth[w][f"{key}_best_GBps"] for w in ("before", "after")
            )
    elapsed = time.perf_counter() - t0
    text = render(rows, bandwidth)
    print(text)
    print(describe(info, load.result))
    print(guard_summary(rows))
    print(
        f"\nisa: {K.available_isas()[-1]}, threads: {torch.get_num_threads()}, "
        f"elapsed {elapsed:.0f} s, dispatch table: {K.dispatch_table()['path']}"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "quick": args.quick,
        "argv": sys.argv[1:] if argv is None else argv,
        "contend": args.contend,
        "machine": {
            "cpu": info["cpu_model"],
            "platform": platform.platform(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "isa": K.available_isas()[-1],
        },
        "machine_info": info,
        "load": load.result,
        "bandwidth": bandwidth,
        "dispatch_table": tuned,
        "autotune_s": tune_s,
        "autotune_load": tune_load,
        "elapsed_s": elapsed,
        "dispatch_ms": {k: v.get("ms") for k, v in K.dispatch_table()["entries"].items()},
        # near ties the tuner re-timed paired: per shape, [{rows, pair, ratio, rounds}]
        "dispatch_duels": {
            k: v.get("duels", []) for k, v in K.dispatch_table()["entries"].items()
        },
        "dense_branch_overhead": overhead,
        "results": rows,
    }
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}\n\n{readme_summary(result)}\n\n{wins_table(rows)}")


if __name__ == "__main__":
    main()
