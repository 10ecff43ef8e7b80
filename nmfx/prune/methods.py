"""One layer's pruning, whatever the method: view, prune, check, write back, measure.

The relative reconstruction error reported per layer is
``||(W - W') X^T||^2 / ||W X^T||^2 = tr(dW H dW^T) / tr(W H W^T)`` with ``H = X^T X / rows``
of the calibration inputs the layer saw (after the layers before it were pruned).
"""

from __future__ import annotations

import warnings

import torch

from nmfx.prune.config import PruneConfig
from nmfx.prune.sparsegpt import inverse_hessian_factor, sparsegpt_prune
from nmfx.prune.targets import PruneTarget
from nmfx.prune.views import unview_weight, view_weight
from nmfx.prune.wanda import magnitude_prune, wanda_prune

__all__ = ["HessianCache", "prune_target", "relative_error"]


_ERROR_ROWS = 256  # output rows the error is measured on (evenly spaced) in larger layers


def relative_error(before: torch.Tensor, after: torch.Tensor, hessian: torch.Tensor) -> float:
    """``tr(dW H dW^T) / tr(W H W^T)``; on ``_ERROR_ROWS`` evenly spaced output rows when the
    layer has more (the exact value costs ``out * cols^2``: seconds for a 4096x4096 layer)."""
    if before.shape[0] > _ERROR_ROWS:
        pick = torch.linspace(0, before.shape[0] - 1, _ERROR_ROWS, device=before.device).long()
        before, after = before[pick], after[pick]
    delta = before - after
    num = float(((delta @ hessian) * delta).sum())
    den = float(((before @ hessian) * before).sum())
    return num / den if den > 0 else float(num > 0)


class HessianCache:
    """The current stage's Hessians and SparseGPT factors, one per distinct input."""

    def __init__(self, percdamp: float) -> None:
        self.percdamp = percdamp
        self.factors: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def factor(
        self, key: tuple, hessian: torch.Tensor, layer: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if key not in self.factors:
            self.factors[key] = inverse_hessian_factor(hessian, self.percdamp, layer)
        return self.factors[key]


def _method(
    t: PruneTarget, w: torch.Tensor, hessian: torch.Tensor | None, key: tuple | None,
    cache: HessianCache, cfg: PruneConfig,
) -> tuple[torch.Tensor, str]:  # fmt: skip
    p = cfg.pattern
    if hessian is None or cfg.method == "magnitude":
        return magnitude_prune(w, p)[0], "magnitude"
    if cfg.method == "wanda":
        return wanda_prune(w, torch.diagonal(hessian), p)[0], "wanda"
    try:
        upper, dead = cache.factor(key, hessian, t.name)  # type: ignore[arg-type]
    except torch.linalg.LinAlgError:
        warnings.warn(
            f"nmfx.prune: {t.name}: SparseGPT could not factor its Hessian; pruned by magnitude",
            RuntimeWarning,
            stacklevel=3,
        )
        return magnitude_prune(w, p)[0], "magnitude (Hessian singular)"
    w = w.clone()
    w[:, dead] = 0
    blocksize = max(p.m, cfg.blocksize // p.m * p.m)  # a group of M never straddles blocks
    return sparsegpt_prune(w, upper, p, blocksize)[0], "sparsegpt"


@torch.no_grad()
def prune_target(
    t: PruneTarget, hessian: torch.Tensor | None, key: tuple | None, cache: HessianCache,
    cfg: PruneConfig,
) -> tuple[str, float | None]:  # fmt: skip
    """Prune ``t``'s weight in place; returns (method used, relative error or None)."""
    weight = t.weight
    w = view_weight(weight, t.kind)
    new, used = _method(t, w, hessian, key, cache, cfg)
    if not bool(torch.isfinite(new).all()) and bool(torch.isfinite(w).all()):
        warnings.warn(
            f"nmfx.prune: {t.name}: {used} produced non-finite weights; pruned by magnitude",
            RuntimeWarning,
            stacklevel=2,
        )
        new, used = magnitude_prune(w, cfg.pattern)[0], f"magnitude ({used} gave non-finite)"
    weight.copy_(unview_weight(new, weight, t.kind))
    err = relative_error(w, new, hessian) if hessian is not None else None
    return used, err
