"""A plain Linear+ReLU MLP: the simplest model whose every hidden layer is N:M-sparsifiable.

The default is the "4 x 1024 wide" MLP over 8x8 scikit-learn digits (64 input features).
Every reduction dim (64, 1024) is a multiple of 32; the 10-way head stays dense by policy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from model_zoo._common import check_positive, replace_config


@dataclass(frozen=True)
class MLPConfig:
    """``depth`` hidden Linear+ReLU layers of width ``hidden``, then a Linear head."""

    in_features: int = 64
    hidden: int = 1024
    depth: int = 4
    num_classes: int = 10

    def __post_init__(self) -> None:
        check_positive(self, "in_features", "hidden", "depth", "num_classes")


MLP_4X1024 = MLPConfig(hidden=1024, depth=4)
"""The "4 x 1024 wide" MLP: four hidden layers of 1024 units (the default)."""


class MLP(nn.Module):
    """``layers`` (Linear, ReLU) * depth, then ``head``; inputs are flattened from dim 1."""

    def __init__(self, cfg: MLPConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = cfg or MLPConfig()
        blocks: list[nn.Module] = []
        width = cfg.in_features
        for _ in range(cfg.depth):
            blocks += [nn.Linear(width, cfg.hidden), nn.ReLU()]
            width = cfg.hidden
        self.layers = nn.Sequential(*blocks)
        self.head = nn.Linear(width, cfg.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(torch.flatten(x, 1)))


def mlp(**overrides: object) -> MLP:
    """Build an :class:`MLP` from :data:`MLP_4X1024` with ``overrides`` applied."""
    return MLP(replace_config(MLP_4X1024, **overrides))
