"""What ``nmfx.prune`` did, as data (``PruneRecord`` rows), rendered separately."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from nmfx.plan import Candidate

__all__ = ["LayerPrune", "PermutationGroup", "PruneSummary", "prune_summary"]


@dataclass
class LayerPrune:
    """One weight op: how it was pruned (or why it stayed dense) and what that cost."""

    name: str
    param: str
    shape: tuple[int, ...]
    verdict: str  # "sparse" | "dense"
    method: str  # the method used; "" when dense
    permuted: str  # "yes" | "no: reason" | "" (permutation not asked for)
    rel_error: float | None  # ||W X - W' X||^2 / ||W X||^2 on the calibration inputs it saw
    reason: str  # the eligibility reason, and any fallback


@dataclass
class PermutationGroup:
    """One set of channels permuted together (or skipped, with the reason)."""

    consumers: list[str]
    producers: list[str]
    channels: int
    applied: bool
    reason: str
    kept_before: float = 0.0  # N:M-kept magnitude of the sparse consumers, identity order
    kept_after: float = 0.0

    @property
    def gain(self) -> float:
        return self.kept_after / self.kept_before - 1 if self.kept_before else 0.0


@dataclass
class PruneSummary:
    """Per-layer record of one ``nmfx.prune`` call; ``str()`` renders it as a table."""

    pattern: str
    method: str
    layers: list[LayerPrune]
    groups: list[PermutationGroup] = field(default_factory=list)
    schedule: str = ""  # how calibration inputs were produced
    calibration_samples: int = 0

    @property
    def sparse(self) -> list[LayerPrune]:
        return [r for r in self.layers if r.verdict == "sparse"]

    def __str__(self) -> str:
        head = (
            f"nmfx.prune: {self.pattern} {self.method}: {len(self.sparse)} of {len(self.layers)} "
            f"weight ops N:M; calibration: {self.calibration_samples} samples, {self.schedule}"
        )
        rows = [
            (r.name, "x".join(map(str, r.shape)), r.verdict, r.method or "-", r.permuted or "-",
             "-" if r.rel_error is None else f"{r.rel_error:.4f}", r.reason)
            for r in self.layers
        ]  # fmt: skip
        from tabulate import tabulate  # lazy: only tables need it

        table = tabulate(
            rows,
            headers=["layer", "weight", "verdict", "method", "permuted", "rel. error", "reason"],
        )
        lines = [head, table]
        for g in self.groups:
            what = f"kept magnitude +{100 * g.gain:.2f}%" if g.applied else f"skipped: {g.reason}"
            lines.append(f"  channel group ({g.channels} ch) -> {', '.join(g.consumers)}: {what}")
        return "\n".join(lines)


def prune_summary(model: nn.Module) -> PruneSummary:
    """The record ``nmfx.prune`` left on ``model``."""
    from nmfx import model_state

    record = model_state.get_prune_summary(model)
    if record is None:
        raise ValueError("model was not pruned by nmfx.prune; call nmfx.prune(model, ...) first")
    return record


def dense_rows(candidates: list[Candidate]) -> list[LayerPrune]:
    return [
        LayerPrune(c.name, c.param, c.shape, "dense", "", "", None, c.reason)
        for c in candidates
        if not c.sparse
    ]
