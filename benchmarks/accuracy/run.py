"""Issue 6: does SR-STE hold up at CPU scale? Dense vs SR-STE vs STE vs fixed-mask fine-tune.

For every task (digits CNN, byte-level LM on the stdlib sources), seed and N:M pattern:

- ``dense``: the zoo model trained for the full budget of T epochs;
- ``srste``: ``nmfx.sparsify(model, pattern, srste_lambda=2e-4)`` from the same init, T epochs;
- ``ste``: the same with ``srste_lambda=0`` (plain STE), T epochs;
- ``fixed``: the recipe of other tools at the same total budget: ``dense_half`` (dense,
  T/2 epochs, its own full schedule) is pruned one-shot by magnitude with
  ``nmfx.sparsify(..., mask_mode="fixed")`` and fine-tuned for the other T/2 epochs with
  the same optimizer settings and schedule shape (one dense_half model per seed serves
  every pattern).

One hyper-parameter setting per task (``tasks.SPECS``), chosen on dense with ``--tune``.
Writes ``out/benchmarks/accuracy.json`` (untracked; ``--out benchmarks/results/accuracy.json``
replaces the committed result); ``render.py`` turns it into tables and plots.

    PYTHONPATH=. python -m benchmarks.accuracy.run                 # the full study
    PYTHONPATH=. python -m benchmarks.accuracy.run --smoke --out /tmp/acc.json
    PYTHONPATH=. python -m benchmarks.accuracy.run --tune          # the dense LR sweep
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import logging
import math
import statistics
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

import nmfx
from benchmarks._timing import LoadMonitor, machine_info
from benchmarks.accuracy.tasks import SMOKE, SPECS, Task, TaskSpec, build_task
from benchmarks.accuracy.train import RunRecord, final_checks, train

ROOT = Path(__file__).resolve().parents[2]
# Untracked defaults (.gitignore: /out/): the committed benchmarks/results/accuracy.json and
# docs/accuracy/tuning.json change only with an explicit --out.
DEFAULT_OUT = ROOT / "out" / "benchmarks" / "accuracy.json"
TUNE_OUT = ROOT / "out" / "benchmarks" / "tuning.json"
PATTERNS = ("2:4", "4:8", "1:4")
LAMBDA_W = 2e-4  # the paper's default
METHODS = ("dense", "dense_half", "srste", "ste", "fixed")
TUNE_LRS = {"digits": (0.01, 0.03, 0.1, 0.3), "charlm": (3e-4, 1e-3, 2e-3, 3e-3, 1e-2)}
SCHEMA_VERSION = 1

log = logging.getLogger("nmfx.accuracy")


def _fresh_model(task: Task, seed: int) -> nn.Module:
    torch.manual_seed(seed)  # same init for dense, srste, ste and dense_half of a seed
    return task.build_model()


def _record(task: Task, method: str, pattern: str | None, seed: int, epochs: int,
            lam: float | None = None, offset: int = 0) -> RunRecord:  # fmt: skip
    return RunRecord(task.spec.name, method, pattern, seed, lam, epochs, 0, offset)


def run_dense(task: Task, seed: int, epochs: int, method: str) -> tuple[RunRecord, nn.Module]:
    model = _fresh_model(task, seed)
    rec = train(task, model, _record(task, method, None, seed, epochs))
    rec.checks = final_checks(task, model, None)
    return rec, model


def run_from_scratch(task: Task, seed: int, pattern: str, lam: float, method: str) -> RunRecord:
    model = nmfx.sparsify(_fresh_model(task, seed), pattern=pattern, srste_lambda=lam)
    rec = train(task, model, _record(task, method, pattern, seed, task.spec.epochs, lam))
    rec.checks = final_checks(task, model, pattern)
    return rec


def run_fixed(task: Task, seed: int, pattern: str, dense_half: nn.Module, offset: int) -> RunRecord:
    model = nmfx.sparsify(copy.deepcopy(dense_half), pattern=pattern, mask_mode="fixed")
    pruned = task.evaluate(model, final=True)  # one-shot magnitude pruning, no fine-tune yet
    epochs = task.spec.epochs - offset
    rec = train(task, model, _record(task, "fixed", pattern, seed, epochs, None, offset))
    rec.checks = {**final_checks(task, model, pattern), "metric_after_one_shot_prune": pruned}
    return rec


def sparsity_plan(task: Task, pattern: str) -> dict[str, Any]:
    """Which weights ``sparsify`` makes N:M for this task's model, and why others stay dense."""
    model = task.build_model()
    plan = nmfx.summary(nmfx.sparsify(model, pattern=pattern)).plan
    numel = {c.param: _prod(c.shape) for c in plan.candidates}
    return {
        "layers": [
            {"name": c.name, "shape": list(c.shape), "verdict": c.verdict, "reason": c.reason}
            for c in plan.candidates
        ],
        "sparse_weights": sum(numel[c.param] for c in plan.sparse),
        "candidate_weights": sum(numel.values()),
        "model_parameters": sum(p.numel() for p in model.parameters()),
    }


