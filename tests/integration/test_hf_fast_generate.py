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
    # another prompt, of another length: the same cache and step, reset, same answer as generate;
    # the steps after the first skip guard checks under one stance entered once per call
    ids2 = torch.randint(0, 1024, (1, 12))
    stances = []
    real_stance = torch.compiler.set_stance
    monkeypatch.setattr(
        torch.compiler, "set_stance", lambda *a, **k: stances.append(k) or real_stance(*a, **k)
    )
    assert torch.equal(fast_generate(low, ids2, 10), hf_generate(model, ids2, 10))
    assert stances == [{"skip_guard_eval_unsafe": True}]
    monkeypatch.undo()
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
        code = _step_code(low, ids)
        assert "omp parallel" not in code
        assert "assert_size_stride(" not in code  # size_asserts off
        monkeypatch.setattr(nmfx.hf, "STEP_COMPILE_OPTIONS", {})  # inductor's defaults
        code = _step_code(low, ids)
        assert "omp parallel" in code and "assert_size_stride(" in code
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


def _sharp_llama() -> torch.nn.Module:
    """A small fp32 Llama whose attention is far from uniform (weights scaled up), so that
    attending to a wrong set of cache positions changes the tokens."""
    torch.manual_seed(0)
    config = T.LlamaConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256, max_position_embeddings=64,
    )  # fmt: skip
    model = T.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(8)
    return model


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_bf16_attention_route_masks_the_empty_cache_positions(monkeypatch, compiled) -> None:
    """The attention a bf16 model decodes with (fp32 inside, one-row steps of our own), taken by
    an fp32 model: generate's tokens. Before the mask was registered for it, HF built no mask
    and every step also attended to the static cache's empty positions."""
    import nmfx.hf

    model = _sharp_llama()
    ids = torch.randint(0, 256, (1, 8))
    want = hf_generate(model, ids, 20)
    monkeypatch.setattr(nmfx.hf, "_model_dtype", lambda m: torch.bfloat16)  # the bf16 route
    calls = []
    real = nmfx.hf._one_row_attention
    monkeypatch.setattr(
        nmfx.hf, "_one_row_attention", lambda *a: calls.append(1) or real(*a)
    )
    torch._dynamo.reset()
    try:
        assert torch.equal(fast_generate(model, ids, 20, compile=compiled), want)
    finally:
        _DECODERS.pop(model, None)
    assert calls  # the one-row attention ran (traced, when compiled)
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "mask"])
def test_one_row_attention_is_sdpa(dtype, masked) -> None:
    """One query row per head, GQA (8 heads on 2 kv heads), a boolean mask over a 40-position
    cache: sdpa's output on fp32 copies (what the route computed before), transposed as HF
    returns it."""
    from nmfx.hf import _one_row_attention, _one_row_ok

    torch.manual_seed(0)
    q = torch.randn(2, 8, 1, 32).mul(3).to(dtype)
    k, v = (torch.randn(2, 2, 40, 32).to(dtype) for _ in range(2))
    mask = torch.arange(40).view(1, 1, 1, 40) < torch.tensor([17, 40]).view(2, 1, 1, 1)
    mask = mask if masked else None
    assert _one_row_ok(q, k, mask, (), {"dropout": 0.0, "scaling": 0.2})
    got = _one_row_attention(q, k, v, mask, {"scaling": 0.2})
    want = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), attn_mask=mask, scale=0.2, enable_gqa=True
    ).transpose(1, 2)
    assert got.dtype == dtype and got.shape == (2, 1, 8, 32)
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {}
    torch.testing.assert_close(got, want.to(dtype), **tol)


@pytest.mark.parametrize(
    ("rows", "kwargs", "mask_shape"),
    [(2, {}, None), (1, {"dropout": 0.1}, None), (1, {"softcap": 30.0}, None),
     (1, {}, (1, 1, 2, 40)), (1, {}, "float")],
    ids=["two-rows", "dropout", "softcap", "mask-of-two-rows", "float-mask"],
)  # fmt: skip
def test_one_row_attention_leaves_other_cases_to_sdpa(rows, kwargs, mask_shape) -> None:
    from nmfx.hf import _one_row_ok

    q, k = torch.zeros(1, 8, rows, 32), torch.zeros(1, 2, 40, 32)
    mask = None
    if mask_shape == "float":
        mask = torch.zeros(1, 1, 1, 40)
    elif mask_shape is not None:
        mask = torch.ones(mask_shape, dtype=torch.bool)
    assert not _one_row_ok(q, k, mask, (), kwargs)
