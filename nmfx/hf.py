"""Hugging Face models: load a ``save_pretrained`` directory or a config file (for the CLI),
and :func:`fast_generate`, greedy decoding without ``generate``'s per-token work.

Kept apart from ``nmfx.cli`` so that ``transformers`` (an optional extra, ``nmfx[hf]``) is
imported only when a command names an HF model. Nothing is downloaded: directories are
read with ``local_files_only`` and configs build randomly initialised models.
"""

from __future__ import annotations

import contextlib
import json
import weakref
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["HFInputError", "fast_generate", "load_hf_config", "load_hf_dir", "token_inputs"]


class HFInputError(ValueError):
    """A bad ``--hf`` / ``--hf-config`` argument (the CLI turns it into a usage error)."""


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:
        raise ImportError(
            "Hugging Face models need transformers: pip install 'nmfx[hf]'"
        ) from exc
    return transformers


def _model_class(tf: Any, config: Any) -> Any:
    """The class named by ``config.architectures``, else the causal-LM auto class, else the
    bare model: the head the checkpoint was saved with."""
    for name in getattr(config, "architectures", None) or ():
        cls = getattr(tf, name, None)
        if cls is not None:
            return cls
    for auto in (tf.AutoModelForCausalLM, tf.AutoModel):
        if type(config) in auto._model_mapping:
            return auto
    raise HFInputError(
        f"no transformers model class for config type {type(config).__name__}; "
        f"set 'architectures' in the config"
    )


def load_hf_dir(path: str) -> nn.Module:
    """The model saved in ``path`` by ``save_pretrained``, in eval mode."""
    where = Path(path)
    if not where.is_dir():
        raise HFInputError(
            f"--hf {path}: no such directory; give a folder written by save_pretrained"
        )
    if not (where / "config.json").is_file():
        raise HFInputError(
            f"--hf {path}: no config.json in it; give a folder written by save_pretrained "
            f"(or a config with --hf-config)"
        )
    tf = _transformers()
    config = tf.AutoConfig.from_pretrained(where, local_files_only=True)
    cls = _model_class(tf, config)
    return cls.from_pretrained(where, local_files_only=True).eval()


