"""Wanda (Sun et al., ICLR 2024) for N:M, following locuslab/wanda ``prune_wanda``: the
score of a weight is ``|w_ij| * ||X_j||_2`` (its input column's norm over the calibration
rows) and the N best scores of every group of M consecutive columns are kept. The weights
that stay are not changed. Magnitude pruning is the same with ``||X_j||`` = 1."""

from __future__ import annotations

import torch

from nmfx.masks import nm_mask
from nmfx.pattern import NMPattern

__all__ = ["magnitude_prune", "wanda_prune"]


def magnitude_prune(weight: torch.Tensor, pattern: NMPattern) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W', keep)`` keeping the N largest |w| of every M columns of ``weight`` [out, cols]."""
    keep = nm_mask(weight, pattern, dim=1)
    return torch.where(keep, weight, 0), keep


def wanda_prune(
    weight: torch.Tensor, sq_norms: torch.Tensor, pattern: NMPattern
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W', keep)`` from the scores ``|W| * sqrt(sq_norms)``; ``sq_norms[j]`` is the mean of
    ``x_j^2`` over the calibration rows (the Hessian's diagonal up to a constant)."""
    score = weight.abs() * sq_norms.clamp_min(0).sqrt().reshape(1, -1)
    keep = nm_mask(score, pattern, dim=1)
    return torch.where(keep, weight, 0), keep
