"""Rendering of ``nmfx.report`` results: terminal, Markdown, JSON (versioned), CSV, PNG.

Computing lives in ``nmfx.reporting.measure``; nothing here measures anything.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nmfx.reporting.schema import Report

_COLUMNS = [
    ("layer", "name"), ("op", "op"), ("weight", "weight_shape"), ("dtype", "dtype"),
    ("pattern", "pattern"), ("verdict", "verdict"), ("dense ms", "dense_ms"),
    ("sparse ms", "sparse_ms"), ("speedup", "speedup"), ("MB dense->sparse", "bytes"),
    ("max |diff|", "max_abs_diff"), ("reason", "reason"),
]  # fmt: skip


def _cell(row: Any, key: str) -> str:
    if key == "weight_shape":
        return "x".join(map(str, row.weight_shape))
    if key == "bytes":
        return (
            f"{row.dense_bytes / 1e6:.2f}->{row.sparse_bytes / 1e6:.2f}" if row.dense_bytes else ""
        )
    value = getattr(row, key)
    if value is None:
        return "-"
    if key in ("dense_ms", "sparse_ms"):
        return f"{value:.3f}"
    if key == "speedup":
        return f"{value:.2f}x"
    if key == "max_abs_diff":
        return f"{value:.1e}"
    return str(value)


def _table(rep: Report, fmt: str) -> str:
    from tabulate import tabulate  # lazy: only tables need it

    rows = [[_cell(r, key) for _, key in _COLUMNS] for r in rep.rows]
    return tabulate(rows, headers=[h for h, _ in _COLUMNS], tablefmt=fmt, disable_numparse=True)


def _header(rep: Report) -> list[str]:
    m = rep.machine
    threads = f"{m.get('threads')} threads of {m.get('cpu_count')}"
    lines = [
        f"nmfx report: target={rep.target}, pattern={rep.settings.get('pattern')}, "
        f"inputs {rep.settings.get('input_shapes')}",
        f"machine: {m.get('cpu')}, {threads}, SIMD {','.join(m.get('simd', [])) or '-'}, "
        f"nmfx ISA path {m.get('nmfx_isa', '-')}, torch {m.get('torch')}",
        f"timing: medians of {rep.settings.get('repeats')} interleaved repeats after "
        f"{rep.settings.get('warmup')} warm-up runs, all measured in this run",
    ]
    return lines


def _totals(rep: Report) -> list[str]:
    t = rep.totals
    n_sparse = sum(r.verdict == "sparse" for r in rep.rows)
    return [
        f"end to end (measured, not summed): dense ({t.dense_baseline}) {t.dense_ms:.3f} ms "
        f"± {t.dense_iqr_ms:.3f}, sparse {t.sparse_ms:.3f} ms ± {t.sparse_iqr_ms:.3f}: "
        f"{t.speedup:.2f}x",
        f"{n_sparse} of {len(rep.rows)} layers sparse; they take {t.sparse_layer_share:.0%} of the "
        f"dense time (Amdahl); weights {t.dense_weight_bytes / 1e6:.2f} MB -> "
        f"{t.sparse_weight_bytes / 1e6:.2f} MB ({t.memory_saved_bytes / 1e6:.2f} MB saved)",
        *[f"note: {n}" for n in rep.notes],
    ]


def render_text(rep: Report) -> str:
    return "\n".join([*_header(rep), _table(rep, "simple"), *_totals(rep)])


def render_markdown(rep: Report) -> str:
    return "\n\n".join(["\n".join(f"- {line}" for line in _header(rep)), _table(rep, "github"),
                        "\n".join(f"- {line}" for line in _totals(rep))])  # fmt: skip


def render_json(rep: Report, indent: int | None = 2) -> str:
    return json.dumps(rep.to_dict(), indent=indent, sort_keys=True)


def parse_json(text: str) -> Report:
    """Rebuild a Report from ``render_json`` output; other schema versions are refused."""
    from nmfx.reporting.schema import SCHEMA_VERSION, Report, ReportRow, ReportTotals

    data = json.loads(text)
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ValueError(
            f"report schema_version {version!r} is not {SCHEMA_VERSION}, the one this nmfx reads; "
            f"use the nmfx version that wrote it"
        )
    totals = {k: v for k, v in data["totals"].items() if k != "memory_saved_bytes"}
    rows = [ReportRow(**r) for r in data["rows"]]
    return Report(rows, ReportTotals(**totals), data["target"], data["machine"], data["settings"],
                  data["notes"], version)  # fmt: skip


def render_csv(rep: Report) -> str:
    from nmfx.reporting.schema import ReportRow

    names = [f.name for f in fields(ReportRow)]
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(names)
    for row in rep.rows:
        writer.writerow(["x".join(map(str, v)) if isinstance(v, list) else ("" if v is None else v)
                         for v in (getattr(row, n) for n in names)])  # fmt: skip
    return buf.getvalue()


def render_plot(rep: Report, path: str) -> str:
    """Per-layer speedup bars with the dense line at 1.0, saved as PNG at ``path``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("report.plot needs matplotlib: pip install 'nmfx[plot]'") from exc
    measured = [r for r in rep.rows if r.speedup is not None]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(measured) + 2), 4.5))
    names = [r.name for r in measured]
    values = [r.speedup for r in measured]
    colors = ["tab:green" if v >= 1.0 else "tab:red" for v in values]
    ax.bar(range(len(values)), values, color=colors)
    ax.axhline(1.0, color="black", linewidth=1, linestyle="--", label="dense = 1.0")
    ax.set_xticks(range(len(names)), names, rotation=75, ha="right", fontsize=7)
    t = rep.totals
    ax.set_ylabel("speedup vs dense (measured)")
    ax.set_title(f"nmfx {rep.target}: per-layer speedup; end to end {t.speedup:.2f}x "
                 f"({t.dense_ms:.2f} -> {t.sparse_ms:.2f} ms)", fontsize=9)  # fmt: skip
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)
    return path
