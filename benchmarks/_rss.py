"""Peak RSS of one ``generate``, and the fresh process that loads a saved model to measure it.

``decode.py --rss-only`` measures each contender in a child process that holds only that
contender. Most children build the model (random init, ``sparsify``, ``finalize``, then their
own steps); the ``-load`` contenders instead load a model another child saved with
``torch.save``, in a fresh process running this file, as a deployment would: no
``torch.export`` capture, no dense weights freed, no autotuning (a lowered model's kernel
choices travel in the pickle). This file imports torch and the decode helpers only, not
nmfx: unpickling a lowered model imports what it needs (``dense-load`` imports no nmfx).

    python benchmarks/_rss.py MODEL.pt --new 16 --batch 1 --prompt 32 --vocab 32000 --threads 1
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _decode_profile import generate_tokens


def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def vm_hwm_mb() -> float:
    """The process's resident high-water mark (``VmHWM``), MB."""
    return _status_mb("VmHWM")


class Stages(dict):
    """Resident memory (``VmRSS``, MB) after each named step of a child, in order: where the
    process holds what (``stage("finalized")``)."""

    def __call__(self, name: str) -> None:
        self[name] = round(_status_mb("VmRSS"), 1)


def trim_heap() -> None:
    """``malloc_trim(0)`` where glibc has it (nmfx.lowering.memory does the same; not imported
    here so that a dense process loads no nmfx)."""
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is not None:
        trim(0)


def measure_generate(model: torch.nn.Module, ids: torch.Tensor, new: int, extra: dict) -> dict:
    """Peak RSS of one ``generate`` (high-water mark reset right before it) and the bytes of the
    model's parameters and buffers (each storage once), MB."""
    if extra:
        generate_tokens(model, ids, new, extra)  # compile first: not the steady state
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
    generate_tokens(model, ids, new, extra)
    tensors = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
               for t in [*model.parameters(), *model.buffers()]}  # fmt: skip
    return {"peak_rss_mb": vm_hwm_mb(), "weights_mb": sum(tensors.values()) / 2**20}


def load_and_measure(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("path")
    for flag in ("--new", "--batch", "--prompt", "--vocab", "--threads"):
        p.add_argument(flag, type=int, required=flag != "--threads")
    p.add_argument("--mmap", action="store_true", help="torch.load(mmap=True)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    stage = Stages(imported=round(_status_mb("VmRSS"), 1))
    model = torch.load(args.path, weights_only=False, mmap=args.mmap).eval()  # a pickled module
    stage("loaded")
    gc.collect()
    trim_heap()  # what unpickling freed, as the building children trim theirs
    stage("trimmed")
    ids = torch.randint(0, args.vocab, (args.batch, args.prompt))
    out = measure_generate(model, ids, args.new, {})
    out["stages_mb"] = stage
    out["nmfx_imported"] = "nmfx" in sys.modules
    out["mmap"] = args.mmap
    return out


if __name__ == "__main__":
    print(json.dumps(load_and_measure()))
