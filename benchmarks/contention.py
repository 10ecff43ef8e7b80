"""How nmfx and dense degrade when another process holds a core: medians and worst rounds.

On a 2-core host with one busy-looping process beside it, a multi-threaded op whose threads
split the work statically, or meet at a barrier, waits for whichever of its threads the
scheduler left off the CPU: a call can take a scheduler slice (milliseconds) instead of
microseconds. Medians hide that; the worst rounds show it. Each case times ``F.linear`` on the
dense weight, ``nm_linear`` as tuned (the sparse kernel) and its dense branch (forced), single
calls interleaved over many rounds, quiet and then with ``--contend N`` busy processes (1 by
default), and reports per contender the median, the 90th percentile and the worst round,
nm_linear's ratio to F.linear at each, and what nmfx's contention guard saw meanwhile (stalls,
calls it kept on one thread, late starts of the second thread; nm_parallel.h).

    PYTHONPATH=. python benchmarks/contention.py [--quick] [--contend 1] [--rounds 300]
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tabulate import tabulate

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import nmfx.kernels as K
from benchmarks import _timing as T
from benchmarks._guard import GuardWatch
from benchmarks.cpu_kernels import random_nm
from nmfx.packed import pack

FULL = [(4096, 4096, "float32"), (4096, 4096, "bfloat16"), (1024, 1024, "float32")]
QUICK = [(4096, 4096, "float32")]
BATCHES = (1, 8)


def stats(xs: list[float]) -> dict[str, float]:
    """Median, 90th percentile and worst of a series, in ms."""
    q = statistics.quantiles(xs, n=10)
    return {"median": statistics.median(xs) * 1e3, "p90": q[-1] * 1e3, "worst": max(xs) * 1e3}


GUARD_KEYS = ("stalls", "serial_calls", "late_starts", "one_offs")


def case(rows: int, cols: int, dtype: str, batch: int, rounds: int) -> dict[str, Any]:
    w = random_nm(rows, cols, "2:4", getattr(torch, dtype))
    p = pack(w, "2:4")
    x = torch.randn(batch, cols, dtype=w.dtype)
    K.autotune([p], progress=False)  # what a lowered layer runs, from the cache when there

    def forced(mode: str):
        def run() -> None:
            with K.force_dispatch(mode):
                K.nm_linear(x, p)

        return run

    fns = {"F.linear": lambda: F.linear(x, w), "nm_linear": forced("auto"),
           "dense branch": forced("dense")}  # fmt: skip
    with GuardWatch() as guard:
        seconds = T.interleaved(fns, repeats=rounds, warmup=3).seconds
    out = {k: stats(v) for k, v in seconds.items()}
    return {"shape": f"{rows}x{cols}", "dtype": dtype, "batch": batch, "ms": out,
            "guard": guard.result, "raw_s": seconds}  # fmt: skip


def run_all(cases: list[tuple[int, int, str]], rounds: int, contend: int) -> list[dict[str, Any]]:
    results = []
    with T.Contention(contend), torch.inference_mode():
        for rows, cols, dtype in cases:
            for batch in BATCHES:
                results.append({**case(rows, cols, dtype, batch, rounds), "contend": contend})
    return results


def table_rows(results: list[dict[str, Any]]) -> list[list[Any]]:
    rows = []
    for r in results:
        ms = r["ms"]
        dense, sparse, branch = ms["F.linear"], ms["nm_linear"], ms["dense branch"]
        rows.append([
            r["shape"], r["dtype"], r["batch"], r["contend"],
            *(f"{dense[k]:.3f}" for k in ("median", "p90", "worst")),
            *(f"{sparse[k]:.3f}" for k in ("median", "p90", "worst")),
            *(f"{dense[k] / sparse[k]:.2f}x" for k in ("median", "p90", "worst")),
            *(f"{branch[k]:.3f}" for k in ("median", "worst")),
            "/".join(str(r["guard"][k]) for k in GUARD_KEYS),
        ])  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = T.base_parser(__doc__.split("\n")[0])
    T.add_contend_arg(parser)
    parser.add_argument("--rounds", type=int, default=None, help="rounds per case (default 300)")
    args = parser.parse_args(argv)
    T.setup_threads(args.threads)
    if not K.kernels_available():
        raise SystemExit(f"the C++ kernels did not build: {K.build_error()}")
    cases = QUICK if args.quick else FULL
    rounds = args.rounds or (60 if args.quick else 300)
    contend = args.contend or 1
    info = T.machine_info()
    with T.LoadMonitor() as load:
        results = run_all(cases, rounds, 0) + run_all(cases, rounds, contend)
    headers = ["weight", "dtype", "rows of x", "busy procs", "F.linear med", "p90", "worst",
               "nm_linear med", "p90", "worst", "gain med", "gain p90", "gain worst",
               "dense branch med", "worst", "stalls/serial/late/one-offs"]  # fmt: skip
    print(f"2:4, single calls, {rounds} interleaved rounds; ms; gain = F.linear / nm_linear")
    print(tabulate(table_rows(results), headers=headers, tablefmt="github"))
    print(T.describe(info, load.result))
    path = T.write_json(
        "contention",
        {"machine": info, "load": load.result, "rounds": rounds, "contend": contend,
         "results": results},
        args.out,
    )  # fmt: skip
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
