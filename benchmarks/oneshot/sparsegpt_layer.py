"""Time SparseGPT on one 4096x4096 layer with 128 calibration rows (issue 16 target: < 10 s
on 2 cores). Times the phases separately: Hessian from the rows, its dampened inverse
Cholesky factor, the column sweep, and the whole ``nmfx.prune`` call on a one-layer
model (which adds the hooks, the analysis and the reconstruction-error measurement).
Also records magnitude and Wanda on the same layer. The machine may be shared: the load
is recorded with the numbers.

    PYTHONPATH=. python benchmarks/oneshot/sparsegpt_layer.py [--size 4096] [--rows 128]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

from benchmarks._timing import LoadMonitor, machine_info, write_json
from nmfx.pattern import parse_pattern
from nmfx.prune import prune
from nmfx.prune.sparsegpt import inverse_hessian_factor, sparsegpt_prune

# untracked by default; benchmarks/results/oneshot_sparsegpt_layer.json only with --out
OUT = Path(__file__).resolve().parents[2] / "out" / "benchmarks" / "oneshot_sparsegpt_layer.json"


def _time(fn) -> tuple[float, object]:  # type: ignore[no-untyped-def]
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--rows", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    pattern = parse_pattern("2:4")
    n = args.size
    x = torch.randn(args.rows, n)
    machine = machine_info()
    results: dict[str, list[float]] = {k: [] for k in (
        "hessian_s", "factor_s", "sweep_s", "sparsegpt_core_s", "prune_sparsegpt_s",
        "prune_wanda_s", "prune_magnitude_s")}  # fmt: skip
    with LoadMonitor() as load:
        for _ in range(args.repeats):
            w = torch.randn(n, n) / n**0.5
            t_h, h = _time(lambda: (x.t() @ x) / args.rows)
            t_f, (upper, _) = _time(lambda h=h: inverse_hessian_factor(h, 0.01, "bench"))
            t_s, _ = _time(lambda w=w, u=upper: sparsegpt_prune(w.clone(), u, pattern, 128))
            results["hessian_s"].append(t_h)
            results["factor_s"].append(t_f)
            results["sweep_s"].append(t_s)
            results["sparsegpt_core_s"].append(t_h + t_f + t_s)
            for method in ("sparsegpt", "wanda", "magnitude"):
                layer = nn.Sequential(nn.Linear(n, n, bias=False))
                t, _ = _time(lambda layer=layer, method=method: prune(
                    layer, "2:4", method, calibration=[x], keep_output_dense=False, progress=False))  # fmt: skip
                results[f"prune_{method}_s"].append(t)
            print({k: round(v[-1], 3) for k, v in results.items()}, flush=True)
    payload = {
        "script": "benchmarks/oneshot/sparsegpt_layer.py",
        "argv": sys.argv[1:] if argv is None else argv,
        "size": n,
        "rows": args.rows,
        "threads": args.threads,
        "pattern": "2:4",
        "results": results,
        "best": {k: min(v) for k, v in results.items()},
        "machine": machine,
        "load": load.result,
    }
    write_json("sparsegpt_layer", payload, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
