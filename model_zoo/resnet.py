"""ResNet-18 and ResNet-50 (torchvision's structure, random init): the standard conv benchmarks.

``small_input=True`` (the default) swaps the 7x7 stride-2 stem and max-pool for a 3x3
stride-1 stem, the usual CIFAR variant for 32x32 inputs. The stem conv has ``in_channels``
(3) input channels, so it stays dense under N:M; every other conv reduces over a multiple of
``width`` channels (64 by default) and every N:M pattern up to M=32 applies.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from model_zoo._common import check_positive, replace_config

_STAGE_BLOCKS: dict[int, tuple[int, int, int, int]] = {18: (2, 2, 2, 2), 50: (3, 4, 6, 3)}


@dataclass(frozen=True)
class ResNetConfig:
    """``depth`` 18 uses BasicBlock, 50 uses Bottleneck (stride on the 3x3 conv, "v1.5")."""

    depth: int = 18
    num_classes: int = 10
    width: int = 64
    in_channels: int = 3
    small_input: bool = True

    def __post_init__(self) -> None:
        if self.depth not in _STAGE_BLOCKS:
            raise ValueError(
                f"ResNetConfig.depth={self.depth!r} is not supported; "
                f"choose one of {sorted(_STAGE_BLOCKS)}"
            )
        check_positive(self, "num_classes", "width", "in_channels")


def _conv_bn(c_in: int, c_out: int, kernel: int, stride: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(c_out),
    ]


class BasicBlock(nn.Module):
    """Two 3x3 convs plus the identity (or a 1x1 projection when the shape changes)."""

    expansion = 1

    def __init__(self, c_in: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(c_in, planes, 3, stride)
        self.conv2, self.bn2 = _conv_bn(planes, planes, 3)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(c_in, planes * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand by 4, plus the identity or a projection."""

    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(c_in, planes, 1)
        self.conv2, self.bn2 = _conv_bn(planes, planes, 3, stride)
        self.conv3, self.bn3 = _conv_bn(planes, planes * self.expansion, 1)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(c_in, planes * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def _shortcut(c_in: int, c_out: int, stride: int) -> nn.Sequential | None:
    if stride == 1 and c_in == c_out:
        return None
    return nn.Sequential(*_conv_bn(c_in, c_out, 1, stride))


class ResNet(nn.Module):
    """stem -> layer1..layer4 (widths w, 2w, 4w, 8w; stride 2 from layer2) -> avgpool -> fc."""

    def __init__(self, cfg: ResNetConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = cfg or ResNetConfig()
        if cfg.small_input:
            self.conv1, self.bn1 = _conv_bn(cfg.in_channels, cfg.width, 3)
        else:
            self.conv1, self.bn1 = _conv_bn(cfg.in_channels, cfg.width, 7, stride=2)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = (
            nn.Identity() if cfg.small_input else nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        )
        block = BasicBlock if cfg.depth < 50 else Bottleneck
        n1, n2, n3, n4 = _STAGE_BLOCKS[cfg.depth]
        w, self._c_in = cfg.width, cfg.width
        self.layer1 = self._make_layer(block, w, n1, stride=1)
        self.layer2 = self._make_layer(block, 2 * w, n2, stride=2)
        self.layer3 = self._make_layer(block, 4 * w, n3, stride=2)
        self.layer4 = self._make_layer(block, 8 * w, n4, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(self._c_in, cfg.num_classes)
        for m in self.modules():  # torchvision's init; BatchNorm keeps weight 1, bias 0
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(
        self, block: type[BasicBlock | Bottleneck], planes: int, n_blocks: int, stride: int
    ) -> nn.Sequential:
        blocks = []
        for j in range(n_blocks):
            blocks.append(block(self._c_in, planes, stride=stride if j == 0 else 1))
            self._c_in = planes * block.expansion
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


RESNET18 = ResNetConfig(depth=18)
RESNET50 = ResNetConfig(depth=50)


def resnet18(**overrides: object) -> ResNet:
    """ResNet-18 (BasicBlock, [2, 2, 2, 2]) with ``overrides`` applied to :data:`RESNET18`."""
    return ResNet(replace_config(RESNET18, **overrides))


def resnet50(**overrides: object) -> ResNet:
    """ResNet-50 (Bottleneck, [3, 4, 6, 3]) with ``overrides`` applied to :data:`RESNET50`."""
    return ResNet(replace_config(RESNET50, **overrides))
