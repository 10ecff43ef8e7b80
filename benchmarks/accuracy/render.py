"""Render the accuracy study from its JSON: Markdown tables and PNG plots (no training here).

    PYTHONPATH=. python -m benchmarks.accuracy.render [--json benchmarks/results/accuracy.json]
        [--out docs/accuracy]    (default out/accuracy, untracked)

Writes ``results.md`` (the tables), ``digits_curves.png``, ``charlm_curves.png`` and
``sad.png`` into ``--out``. Means and sample standard deviations (n-1) over seeds come
from the JSON's ``summary``; curves are averaged over seeds here.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path
from typing import Any

from tabulate import tabulate

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_JSON = ROOT / "benchmarks" / "results" / "accuracy.json"
DEFAULT_OUT = ROOT / "out" / "accuracy"  # untracked; docs/accuracy only with --out docs/accuracy
METHOD_ORDER = ("dense", "dense_half", "srste", "ste", "fixed")
LABELS = {
    "dense": "dense",
    "dense_half": "dense, half budget (prune source)",
    "srste": "SR-STE",
    "ste": "STE",
    "fixed": "fixed mask (one-shot prune + fine-tune)",
}
COLORS = {"dense": "black", "srste": "tab:blue", "ste": "tab:orange", "fixed": "tab:green",
          "dense_half": "tab:gray"}  # fmt: skip
TASK_TITLES = {"digits": "digits (small_cnn)", "charlm": "byte-level LM on stdlib sources (llama)"}

__all__ = ["markdown", "plot_curves", "plot_sad", "render", "sad_table"]


def _num(x: Any) -> float:
    return float(x)  # also parses the "nan"/"inf" strings run.py writes for non-finite values


def _pm(entry: dict[str, Any] | None, scale: float = 1.0, digits: int = 3) -> str:
    if entry is None:
        return "-"
    mean, std = _num(entry["mean"]) * scale, _num(entry["std"]) * scale
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _rows_key(key: str, patterns: list[str]) -> tuple[int, int]:
    """Methods in METHOD_ORDER, patterns in the order the study ran them."""
    method, _, pattern = key.partition("/")
    return METHOD_ORDER.index(method), patterns.index(pattern) if pattern in patterns else -1


def results_table(task: dict[str, Any], name: str) -> str:
    """One row per method and pattern: headline metric, second metric, one-shot prune."""
    summary = task["summary"]
    acc = task["metric"] == "accuracy"
    headers = (
        ["method", "N:M", "test accuracy %", "test loss"]
        if acc
        else ["method", "N:M", "val loss (nats/byte)", "val bits/byte"]
    )
    headers.append("right after one-shot prune (before fine-tune)")
    rows = []
    patterns = list(task["sparsity"])
    for key in sorted((k for k in summary if "/" in k), key=lambda k: _rows_key(k, patterns)):
        method, _, pattern = key.partition("/")
        e = summary[key]
        if acc:
            cells = [_pm(e["accuracy"], 100, 2), _pm(e["loss"], 1, 3)]
        else:
            cells = [_pm(e["loss"], 1, 3), _pm(e["bits_per_byte"], 1, 3)]
        one_shot = e.get("one_shot_" + task["metric"])
        rows.append([
            LABELS[method], pattern, *cells,
            _pm(one_shot, 100 if acc else 1, 2 if acc else 3) if one_shot else "-",
        ])  # fmt: skip
    return f"### {TASK_TITLES.get(name, name)}\n\n" + tabulate(rows, headers, tablefmt="github")


def sad_table(data: dict[str, Any]) -> str:
    """Per task, pattern and sparse method: SAD and the pruned/kept weight magnitudes."""
    rows = []
    for name, task in data["tasks"].items():
        summary = task["summary"]
        keys = [k for k in summary if "/" in k and "sad_total" in summary[k]]
        patterns = list(task["sparsity"])
        for key in sorted(keys, key=lambda k: _rows_key(k, patterns)[::-1]):
            method, _, pattern = key.partition("/")
            e = summary[key]
            rows.append([
                name, pattern, LABELS[method], _pm(e["sad_total"], 1, 4),
                _pm(e["sad_vs_start_end"], 1, 4), _pm(e.get("sad_second_half"), 1, 5),
                _pm(e["sad_last_epoch"], 1, 5),
                _pm(e.get("pruned_to_kept_abs_ratio"), 1, 3),
            ])  # fmt: skip
    headers = [
        "task", "N:M", "method", "SAD summed over epochs", "SAD start->end",
        "SAD summed over the second half", "SAD in the last epoch",
        "mean abs pruned / mean abs kept (end)",
    ]  # fmt: skip
    return tabulate(rows, headers, tablefmt="github")


def paired_table(data: dict[str, Any]) -> str:
    rows = []
    for name, task in data["tasks"].items():
        acc = task["metric"] == "accuracy"
        for pattern, d in task["summary"]["paired_srste_minus_ste"].items():
            scale, unit = (100, "accuracy points") if acc else (1, "val loss (nats/byte)")
            nd = 2 if acc else 4
            vals = ", ".join(f"{_num(v) * scale:+.{nd}f}" for v in d["values"])
            rows.append([name, pattern, unit, _pm(d, scale, nd), vals])
    headers = ["task", "N:M", "difference in", "SR-STE - STE, mean ± std", "per seed"]
    return tabulate(rows, headers, tablefmt="github")


def sparsity_table(data: dict[str, Any]) -> str:
    rows = []
    for name, task in data["tasks"].items():
        for pattern, s in task["sparsity"].items():
            dense = [f"{lay['name']} ({lay['reason'].split(';')[0]})" for lay in s["layers"]
                     if lay["verdict"] != "sparse"]  # fmt: skip
            n_sparse = sum(lay["verdict"] == "sparse" for lay in s["layers"])
            rows.append([
                name, pattern, f"{n_sparse} of {len(s['layers'])}",
                f"{s['sparse_weights']:,} of {s['candidate_weights']:,} "
                f"({s['sparse_weights'] / s['candidate_weights']:.1%})",
                f"{s['model_parameters']:,}", "; ".join(dense),
            ])  # fmt: skip
    headers = ["task", "N:M", "layers N:M", "weights in N:M layers", "model params", "kept dense"]
    return tabulate(rows, headers, tablefmt="github")


def checks_table(data: dict[str, Any]) -> str:
    """Per task: are all sparse runs exactly N:M after finalize, and did finalize change scores."""
    rows = []
    for name, task in data["tasks"].items():
        sparse = [r for r in task["runs"] if r["pattern"] is not None]
        dense = [r for r in task["runs"] if r["pattern"] is None]
        exact = all(
            _num(r["checks"]["mask_density"]) == _num(r["checks"]["expected_density"])
            for r in sparse
        )
        rows.append([
            name, len(sparse),
            sum(bool(r["checks"]["all_nm_after_finalize"]) for r in sparse),
            sum(bool(r["checks"]["detect_nm_matches"]) for r in sparse),
            "yes" if exact else "NO",
            max((_num(r["checks"]["max_metric_change_on_finalize"]) for r in sparse), default=0.0),
            sum(r["checks"]["masked_weights"] == 0 for r in dense), len(dense),
        ])  # fmt: skip
    headers = [
        "task", "sparse runs", "exactly N:M after finalize", "detect_nm agrees",
        "mask density == N/M", "max metric change on finalize", "dense runs without masks",
        "dense runs",
    ]  # fmt: skip
    return tabulate(rows, headers, tablefmt="github")


def markdown(data: dict[str, Any]) -> str:
    """All tables of the study as one Markdown document."""
    s = data["settings"]
    m = data["machine"]
    parts = [
        "# Accuracy study: results\n",
        f"Generated by `benchmarks/accuracy/render.py` from `{data['script']}` output "
        f"(argv {' '.join(data['argv']) or '(defaults)'}). Seeds {s['seeds']}, "
        f"lambda_W {s['srste_lambda']:g}, {s['threads']} torch thread(s), "
        f"wall time {data['wall_s'] / 60:.1f} min, torch {m['torch']}, Python {m['python']}, "
        f"{m.get('cpu_model', '?')}. Mean ± sample std over seeds.\n",
    ]
    if data.get("smoke"):
        parts.append("**Smoke run: tiny models and budgets, numbers are meaningless.**\n")
    for name, task in data["tasks"].items():
        parts.append(results_table(task, name) + "\n")
    parts += [
        "### SR-STE minus STE, paired by seed (same init, same batches)\n",
        paired_table(data) + "\n",
        "### SAD: fraction of mask entries flipped (per epoch: vs the mask one epoch earlier)\n",
        sad_table(data) + "\n",
        "### What was made N:M\n",
        sparsity_table(data) + "\n",
        "### Checks\n",
        checks_table(data) + "\n",
    ]
    return "\n".join(parts)


def _mean_curve(runs: list[dict[str, Any]], key: str, field: str) -> tuple[list, list, list]:
    xs = runs[0][key]["epoch"] if key == "curve" else list(range(1, len(runs[0][key][field]) + 1))
    offset = runs[0].get("epoch_offset", 0)
    ys = [[_num(v) for v in r[key][field]] for r in runs]
    mean = [statistics.fmean(col) for col in zip(*ys, strict=True)]
    std = [statistics.stdev(col) if len(col) > 1 else 0.0 for col in zip(*ys, strict=True)]
    return [x + offset for x in xs], mean, std


def _by(task: dict[str, Any], method: str, pattern: str | None) -> list[dict[str, Any]]:
    return [r for r in task["runs"] if r["method"] == method and r["pattern"] == pattern]


def plot_curves(task: dict[str, Any], name: str, path: Path) -> Path:
    """Evaluation metric per epoch, one panel per pattern (rows: metrics), mean ± std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    patterns = list(task["sparsity"])
    fields = ["accuracy", "loss"] if task["metric"] == "accuracy" else ["loss"]
    fig, axes = plt.subplots(len(fields), len(patterns), squeeze=False,
                             figsize=(4.6 * len(patterns), 3.4 * len(fields)))  # fmt: skip
    for col, pattern in enumerate(patterns):
        for row, field in enumerate(fields):
            ax = axes[row][col]
            for method in METHOD_ORDER:
                runs = _by(task, method, None if method.startswith("dense") else pattern)
                if not runs:
                    continue
                xs, mean, std = _mean_curve(runs, "curve", field)
                scale = 100 if field == "accuracy" else 1
                style = "--" if method == "dense_half" else "-"
                ax.plot(xs, [v * scale for v in mean], style, color=COLORS[method],
                        label=LABELS[method], lw=1.4)  # fmt: skip
                ax.fill_between(xs, [(m - s) * scale for m, s in zip(mean, std, strict=True)],
                                [(m + s) * scale for m, s in zip(mean, std, strict=True)],
                                color=COLORS[method], alpha=0.15, lw=0)  # fmt: skip
            _zoom(ax, field, task)
            ax.set_title(f"{pattern}" if row == 0 else "")
            ax.set_xlabel("epoch (of the total budget)")
            ylabel = {"accuracy": "test accuracy %", "loss": "test loss"}[field]
            if task["metric"] != "accuracy":
                ylabel = "val loss, nats/byte (per-epoch subset)"
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{TASK_TITLES.get(name, name)}: mean ± std over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _zoom(ax: Any, field: str, task: dict[str, Any]) -> None:
    """Show the end of training, where the methods differ, not the random-init start."""
    finals = [_num(v) for r in task["runs"] for v in r["curve"][field][-1:]]
    if not finals or any(math.isnan(v) for v in finals):
        return
    if field == "accuracy":
        lo = min(finals) * 100
        ax.set_ylim(max(lo - 2 * (100 - lo) - 0.5, 0), 100)
    else:
        lo, hi = min(finals), max(finals)
        ax.set_ylim(lo - 0.5 * (hi - lo), hi + max(3 * (hi - lo), 0.1 * hi))


