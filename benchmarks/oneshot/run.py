"""Issue 16: one-shot N:M pruning of a pretrained model, then fine-tuning from it.

For each task (the accuracy study's byte-level LM and digits CNN, same data, model and
optimizer settings) and seed: pretrain dense; for each pattern (2:4, 4:8, 1:4) prune a copy
one-shot with ``nmfx.prune`` by magnitude, magnitude + channel permutation, Wanda and
SparseGPT (128 calibration samples from the training split) and evaluate it; then
fine-tune each pruned copy for the same budget with SR-STE (lambda_W 2e-4), STE
(lambda_W 0) and a fixed mask (``nmfx.sparsify(..., mask_mode="fixed")``), all starting
from the pruned weights, with the pretraining optimizer settings and schedule shape.

    PYTHONPATH=. python -m benchmarks.oneshot.run                  # the study as published
    PYTHONPATH=. python -m benchmarks.oneshot.run --smoke --out /tmp/oneshot.json
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import logging
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
from benchmarks.accuracy.run import _fresh_model, _jsonable, _scaled, _strict
from benchmarks.accuracy.tasks import SMOKE, SPECS, Task, TaskSpec, build_task
from benchmarks.accuracy.train import RunRecord, final_checks, train
from nmfx.prune import prune, prune_summary

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = ROOT / "out" / "benchmarks" / "oneshot.json"  # untracked; results/ only with --out
PATTERNS = ("2:4", "4:8", "1:4")
STARTS = {  # name -> (method, permute)
    "magnitude": ("magnitude", False),
    "magnitude+permute": ("magnitude", True),
    "wanda": ("wanda", False),
    "sparsegpt": ("sparsegpt", False),
}
FINETUNES = {
    "srste": {"srste_lambda": 2e-4},
    "ste": {"srste_lambda": 0.0},
    "fixed": {"mask_mode": "fixed"},
}
CALIBRATION_SAMPLES = 128  # both papers' default
log = logging.getLogger("nmfx.oneshot")


def calibration(task: Task, seed: int, samples: int) -> list[Any]:
    """``samples`` training inputs (no labels) in batches of the task's batch size."""
    gen = torch.Generator().manual_seed(10_000 + seed)
    out, count = [], 0
    while count < samples:
        for x, _ in task.batches(gen):
            out.append(x[: samples - count])
            count += len(out[-1])
            if count >= samples:
                break
    return out


