"""How much kept magnitude channel permutation finds on the pretrained digits CNN, and how
much there could be: for each seed's dense model (the one-shot study's, cached or trained)
and each conv with permutable input channels, the N:M-kept magnitude of the identity
order, of the greedy swap search alone, of the search with its escapes (what
``nmfx.prune(..., permute=True)`` runs), and the per-row bound (every row keeping its own
top N/M of weights: no single permutation can beat it).

    PYTHONPATH=. python -m benchmarks.oneshot.permutation_search --cache /tmp/oneshot/cache
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from benchmarks._timing import LoadMonitor, machine_info, write_json
from benchmarks.accuracy.tasks import SPECS, build_task
from benchmarks.oneshot.run import pretrained
from nmfx.prune.permute_search import kept_magnitude, search_permutation

OUT = Path(__file__).resolve().parents[2] / "out" / "benchmarks" / "oneshot_permutation.json"


def measure(a: torch.Tensor, n: int, m: int) -> dict[str, float]:
    base = kept_magnitude(a, n, m)
    out: dict[str, float] = {}
    for label, escapes in (("greedy", 0), ("greedy_escapes", 20)):
        t0 = time.perf_counter()
        perm = search_permutation(a, n, m, escapes=escapes)
        out[f"{label}_s"] = time.perf_counter() - t0
        out[f"{label}_gain"] = kept_magnitude(a, n, m, perm) / base - 1
    bound = float(a.topk(a.shape[1] * n // m, dim=1).values.sum())
    out["row_bound_gain"] = bound / base - 1
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--patterns", nargs="+", default=["2:4", "1:4"])
    p.add_argument("--cache", type=Path, default=None)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    task = build_task(SPECS["digits"])
    rows = []
    with LoadMonitor() as load:
        for seed in args.seeds:
            dense, _ = pretrained(task, seed, args.cache)
            for name, mod in dense.named_modules():
                if (
                    not isinstance(mod, torch.nn.Conv2d)
                    or mod.in_channels % 4
                    or mod.in_channels < 8
                ):
                    continue
                w = mod.weight.detach().abs()
                a = w.movedim(1, -1).reshape(-1, w.shape[1])
                for pattern in args.patterns:
                    n, m = (int(v) for v in pattern.split(":"))
                    row = {"seed": seed, "layer": name, "pattern": pattern, **measure(a, n, m)}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    payload = {"script": "benchmarks/oneshot/permutation_search.py",
               "argv": sys.argv[1:] if argv is None else argv, "rows": rows,
               "machine": machine_info(), "load": load.result}  # fmt: skip
    write_json("permutation_search", payload, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