def _prod(shape: tuple[int, ...]) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


def run_task(
    spec: TaskSpec, seeds: list[int], patterns: list[str], lam: float, methods: list[str]
) -> dict[str, Any]:
    """Every method x pattern x seed of one task, plus the task's facts and summary."""
    t0 = time.perf_counter()
    task = build_task(spec)
    half = spec.epochs // 2
    runs: list[RunRecord] = []
    for seed in seeds:
        if "dense" in methods:
            runs.append(run_dense(task, seed, spec.epochs, "dense")[0])
        if "fixed" in methods or "dense_half" in methods:
            rec, dense_half = run_dense(task, seed, half, "dense_half")
            runs.append(rec)
        for pattern in patterns:
            if "srste" in methods:
                runs.append(run_from_scratch(task, seed, pattern, lam, "srste"))
            if "ste" in methods:
                runs.append(run_from_scratch(task, seed, pattern, 0.0, "ste"))
            if "fixed" in methods:
                runs.append(run_fixed(task, seed, pattern, dense_half, half))
            gc.collect()  # maskers hold reference cycles; free the finished models
    spec_json = {**asdict(spec), "overrides": {k: _jsonable(v) for k, v in spec.overrides.items()}}
    return {
        "spec": spec_json,
        "metric": spec.metric,
        "higher_is_better": spec.higher_is_better,
        "data": task.data_info,
        "steps_per_epoch": task.steps_per_epoch(),
        "budget": {
            "total_epochs": spec.epochs,
            "dense": spec.epochs,
            "srste": spec.epochs,
            "ste": spec.epochs,
            "fixed": f"dense_half {half} epochs + fine-tune {spec.epochs - half} epochs",
            "dense_half": half,
        },
        "sparsity": {p: sparsity_plan(task, p) for p in patterns},
        "runs": [r.to_json() for r in runs],
        "summary": summarize(runs, spec.metric),
        "wall_s": time.perf_counter() - t0,
    }


def _strict(obj: Any) -> Any:
    """``obj`` with non-finite floats as strings ("nan", "inf"): strict JSON, and a diverged
    run stays visible instead of failing the write."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _strict(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_strict(v) for v in obj]
    return obj


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _mean_std(xs: list[float]) -> dict[str, Any]:
    return {
        "mean": statistics.fmean(xs),
        "std": statistics.stdev(xs) if len(xs) > 1 else 0.0,
        "n": len(xs),
        "values": xs,
    }


def summarize(runs: list[RunRecord], metric: str) -> dict[str, Any]:
    """Mean and sample std (n-1) over seeds per method and pattern; paired SR-STE - STE
    differences (same init and batches per seed); SAD summed over epochs."""
    groups: dict[str, list[RunRecord]] = {}
    for r in runs:
        groups.setdefault(f"{r.method}/{r.pattern or '-'}", []).append(r)
    out: dict[str, Any] = {}
    for key, rs in groups.items():
        entry: dict[str, Any] = {m: _mean_std([r.final[m] for r in rs]) for m in rs[0].final}
        if rs[0].sad:
            entry["sad_total"] = _mean_std([sum(r.sad["vs_previous_epoch"]) for r in rs])
            entry["sad_vs_start_end"] = _mean_std([r.sad["vs_start"][-1] for r in rs])
            entry["sad_last_epoch"] = _mean_std([r.sad["vs_previous_epoch"][-1] for r in rs])
            entry["sad_second_half"] = _mean_std(
                [sum(r.sad["vs_previous_epoch"][r.epochs // 2 :]) for r in rs]
            )
            entry["pruned_to_kept_abs_ratio"] = _mean_std(
                [r.checks["pruned_to_kept_abs_ratio"] for r in rs]
            )
        if rs[0].method == "fixed":
            entry["one_shot_" + metric] = _mean_std(
                [r.checks["metric_after_one_shot_prune"][metric] for r in rs]
            )
        entry["wall_s"] = _mean_std([r.wall_s for r in rs])
        out[key] = entry
    by = {(r.method, r.pattern, r.seed): r for r in runs}
    paired: dict[str, Any] = {}
    for (method, pattern, seed), r in by.items():
        other = by.get(("ste", pattern, seed))
        if method == "srste" and other is not None:
            paired.setdefault(pattern, []).append(r.final[metric] - other.final[metric])
    out["paired_srste_minus_ste"] = {p: _mean_std(d) for p, d in paired.items()}
    return out


def resummarize(path: Path) -> None:
    """Recompute every task's ``summary`` from the runs recorded in ``path`` (no training)."""
    data = json.loads(path.read_text())
    for task in data["tasks"].values():
        runs = [RunRecord(**r) for r in task["runs"]]
        task["summary"] = summarize(runs, task["metric"])
    path.write_text(json.dumps(_strict(data), indent=1, allow_nan=False) + "\n")


