"""The sparse-refined term of SR-STE, applied once per optimizer step.

``W <- W - lr * (dL/dW~ + lambda_W * (1 - E) (.) W)``: the straight-through gradient comes
from autograd (``modules._StraightThroughMask``); the lambda_W term is added to ``.grad``
by a global optimizer step pre-hook, so it is applied exactly once per step on unscaled
gradients whatever the number of backward passes (gradient accumulation), the loss scale
(``GradScaler.step`` unscales before stepping) or the number of DDP ranks (gradients are
averaged first). Every ``torch.optim.Optimizer`` runs the hook; nothing is patched.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.hooks import RemovableHandle

from nmfx.modules import live_maskers

__all__ = ["add_srste_terms", "ensure_optimizer_hook"]

_handle: RemovableHandle | None = None


def add_srste_terms(params: Any) -> int:
    """Add lambda_W * (1 - E) (.) W to the ``.grad`` of every sparsified weight in ``params``.

    Called by the hook for each optimizer step; call it yourself only with an optimizer
    that is not a ``torch.optim.Optimizer``. Returns how many weights were touched.
    """
    maskers = live_maskers()
    if not maskers:
        return 0
    ids = {id(p) for p in params}
    touched = 0
    for masker in maskers:
        if masker.srste_lambda == 0 or masker.mask_mode == "fixed":
            continue  # fixed masks: pruned weights are zero, so the term is zero
        try:
            weight = masker.weight
        except AttributeError:  # owner was finalized
            continue
        if id(weight) in ids and weight.grad is not None:
            masker.add_srste_term()
            touched += 1
    return touched


def _step_pre_hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    add_srste_terms(p for group in optimizer.param_groups for p in group["params"])


def ensure_optimizer_hook() -> None:
    """Register the global step pre-hook once per process (first ``sparsify`` call)."""
    global _handle
    if _handle is None:
        _handle = register_optimizer_step_pre_hook(_step_pre_hook)
