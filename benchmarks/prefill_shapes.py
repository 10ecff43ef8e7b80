"""nm_linear against dense ``F.linear`` at the weight shapes of a prefill, outside the kernel sweep.

The 224-point sweep of ``cpu_kernels.py`` covers 1024x1024 to 11008x4096 weights. A prompt
through the decode model (TinyLlama-sized: hidden 2048, 4 key/value heads of 64, MLP 5632,
vocabulary 32000) also runs 256x2048 (the k/v projections), 2048x2048, 5632x2048, 2048x5632
and 32000x2048 weights at the prompt's rows of x, and "never slower than dense" holds there
too: 256x2048 bf16 2:4 at 32 rows ran 0.70x of ``F.linear`` on every sparse path (session 8).

This runs ``cpu_kernels.py``'s measurement (autotune, then dense eager and compiled, the
sparse kernel, ``nm_linear`` and the best sparse path, interleaved; same table and JSON) on
these shapes, 2:4, fp32 and bf16, 32 rows of x by default. ``--only`` narrows or widens it as
in ``cpu_kernels.py``; later ``--only`` options override these defaults.

    PYTHONPATH=. python benchmarks/prefill_shapes.py
    PYTHONPATH=. python benchmarks/prefill_shapes.py --only batches=16,32,64 --only dtypes=bfloat16

Writes ``out/benchmarks/prefill_shapes.json`` unless ``--out`` is given.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cpu_kernels

# The decode model's linear weights (rows x columns), smallest first.
SHAPES = ((256, 2048), (2048, 2048), (5632, 2048), (2048, 5632), (32000, 2048))
DEFAULTS = {
    "shapes": ",".join(f"{r}x{c}" for r, c in SHAPES),
    "batches": "32",
    "patterns": "2:4",
    "dtypes": "float32,bfloat16",
}
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "out" / "benchmarks" / "prefill_shapes.json"


def prefill_argv(argv: list[str]) -> list[str]:
    """``cpu_kernels.py`` arguments: these shapes' defaults, then the caller's (which win)."""
    out = [a for k, v in DEFAULTS.items() for a in ("--only", f"{k}={v}")]
    if "--out" not in argv and not any(a.startswith("--out=") for a in argv):
        out += ["--out", str(DEFAULT_OUT)]
    return out + argv


def main(argv: list[str] | None = None) -> None:
    cpu_kernels.main(prefill_argv(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
