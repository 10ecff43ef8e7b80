"""Render the one-shot study from its JSON files: Markdown tables and one plot.

    PYTHONPATH=. python -m benchmarks.oneshot.render \\
        --json benchmarks/results/oneshot_charlm.json benchmarks/results/oneshot_digits.json \\
        --out docs/oneshot

Writes ``tables.md`` (one-shot metric per pattern and start; fine-tuned metric per start and
fine-tuning method; the share of the magnitude-to-dense gap each method closes; the kept
magnitude gained by permutation) and ``oneshot.png``. Means and sample std (n-1) over seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from tabulate import tabulate

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = ROOT / "out" / "oneshot"  # untracked; docs/oneshot only with --out docs/oneshot
STARTS = ("magnitude", "magnitude+permute", "wanda", "sparsegpt")
FINETUNES = ("srste", "ste", "fixed")


def _ms(xs: list[float], digits: int = 4) -> str:
    if not xs:
        return "-"
    if len(xs) == 1:
        return f"{xs[0]:.{digits}f}"
    return f"{statistics.fmean(xs):.{digits}f} ± {statistics.stdev(xs):.{digits}f}"


def _metric(task: dict[str, Any]) -> str:
    return task["metric"]


def _value(run: dict[str, Any], metric: str) -> float:
    return float((run.get("metrics") or run["final"])[metric])


def one_shot_table(task: dict[str, Any], metric: str) -> str:
    dense = [_value(r, metric) for r in task["runs"] if r["kind"] == "dense"]
    patterns = sorted({r["pattern"] for r in task["runs"] if r["kind"] == "one_shot"}, key=_pkey)
    rows = [["dense", *[_ms(dense)] * len(patterns)]]
    for start in STARTS:
        rows.append([start, *[
            _ms([_value(r, metric) for r in task["runs"]
                 if r["kind"] == "one_shot" and r["start"] == start and r["pattern"] == p])
            for p in patterns]])  # fmt: skip
    return tabulate(rows, headers=[f"one-shot {metric}", *patterns], tablefmt="github")


def gap_table(task: dict[str, Any], metric: str = "loss") -> str:
    """Share of the magnitude -> dense gap in ``metric`` each method closes, per pattern
    (per seed, then mean)."""
    patterns = sorted({r["pattern"] for r in task["runs"] if r["kind"] == "one_shot"}, key=_pkey)
    rows = []
    for start in STARTS[1:]:
        cells = []
        for p in patterns:
            shares = []
            for d in (r for r in task["runs"] if r["kind"] == "dense"):
                seed = d["seed"]
                get = {r["start"]: _value(r, metric) for r in task["runs"]
                       if r["kind"] == "one_shot" and r["seed"] == seed and r["pattern"] == p}  # fmt: skip
                gap = get["magnitude"] - _value(d, metric)
                if start in get and gap != 0:
                    shares.append(100 * (get["magnitude"] - get[start]) / gap)
            cells.append(_ms(shares, 1) + (" %" if shares else ""))
        rows.append([start, *cells])
    return tabulate(rows, headers=[f"{metric} gap to dense closed", *patterns], tablefmt="github")


def finetune_table(task: dict[str, Any], metric: str) -> str:
    runs = [r for r in task["runs"] if r["kind"] == "finetune"]
    keys = sorted({(r["pattern"], r.get("fraction", task["finetune_fraction"])) for r in runs
                   if r["pattern"] is not None},
                  key=lambda k: (_pkey(k[0]), k[1]))  # fmt: skip
    rows = []
    for frac in sorted({r.get("fraction") for r in task["runs"] if r["kind"] == "finetune"
                        and r["start"] == "dense"}):  # fmt: skip
        dense = [_value(r, metric) for r in task["runs"] if r["kind"] == "finetune"
                 and r["start"] == "dense" and r.get("fraction") == frac]  # fmt: skip
        rows.append(["dense", f"{100 * frac:.0f}%", "dense, trained on", _ms(dense), "", ""])
    keys = [k for k in keys if k[0] is not None]
    for pattern, frac in keys:
        for start in STARTS:
            cells = [_ms([_value(r, metric) for r in runs if r["pattern"] == pattern
                          and r["start"] == start and r["finetune"] == ft
                          and r.get("fraction", task["finetune_fraction"]) == frac])
                     for ft in FINETUNES]  # fmt: skip
            if any(c != "-" for c in cells):
                rows.append([pattern, f"{100 * frac:.0f}%", start, *cells])
    heads = ["pattern", "budget", "start", *(f"{ft} {metric}" for ft in FINETUNES)]
    return tabulate(rows, headers=heads, tablefmt="github")


def permutation_table(task: dict[str, Any]) -> str:
    rows = []
    for r in task["runs"]:
        if r["kind"] == "one_shot" and r["start"] == "magnitude+permute":
            for g in r["permutation"]:
                gain = 100 * (g["kept_after"] / g["kept_before"] - 1) if g["applied"] else None
                rows.append([r["seed"], r["pattern"], ", ".join(g["consumers"])[:60], g["channels"],
                             f"+{gain:.2f}%" if gain is not None else f"skipped: {g['reason'][:60]}"])  # fmt: skip
    return tabulate(rows, headers=["seed", "pattern", "consumers", "channels", "kept magnitude"],
                    tablefmt="github")  # fmt: skip


def _mean(task: dict[str, Any], metric: str, kind: str, start: str, pattern: str,
          ft: str | None = None) -> float:  # fmt: skip
    xs = [_value(r, metric) for r in task["runs"] if r["kind"] == kind and r["start"] == start
          and r["pattern"] == pattern and (ft is None or (r["finetune"] == ft and
          r.get("fraction", task["finetune_fraction"]) == task["finetune_fraction"]))]  # fmt: skip
    return statistics.fmean(xs) if xs else float("nan")


def _pkey(p: str) -> tuple[int, int]:
    n, m = p.split(":")
    return int(m), int(n)


def plot(tasks: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4), squeeze=False)
    for ax, (name, task) in zip(axes[0], tasks.items(), strict=True):
        metric = "loss"  # both tasks: accuracy moves by single test images on digits
        patterns = sorted(
            {r["pattern"] for r in task["runs"] if r["kind"] == "one_shot"}, key=_pkey
        )
        width = 0.8 / len(STARTS)
        values = []
        for i, start in enumerate(STARTS):
            one = [_mean(task, metric, "one_shot", start, p) for p in patterns]
            ft = [_mean(task, metric, "finetune", start, p, "srste") for p in patterns]
            values += one + ft
            xs = [j + (i - 1.5) * width for j in range(len(patterns))]
            ax.bar(xs, one, width, label=f"{start}: one-shot", alpha=0.45, color=f"C{i}")
            ax.scatter(xs, ft, marker="_", s=300, color=f"C{i}",
                       label=f"{start}: + SR-STE, {100 * task['finetune_fraction']:.0f}% budget")  # fmt: skip
        dense = statistics.fmean([_value(r, metric) for r in task["runs"] if r["kind"] == "dense"])
        cont = [
            _value(r, metric)
            for r in task["runs"]
            if r["kind"] == "finetune" and r["start"] == "dense"
        ]
        ax.axhline(dense, color="black", lw=1, ls="--", label="dense (pretrained)")
        if cont:
            ax.axhline(
                statistics.fmean(cont),
                color="black",
                lw=1,
                ls=":",
                label="dense, trained on as long",
            )
        finite = [v for v in [*values, dense] if v == v]
        ax.set_ylim(0.97 * min(finite), 1.02 * max(finite))
        ax.set_xticks(range(len(patterns)), patterns)
        ax.set_ylabel("validation loss" if name == "charlm" else "test loss")
        ax.set_title(f"{name}: one-shot (bars), after fine-tuning (ticks)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def render(paths: list[Path], out: Path) -> None:
    tasks: dict[str, dict[str, Any]] = {}
    for p in paths:  # files of one task (the study, its dense baseline) are merged
        for name, task in json.loads(p.read_text())["tasks"].items():
            if name in tasks:
                seen = {json.dumps(r, sort_keys=True) for r in tasks[name]["runs"]}
                tasks[name]["runs"] += [
                    r for r in task["runs"] if json.dumps(r, sort_keys=True) not in seen
                ]
            else:
                tasks[name] = task
    out.mkdir(parents=True, exist_ok=True)
    parts = []
    for name, task in tasks.items():
        metrics = [_metric(task)] + (["loss"] if _metric(task) != "loss" else [])
        parts += [f"## {name}", ""]
        parts += [t for m in metrics for t in (one_shot_table(task, m), "")]
        parts += [gap_table(task, "loss"), ""]
        parts += [t for m in metrics for t in (finetune_table(task, m), "")]
        parts += [permutation_table(task), ""]
    (out / "tables.md").write_text("\n".join(parts))
    plot(tasks, out / "oneshot.png")
    print(f"wrote {out / 'tables.md'} and {out / 'oneshot.png'}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", nargs="+", type=Path, required=True)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    render(args.json, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
