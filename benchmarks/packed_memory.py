"""Resident memory of a lowered layer: RSS growth from calls at 1, 64 and 512 rows of x.

A lowered model's resident weight memory must stay its packed size: the dense branch expands W
per call into reused per-thread scratch (a few MB) and keeps no dense copy. This builds one
lowered 11008x4096 fp32 2:4 layer (dense weight 180 MB, packed 96 MB), measures the process's
RSS, runs it at 1, 64 and 512 rows of x on every path this host has (each sparse path forced,
then the dense branch), and reports the growth as a share of the dense weight's size.

    PYTHONPATH=. python benchmarks/packed_memory.py [--rows 11008 --cols 4096] [--out FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import nmfx.kernels as K
from nmfx.lowering.cpu import NMLinear
from nmfx.packed import pack


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def trim() -> None:
    """Return freed heap to the OS (glibc), so the baseline holds only live memory."""
    gc.collect()
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def measure(rows: int, cols: int, batches: tuple[int, ...]) -> dict:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(rows, cols // 4, 4, generator=g)
    w[..., 2:] = 0
    layer = NMLinear(pack(w.reshape(rows, cols), "2:4"), torch.randn(rows))
    dense_bytes = rows * cols * 4
    del w
    assert K.kernels_available()
    modes = ["dense", *[c for c in K.CHOICES if c != "dense" and c.split("-")[0]
                        in K.available_isas() and c not in ("portable", "avx2-select")]]
    trim()
    base = rss_bytes()
    out = {"rows": rows, "cols": cols, "dense_bytes": dense_bytes, "baseline_rss": base,
           "packed_bytes": layer.values.numel() * 4 + layer.mask.numel(), "calls": []}
    peak = base
    with torch.inference_mode():
        for batch in batches:
            x = torch.randn(batch, cols)
            for mode in modes:
                with K.force_dispatch(mode):
                    layer(x)
                grown = rss_bytes() - base
                peak = max(peak, base + grown)
                out["calls"].append({"batch": batch, "mode": mode, "rss_growth_bytes": grown})
                print(f"{batch:4d} rows, {mode:14s}: RSS +{grown / 2**20:7.1f} MiB "
                      f"({grown / dense_bytes:6.1%} of the dense weight)")
    out["max_growth_share"] = (peak - base) / dense_bytes
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=11008)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--out", type=Path, default=None, help="JSON output path")
    args = parser.parse_args(argv)
    result = measure(args.rows, args.cols, (1, 64, 512))
    print(f"max RSS growth: {result['max_growth_share']:.1%} of the dense weight "
          f"({result['dense_bytes'] / 2**20:.0f} MiB); target < 10%")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
