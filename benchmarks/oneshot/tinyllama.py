"""SparseGPT 2:4 on a TinyLlama-sized model (Hugging Face ``LlamaForCausalLM``: dim 2048,
SwiGLU 5632, 32 heads, 4 key/value heads, vocab 32000, 22 layers; random init), 32
calibration sequences of 128 tokens: wall time, peak resident memory and where the time
went (calibration forwards, Hessians, SparseGPT, error measurement).

The issue's target is the full 22 layers in < 15 min and < 8 GB on 2 cores. ``--layers``
runs fewer blocks (a per-block time, never a measurement of 22); ``--model zoo`` uses
nmfx's zoo LLaMA (full-size k/v projections) where transformers is not installed.

    PYTHONPATH=. python benchmarks/oneshot/tinyllama.py --layers 22
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import resource
import sys
import time
from pathlib import Path

import torch

import model_zoo
from benchmarks._timing import LoadMonitor, machine_info, write_json
from nmfx.prune import prune, prune_summary

# untracked by default; benchmarks/results/oneshot_tinyllama.json only with --out
OUT = Path(__file__).resolve().parents[2] / "out" / "benchmarks" / "oneshot_tinyllama.json"


# where the time goes: cumulative seconds of these functions (nested ones overlap)
_PHASES = {
    "dense_check_forward": "trace_calls",
    "stage_calibration_forwards": "run_stage",
    "hessian_accumulation": "add",  # GramStats.add (the hook closure of the same name wraps it)
    "block_advance_forwards": "advance",
    "inverse_hessian_factor": "inverse_hessian_factor",
    "sparsegpt_sweep": "sparsegpt_prune",
    "relative_error": "relative_error",
}


def _phases(profiler: cProfile.Profile) -> dict[str, float]:
    stats = pstats.Stats(profiler)
    out: dict[str, float] = {}
    for (path, _line, name), (_cc, _nc, _tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        if "nmfx" not in path:
            continue
        for phase, fn in _PHASES.items():
            if name == fn and phase == "hessian_accumulation":
                out[phase] = min(out.get(phase, ct), ct)
            elif name == fn:
                out[phase] = out.get(phase, 0.0) + ct
    stats.sort_stats("cumulative").print_stats(25)
    return out


def _build(kind: str, layers: int, seq_len: int) -> torch.nn.Module:
    if kind == "zoo":
        return model_zoo.build("llama", vocab_size=32000, dim=2048, n_layers=layers, n_heads=32,
                               hidden_dim=5632, max_seq_len=seq_len)  # fmt: skip
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers,
        num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg).eval()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--sequences", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model", choices=("hf", "zoo"), default="hf")
    p.add_argument("--profile", action="store_true", help="print the top functions (cProfile)")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = _build(args.model, args.layers, args.seq_len)
    build_s = time.perf_counter() - t0
    data = torch.randint(0, 32000, (args.sequences, args.seq_len)).split(args.batch)
    machine = machine_info()
    profiler = cProfile.Profile() if args.profile else None
    with LoadMonitor() as load:
        t0 = time.perf_counter()
        if profiler is not None:
            profiler.enable()
        prune(model, "2:4", "sparsegpt", calibration=list(data), nsamples=args.sequences)
        if profiler is not None:
            profiler.disable()
        wall = time.perf_counter() - t0
    phases = _phases(profiler) if profiler is not None else {}
    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    summary = prune_summary(model)
    payload = {
        "script": "benchmarks/oneshot/tinyllama.py",
        "argv": sys.argv[1:] if argv is None else argv,
        "layers": args.layers,
        "parameters": sum(q.numel() for q in model.parameters()),
        "build_s": build_s,
        "model": args.model,
        "prune_s": wall,
        "phases_s": phases,
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
    write_json("tinyllama", payload, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
