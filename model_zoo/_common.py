"""Helpers shared by the model-zoo files: config overrides and validation, transformer init.

Kept private so each model file stays a readable, self-contained reference model.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, TypeVar

from torch import nn

ConfigT = TypeVar("ConfigT")

TRANSFORMER_INIT_STD = 0.02


def replace_config(cfg: ConfigT, **overrides: Any) -> ConfigT:
    """Return a copy of the frozen config ``cfg`` with ``overrides`` applied.

    Unknown keys are errors (never silently dropped); the message names the allowed options
    and a close match.
    """
    names = [f.name for f in dataclasses.fields(cfg)]  # type: ignore[arg-type]
    for key in overrides:
        if key not in names:
            match = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {match[0]!r}?" if match else ""
            raise TypeError(
                f"{type(cfg).__name__} has no option {key!r}; options are {names}{hint}"
            )
    return dataclasses.replace(cfg, **overrides)  # type: ignore[type-var]


def check_positive(cfg: object, *names: str) -> None:
    """Raise ``ValueError`` unless every named field of ``cfg`` is a positive int."""
    for name in names:
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{type(cfg).__name__}.{name}={value!r} must be a positive int")


def check_divisible(cfg: object, name: str, divisor_name: str) -> None:
    """Raise ``ValueError`` unless field ``name`` of ``cfg`` is divisible by ``divisor_name``."""
    value, divisor = getattr(cfg, name), getattr(cfg, divisor_name)
    if value % divisor:
        raise ValueError(
            f"{type(cfg).__name__}.{name}={value} is not a multiple of "
            f"{divisor_name}={divisor}; change one of them"
        )


def init_transformer_(model: nn.Module, std: float = TRANSFORMER_INIT_STD) -> None:
    """GPT-style init: weights of Linear, Embedding and MHA input projections ~ N(0, std),
    biases zero; norms keep their defaults (weight 1, bias 0)."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None:
            nn.init.normal_(module.in_proj_weight, mean=0.0, std=std)
            if module.in_proj_bias is not None:
                nn.init.zeros_(module.in_proj_bias)
