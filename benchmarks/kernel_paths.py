"""Which of nmfx's AVX2 kernel paths wins where: expanding W vs selecting x at one row of x, and
expanding W vs the batched (x panel) path at many rows, with dense ``F.linear`` in the same
rounds. On a CPU with AVX512-BF16, bf16 weights also compare the batched path with the bf16
dot-product path (``avx512bf16-panels``, nm_bf16dot.cpp) from 8 rows of x.

The op's default picks one path per call (see ``nmfx/csrc/nm_ops.cpp``); ``nm_gemm``'s path
bits force the others, so each pair runs interleaved in one process. Prints a table of
medians and paired per-round ratios and writes ``out/benchmarks/kernel_paths.json`` (``--out benchmarks/results/kernel_paths.json``
replaces the committed result).

    PYTHONPATH=. python benchmarks/kernel_paths.py [--quick]
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tabulate import tabulate

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import nmfx.kernels as K
from benchmarks._timing import (
    Contention,
    LoadMonitor,
    add_contend_arg,
    base_parser,
    describe,
    interleaved,
    machine_info,
    paired_ratios,
    setup_threads,
    source_fingerprint,
    write_json,
)
from benchmarks.cpu_kernels import random_nm
from nmfx.kernels import _build
from nmfx.packed import pack

FULL = {
    "shapes": [(1024, 1024), (4096, 4096), (11008, 4096), (4096, 11008)],
    "dtypes": ["float32", "bfloat16"],
    # One row of x: the patterns with a selecting GEMV. Many rows: every calibrated pattern.
    "gemv_patterns": ["2:4", "4:8", "1:4", "1:8"],
    "batched_patterns": ["2:4", "4:8", "1:4", "1:8"],
    "batches": [64, 256],
    "bf16dot_batches": [8, 64, 256],
}
QUICK = {
    "shapes": [(4096, 4096)],
    "dtypes": ["float32", "bfloat16"],
    "gemv_patterns": ["2:4", "1:4"],
    "batched_patterns": ["2:4"],
    "batches": [256],
    "bf16dot_batches": [64],
}
# The paths compared, each forced with its ISA code and path bit.
PATH_CODES = {
    "expand": _build.ISA_CODES["avx2"] | _build.PATH_EXPAND,
    "panels": _build.ISA_CODES["avx2"] | _build.PATH_PANELS,
    "select": _build.ISA_CODES["avx2"] | _build.PATH_SELECT,
    "bf16dot": _build.ISA_CODES["avx512bf16"] | _build.PATH_PANELS,
}


def case(
    rows: int, cols: int, dtype: torch.dtype, pattern: str, batch: int, paths: tuple[str, str],
    repeats: int, budget_s: float,
) -> dict[str, Any]:  # fmt: skip
    n, m = (int(v) for v in pattern.split(":"))
    w = random_nm(rows, cols, pattern, dtype)
    p = pack(w, pattern)
    x = torch.randn(batch, cols, dtype=dtype)
    op = torch.ops.nmfx_cpu.nm_gemm.default

    def run(code: int):
        return lambda: op(x, p.values, p.mask, None, rows, cols, n, m, code)

    fns = {"dense": lambda: F.linear(x, w), **{name: run(PATH_CODES[name]) for name in paths}}
    rounds = interleaved(fns, repeats=repeats, warmup=2, budget_s=budget_s, min_repeats=9)
    seconds, used = rounds.pick()
    med = {k: statistics.median(v) for k, v in seconds.items()}
    a, b = paths
    return {
        "shape": f"{rows}x{cols}",
        "dtype": str(dtype).removeprefix("torch."),
        "pattern": pattern,
        "batch": batch,
        "paths": list(paths),
        "median_ms": {k: v * 1e3 for k, v in med.items()},
        f"{b}_vs_{a}_paired": statistics.median(paired_ratios(seconds[a], seconds[b])),
        f"{a}_vs_dense_paired": statistics.median(paired_ratios(seconds["dense"], seconds[a])),
        f"{b}_vs_dense_paired": statistics.median(paired_ratios(seconds["dense"], seconds[b])),
        "rounds_used": used,
    }


def main(argv: list[str] | None = None) -> None:
    parser = base_parser(__doc__.split("\n")[0])
    add_contend_arg(parser)
    args = parser.parse_args(argv)
    setup_threads(args.threads)
    if "avx2" not in K.available_isas():
        raise SystemExit(f"needs the AVX2 kernels (available: {K.available_isas()})")
    config = QUICK if args.quick else FULL
    repeats, budget_s = (15, 0.3) if args.quick else (31, 1.0)
    dot = "avx512bf16" in K.available_isas()
    jobs = []
    for rows, cols in config["shapes"]:
        for dname in config["dtypes"]:
            for pattern in config["gemv_patterns"]:
                jobs.append((rows, cols, dname, pattern, 1, ("expand", "select")))
            for pattern in config["batched_patterns"]:
                for batch in config["batches"]:
                    jobs.append((rows, cols, dname, pattern, batch, ("expand", "panels")))
                n, m = (int(v) for v in pattern.split(":"))
                if dname == "bfloat16" and dot and _build.bf16dot_supports(n, m):
                    for batch in config["bf16dot_batches"]:
                        jobs.append((rows, cols, dname, pattern, batch, ("panels", "bf16dot")))
    t0 = time.perf_counter()
    info = machine_info()
    results = []
    with Contention(args.contend), LoadMonitor() as load, torch.inference_mode():
        for rows, cols, dname, pattern, batch, paths in jobs:
            results.append(
                case(rows, cols, getattr(torch, dname), pattern, batch, paths, repeats, budget_s)
            )
    table = []
    for r in results:
        a, b = r["paths"]
        label = b
        table.append([
            r["shape"], r["dtype"], r["pattern"], r["batch"], f"{r['median_ms']['dense']:.3f}",
            f"{r['median_ms'][a]:.3f} ({a})", f"{r['median_ms'][b]:.3f}", label,
            f"{r[f'{b}_vs_{a}_paired']:.2f}x", f"{r[f'{b}_vs_dense_paired']:.2f}x",
        ])  # fmt: skip
    headers = ["weight", "dtype", "N:M", "rows of x", "dense ms", "first path ms", "other ms",
               "other path", "other vs first", "other vs dense"]  # fmt: skip
    print(tabulate(table, headers=headers, tablefmt="github"))
    print("(ratios: medians of per-round ratios; all three contenders interleaved)")
    print(describe(info, load.result))
    path = write_json(
        "kernel_paths",
        {
            "argv": sys.argv[1:] if argv is None else argv,
            "quick": args.quick,
            "machine_info": info,
            "source": source_fingerprint(),
            "load": load.result,
            "threads": torch.get_num_threads(),
            "elapsed_s": time.perf_counter() - t0,
            "results": results,
        },
        args.out,
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