def load_hf_config(path: str) -> nn.Module:
    """A randomly initialised model built from the config file ``path`` (or the
    ``config.json`` in the folder ``path``), in eval mode."""
    where = Path(path)
    if where.is_dir():
        where = where / "config.json"
    if not where.is_file():
        raise HFInputError(f"--hf-config {path}: no such file; give a transformers config.json")
    try:
        fields = json.loads(where.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise HFInputError(f"--hf-config {path}: not a JSON file ({exc})") from exc
    if not isinstance(fields, dict) or "model_type" not in fields:
        raise HFInputError(
            f"--hf-config {path}: no 'model_type' in it; a transformers config.json names "
            f"one, e.g. \"model_type\": \"llama\""
        )
    tf = _transformers()
    try:
        config = tf.AutoConfig.for_model(**fields)
    except ValueError as exc:
        raise HFInputError(f"--hf-config {path}: {exc}") from exc
    cls = _model_class(tf, config)
    make = cls.from_config if hasattr(cls, "from_config") else cls._from_config
    return make(config).eval()


def token_inputs(model: nn.Module, batch: int, seq: int | None) -> tuple[torch.Tensor, ...] | None:
    """Random token ids ``(batch, seq)`` (32 tokens by default) for a text model, None for
    other models (they need ``--input-shape``)."""
    config = getattr(model, "config", None)
    if getattr(model, "main_input_name", None) != "input_ids" or config is None:
        return None
    seq = seq or 32
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and seq > limit:
        raise HFInputError(
            f"--seq {seq} is longer than the model's max_position_embeddings={limit}; "
            f"pass --seq {limit} or less"
        )
    vocab = int(getattr(config, "vocab_size", 2))
    return (torch.randint(0, vocab, (batch, seq)),)


# ---- greedy decoding with a static KV cache and one compiled step ----

# Per model: the static caches and compiled steps built for it, by (batch, cache length, dtype).
_DECODERS: weakref.WeakKeyDictionary[nn.Module, dict[tuple, Any]] = weakref.WeakKeyDictionary()


def fast_generate(
    model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int, *, compile: bool = True
) -> torch.Tensor:
    """Greedy decoding of a Hugging Face causal LM: ``input_ids`` [batch, prompt] followed by
    exactly ``max_new_tokens`` tokens, as ``model.generate(input_ids, do_sample=False,
    max_new_tokens=n, min_new_tokens=n)`` returns them (no padding, no stop at EOS).

    Why not ``generate``: per token it runs logits processors, stopping criteria, input
    preparation and a dynamic cache, about 1.5 ms on a CPU, as long as what 2:4 sparsity saves
    in a small model's linears. Here the prompt is one eager forward into a static KV cache, then
    each token is one call of a compiled step (``torch.compile``, default backend: a lowered
    model's packed linears run the C++ op ``nmfx_cpu::nm_linear`` there) that returns the argmax
    token. The cache and the compiled step are built on first use per model, batch, cache length
    and dtype, and reused; the cache length is prompt + new tokens rounded up to a multiple of
    :data:`CACHE_ROUND` (at most ``max_position_embeddings``), so that prompts of other lengths
    reuse the step instead of compiling another. ``compile=False`` runs the same loop eagerly.
    """
    _check_generate_args(model, input_ids, max_new_tokens)
    batch, prompt = input_ids.shape
    decoder = _decoder(model, batch, _cache_length(model, prompt + max_new_tokens), compile)
    with _fp32_attention(model):
        return decoder(input_ids, max_new_tokens)


_FP32_SDPA = "nmfx_sdpa_fp32"


def _fp32_sdpa(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, *args: Any, **kwargs: Any) -> tuple:  # fmt: skip
    """HF's ``sdpa`` attention on fp32 copies of bf16/fp16 q, k, v, the output cast back.

    On CPU, ``scaled_dot_product_attention`` runs a one-row bf16 query about 6x slower than
    fp32 (240 vs 39 us for 32 heads over 64 positions, one thread, Zen 4): per decoded token
    that was more than a 4-layer model's norms, activations and residuals together. q, k and v
    are small (the cache of a few hundred positions), so the copies cost little. A decode step's
    one-row query skips sdpa (:func:`_one_row_attention`)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if _one_row_ok(query, key, attention_mask, args, kwargs):
        return _one_row_attention(query, key, value, attention_mask, kwargs), None
    dtype = query.dtype
    query, key, value = query.float(), key.float(), value.float()
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()
    out, weights = sdpa_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)
    return out.to(dtype), weights


def _one_row_ok(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None,
                args: tuple, kwargs: dict) -> bool:  # fmt: skip
    """A decode step's attention that :func:`_one_row_attention` computes as sdpa would: one
    query row, no dropout, a boolean mask (or none), no extras (softcap, position bias)."""
    extras = any(kwargs.get(k) is not None for k in ("softcap", "position_bias", "s_aux"))
    plain_mask = mask is None or (
        mask.dtype == torch.bool and mask.dim() == 4 and mask.shape[1:3] == (1, 1)
    )
    return (
        query.shape[2] == 1 and not args and not extras and not kwargs.get("dropout")
        and query.shape[1] % key.shape[1] == 0 and query.shape[-1] == key.shape[-1]
        and plain_mask
    )  # fmt: skip


def _one_row_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       mask: torch.Tensor | None, kwargs: dict) -> torch.Tensor:  # fmt: skip
    """Softmax attention of one query row per head, in fp32, written as products and sums so
    that inductor fuses it into a loop or two over the bf16 cache: no fp32 copy of the cache,
    no GQA copy of k/v per query head, no separate attention op. Returns [batch, 1, heads,
    dim] (sdpa's output after HF's transpose)."""
    batch, heads, _, dim = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    scale = kwargs.get("scaling") or dim**-0.5
    q = query.reshape(batch, kv_heads, heads // kv_heads, 1, dim).float() * scale
    scores = (q * key.unsqueeze(2).float()).sum(-1)  # [batch, kv_heads, group, length]
    if mask is not None:
        scores = scores.masked_fill(~mask.reshape(-1, 1, 1, length), float("-inf"))
    probs = scores.softmax(-1).unsqueeze(-1)
    out = (probs * value.unsqueeze(2).float()).sum(-2)  # [batch, kv_heads, group, dim]
    return out.reshape(batch, 1, heads, -1).to(query.dtype)


@contextlib.contextmanager
def _fp32_attention(model: nn.Module) -> Any:
    """Within the block, a bf16/fp16 model using ``sdpa`` attention runs it in fp32."""
    sdpa = getattr(model.config, "_attn_implementation", None) == "sdpa"
    if not sdpa or _model_dtype(model) not in (torch.bfloat16, torch.float16):
        yield
        return
    tf = _transformers()
    if _FP32_SDPA not in tf.AttentionInterface._global_mapping:
        tf.AttentionInterface.register(_FP32_SDPA, _fp32_sdpa)
    # HF builds no attention mask for an implementation its mask interface does not know
    # (it takes it for an external kernel that needs none): a one-row step would then attend
    # to the static cache's empty positions too. sdpa's mask, as "sdpa" gets.
    masks = tf.masking_utils.ALL_MASK_ATTENTION_FUNCTIONS
    if _FP32_SDPA not in masks._global_mapping:
        masks.register(_FP32_SDPA, masks._global_mapping["sdpa"])
    model.set_attn_implementation(_FP32_SDPA)
    try:
        yield
    finally:
        model.set_attn_implementation("sdpa")


def _check_generate_args(model: nn.Module, input_ids: Any, max_new_tokens: Any) -> None:
    config = getattr(model, "config", None)
    if config is None or not callable(getattr(model, "generate", None)):
        raise TypeError(
            f"fast_generate needs a Hugging Face causal LM (with .config and .generate), got "
            f"{type(model).__name__}"
        )
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids)
        raise ValueError(
            f"input_ids must be an integer tensor [batch, prompt], got {shape}; e.g. "
            f"tokenizer(text, return_tensors='pt').input_ids"
        )
    if input_ids.shape[0] < 1 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} is empty; give at least one token")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an int >= 1")
    limit = getattr(config, "max_position_embeddings", None)
    total = input_ids.shape[1] + max_new_tokens
    if isinstance(limit, int) and total > limit:
        raise ValueError(
            f"prompt {input_ids.shape[1]} + max_new_tokens {max_new_tokens} = {total} is more than "
            f"the model's max_position_embeddings={limit}; generate fewer tokens"
        )


CACHE_ROUND = 64  # positions: one compiled step serves every prompt + new tokens up to it


def _cache_length(model: nn.Module, total: int) -> int:
    rounded = -(-total // CACHE_ROUND) * CACHE_ROUND
    limit = getattr(model.config, "max_position_embeddings", None)
    return min(rounded, limit) if isinstance(limit, int) else rounded


def _model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating parameter (a lowered model's norms, embedding)."""
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32


def _decoder(model: nn.Module, batch: int, length: int, compile: bool) -> _StaticDecoder:
    dtype = _model_dtype(model)
    per_model = _DECODERS.setdefault(model, {})
    key = (batch, length, dtype, compile)
    if key not in per_model:
        per_model[key] = _StaticDecoder(model, length, compile)
    return per_model[key]


# Inductor options of the compiled step. A decode step's kernels between the linears (norms,
# rotary, SiLU, the cache update and its fp32 copy for attention, the argmax) touch a few
# thousand to a few hundred thousand values each; inductor opens an OpenMP region for a kernel
# once each thread gets 512 values, and a parallel region costs ~7-20 us on a 2-core VM, more
# than most of these kernels' work. Here a kernel runs in parallel only from 256K values per
# thread (~50 us of work): the 4-layer TinyLlama-sized model's step opens ~40 regions fewer per
# token. The packed linears keep their threads (their own op); long caches still go parallel.
#
# The step's Python wrapper also checks the size and stride of every input and custom-op output
# before use (~110 checks per token in the 4-layer model, about 1 us each): the step's inputs
# never change shape within a decode (the first step of each call checks every guard) and the
# packed ops return contiguous outputs, so they are off (size_asserts).
STEP_COMPILE_OPTIONS = {"cpp.min_chunk_size": 1 << 18, "size_asserts": False}


def _step_backend(gm: torch.fx.GraphModule, example_inputs: list) -> Any:
    """Inductor with :data:`STEP_COMPILE_OPTIONS`, after the packed calls that share an input
    (q/k/v, gate/up) became one call each (``group_packed_calls``: x staged once, one parallel
    region, no weight copied)."""
    from torch._inductor.compile_fx import compile_fx

    from nmfx.passes.fuse_shared_input_linears import group_packed_calls

    group_packed_calls(gm)
    return compile_fx(gm, example_inputs, config_patches=STEP_COMPILE_OPTIONS)


class _StaticDecoder:
    """One static KV cache of ``length`` positions and the step that decodes into it."""

    def __init__(self, model: nn.Module, length: int, compile: bool) -> None:
        tf = _transformers()
        self._model = weakref.ref(model)  # held by _DECODERS under the model: no cycle
        self.cache = tf.StaticCache(config=model.config, max_cache_len=length)
        self.compiled = compile
        self.step = (
            torch.compile(self._step, dynamic=False, backend=_step_backend)
            if compile
            else self._step
        )

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        model = self._model()
        out = model(
            input_ids=ids, position_ids=positions, cache=self.cache, use_cache=True,
            logits_to_keep=1,
        )  # fmt: skip
        return out.logits[:, -1].argmax(-1, keepdim=True)  # greedy, as generate's argmax

    def _step(self, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        return self._forward(token, position)

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, new: int) -> torch.Tensor:
        batch, prompt = input_ids.shape
        self.cache.reset()
        positions = torch.arange(prompt).expand(batch, prompt)
        token = self._forward(input_ids, positions)  # the prompt: eager (its shape varies)
        out = torch.empty(batch, prompt + new, dtype=input_ids.dtype)
        out[:, :prompt] = input_ids
        out[:, prompt : prompt + 1] = token
        # The first step checks every guard (the model may have changed since the last call);
        # later ones only tell compiled graphs apart (~1 ms a token on a model's guards):
        # nothing can change the model or the inputs' shapes within this loop. The stance is
        # entered once for all of them (entering it costs tens of us).
        for i in range(1, min(new, 2)):
            out[:, prompt + i : prompt + i + 1] = token = self._step_at(token, prompt + i - 1)
        with self._stance(skip=True):
            for i in range(2, new):
                out[:, prompt + i : prompt + i + 1] = token = self._step_at(token, prompt + i - 1)
        return out

    def _step_at(self, token: torch.Tensor, position: int) -> torch.Tensor:
        return self.step(token, torch.full((token.shape[0], 1), position, dtype=torch.long))

    def _stance(self, skip: bool) -> Any:
        if skip and self.compiled:
            return torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)
        return contextlib.nullcontext()
