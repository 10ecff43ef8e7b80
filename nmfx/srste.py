"""The sparse-refined term of SR-STE, applied once per optimizer step.

``W <- W - lr * (dL/dW~ + lambda_W * (1 - E) (.) W)``: the straight-through gradient comes
from autograd (``modules._StraightThroughMask``); the lambda_W term is added to ``.grad``
right before an optimizer steps the weight, by a step pre-hook that every
``torch.optim.Optimizer`` runs (nothing is patched). Where the term goes, stated:

- **per optimizer**: a step adds the term to the masked weights *that optimizer holds*
  (its ``param_groups``), on their unscaled, DDP-averaged gradients (``GradScaler.step``
  unscales before stepping; DDP averages during backward) — whatever the number of
  backward passes before it (gradient accumulation);
- **once per gradient**: two optimizers over one parameter, stepping on the same gradient,
  add it once (the masker remembers the gradient tensor and its version);
- **never silently skipped**: a masked weight that changes after a backward without having
  received the term (a hand-written optimizer, not a ``torch.optim.Optimizer``) triggers a
  warning, once; such optimizers call :func:`add_srste_terms` before their step;
- **registered where maskers appear**: by ``sparsify`` and when a sparsified model is
  unpickled (``torch.load`` in a fresh process trains SR-STE too).

The hook is process-wide because optimizers are created after ``sparsify`` (it cannot know
them); it is a no-op for optimizers that hold no masked weight.
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
    """Add lambda_W * (1 - E) (.) W to the ``.grad`` of every sparsified weight in ``params``
    that has not received it for its current gradient.

    Called by the hook for each optimizer step; call it yourself only with an optimizer
    that is not a ``torch.optim.Optimizer``. Returns how many weights received the term.
    """
    maskers = live_maskers()
    if not maskers:
        return 0
    by_weight: dict[int, list] = {}
    for masker in maskers:
        if masker.srste_lambda == 0 or masker.mask_mode == "fixed":
            continue  # fixed masks: pruned weights are zero, so the term is zero
        try:
            weight = masker.weight
        except AttributeError:  # owner was finalized
            continue
        by_weight.setdefault(id(weight), []).append(masker)
    touched = 0
    # Last parameter first: an optimizer then steps its first parameters while the weights
    # and gradients the hook touched last are still in cache (each term is a pass over both).
    for p in reversed(list(params)):
        for masker in by_weight.pop(id(p), ()):
            touched += masker.add_srste_term()
    return touched


def _step_pre_hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    add_srste_terms(p for group in optimizer.param_groups for p in group["params"])


def ensure_optimizer_hook() -> None:
    """Register the global step pre-hook once per process (first ``sparsify`` call)."""
    global _handle
    if _handle is None:
        _handle = register_optimizer_step_pre_hook(_step_pre_hook)
