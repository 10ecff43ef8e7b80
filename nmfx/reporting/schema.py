"""The ``Report`` schema: what ``nmfx.report`` returns, versioned for JSON round trips.

Only data here: measuring lives in ``nmfx.reporting.measure``, rendering in
``nmfx.reporting.render``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["SCHEMA_VERSION", "Report", "ReportRow", "ReportTotals"]

SCHEMA_VERSION = 1


@dataclass
class ReportRow:
    """One weight-consuming layer. Times in milliseconds; None where not measured."""

    name: str
    param: str  # the weight's FQN
    op: str
    weight_shape: list[int]
    dtype: str
    pattern: str | None
    verdict: str
    reason: str
    input_shape: list[int] | None = None
    flops: int | None = None
    dense_bytes: int | None = None
    sparse_bytes: int | None = None
    dense_ms: float | None = None
    dense_iqr_ms: float | None = None
    sparse_ms: float | None = None
    sparse_iqr_ms: float | None = None
    speedup: float | None = None
    max_abs_diff: float | None = None


@dataclass
class ReportTotals:
    """Whole-model figures, measured end to end."""

    dense_ms: float
    dense_iqr_ms: float
    sparse_ms: float
    sparse_iqr_ms: float
    speedup: float
    dense_baseline: str  # "eager" or "compiled": the faster dense variant measured
    sparse_layer_share: float  # Amdahl: share of dense time spent in the layers made sparse
    dense_weight_bytes: int
    sparse_weight_bytes: int

    @property
    def memory_saved_bytes(self) -> int:
        return self.dense_weight_bytes - self.sparse_weight_bytes


@dataclass
class Report:
    rows: list[ReportRow]
    totals: ReportTotals
    target: str
    machine: dict[str, Any]
    settings: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    schema_version: int = SCHEMA_VERSION

    def __str__(self) -> str:
        from nmfx.reporting.render import render_text

        return render_text(self)

    def to_markdown(self) -> str:
        from nmfx.reporting.render import render_markdown

        return render_markdown(self)

    def to_json(self, indent: int | None = 2) -> str:
        from nmfx.reporting.render import render_json

        return render_json(self, indent)

    @classmethod
    def from_json(cls, text: str) -> Report:
        from nmfx.reporting.render import parse_json

        return parse_json(text)

    def to_csv(self) -> str:
        from nmfx.reporting.render import render_csv

        return render_csv(self)

    def plot(self, path: str) -> str:
        from nmfx.reporting.render import render_plot

        return render_plot(self, path)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["totals"]["memory_saved_bytes"] = self.totals.memory_saved_bytes
        return out
