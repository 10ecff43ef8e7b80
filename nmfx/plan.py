"""Decisions as data: one ``Candidate`` per weight-consuming op, gathered in a ``SparsityPlan``."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from nmfx.config import SparsityConfig
from nmfx.pattern import NMPattern

__all__ = ["Candidate", "Coverage", "LayerDecision", "NMWeight", "SparsityPlan"]

SPARSE = "sparse"
DENSE = "dense"


@dataclass
class Candidate:
    """One op that consumes a weight parameter, and what nmfx decided about it."""

    name: str  # layer name shown to people: module FQN, or the weight FQN for functional ops
    param: str  # the weight's FQN == its state_dict key
    owner: str  # FQN of the module whose forward consumes the weight ("" = root)
    local_param: str  # the weight's path relative to ``owner``
    op: str  # linear, conv2d, matmul, addmm, bmm, einsum, mha.in_proj, ...
    shape: tuple[int, ...]
    dtype: torch.dtype
    reduce_dim: int | None  # dim of the weight that the op reduces over; groups of M run along it
    verdict: str = "pending"
    reason: str = ""
    groups: int = 1  # conv groups
    facts: dict = field(default_factory=dict)  # structural facts from analysis (shared_with, ...)

    @property
    def sparse(self) -> bool:
        return self.verdict == SPARSE


@dataclass
class Coverage:
    """How one part of the model was analysed: traced by FX, handled natively, or not at all."""

    module: str
    how: str  # "fx", "native", "untraceable"
    detail: str = ""


@dataclass
class SparsityPlan:
    """Everything ``sparsify`` decided; kept on the model for ``nmfx.summary``."""

    config: SparsityConfig
    candidates: list[Candidate]
    coverage: list[Coverage]
    whole_model_traced: bool  # a whole-model graph was captured (torch.fx or torch.export)
    trace_error: str = ""
    capture: str = "torch.fx"  # what captured the whole-model graph

    @property
    def sparse(self) -> list[Candidate]:
        return [c for c in self.candidates if c.sparse]


@dataclass(frozen=True)
class NMWeight:
    """A weight known to be N:M: groups of ``pattern.m`` along ``reduce_dim`` hold at most
    ``pattern.n`` non-zeros. ``finalize`` and the detection pass produce these."""

    param: str  # weight FQN (state_dict key)
    name: str  # layer name shown to people
    op: str  # linear, conv2d, addmm, ...
    pattern: NMPattern
    reduce_dim: int


@dataclass
class LayerDecision:
    """One layer's lowering verdict for a target (``sparse`` or ``dense``) and why."""

    name: str
    param: str
    op: str
    target: str
    verdict: str
    reason: str
    facts: dict = field(default_factory=dict)  # measured times, dtype casts, ...
