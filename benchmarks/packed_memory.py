"""Resident memory of a lowered layer: RSS growth from calls at 1, 64 and 512 rows of x.

A lowered model's resident weight memory must stay its packed size: the dense branch expands W
per call into reused per-thread scratch (a few MB) and keeps no dense copy. This builds one
lowered 11008x4096 fp32 2:4 layer (dense weight 172 MiB, packed 91 MiB) in a fresh process,
measures its RSS, runs it at 1, 64 and 512 rows of x on every path this host has (the dense
branch, then each sparse path forced), and reports the growth as a share of the dense
weight's size: as RSS (what the OS sees) and after ``malloc_trim`` (live memory: glibc keeps
freed multi-MB blocks, e.g. a 22 MiB output at 512 rows, once its mmap threshold has grown).
The same is measured for ``F.linear`` on the dense weight, in its own process, for reference.

    PYTHONPATH=. python benchmarks/packed_memory.py [--rows 11008 --cols 4096] [--out FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def trim() -> None:
    """Return freed heap to the OS (glibc), so what is left is live memory."""
    gc.collect()
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def child(mode: str, rows: int, cols: int) -> dict:
    """In this process: build the layer (or the dense weight), then time nothing, only RSS."""
    import nmfx.kernels as K
    from nmfx.lowering.cpu import NMLinear
    from nmfx.packed import pack

    g = torch.Generator().manual_seed(0)
    w = torch.randn(rows, cols // 4, 4, generator=g)
    w[..., 2:] = 0
    w = w.reshape(rows, cols)
    bias = torch.randn(rows)
    if mode == "nmfx":
        assert K.kernels_available()
        layer = NMLinear(pack(w, "2:4"), bias)
        del w
        runs = ["dense", *[c for c in K.CHOICES if c not in ("dense", "portable", "avx2-select")
                           and c.split("-")[0] in K.available_isas()]]  # fmt: skip
    else:
        layer = torch.nn.Linear(cols, rows)
        with torch.no_grad():
            layer.weight.copy_(w)
            layer.bias.copy_(bias)
        del w
        runs = ["F.linear"]
    trim()
    base = rss_bytes()
    out = []
    with torch.inference_mode():
        for batch in (1, 64, 512):
            x = torch.randn(batch, cols)
            for run in runs:
                ctx = K.force_dispatch(run) if mode == "nmfx" else contextlib.nullcontext()
                with ctx:
                    layer(x)
                rss = rss_bytes() - base
                trim()
                live = rss_bytes() - base
                out.append({"batch": batch, "path": run, "rss_growth": rss, "live_growth": live})
    return {"mode": mode, "baseline_rss": base, "calls": out}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=11008)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--out", type=Path, default=None, help="JSON output path")
    parser.add_argument("--child", choices=["nmfx", "dense"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.rows, args.cols)))
        return
    dense_bytes = args.rows * args.cols * 4
    result = {"rows": args.rows, "cols": args.cols, "dense_bytes": dense_bytes}
    for mode in ("dense", "nmfx"):
        proc = subprocess.run(
            [sys.executable, __file__, "--child", mode, "--rows", str(args.rows),
             "--cols", str(args.cols)],
            capture_output=True, text=True, check=True, cwd=ROOT,
        )  # fmt: skip
        result[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
        for c in result[mode]["calls"]:
            print(f"{mode:5s} {c['batch']:4d} rows, {c['path']:14s}: RSS +{c['rss_growth'] / 2**20:6.1f}"
                  f" MiB ({c['rss_growth'] / dense_bytes:5.1%} of the dense weight), live "
                  f"+{c['live_growth'] / 2**20:6.1f} MiB ({c['live_growth'] / dense_bytes:5.1%})")
    worst = max(c["rss_growth"] for c in result["nmfx"]["calls"]) / dense_bytes
    worst_live = max(c["live_growth"] for c in result["nmfx"]["calls"]) / dense_bytes
    print(f"nmfx, worst: RSS +{worst:.1%}, live +{worst_live:.1%} of the dense weight "
          f"({dense_bytes / 2**20:.0f} MiB); target < 10%")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