def plot_sad(data: dict[str, Any], path: Path) -> Path:
    """SAD per epoch (fraction of mask entries flipped since the previous epoch, solid, and
    since the start, dashed) for SR-STE and STE; the fixed mask is 0 throughout (not drawn
    on the log axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = data["tasks"]
    patterns = data["settings"]["patterns"]
    fig, axes = plt.subplots(len(tasks), len(patterns), squeeze=False,
                             figsize=(4.6 * len(patterns), 3.4 * len(tasks)))  # fmt: skip
    for row, (name, task) in enumerate(tasks.items()):
        for col, pattern in enumerate(patterns):
            ax = axes[row][col]
            for method in ("srste", "ste"):
                runs = _by(task, method, pattern)
                if not runs:
                    continue
                for field, style in (("vs_previous_epoch", "-"), ("vs_start", "--")):
                    xs, mean, _ = _mean_curve(runs, "sad", field)
                    what = "since previous epoch" if style == "-" else "since start"
                    ys = [v if v > 0 else math.nan for v in mean]  # log axis: 0 leaves a gap
                    ax.plot(xs, ys, style, color=COLORS[method], marker=".", ms=3,
                            label=f"{LABELS[method]}, {what}", lw=1.4)  # fmt: skip
            fixed = _by(task, "fixed", pattern)
            title = f"{name} {pattern}"
            if fixed:
                peak = max(_num(v) for r in fixed for v in r["sad"]["vs_previous_epoch"])
                title += f" (fixed mask: max SAD {peak:g})"
            ax.set_yscale("log")
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("epoch")
            ax.set_ylabel("flipped mask entries / weights")
            ax.grid(alpha=0.3, which="both")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("SAD (sparse architecture divergence), mean over seeds; "
                 "epochs with no flip at all leave gaps on the log axis")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def ablation_table(main: dict[str, Any], ablations: list[dict[str, Any]]) -> str:
    """SR-STE at other lambda_W values (``run.py --methods srste --lambda-w X``), paired by
    seed with the main study's STE runs: same spec, init and batches, only lambda_W differs."""
    rows = []
    studies = [main, *ablations]
    for name, task in main["tasks"].items():
        ste = {(r["pattern"], r["seed"]): r for r in task["runs"] if r["method"] == "ste"}
        acc = task["metric"] == "accuracy"
        scale, nd = (100, 2) if acc else (1, 4)
        for study in studies:
            other = study["tasks"].get(name)
            if other is None:
                continue
            if other["spec"] != task["spec"]:
                raise ValueError(f"{name}: ablation run with another task setting; rerun it")
            by_pattern: dict[str, list[dict[str, Any]]] = {}
            for r in other["runs"]:
                if r["method"] == "srste" and (r["pattern"], r["seed"]) in ste:
                    by_pattern.setdefault(r["pattern"], []).append(r)
            for pattern, runs in by_pattern.items():
                metric = task["metric"]
                diffs = [
                    (r["final"][metric] - ste[(pattern, r["seed"])]["final"][metric]) * scale
                    for r in runs
                ]
                sad = [sum(r["sad"]["vs_previous_epoch"]) for r in runs]
                ratio = [r["checks"]["pruned_to_kept_abs_ratio"] for r in runs]
                final = [r["final"][metric] * scale for r in runs]
                rows.append([
                    name, pattern, f"{runs[0]['srste_lambda']:g}", len(runs),
                    "test accuracy %" if acc else "val loss", _fmt(final, nd),
                    _fmt(diffs, nd, sign=True), _fmt(sad, 4), _fmt(ratio, 3),
                ])  # fmt: skip
    headers = [
        "task", "N:M", "lambda_W", "seeds", "metric", "SR-STE", "SR-STE - STE (paired)",
        "SAD summed over epochs", "mean abs pruned / kept",
    ]  # fmt: skip
    return tabulate(rows, headers, tablefmt="github")


