"""What a model must be before ``sparsify`` may change it, checked before anything changes.

Two states of a model make a later training step fail far from the cause: parameters that
do not exist yet (lazy modules) and tensors made under ``torch.inference_mode`` (masks or
weights that training must update in place). Both are caught here, with the fix.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import nn

__all__ = ["check_materialized", "outside_inference_mode"]

F = TypeVar("F", bound=Callable[..., Any])


def _has_inference_params(model: nn.Module) -> bool:
    return any(p.is_inference() for p in model.parameters())


def check_materialized(model: nn.Module) -> None:
    """Lazy parameters have no shape yet; inference-tensor weights cannot be trained."""
    for name, p in model.named_parameters():
        if nn.parameter.is_lazy(p):
            owner = name.rpartition(".")[0]
            kind = type(model.get_submodule(owner)).__name__
            raise ValueError(
                f"{owner or '<root>'} ({kind}): parameter {name!r} is not materialized yet (lazy "
                f"module); run one forward pass on a real input first (model(x)), then "
                f"nmfx.sparsify"
            )
        if p.is_inference() and not torch.is_inference_mode_enabled():
            raise ValueError(
                f"parameter {name!r} is an inference tensor (the model was built or loaded "
                f"under torch.inference_mode()) and cannot be trained; build or load it outside "
                f"inference_mode, then nmfx.sparsify"
            )


def outside_inference_mode(fn: F) -> F:
    """Run ``fn(model, ...)`` with inference mode off when the model's weights are normal
    tensors: the masks it creates are then normal tensors that training can update (made
    under inference mode, the first training forward fails). A model whose weights are
    themselves inference tensors is inference-only: it stays in inference mode."""

    @functools.wraps(fn)
    def wrapper(model: Any, *args: Any, **kwargs: Any) -> Any:
        if (
            torch.is_inference_mode_enabled()
            and isinstance(model, nn.Module)
            and not _has_inference_params(model)
        ):
            with torch.inference_mode(False):
                return fn(model, *args, **kwargs)
        return fn(model, *args, **kwargs)

    return wrapper  # type: ignore[return-value]
