"""Reporting: what nmfx measured, per layer and end to end, and how it is shown.

- ``schema``: the ``Report`` dataclasses (versioned JSON round trip);
- ``measure``: ``report()``, which lowers a copy and times dense against sparse;
- ``render``: terminal, Markdown, JSON, CSV and PNG renderings (nothing measured there);
- ``timing``: interleaved timing and machine facts, shared with the kernels' calibration
  and the benchmarks.
"""

from __future__ import annotations

from nmfx.reporting.measure import report
from nmfx.reporting.schema import SCHEMA_VERSION, Report, ReportRow, ReportTotals

__all__ = ["SCHEMA_VERSION", "Report", "ReportRow", "ReportTotals", "report"]
