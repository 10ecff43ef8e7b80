"""nmfx.hf.fast_generate: greedy tokens identical to HF ``generate`` (fp32), dense and lowered,
eager and compiled, its cache and step reused per model, and its bad-input errors."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch

import nmfx
from nmfx.hf import _DECODERS, fast_generate

T = pytest.importorskip(
    "transformers", reason="transformers is not installed: pip install 'nmfx[hf]'"
)

CONFIGS = {
    "llama": lambda: T.LlamaConfig(
        hidden_size=512, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, vocab_size=1024, max_position_embeddings=64,
    ),
    "qwen2": lambda: T.Qwen2Config(
        hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=512, max_position_embeddings=64,
    ),
    "mistral": lambda: T.MistralConfig(
        hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=512, max_position_embeddings=64,
    ),
}  # fmt: skip


def pruned(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(CONFIGS[name]()).eval()
    nmfx.sparsify(model, mask_mode="fixed")
    return nmfx.finalize(model).eval()


def hf_generate(model: torch.nn.Module, ids: torch.Tensor, new: int) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(
            ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0
        )


@pytest.mark.parametrize("name", list(CONFIGS))
def test_eager_loop_matches_generate_dense_and_lowered(name: str) -> None:
    model = pruned(name)
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    want = hf_generate(model, ids, 12)
    low = nmfx.lower(copy.deepcopy(model), "cpu")
    assert torch.equal(fast_generate(model, ids, 12, compile=False), want)
    assert torch.equal(fast_generate(low, ids, 12, compile=False), want)


def test_compiled_step_matches_generate_and_is_reused(monkeypatch) -> None:
    from nmfx.kernels import _ops

    model = pruned("llama")
    ids = torch.randint(0, 1024, (1, 7))
    want = hf_generate(model, ids, 10)
    low = nmfx.lower(copy.deepcopy(model), "cpu")
    torch._dynamo.reset()
    assert torch.equal(fast_generate(low, ids, 10), want)
    decoder = _DECODERS[low][(1, 64, torch.float32, True)]  # 17 rounded up (CACHE_ROUND)
    # the compiled step calls the packed C++ op: no call reaches the Python op
    calls = []
    real = _ops.compute
    monkeypatch.setattr(_ops, "compute", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        token = decoder.step(ids[:, -1:], torch.full((1, 1), 7))
    assert token.shape == (1, 1) and not calls
    monkeypatch.undo()
    # another prompt, of another length: the same cache and step, reset, same answer as generate
    ids2 = torch.randint(0, 1024, (1, 12))
    assert torch.equal(fast_generate(low, ids2, 10), hf_generate(model, ids2, 10))
    assert list(_DECODERS[low]) == [(1, 64, torch.float32, True)]
    # the decoders go with the model
    ref = weakref.ref(low)
    del low, decoder
    gc.collect()
    assert ref() is None


@pytest.mark.parametrize(
    ("ids", "new", "match"),
    [
        (torch.zeros(4, dtype=torch.long), 3, r"integer tensor \[batch, prompt\], got \(4,\)"),
        (torch.zeros(1, 4), 3, "integer tensor"),
        (torch.zeros(1, 0, dtype=torch.long), 3, "is empty"),
        (torch.zeros(1, 4, dtype=torch.long), 0, "max_new_tokens=0 must be an int >= 1"),
        (torch.zeros(1, 60, dtype=torch.long), 8, "max_position_embeddings=64"),
    ],
)
def test_bad_input(ids, new, match) -> None:
    model = pruned("qwen2")
    with pytest.raises(ValueError, match=match):
        fast_generate(model, ids, new)
    assert model not in _DECODERS  # nothing built


def test_not_a_causal_lm() -> None:
    with pytest.raises(TypeError, match=r"needs a Hugging Face causal LM.*got Linear"):
        fast_generate(torch.nn.Linear(2, 2), torch.zeros(1, 2, dtype=torch.long), 2)


def test_bf16_attention_runs_in_fp32_and_the_model_is_restored() -> None:
    from nmfx.hf import _FP32_SDPA

    model = pruned("llama").to(torch.bfloat16)
    assert model.config._attn_implementation == "sdpa"
    ids = torch.randint(0, 1024, (1, 8))
    got = fast_generate(model, ids, 56, compile=False)  # 64 positions: no rounding up
    assert model.config._attn_implementation == "sdpa"  # restored
    # generate with the same attention and a static cache of the same length (bf16 rounding
    # differs with the cache's length): the same tokens
    model.set_attn_implementation(_FP32_SDPA)
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=56, min_new_tokens=56, do_sample=False,
                              pad_token_id=0, cache_implementation="static")  # fmt: skip
    assert torch.equal(got, want)
    model.set_attn_implementation("sdpa")
    fp32 = pruned("llama")
    fast_generate(fp32, ids, 2, compile=False)
    assert _FP32_SDPA in T.AttentionInterface._global_mapping


def _step_code(model: torch.nn.Module, ids: torch.Tensor) -> str:
    """The inductor code of ``fast_generate``'s compiled step (built fresh, caches off)."""
    from torch._inductor.utils import run_and_get_code

    _DECODERS.pop(model, None)
    torch._dynamo.reset()
    with torch._inductor.config.patch(fx_graph_cache=False, autotune_local_cache=False):
        _, code = run_and_get_code(fast_generate, model, ids, 3)
    return "\n".join(code)


def test_step_elementwise_kernels_run_on_the_calling_thread(monkeypatch) -> None:
    """At 2 threads the step's kernels between the linears (norms, rotary, SiLU, the 64-position
    cache's copies, argmax) open no OpenMP region (each costs more than their work); inductor's
    default would."""
    import nmfx.hf

    low = nmfx.lower(pruned("llama"), "cpu")
    ids = torch.randint(0, 1024, (1, 5))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert "omp parallel" not in _step_code(low, ids)
        monkeypatch.setattr(nmfx.hf, "STEP_COMPILE_OPTIONS", {})  # inductor's defaults
        assert "omp parallel" in _step_code(low, ids)
    finally:
        torch.set_num_threads(threads)
        _DECODERS.pop(low, None)


def test_step_groups_shared_input_linears_with_the_same_tokens(monkeypatch) -> None:
    """q/k/v and gate/up become one nm_linear_group call each in the compiled step (bf16,
    as decoded); the tokens are those of the step with every linear its own call."""
    import importlib

    from nmfx.lowering.cpu import NMLinear

    fuse = importlib.import_module("nmfx.passes.fuse_shared_input_linears")

    low = nmfx.lower(pruned("llama").to(torch.bfloat16), "cpu")
    ids = torch.randint(0, 1024, (1, 5))
    code = _step_code(low, ids)
    assert code.count("nm_linear_group.default(") == 2 * 2  # 2 layers: q/k/v and gate/up
    n_packed = sum(isinstance(mod, NMLinear) for mod in low.modules())
    assert code.count("nm_linear.default(") == n_packed - 2 * 5  # o, down (lm_head if packed)
    grouped = fast_generate(low, ids, 12)
    monkeypatch.setattr(fuse, "group_packed_calls", lambda gm: 0)
    _DECODERS.pop(low, None)
    torch._dynamo.reset()
    assert torch.equal(fast_generate(low, ids, 12), grouped)
    _DECODERS.pop(low, None)
