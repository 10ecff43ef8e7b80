"""Lowering to CPU hands the dense weights it freed back to the OS (glibc keeps them), and
finalize the masks it removed."""

from __future__ import annotations

import gc
import importlib
import platform
import subprocess
import sys
import weakref

import pytest
import torch

import nmfx
from nmfx.lowering import memory

_GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"

# Freed blocks under glibc's (raised) mmap threshold stay resident until malloc_trim.
_SCRIPT = """
import sys
from pathlib import Path
from nmfx.lowering.memory import release_freed_memory
def rss_mb():
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmRSS"))
    return int(line.split()[1]) / 1024
big = bytearray(30 << 20); del big               # raises the mmap threshold to 30 MiB
blocks = [bytearray(1 << 20) for _ in range(96)]  # now served from the heap, and touched
keep = blocks[-1]; del blocks                     # the last one pins the heap's top
before = rss_mb()
released = release_freed_memory()
print(before - rss_mb(), released)
"""


@pytest.mark.skipif(not _GLIBC, reason="malloc_trim is glibc's; elsewhere this is a no-op")
def test_release_freed_memory_returns_freed_heap_pages() -> None:
    out = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True,
                         check=True).stdout.split()  # fmt: skip
    dropped_mb, released = float(out[0]), out[1]
    assert released == "True" and dropped_mb > 64


def test_finalize_and_lower_cpu_release_once_each(monkeypatch) -> None:
    """finalize frees the masks and its baked copies (a dense model's size at 22 layers of a
    TinyLlama-sized Llama: 5.7 GB resident after finalize, 4.6 GB trimmed); lower the dense
    weights it packed."""
    calls = []
    monkeypatch.setattr(memory, "release_freed_memory", lambda: calls.append(1) or True)
    monkeypatch.setenv("NMFX_CALIBRATE", "0")
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    nmfx.finalize(nmfx.sparsify(model))
    assert calls == [1]
    low = nmfx.lower(model, "cpu")
    assert type(low[0]).__name__ == "NMLinear" and calls == [1, 1]


def _finalized_masks_alive(monkeypatch, collect_from: int) -> tuple[int, int]:
    """(masks alive right after finalize, masks) of a tiny HF Llama, with Python's cyclic GC
    off so that only finalize can run it."""
    tf = pytest.importorskip("transformers", reason="transformers is not installed")
    from nmfx import model_state

    fin = importlib.import_module("nmfx.finalize")  # the module (nmfx.finalize is the function)
    monkeypatch.setattr(fin, "COLLECT_FROM_BYTES", collect_from)
    cfg = tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=96)  # fmt: skip
    model = tf.LlamaForCausalLM(cfg)
    gc.collect()
    gc.disable()
    try:
        nmfx.sparsify(model, mask_mode="fixed")  # stored masks
        masks = [weakref.ref(m.mask) for _, m in model_state.maskers(model)]
        nmfx.finalize(model)
        return sum(r() is not None for r in masks), len(masks)
    finally:
        gc.enable()


def test_finalize_frees_the_maskers_masks_without_waiting_for_the_gc(monkeypatch) -> None:
    alive, total = _finalized_masks_alive(monkeypatch, collect_from=1 << 62)  # never collects
    if alive == 0:
        pytest.skip("no reference cycle keeps a removed masker in this torch: nothing to free")
    assert total >= 7 and alive > 0
    assert _finalized_masks_alive(monkeypatch, collect_from=0) == (0, total)
