"""A small Vision Transformer (ViT-Tiny / ViT-Small shapes) for 32x32 images.

The default attention is ``nn.MultiheadAttention(batch_first=True)``, so the model exercises
MHA's packed in-projection (``in_proj_weight``) and its ``out_proj``; ``attention="sdpa"``
uses a qkv ``nn.Linear`` and ``F.scaled_dot_product_attention`` instead. The patch embedding
is a Conv2d over 3 input channels (reduction 3*4*4 = 48) and stays dense; every Linear
reduces over ``dim`` or ``dim * mlp_ratio`` (multiples of 32 for the presets).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model_zoo._common import check_divisible, check_positive, init_transformer_, replace_config

_ATTENTIONS = ("mha", "sdpa")


@dataclass(frozen=True)
class ViTConfig:
    """Patch size ``patch_size``, ``depth`` pre-norm blocks of width ``dim``, a cls token."""

    image_size: int = 32
    patch_size: int = 4
    in_channels: int = 3
    dim: int = 192
    depth: int = 6
    heads: int = 3
    mlp_ratio: int = 4
    num_classes: int = 10
    attention: str = "mha"

    def __post_init__(self) -> None:
        check_positive(self, "image_size", "patch_size", "in_channels", "num_classes")
        check_positive(self, "dim", "depth", "heads", "mlp_ratio")
        check_divisible(self, "image_size", "patch_size")
        check_divisible(self, "dim", "heads")
        if self.attention not in _ATTENTIONS:
            raise ValueError(f"ViTConfig.attention={self.attention!r} is not one of {_ATTENTIONS}")


class SDPAttention(nn.Module):
    """Multi-head self-attention from a packed qkv Linear and ``scaled_dot_product_attention``."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [B, T, 3*dim] -> [3, B, heads, T, head_dim]
        qkv = self.qkv(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).flatten(2))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.use_mha = cfg.attention == "mha"
        self.norm1 = nn.LayerNorm(cfg.dim, eps=1e-6)
        if self.use_mha:
            self.attn: nn.Module = nn.MultiheadAttention(cfg.dim, cfg.heads, batch_first=True)
        else:
            self.attn = SDPAttention(cfg.dim, cfg.heads)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=1e-6)
        hidden = cfg.dim * cfg.mlp_ratio
        self.mlp = nn.Sequential(nn.Linear(cfg.dim, hidden), nn.GELU(), nn.Linear(hidden, cfg.dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        h = self.attn(h, h, h, need_weights=False)[0] if self.use_mha else self.attn(h)
        x = x + h
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """patch_embed (Conv2d) -> [cls] + patches + pos_embed -> blocks -> norm -> head(cls)."""

    def __init__(self, cfg: ViTConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = cfg or ViTConfig()
        n_patches = (cfg.image_size // cfg.patch_size) ** 2
        self.patch_embed = nn.Conv2d(
            cfg.in_channels, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, n_patches + 1, cfg.dim))
        self.blocks = nn.Sequential(*(Block(cfg) for _ in range(cfg.depth)))
        self.norm = nn.LayerNorm(cfg.dim, eps=1e-6)
        self.head = nn.Linear(cfg.dim, cfg.num_classes)
        init_transformer_(self)
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # [B, n_patches, dim]
        cls = self.cls_token.expand(x.size(0), -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


# Real ViT-Ti/S have depth 12; 6 keeps CPU tests and benchmarks quick. Pass depth=12 for those.
VIT_TINY = ViTConfig(dim=192, depth=6, heads=3)
VIT_SMALL = ViTConfig(dim=384, depth=6, heads=6)


def vit_tiny(**overrides: object) -> ViT:
    """ViT-Tiny widths (dim 192, 3 heads) with ``overrides`` applied to :data:`VIT_TINY`."""
    return ViT(replace_config(VIT_TINY, **overrides))


def vit_small(**overrides: object) -> ViT:
    """ViT-Small widths (dim 384, 6 heads) with ``overrides`` applied to :data:`VIT_SMALL`."""
    return ViT(replace_config(VIT_SMALL, **overrides))
