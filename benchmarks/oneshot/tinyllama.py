"""SparseGPT 2:4 on a TinyLlama-sized model (dim 2048, SwiGLU 5632, 32 heads, vocab 32000;
random init), 32 calibration sequences of 128 tokens: wall time and peak memory.

The issue's target is the full 22 layers in < 15 min and < 8 GB on 2 cores. ``--layers``
runs fewer blocks (the zoo LLaMA, full-size k/v projections, so slightly larger blocks than
TinyLlama's grouped-query ones); the per-block time it prints is then the basis of an
estimate for 22, reported as an estimate, never as a measurement.

    PYTHONPATH=. python benchmarks/oneshot/tinyllama.py --layers 22
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

import model_zoo
from benchmarks._timing import LoadMonitor, machine_info
from nmfx.prune import prune, prune_summary

# untracked by default; benchmarks/results/oneshot_tinyllama.json only with --out
OUT = Path(__file__).resolve().parents[2] / "out" / "benchmarks" / "oneshot_tinyllama.json"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--sequences", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = model_zoo.build("llama", vocab_size=32000, dim=2048, n_layers=args.layers, n_heads=32,
                            hidden_dim=5632, max_seq_len=args.seq_len)  # fmt: skip
    build_s = time.perf_counter() - t0
    data = torch.randint(0, 32000, (args.sequences, args.seq_len)).split(args.batch)
    machine = machine_info()
    with LoadMonitor() as load:
        t0 = time.perf_counter()
        prune(model, "2:4", "sparsegpt", calibration=list(data), nsamples=args.sequences)
        wall = time.perf_counter() - t0
    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    summary = prune_summary(model)
    payload = {
        "script": "benchmarks/oneshot/tinyllama.py",
        "argv": sys.argv[1:] if argv is None else argv,
        "layers": args.layers,
        "parameters": sum(q.numel() for q in model.parameters()),
        "build_s": build_s,
        "prune_s": wall,
        "prune_s_per_block": wall / args.layers,
        "estimate_22_layers_s": wall / args.layers * 22,
        "peak_rss_gb": rss_gb,
        "sparse_layers": len(summary.sparse),
        "schedule": summary.schedule,
        "max_rel_error": max(r.rel_error or 0 for r in summary.sparse),
        "threads": args.threads,
        "machine": machine,
        "load": load.result,
    }
    print(json.dumps({k: v for k, v in payload.items() if k not in ("machine", "load")}, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
