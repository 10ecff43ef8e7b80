"""A small GPT-2-style decoder that uses HuggingFace's ``Conv1D`` for its projections.

``Conv1D`` is a Linear whose weight is stored transposed (``[in, out]``) and applied with
``torch.addmm``; HF GPT-2 checkpoints use it for ``c_attn``, ``c_proj`` and ``c_fc``, so a
sparsifier must find the reduction dim on weight dim 0 here, not dim 1. The LM head is an
``nn.Linear`` whose ``weight`` is the same Parameter as ``wte.weight`` (tied), so it stays
dense. Causal attention is written with plain tensor ops and ``scaled_dot_product_attention``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model_zoo._common import (
    TRANSFORMER_INIT_STD,
    check_divisible,
    check_positive,
    init_transformer_,
    replace_config,
)


@dataclass(frozen=True)
class GPT2Config:
    """Byte-level vocabulary by default; ``n_positions`` is the longest sequence accepted."""

    vocab_size: int = 256
    n_positions: int = 128
    n_embd: int = 128
    n_layer: int = 2
    n_head: int = 4
    layer_norm_epsilon: float = 1e-5

    def __post_init__(self) -> None:
        check_positive(self, "vocab_size", "n_positions", "n_embd", "n_layer", "n_head")
        check_divisible(self, "n_embd", "n_head")


class Conv1D(nn.Module):
    """HuggingFace's ``Conv1D``: ``y = x @ weight + bias`` with ``weight`` of shape [nx, nf]."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.empty(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))
        nn.init.normal_(self.weight, std=TRANSFORMER_INIT_STD)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Concatenate, don't star-unpack: FX cannot iterate a traced size (RUF005 would).
        size_out = x.size()[:-1] + (self.nf,)  # noqa: RUF005
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return x.view(size_out)


class CausalSelfAttention(nn.Module):
    """``c_attn`` packs q, k, v; heads are split with unflatten, merged with flatten."""

    def __init__(self, cfg: GPT2Config) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.n_embd = cfg.n_embd
        self.c_attn = Conv1D(3 * cfg.n_embd, cfg.n_embd)
        self.c_proj = Conv1D(cfg.n_embd, cfg.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.c_attn(x)
        c = self.n_embd
        # each [B, T, C] -> [B, n_head, T, head_dim]
        q, k, v = (
            qkv[..., i * c : (i + 1) * c].unflatten(-1, (self.n_head, -1)).transpose(1, 2)
            for i in range(3)
        )
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).flatten(2))


class MLP(nn.Module):
    """``c_fc`` to 4 * n_embd, tanh-approximated GELU (GPT-2's ``gelu_new``), ``c_proj``."""

    def __init__(self, cfg: GPT2Config) -> None:
        super().__init__()
        self.c_fc = Conv1D(4 * cfg.n_embd, cfg.n_embd)
        self.act = nn.GELU(approximate="tanh")
        self.c_proj = Conv1D(cfg.n_embd, 4 * cfg.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class Block(nn.Module):
    """Pre-norm: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, cfg: GPT2Config) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT2(nn.Module):
    """Token ids [B, T] (T <= n_positions) -> next-token logits [B, T, vocab_size]."""

    def __init__(self, cfg: GPT2Config | None = None) -> None:
        super().__init__()
        self.config = cfg = cfg or GPT2Config()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.n_positions, cfg.n_embd)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        init_transformer_(self)
        self.lm_head.weight = self.wte.weight  # tied: one Parameter, two users
        # GPT-2's scaled init of the projections that write into the residual stream.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, std=TRANSFORMER_INIT_STD / math.sqrt(2 * cfg.n_layer))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.size(1), device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def gpt2(**overrides: object) -> GPT2:
    """Build a :class:`GPT2` from the default :class:`GPT2Config` with ``overrides``."""
    return GPT2(replace_config(GPT2Config(), **overrides))
