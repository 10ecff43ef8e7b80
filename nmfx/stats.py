"""Mask statistics and SAD (sparse architecture divergence, from the SR-STE paper).

SAD(i, j) = ||E_j - E_i||_1: how many weights switched between kept and pruned. Masks are
taken from the maskers (the one the last forward used, cached in eager mode), so calling
this every step costs one XOR and one count per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from nmfx.modules import NMMasker

__all__ = ["LayerMaskStats", "MaskStats", "mask_snapshot", "mask_stats"]


def _maskers(model: nn.Module) -> dict[str, NMMasker]:
    out = {}
    for fqn, module in model.named_modules():
        if isinstance(module, NMMasker):
            owner = fqn.rsplit(".", 1)[0] if "." in fqn else ""
            out[f"{owner}.{module.param_name}" if owner else module.param_name] = module
    return out


@torch.no_grad()
def mask_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """The current N:M mask of every sparsified weight, by weight FQN (bool, copies)."""
    return {name: m.current_mask().clone() for name, m in _maskers(model).items()}


@dataclass
class LayerMaskStats:
    param: str
    numel: int
    kept: int
    density: float  # kept / numel of the mask
    weight_density: float  # non-zeros of the masked weight / numel
    flips: int | None  # SAD vs the reference snapshot
    flip_fraction: float | None


@dataclass
class MaskStats:
    layers: list[LayerMaskStats]

    @property
    def numel(self) -> int:
        return sum(s.numel for s in self.layers)

    @property
    def density(self) -> float:
        return sum(s.kept for s in self.layers) / max(self.numel, 1)

    @property
    def flips(self) -> int | None:
        if any(s.flips is None for s in self.layers):
            return None
        return sum(s.flips for s in self.layers)

    @property
    def flip_fraction(self) -> float | None:
        flips = self.flips
        return None if flips is None else flips / max(self.numel, 1)


@torch.no_grad()
def mask_stats(model: nn.Module, since: dict[str, torch.Tensor] | None = None) -> MaskStats:
    """Per-layer and total density, and SAD against ``since`` (a ``mask_snapshot``)."""
    rows = []
    for name, masker in _maskers(model).items():
        mask = masker.current_mask()
        numel = mask.numel()
        kept = int(mask.sum())
        nonzero = int(torch.count_nonzero(torch.where(mask, masker.weight, 0)))
        flips = None
        if since is not None and name in since:
            flips = int(torch.count_nonzero(mask ^ since[name].to(mask.device)))
        rows.append(LayerMaskStats(
            name, numel, kept, kept / numel, nonzero / numel, flips,
            None if flips is None else flips / numel,
        ))  # fmt: skip
    return MaskStats(rows)