def finetune_spec(spec: TaskSpec, fraction: float) -> TaskSpec:
    """``fraction`` of the pretraining steps, same optimizer and schedule shape."""
    if spec.steps_per_epoch is not None:
        steps = max(1, round(spec.epochs * spec.steps_per_epoch * fraction))
        epochs = min(spec.epochs, steps)
        return replace(spec, epochs=epochs, steps_per_epoch=max(1, steps // epochs),
                       warmup_steps=max(1, round(spec.warmup_steps * fraction)))  # fmt: skip
    return replace(spec, epochs=max(1, round(spec.epochs * fraction)))


def one_shot(
    task: Task, dense: nn.Module, pattern: str, start: str, calib: list[Any]
) -> tuple[nn.Module, dict]:
    method, permute = STARTS[start]
    model = copy.deepcopy(dense)
    t0 = time.perf_counter()
    prune(model, pattern, method, calibration=calib, permute=permute, progress=False)
    wall = time.perf_counter() - t0
    summary = prune_summary(model)
    errors = [r.rel_error for r in summary.sparse if r.rel_error is not None]
    groups = [g for g in summary.groups if g.applied]
    return model, {
        "start": start,
        "pattern": pattern,
        "metrics": task.evaluate(model, final=True),
        "prune_wall_s": wall,
        "mean_rel_error": statistics.fmean(errors) if errors else None,
        "rel_error_per_layer": {r.name: r.rel_error for r in summary.sparse},
        "permutation": [
            {
                "consumers": g.consumers,
                "channels": g.channels,
                "applied": g.applied,
                "reason": g.reason,
                "kept_before": g.kept_before,
                "kept_after": g.kept_after,
            }
            for g in summary.groups
        ],
        "kept_magnitude_gain": (
            sum(g.kept_after for g in groups) / sum(g.kept_before for g in groups) - 1
            if groups
            else 0.0
        ),
    }


def pretrained(task: Task, seed: int, cache: Path | None) -> tuple[nn.Module, dict[str, Any]]:
    """The dense model of ``seed`` trained for the task's budget (cached across restarts)."""
    path = (
        cache / f"{task.spec.name}_seed{seed}_{task.spec.epochs}x{task.steps_per_epoch()}.pt"
        if cache
        else None
    )
    model = _fresh_model(task, seed)
    if path is not None and path.exists():
        saved = torch.load(path, weights_only=False)
        model.load_state_dict(saved["state_dict"])
        return model, saved["record"]
    rec = train(
        task, model, RunRecord(task.spec.name, "dense", None, seed, None, task.spec.epochs, 0)
    )
    record = {"final": rec.final, "steps": rec.steps, "wall_s": rec.wall_s, "curve": rec.curve}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state_dict": model.state_dict(), "record": record}, path)
    return model, record


def finetune(task: Task, pruned: nn.Module, pattern: str | None, start: str, ft: str, fspec: TaskSpec,
             fraction: float, seed: int) -> dict[str, Any]:  # fmt: skip
    """Fine-tune a copy of ``pruned`` with SR-STE, STE or a fixed mask for ``fspec``'s budget."""
    spec = task.spec
    model = copy.deepcopy(pruned)
    if pattern is not None:
        model = nmfx.sparsify(model, pattern=pattern, **FINETUNES[ft])
    task.spec = fspec
    try:
        r = train(task, model, RunRecord(spec.name, ft, pattern, seed, None, fspec.epochs, 0))
    finally:
        task.spec = spec
    checks = final_checks(task, model, pattern) if pattern is not None else {}
    log.info("%s seed %d %s %s -> %s (%.0f%%): %s", spec.name, seed, pattern, start, ft,
             100 * fraction, r.final)  # fmt: skip
    del model
    gc.collect()
    return {
        "kind": "finetune", "seed": seed, "pattern": pattern, "start": start, "finetune": ft,
        "fraction": fraction, "final": r.final, "curve": r.curve, "steps": r.steps,
        "wall_s": r.wall_s, "all_nm_after_finalize": checks.get("all_nm_after_finalize"),
    }  # fmt: skip


def run_task(spec: TaskSpec, seeds: list[int], patterns: list[str], starts: list[str],
             finetunes: list[str], fraction: float, samples: int, extra: list[tuple],
             cache: Path | None, full_patterns: list[str], save: Any,
             dense_continue: bool = False) -> dict[str, Any]:  # fmt: skip
    task = build_task(spec)
    ft_spec = finetune_spec(spec, fraction)
    runs: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for seed in seeds:
        dense, rec = pretrained(task, seed, cache)
        runs.append({"kind": "dense", "seed": seed, **rec})
        if dense_continue:  # the baseline a fine-tune must beat: dense, same extra steps
            for frac in sorted({fraction, *(e[3] for e in extra)}):
                runs.append(
                    finetune(
                        task, dense, None, "dense", "dense", finetune_spec(spec, frac), frac, seed
                    )
                )
        calib = calibration(task, seed, samples)
        pruned: dict[tuple[str, str], nn.Module] = {}
        for pattern in patterns:  # every one-shot result first: they are cheap
            for start in starts:
                pruned[pattern, start], info = one_shot(task, dense, pattern, start, calib)
                runs.append({"kind": "one_shot", "seed": seed, **info})
                log.info("%s seed %d %s %s one-shot: %s", spec.name, seed, pattern, start,
                         info["metrics"])  # fmt: skip
        save(_task_payload(spec, ft_spec, task, fraction, extra, samples, runs, t0))
        for pattern in patterns:
            for start in starts:
                chosen = finetunes if pattern in full_patterns else finetunes[:1]
                jobs = [(ft, ft_spec, fraction) for ft in chosen]
                jobs += [(ft, finetune_spec(spec, f), f) for p, st, ft, f in extra
                         if (p, st) == (pattern, start)]  # fmt: skip
                for ft, fspec, frac in jobs:
                    runs.append(finetune(task, pruned[pattern, start], pattern, start, ft, fspec,
                                         frac, seed))  # fmt: skip
                save(_task_payload(spec, ft_spec, task, fraction, extra, samples, runs, t0))
    return _task_payload(spec, ft_spec, task, fraction, extra, samples, runs, t0)


def _task_payload(spec: TaskSpec, ft_spec: TaskSpec, task: Task, fraction: float, extra: list,
                  samples: int, runs: list, t0: float) -> dict[str, Any]:  # fmt: skip
    spec_json = {**asdict(spec), "overrides": {k: _jsonable(v) for k, v in spec.overrides.items()}}
    ft_json = {**asdict(ft_spec), "overrides": spec_json["overrides"]}
    return {
        "spec": spec_json,
        "finetune_spec": ft_json,
        "finetune_fraction": fraction,
        "extra_finetunes": [list(e) for e in extra],
        "pretrain_steps": spec.epochs * task.steps_per_epoch(),
        "metric": spec.metric,
        "data": task.data_info,
        "calibration_samples": samples,
        "runs": runs,
        "wall_s": time.perf_counter() - t0,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", nargs="+", default=["charlm", "digits"], choices=list(SPECS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--patterns", nargs="*", default=list(PATTERNS))
    p.add_argument("--starts", nargs="*", default=list(STARTS), choices=list(STARTS))
    p.add_argument(
        "--dense-continue",
        action="store_true",
        help="also train the dense model for the fine-tuning budget (the baseline)",
    )
    p.add_argument("--finetunes", nargs="+", default=list(FINETUNES), choices=list(FINETUNES))
    p.add_argument(
        "--charlm-scale", type=int, default=4, help="pretraining budget x the accuracy study's"
    )
    p.add_argument("--finetune-fraction", type=float, default=0.25, help="of the pretraining steps")
    p.add_argument(
        "--extra",
        nargs="*",
        default=[],
        metavar="PATTERN/START/FINETUNE/FRACTION",
        help="additional fine-tunes at another budget, e.g. 2:4/sparsegpt/srste/0.25",
    )
    p.add_argument(
        "--full-patterns",
        nargs="+",
        default=list(PATTERNS),
        help="patterns fine-tuned with every method; the others with the first only",
    )
    p.add_argument("--cache", type=Path, default=None, help="directory for the pretrained weights")
    p.add_argument("--samples", type=int, default=CALIBRATION_SAMPLES)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    torch.set_num_threads(args.threads)
    machine = machine_info()
    t0 = time.perf_counter()
    tasks = {}
    extra = []
    for item in args.extra:
        pattern, start, ft, frac = item.split("/")
        extra.append((pattern, start, ft, float(frac)))

    def save(partial: dict[str, Any]) -> None:
        """Write what is done so far: a long run interrupted still leaves its results."""
        payload = {
            "script": "benchmarks/oneshot/run.py",
            "argv": sys.argv[1:] if argv is None else argv,
            "machine": machine,
            "partial": True,
            "tasks": {**tasks, partial["spec"]["name"]: partial},
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(_strict(payload), indent=1, allow_nan=False) + "\n")

    with LoadMonitor() as load:
        for name in args.tasks:
            spec = (SMOKE if args.smoke else SPECS)[name]
            if name == "charlm" and not args.smoke:
                spec = _scaled(spec, args.charlm_scale)
            tasks[name] = run_task(spec, args.seeds, args.patterns, args.starts, args.finetunes,
                                   args.finetune_fraction, 16 if args.smoke else args.samples,
                                   extra, args.cache, args.full_patterns, save, args.dense_continue)  # fmt: skip
    payload = {
        "script": "benchmarks/oneshot/run.py",
        "argv": sys.argv[1:] if argv is None else argv,
        "machine": machine,
        "partial": False,
        "load": load.result,
        "wall_s": time.perf_counter() - t0,
        "tasks": tasks,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(_strict(payload), indent=1, allow_nan=False) + "\n")
    print(f"wrote {args.out} ({payload['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
