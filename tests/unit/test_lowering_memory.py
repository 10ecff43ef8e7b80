"""Lowering to CPU hands the dense weights it freed back to the OS (glibc keeps them), and
finalize the masks it removed."""

from __future__ import annotations

import gc
import importlib
import os
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


def _tiny_llama():
    tf = pytest.importorskip("transformers", reason="transformers is not installed")
    cfg = tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=96)  # fmt: skip
    return tf.LlamaForCausalLM(cfg)


def _finalize_without_gc(monkeypatch, model, hold=None) -> tuple[list, int]:
    """(whether each masker is alive, full collections finalize ran) with Python's cyclic GC
    off, so that only refcounting (or finalize's own collection) can free them; a masker holds
    its mask and reused masked-weight buffers. ``hold(maskers)`` may keep them in a cycle."""
    from nmfx import model_state

    collections, collect = [], gc.collect
    gc.collect()
    gc.disable()
    try:
        nmfx.sparsify(model, mask_mode="fixed")  # stored masks
        maskers = [m for _, m in model_state.maskers(model)]
        refs = [weakref.ref(m) for m in maskers]
        if hold is not None:
            hold(maskers)
        del maskers
        monkeypatch.setattr(memory.gc, "collect", lambda *a: collections.append(a) or collect(*a))
        nmfx.finalize(model)
        monkeypatch.setattr(memory.gc, "collect", collect)
        return [r() is not None for r in refs], len(collections)  # before the GC is back on
    finally:
        gc.enable()


def test_finalize_frees_the_masks_without_a_garbage_collection(monkeypatch) -> None:
    """sparsify's temporary FX GraphModules are torn down (analysis._discard): nothing of nmfx's
    keeps a removed masker, so it (and its mask) is freed by refcounting when finalize drops it,
    with no full collection. Without the teardown each GraphModule, in a cycle with its Graph, kept its
    masker until the cyclic GC next ran. Nothing is left to collect, so finalize does not, even
    above its size threshold."""
    monkeypatch.setattr(memory, "COLLECT_FROM_BYTES", 0)
    alive, collections = _finalize_without_gc(monkeypatch, _tiny_llama())
    assert len(alive) >= 7 and not any(alive)
    assert collections == 0


def test_finalize_collects_maskers_a_cycle_still_holds(monkeypatch) -> None:
    """A removed masker that something else keeps in a reference cycle is collected by finalize
    once such maskers hold COLLECT_FROM_BYTES of masked weights; below that, it waits for the GC."""

    def cycle(maskers):
        loop = [maskers]
        loop.append(loop)  # unreachable once the caller drops it, freed only by the cyclic GC

    monkeypatch.setattr(memory, "COLLECT_FROM_BYTES", 1 << 62)
    alive, collections = _finalize_without_gc(monkeypatch, _tiny_llama(), hold=cycle)
    assert collections == 0 and len(alive) >= 7 and all(alive)
    gc.collect()
    monkeypatch.setattr(memory, "COLLECT_FROM_BYTES", 0)
    alive, collections = _finalize_without_gc(monkeypatch, _tiny_llama(), hold=cycle)
    assert collections == 1 and not any(alive)


def test_finalize_holds_one_baked_copy_at_a_time(monkeypatch) -> None:
    """finalize checks each baked weight before changing any, one copy at a time: holding them
    all made its peak 2.4x the weights of a 22-layer TinyLlama-sized Llama (10.3 GB). The model
    comes out the same: masked entries zero, kept ones untouched."""
    fin = importlib.import_module("nmfx.finalize")
    checked, alive_before = [], []

    def is_nm(baked, *args):
        alive_before.append(sum(r() is not None for r in checked))
        checked.append(weakref.ref(baked))
        return real(baked, *args)

    real = fin.is_nm
    monkeypatch.setattr(fin, "is_nm", is_nm)
    model = _tiny_llama()
    nmfx.sparsify(model, mask_mode="fixed")
    from nmfx import model_state

    expected = {
        f"{fqn}.{m.param_name}": torch.where(m.current_mask(), m.weight, 0).clone()
        for fqn, m in model_state.maskers(model)
    }
    nmfx.finalize(model)
    assert len(alive_before) == len(expected) >= 7 and alive_before == [0] * len(expected)
    for name, want in expected.items():
        assert torch.equal(model.get_parameter(name), want), name


