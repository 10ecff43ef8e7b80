"""Resident memory of a lowered layer: RSS growth from calls at 1, 64 and 512 rows of x.

A lowered model's resident weight memory must stay its packed size: the dense branch expands W
per call into reused per-thread scratch (a few MB) and keeps no dense copy. This builds one
lowered 11008x4096 fp32 2:4 layer (dense weight 172 MiB, packed 91 MiB) in a fresh process,
measures its RSS, runs it at 1, 64 and 512 rows of x (each ``--repeat`` times; the inputs are
allocated before the baseline, each output dropped after its call) and reports the growth as a
share of the dense weight's size: as RSS (what the OS sees) and after ``malloc_trim`` (live
memory), with what glibc holds freed in its heaps and what nmfx's per-thread scratch keeps
(``nmfx_cpu::scratch_stats``). Each path runs in its own process: nmfx's dense branch, each
sparse path this host has (forced), and ``F.linear`` on the dense weight for reference.

    PYTHONPATH=. python benchmarks/packed_memory.py [--rows 11008 --cols 4096] [--repeat 3]
        [--out FILE]
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
BATCHES = (1, 64, 512)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]  # fmt: skip


def heap_free_bytes() -> int:
    """Bytes glibc holds freed in its heaps (``mallinfo2().fordblks``), -1 where unknown."""
    try:
        fn = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return -1
    fn.restype = _Mallinfo2
    return int(fn().fordblks)


def trim() -> None:
    """Return freed heap to the OS (glibc), so what is left is live memory."""
    gc.collect()
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def scratch_kept() -> int:
    """Bytes nmfx's per-thread scratch buffers hold (``nmfx_cpu::scratch_stats``)."""
    return int(torch.ops.nmfx_cpu.scratch_stats()[0])


def child(mode: str, rows: int, cols: int, repeat: int) -> dict:
    """In this process: one layer, one path (``mode``: nmfx's path, or ``F.linear``) run at each
    batch ``repeat`` times; the memory after each batch, nothing timed. The inputs exist before
    the baseline (they are the caller's), each output is dropped right after its call."""
    import nmfx.kernels as K
    from nmfx.lowering.cpu import NMLinear
    from nmfx.packed import pack

    g = torch.Generator().manual_seed(0)
    w = torch.randn(rows, cols // 4, 4, generator=g)
    w[..., 2:] = 0
    w = w.reshape(rows, cols)
    bias = torch.randn(rows)
    if mode != "F.linear":
        assert K.kernels_available()
        layer = NMLinear(pack(w, "2:4"), bias)
        ctx = K.force_dispatch(mode)
    else:
        layer = torch.nn.Linear(cols, rows)
        with torch.no_grad():
            layer.weight.copy_(w)
            layer.bias.copy_(bias)
        ctx = contextlib.nullcontext()
    del w
    xs = {batch: torch.randn(batch, cols) for batch in BATCHES}
    trim()
    base = rss_bytes()
    out = []
    with torch.inference_mode(), ctx:
        for batch in BATCHES:
            for _ in range(repeat):
                layer(xs[batch])
            rss, free = rss_bytes() - base, heap_free_bytes()
            trim()
            out.append({
                "batch": batch, "rss_growth": rss, "live_growth": rss_bytes() - base,
                "heap_free": free, "scratch_kept": scratch_kept() if mode != "F.linear" else 0,
            })  # fmt: skip
    return {"mode": mode, "baseline_rss": base, "calls": out}


def paths() -> list[str]:
    """F.linear, nmfx's dense branch and every sparse path this host runs at any batch."""
    import nmfx.kernels as K

    sparse = [c for c in K.CHOICES if c not in ("dense", "portable") and not c.endswith("-select")
              and c.split("-")[0] in K.available_isas()]  # fmt: skip
    return ["F.linear", "dense", *sparse]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=11008)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=3, help="calls per batch size")
    parser.add_argument("--out", type=Path, default=None, help="JSON output path")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.rows, args.cols, args.repeat)))
        return
    dense_bytes = args.rows * args.cols * 4
    result = {"rows": args.rows, "cols": args.cols, "dense_bytes": dense_bytes,
              "repeat": args.repeat, "paths": {}}  # fmt: skip
    for mode in paths():
        proc = subprocess.run(
            [sys.executable, __file__, "--child", mode, "--rows", str(args.rows),
             "--cols", str(args.cols), "--repeat", str(args.repeat)],
            capture_output=True, text=True, check=True, cwd=ROOT,
        )  # fmt: skip
        result["paths"][mode] = json.loads(proc.stdout.strip().splitlines()[-1])
        for c in result["paths"][mode]["calls"]:
            print(f"{mode:14s} {c['batch']:4d} rows: RSS +{c['rss_growth'] / 2**20:5.1f} MiB "
                  f"({c['rss_growth'] / dense_bytes:5.1%} of the dense weight), live "
                  f"+{c['live_growth'] / 2**20:5.1f} MiB ({c['live_growth'] / dense_bytes:5.1%}); "
                  f"glibc free {c['heap_free'] / 2**20:5.1f} MiB, nmfx scratch kept "
                  f"{c['scratch_kept'] / 2**20:4.1f} MiB")  # fmt: skip
    for label, modes in (("F.linear", ["F.linear"]),
                         ("nmfx", [m for m in result["paths"] if m != "F.linear"])):  # fmt: skip
        calls = [c for m in modes for c in result["paths"][m]["calls"]]
        worst = max(c["rss_growth"] for c in calls) / dense_bytes
        worst_live = max(c["live_growth"] for c in calls) / dense_bytes
        print(
            f"{label}, worst: RSS +{worst:.1%}, live +{worst_live:.1%} of the dense weight "
            f"({dense_bytes / 2**20:.0f} MiB); target for nmfx < 10%"
        )
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
