"""Small, readable reference models (random init, no downloads) to sparsify, test and benchmark.

One model per file, each with a frozen config dataclass whose defaults are small enough for
CPU. Every hidden layer reduces over a multiple of 32, so 2:4, 4:8, 1:8 and 16-wide patterns
apply; each model also has a layer that must stay dense (a 1- or 3-channel stem or patch
conv, or the output head).

    model = model_zoo.build("resnet18", num_classes=100)
    logits = model(model_zoo.example_input("resnet18", batch=8, model=model))
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from model_zoo.gpt2 import GPT2, GPT2Config, gpt2
from model_zoo.llama import Llama, LlamaConfig, llama
from model_zoo.mlp import MLP, MLP_4X1024, MLPConfig, mlp
from model_zoo.resnet import RESNET18, RESNET50, ResNet, ResNetConfig, resnet18, resnet50
from model_zoo.small_cnn import SmallCNN, SmallCNNConfig, small_cnn
from model_zoo.vit import VIT_SMALL, VIT_TINY, ViT, ViTConfig, vit_small, vit_tiny

__all__ = [
    "GPT2",
    "MLP",
    "MODELS",
    "SEQ_LEN",
    "GPT2Config",
    "Llama",
    "LlamaConfig",
    "MLPConfig",
    "ResNet",
    "ResNetConfig",
    "SmallCNN",
    "SmallCNNConfig",
    "ViT",
    "ViTConfig",
    "build",
    "example_input",
]

MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": mlp,
    "small_cnn": small_cnn,
    "resnet18": resnet18,
    "resnet50": resnet50,
    "vit_tiny": vit_tiny,
    "vit_small": vit_small,
    "gpt2": gpt2,
    "llama": llama,
}

# The config each builder starts from, so example_input needs no model.
_DEFAULT_CONFIGS: dict[str, object] = {
    "mlp": MLP_4X1024,
    "small_cnn": SmallCNNConfig(),
    "resnet18": RESNET18,
    "resnet50": RESNET50,
    "vit_tiny": VIT_TINY,
    "vit_small": VIT_SMALL,
    "gpt2": GPT2Config(),
    "llama": LlamaConfig(),
}

SEQ_LEN = 16
"""Sequence length of the token ids :func:`example_input` makes for the decoders."""

RESNET_IMAGE_SIZE = 32


def _check_name(name: str) -> str:
    if name not in MODELS:
        match = difflib.get_close_matches(name, MODELS, n=1)
        hint = f"; did you mean {match[0]!r}?" if match else ""
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODELS)}{hint}")
    return name


def build(name: str, **overrides: Any) -> nn.Module:
    """Build registered model ``name`` with config fields ``overrides`` (e.g. ``depth=2``).

    Unknown names raise ``ValueError``; unknown config fields raise ``TypeError``.
    """
    return MODELS[_check_name(name)](**overrides)


def _images(batch: int, channels: int, size: int) -> torch.Tensor:
    return torch.randn(batch, channels, size, size)


def _tokens(batch: int, vocab_size: int, max_len: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (batch, min(SEQ_LEN, max_len)))


# Input makers looked up by config type: one entry per model family.
_INPUTS: dict[type, Callable[[Any, int], torch.Tensor]] = {
    MLPConfig: lambda c, b: torch.randn(b, c.in_features),
    SmallCNNConfig: lambda c, b: _images(b, c.in_channels, c.image_size),
    ResNetConfig: lambda c, b: _images(b, c.in_channels, RESNET_IMAGE_SIZE),
    ViTConfig: lambda c, b: _images(b, c.in_channels, c.image_size),
    GPT2Config: lambda c, b: _tokens(b, c.vocab_size, c.n_positions),
    LlamaConfig: lambda c, b: _tokens(b, c.vocab_size, c.max_seq_len),
}


def example_input(name: str, batch: int = 2, model: nn.Module | None = None) -> torch.Tensor:
    """A random input of the right shape and dtype for model ``name``.

    Images are float [batch, C, H, W] (32x32 for ResNet/ViT, 1x8x8 for ``small_cnn``), ``mlp``
    takes [batch, in_features], decoders take int64 token ids [batch, SEQ_LEN]. Pass the
    ``model`` built with overrides so its ``config`` (channels, vocab, ...) is respected;
    its parameters' device is used too.
    """
    default = _DEFAULT_CONFIGS[_check_name(name)]
    cfg = getattr(model, "config", None) or default
    x = _INPUTS[type(cfg)](cfg, batch)
    if model is not None:
        param = next(model.parameters(), None)
        if param is not None:
            x = x.to(param.device)
    return x