def supplement_table(study: dict[str, Any]) -> str:
    """Every run of a supplementary study (e.g. a longer budget), one row each."""
    rows = []
    for name, task in study["tasks"].items():
        metric = task["metric"]
        scale, nd = (100, 2) if metric == "accuracy" else (1, 4)
        for r in task["runs"]:
            sad = sum(r["sad"]["vs_previous_epoch"]) if r["sad"] else None
            rows.append([
                name, LABELS[r["method"]], r["pattern"] or "-", r["seed"], r["steps"],
                "test accuracy %" if metric == "accuracy" else "val loss",
                f"{_num(r['final'][metric]) * scale:.{nd}f}",
                "-" if sad is None else f"{sad:.4f}",
            ])  # fmt: skip
    headers = ["task", "method", "N:M", "seed", "steps", "metric", "final", "SAD summed"]
    return tabulate(rows, headers, tablefmt="github")


def _fmt(xs: list[float], nd: int, sign: bool = False) -> str:
    mean = statistics.fmean(xs)
    std = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{mean:{'+' if sign else ''}.{nd}f} ± {std:.{nd}f}"


def render(
    json_path: Path,
    out_dir: Path,
    plots: bool = True,
    ablations: tuple[Path, ...] = (),
    supplements: tuple[Path, ...] = (),
) -> list[Path]:
    """Write ``results.md`` and (with ``plots``) the PNGs for the study in ``json_path``;
    ``ablations`` are JSON files of SR-STE-only runs at other lambda_W values,
    ``supplements`` studies with other budgets (listed run by run)."""
    data = json.loads(json_path.read_text())
    out_dir.mkdir(parents=True, exist_ok=True)
    text = markdown(data)
    if ablations:
        extra = [json.loads(p.read_text()) for p in ablations]
        text += (
            "\n### Sensitivity: SR-STE at larger lambda_W (not part of the comparison above)\n\n"
            + ablation_table(data, extra)
            + "\n"
        )
    for path in supplements:
        extra_study = json.loads(path.read_text())
        scale = extra_study["settings"].get("budget_scale", 1)
        text += (
            f"\n### Supplement: {path.name} ({scale}x the training steps, "
            f"argv {' '.join(extra_study['argv'])})\n\n" + supplement_table(extra_study) + "\n"
        )
    md = out_dir / "results.md"
    md.write_text(text)
    written = [md]
    if plots:
        for name, task in data["tasks"].items():
            written.append(plot_curves(task, name, out_dir / f"{name}_curves.png"))
        written.append(plot_sad(data, out_dir / "sad.png"))
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="render the accuracy study's tables and plots")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--ablation", type=Path, nargs="*", default=[], help="SR-STE-only JSONs")
    p.add_argument("--supplement", type=Path, nargs="*", default=[], help="other-budget JSONs")
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)
    extra = (tuple(args.ablation), tuple(args.supplement))
    for path in render(args.json, args.out, not args.no_plots, *extra):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
