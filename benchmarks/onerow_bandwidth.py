"""One row of x, fp32: the sparse GEMV's effective weight bandwidth against dense ``F.linear``'s.

Issue 14 asks that, at one row of x, each sparse GEMV read its packed weight (values + mask
bytes) at >= 0.9x the rate ``F.linear`` reads the dense weight, in the same run, on every host:
then the gain approaches the bytes ratio (1.88x for fp32 2:4). Weights up to a few MB stay in
the caches between calls, where the dense GEMV reads fast and the sparse one can be
instruction-bound; larger ones come from DRAM. Per shape, pattern and thread count this times,
interleaved, single calls of

* ``F.linear(x, w)`` on the dense weight (bandwidth: dense bytes / time),
* each one-row sparse path this host has (``nmfx_cpu::nm_gemm`` forced to it, no Python
  between: ``avx2-select``, ``avx512-select``, ``avx512-expand``, ...) (packed bytes / time),
* a lowered layer (``NMLinear``, tuned) called as a model calls it, overheads included,

and prints the medians (clean rounds when there are enough), the bandwidths and each path's
share of dense's; writes ``out/benchmarks/onerow_bandwidth.json`` (or ``--out``).

    PYTHONPATH=. python benchmarks/onerow_bandwidth.py [--quick] [--threads-list 1,2]
"""

from __future__ import annotations

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
from benchmarks.cpu_kernels import random_nm
from nmfx.kernels import _autotune
from nmfx.lowering.cpu import NMLinear
from nmfx.packed import pack

FULL = {
    "shapes": [(256, 2048), (1024, 1024), (2048, 2048), (4096, 4096)],
    "patterns": ["2:4", "4:8"],
}
QUICK = {"shapes": [(256, 2048), (1024, 1024)], "patterns": ["2:4"]}
# One-row sparse paths worth timing (the others are slower at one row by design).
PATHS = ("avx2-select", "avx512-select", "avx512-expand", "avx2-expand", "portable")
LAST_LEVEL_CACHE = 32 << 20  # the Zen 4 host's L3; labels which weights stay cache-resident


def case(rows: int, cols: int, pattern: str, rounds: int) -> dict[str, Any]:
    n, m = (int(v) for v in pattern.split(":"))
    w = random_nm(rows, cols, pattern, torch.float32)
    p = pack(w, pattern)
    layer = NMLinear(p, None)
    K.autotune([layer], progress=False)
    x = torch.randn(1, cols)
    gemm = torch.ops.nmfx_cpu.nm_gemm.default
    args = (x, p.values, p.mask, None, rows, cols, n, m)
    host = set(_autotune.host_choices(n, m, 1, "float32"))
    fns = {"F.linear": lambda: F.linear(x, w), "lowered layer": lambda: layer(x)}
    for path in PATHS:
        if path in host:
            code = _autotune.path_code(path)
            fns[path] = lambda code=code: gemm(*args, code)
    want = F.linear(x, w)
    for name, fn in fns.items():  # every contender computes the same product
        torch.testing.assert_close(fn(), want, rtol=1e-4, atol=1e-3, msg=name)
    rounds_ = T.interleaved(fns, repeats=rounds, warmup=20)
    seconds, used = rounds_.pick()
    med = {k: T.median(v) for k, v in seconds.items()}
    dense_gbps = p.dense_nbytes / med["F.linear"] / 1e9
    out: dict[str, Any] = {
        "shape": f"{rows}x{cols}", "pattern": pattern, "threads": torch.get_num_threads(),
        "cache_resident": p.dense_nbytes <= LAST_LEVEL_CACHE, "rounds_used": used,
        "dense_bytes": p.dense_nbytes, "packed_bytes": p.nbytes, "dense_GBps": dense_gbps,
        "lowered_runs": K.dispatch_choices(layer.dispatch).get("1"),
        "us": {k: v * 1e6 for k, v in med.items()},
        "GBps": {}, "share_of_dense": {},
        "raw": rounds_.as_json(),
    }  # fmt: skip
    for name, sec in med.items():
        if name == "F.linear":
            continue
        gbps = p.nbytes / sec / 1e9
        out["GBps"][name] = gbps
        out["share_of_dense"][name] = gbps / dense_gbps
    return out


def table(results: list[dict[str, Any]]) -> str:
    rows = []
    for r in results:
        paths = [k for k in r["share_of_dense"] if k != "lowered layer"]
        best = max(paths, key=lambda k: r["share_of_dense"][k])
        rows.append([
            r["shape"], "L3" if r["cache_resident"] else "DRAM", r["pattern"], r["threads"],
            f"{r['us']['F.linear']:.1f}", f"{r['dense_GBps']:.1f}", best, f"{r['us'][best]:.1f}",
            f"{r['GBps'][best]:.1f}", f"{r['share_of_dense'][best]:.2f}",
            " ".join(f"{k}={r['share_of_dense'][k]:.2f}" for k in paths if k != best),
            f"{r['share_of_dense']['lowered layer']:.2f} ({r['lowered_runs']})",
        ])  # fmt: skip
    head = ["shape", "weight in", "pattern", "threads", "F.linear us", "dense GB/s", "best path",
            "us", "packed GB/s", "share", "other paths' share", "lowered layer share (runs)"]  # fmt: skip
    return tabulate(rows, headers=head)


def main(argv: list[str] | None = None) -> None:
    parser = T.base_parser(__doc__.split("\n")[0])
    T.add_contend_arg(parser)
    parser.add_argument("--threads-list", default="1,2", help="thread counts to run, e.g. 1,2")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per case (default 400)")
    args = parser.parse_args(argv)
    if not K.kernels_available():
        raise SystemExit(f"nmfx kernels unavailable: {K.build_error()}")
    config = QUICK if args.quick else FULL
    rounds = args.rounds or (100 if args.quick else 400)
    info = T.machine_info()
    results = []
    with T.Contention(args.contend), T.LoadMonitor() as load:
        for threads in (int(t) for t in args.threads_list.split(",")):
            torch.set_num_threads(threads)
            for rows, cols in config["shapes"]:
                for pattern in config["patterns"]:
                    results.append(case(rows, cols, pattern, rounds))
    print(table(results))
    print(T.describe(info, load.result))
    payload = {"machine": info, "load": load.result, "contend": args.contend,
               "source": T.source_fingerprint(), "results": results}  # fmt: skip
    print(f"wrote {T.write_json('onerow_bandwidth', payload, args.out)}")


if __name__ == "__main__":
    main()