def test_lower_frees_the_dense_weights_a_cycle_still_holds(monkeypatch) -> None:
    """torch.export's leftovers of sparsify's capture (an HF model) hold the model's modules
    and weights in reference cycles until the cyclic GC runs: with the GC off, the dense weights
    lower replaced stayed alive. lower collects when COLLECT_FROM_BYTES of them are."""
    from nmfx import model_state

    monkeypatch.setenv("NMFX_CALIBRATE", "0")  # every N:M layer lowered, none kept by timing

    def lowered_alive(collect_from: int) -> tuple[list[bool], int]:
        model = _tiny_llama()
        collections, collect = [], gc.collect
        gc.collect()
        gc.disable()
        try:
            nmfx.finalize(nmfx.sparsify(model, mask_mode="fixed"))
            params = list(model_state.nm_record(model))
            refs = [weakref.ref(model.get_parameter(p)) for p in params]
            monkeypatch.setattr(memory, "COLLECT_FROM_BYTES", collect_from)
            monkeypatch.setattr(memory.gc, "collect", lambda *a: collections.append(a) or collect(*a))
            low = nmfx.lower(model, "cpu", inplace=True)
            monkeypatch.setattr(memory.gc, "collect", collect)
            lowered = [n for n, _ in low.named_parameters()] + [n for n, _ in low.named_buffers()]
            gone = [p for p in params if p not in lowered]  # replaced by packed buffers
            assert gone, lowered
            return [refs[params.index(p)]() is not None for p in gone], len(collections)
        finally:
            gc.enable()

    alive, collections = lowered_alive(1 << 62)
    if not any(alive):
        pytest.skip("no reference cycle holds a replaced weight in this torch: nothing to free")
    assert collections == 0
    alive, collections = lowered_alive(0)
    assert collections == 1 and not any(alive)


# Heap bytes glibc holds free (holes and the top chunk) before and after lowering six 1024x1024
# Linears (built with their own mappings, as at glibc's initial threshold) in a process whose
# mmap threshold has since risen to 30 MiB, as it has once finalize or a cast freed large blocks. ``NO_MAPPING`` lowers without ``large_blocks_mapped``.
_HOLES_SCRIPT = """
import contextlib, ctypes, json, os
import torch, nmfx
from nmfx.lowering import memory

class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
info = ctypes.CDLL(None).mallinfo2
info.restype = Info
if os.environ.get("NO_MAPPING"):
    memory.large_blocks_mapped = contextlib.nullcontext
torch.manual_seed(0)
model = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024, bias=False) for _ in range(6)])
big = bytearray(30 << 20); del big                # glibc's dynamic threshold is now 30 MiB
nmfx.finalize(nmfx.sparsify(model, mask_mode="fixed"))
memory.release_freed_memory()
before = info().fordblks
low = nmfx.lower(model, "cpu", inplace=True)
held = info().fordblks - before
with torch.inference_mode():
    out = low(torch.randn(2, 1024))
mapped = info().hblkhd
block = bytearray(4 << 20)                        # after lowering: from the heap again
print(json.dumps({"holes_mb": held / 2**20, "packed": sum(type(m).__name__ == "NMLinear" for m in low),
                  "later_block_mapped": info().hblkhd > mapped, "finite": bool(out.isfinite().all())}))
"""


def _holes(**env: str) -> dict:
    import json

    run = subprocess.run([sys.executable, "-c", _HOLES_SCRIPT], capture_output=True, text=True,
                         env={**os.environ, "NMFX_CALIBRATE": "0", **env}, check=True)  # fmt: skip
    return json.loads(run.stdout.splitlines()[-1])


@pytest.mark.skipif(not _GLIBC, reason="mallopt is glibc's; elsewhere lowering leaves it alone")
def test_lowering_leaves_no_holes_in_the_heap() -> None:
    """Packing each weight, then copying it to its exact size, freed the first copy between
    two buffers that stay: ~30 MB of holes here, 1.2 GB at 22 TinyLlama-sized layers,
    which generate's activations then faulted back in (+23 MB peak RSS). Lowered inside
    large_blocks_mapped, each such block had its own mapping and left no hole; afterwards,
    blocks under 32 MiB come from the heap again (glibc's threshold after large frees)."""
    without = _holes(NO_MAPPING="1")
    assert without["packed"] == 5 and without["holes_mb"] > 6, without  # output layer dense
    with_mapping = _holes()
    assert with_mapping["packed"] == 5 and with_mapping["finite"]
    assert with_mapping["holes_mb"] < 1, with_mapping
    assert not with_mapping["later_block_mapped"]


@pytest.mark.skipif(not _GLIBC, reason="mallopt is glibc's")
def test_large_blocks_mapped_keeps_the_processes_own_malloc_tuning() -> None:
    """A process that tuned glibc's malloc itself (environment) keeps its thresholds."""
    code = ("from nmfx.lowering.memory import large_blocks_mapped\n"
            "with large_blocks_mapped() as applied: print(applied)")  # fmt: skip
    for env, want in (({}, "True"), ({"MALLOC_MMAP_THRESHOLD_": "65536"}, "False"),
                      ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1"}, "False")):  # fmt: skip
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_"))}
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env={**clean, **env}, check=True).stdout.strip()  # fmt: skip
        assert out == want, (env, out)