def tune(specs: list[TaskSpec], seed: int) -> dict[str, Any]:
    """Dense-only learning-rate sweep on a split held out from the training data."""
    result: dict[str, Any] = {}
    for spec in specs:
        task = build_task(spec, tune=True)
        rows = []
        for lr in TUNE_LRS[spec.name]:
            task.spec = replace(spec, lr=lr)
            model = _fresh_model(task, seed)
            rec = train(task, model, _record(task, "dense", None, seed, spec.epochs))
            rows.append({"lr": lr, **rec.final, "wall_s": rec.wall_s})
            print(f"tune {spec.name}: lr {lr:g}: {rec.final}", flush=True)
        best = min(rows, key=lambda r: r["loss"])
        result[spec.name] = {
            "criterion": "lowest held-out loss of the dense model",
            "seed": seed,
            "data": task.data_info,
            "rows": rows,
            "chosen_lr": best["lr"],
        }
    return result


def _scaled(spec: TaskSpec, k: int) -> TaskSpec:
    """``spec`` with k times the optimizer steps (same epochs and schedule shape)."""
    if k == 1:
        return spec
    if spec.steps_per_epoch is not None:
        return replace(
            spec, steps_per_epoch=spec.steps_per_epoch * k, warmup_steps=spec.warmup_steps * k
        )
    return replace(spec, epochs=spec.epochs * k)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", nargs="+", default=list(SPECS), choices=list(SPECS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--patterns", nargs="+", default=list(PATTERNS))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--lambda-w", type=float, default=LAMBDA_W, help="SR-STE lambda_W")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument(
        "--budget-scale", type=int, default=1, help="k x the training steps (supplement runs)"
    )
    p.add_argument("--smoke", action="store_true", help="tiny models and budgets (CI, seconds)")
    p.add_argument("--tune", action="store_true", help="dense LR sweep instead of the study")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON output path (default out/benchmarks/accuracy.json or tuning.json, untracked)")  # fmt: skip
    p.add_argument(
        "--resummarize", type=Path, default=None, help="recompute a JSON's summaries, no training"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.resummarize is not None:
        resummarize(args.resummarize)
        print(f"rewrote the summaries of {args.resummarize}")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    torch.set_num_threads(args.threads)
    for p in args.patterns:
        nmfx.parse_pattern(p)  # fail before training anything
    specs = [
        _scaled((SMOKE if args.smoke else SPECS)[name], args.budget_scale) for name in args.tasks
    ]
    machine = machine_info()  # before training: others may edit nmfx/ while this runs
    t0, cpu0 = time.perf_counter(), time.process_time()
    with LoadMonitor() as load:
        if args.tune:
            payload: dict[str, Any] = {"tuning": tune(specs, seed=100)}
        else:
            payload = {
                "tasks": {
                    s.name: run_task(s, args.seeds, args.patterns, args.lambda_w, args.methods)
                    for s in specs
                },
            }
    payload = {
        "schema_version": SCHEMA_VERSION,
        "script": "benchmarks/accuracy/run.py",
        "argv": sys.argv[1:] if argv is None else argv,
        "smoke": args.smoke,
        "settings": {
            "seeds": args.seeds,
            "patterns": args.patterns,
            "srste_lambda": args.lambda_w,
            "threads": args.threads,
            "budget_scale": args.budget_scale,
            "methods": args.methods,
        },
        "machine": machine,
        "load": load.result,
        "wall_s": time.perf_counter() - t0,
        "cpu_s": time.process_time() - cpu0,
        **payload,
    }
    out = args.out or (TUNE_OUT if args.tune else DEFAULT_OUT)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(_strict(payload), indent=1, allow_nan=False) + "\n")
    print(f"wrote {out} ({payload['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
