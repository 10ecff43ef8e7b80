"""What every module holding a packed N:M weight needs from the kernels: trust on entry.

The kernels address a weight's kept ``values`` through its ``mask``. A module's buffers enter
from outside at construction (through :class:`~nmfx.packed.PackedNM`, which checks them), from a
state_dict (``load_state_dict``) and from a pickle (``torch.load`` of the module, ``deepcopy``):
a checkpoint is untrusted input, so the last two are checked here before the buffers are used.
(The kernels also never read or write out of bounds whatever a mask holds; a corrupt mask that
got past these checks gives wrong numbers, not a crash.)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from nmfx.packed import buffers_problem

__all__ = ["PackedLinearBase"]


class PackedLinearBase(nn.Module):
    """Base of modules with ``values``/``mask`` buffers and ``out_features``, ``in_features``,
    ``n``, ``m`` attributes (e.g. ``nmfx.lowering.cpu.NMLinear``)."""

    values: torch.Tensor
    mask: torch.Tensor
    # Per-bucket kernel choices set by nmfx.kernels.autotune (-1: tuned on first call); a plain
    # int attribute, so it travels through pickling, deepcopy and torch.export.
    dispatch: int = -1

    def _packed_problem(self, values: torch.Tensor, mask: torch.Tensor) -> str:
        return buffers_problem(values, mask, self.out_features, self.in_features, self.n, self.m)

    def _describe(self, prefix: str, problem: str) -> str:
        name = prefix.rstrip(".") or type(self).__name__
        return (
            f"{name}: the packed {self.n}:{self.m} weight [{self.out_features}, "
            f"{self.in_features}] is invalid: {problem}; the checkpoint is damaged or is not "
            f"this layer's: load one saved from this lowered model, or lower the trained "
            f"model again"
        )

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        values = state_dict.get(prefix + "values", self.values)
        mask = state_dict.get(prefix + "mask", self.mask)
        problem = self._packed_problem(values, mask)
        if problem:
            # Reported by load_state_dict (RuntimeError); this module's buffers stay as they were.
            error_msgs.append(self._describe(prefix, problem))
            return
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        buffers = self.__dict__.get("_buffers", {})
        if "values" in buffers and "mask" in buffers:
            problem = self._packed_problem(buffers["values"], buffers["mask"])
            if problem:
                raise ValueError(self._describe("", problem))
