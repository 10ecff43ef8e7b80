"""A small CNN for scikit-learn digits (1x8x8 images, 10 classes), fast enough to train on CPU.

The 1-channel stem conv (reduction dim 1*3*3 = 9) must stay dense; the following convs have
channel counts that are multiples of 16, so with 32 or 64 input channels their reduction
dims (32*9, 64*9) are multiples of 32 and every N:M pattern up to M=32 applies.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from model_zoo._common import check_positive, replace_config


@dataclass(frozen=True)
class SmallCNNConfig:
    """stem conv -> ``channels`` convs (each followed by a 2x2 max-pool) -> Linear head."""

    in_channels: int = 1
    image_size: int = 8
    stem_channels: int = 32
    channels: tuple[int, ...] = (64, 64)
    num_classes: int = 10

    def __post_init__(self) -> None:
        check_positive(self, "in_channels", "image_size", "stem_channels", "num_classes")
        for c in (self.stem_channels, *self.channels):
            if c % 16:
                raise ValueError(
                    f"SmallCNNConfig: channel count {c} is not a multiple of 16; "
                    "round it to one so N:M patterns apply to the next conv"
                )
        if self.image_size >> len(self.channels) < 1:
            raise ValueError(
                f"SmallCNNConfig.image_size={self.image_size} is too small for "
                f"{len(self.channels)} 2x2 max-pools; use fewer channels entries"
            )


class SmallCNN(nn.Module):
    """3x3 convs with padding 1; each conv after the stem halves the spatial size."""

    def __init__(self, cfg: SmallCNNConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = cfg or SmallCNNConfig()
        self.stem = nn.Sequential(
            nn.Conv2d(cfg.in_channels, cfg.stem_channels, 3, padding=1), nn.ReLU()
        )
        blocks: list[nn.Module] = []
        width = cfg.stem_channels
        for c in cfg.channels:
            blocks += [nn.Conv2d(width, c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            width = c
        self.features = nn.Sequential(*blocks)
        side = cfg.image_size >> len(cfg.channels)
        self.head = nn.Linear(width * side * side, cfg.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.features(self.stem(x)), 1))


def small_cnn(**overrides: object) -> SmallCNN:
    """Build a :class:`SmallCNN` from the default :class:`SmallCNNConfig` with ``overrides``."""
    return SmallCNN(replace_config(SmallCNNConfig(), **overrides))
