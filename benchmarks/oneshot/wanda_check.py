"""Is Wanda worse than magnitude on the study's byte-level LM, and why? (issue 16, target:
Wanda closes >= 40% of the magnitude -> dense gap at 2:4.)

For each seed's pretrained LM (the one-shot study's, cached or trained): validation loss
at 2:4 after magnitude, Wanda (128 and 512 calibration windows: 16k and 64k bytes) and
SparseGPT, with nmfx's layer-by-layer schedule and with the reference code's block-wise
one (every layer of a block calibrated in the same forward, on the dense block); the mean
per-layer reconstruction error; with ``--ablation``, the loss increase of pruning one layer
at a time (each method's weights for that layer, the rest dense).

    PYTHONPATH=. python -m benchmarks.oneshot.wanda_check --cache /tmp/oneshot/cache
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import json
import statistics
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks._timing import LoadMonitor, machine_info, write_json
from benchmarks.accuracy.tasks import SPECS, build_task
from benchmarks.oneshot.run import calibration, pretrained
from nmfx.prune import prune, prune_summary

OUT = Path(__file__).resolve().parents[2] / "out" / "benchmarks" / "oneshot_wanda_check.json"
RUNS = (  # label, method, calibration windows, schedule
    ("magnitude", "magnitude", 128, "layer"),
    ("wanda", "wanda", 128, "layer"),
    ("wanda_512", "wanda", 512, "layer"),
    ("wanda_blockwise", "wanda", 128, "block"),
    ("sparsegpt", "sparsegpt", 128, "layer"),
    ("sparsegpt_blockwise", "sparsegpt", 128, "block"),
)


@contextlib.contextmanager
def blockwise_schedule() -> Iterator[None]:
    """The reference code's schedule: the stages of a block merged into one (one forward
    calibrates all of the block's layers, then all are pruned). Patches nmfx internals."""
    seq = importlib.import_module("nmfx.prune.sequential")
    api = importlib.import_module("nmfx.prune.api")
    plan = api.plan_schedule

    def merged(*args: Any) -> Any:
        schedule = plan(*args)
        stages: list = []
        for st in schedule.stages:
            if stages and st.block is not None and stages[-1].block == st.block:
                stages[-1].targets += st.targets
            else:
                stages.append(seq.Stage(list(st.targets), st.block, None))
        schedule.stages = stages
        return schedule

    api.plan_schedule = merged
    try:
        yield
    finally:
        api.plan_schedule = plan


def pruned(dense: nn.Module, method: str, calib: list, schedule: str) -> nn.Module:
    model = copy.deepcopy(dense)
    ctx = blockwise_schedule() if schedule == "block" else contextlib.nullcontext()
    with ctx:
        prune(model, "2:4", method, calibration=calib, nsamples=sum(len(b) for b in calib),
              progress=False)  # fmt: skip
    return model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--cache", type=Path, default=None)
    p.add_argument("--ablation", action="store_true")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    task = build_task(SPECS["charlm"])
    results: dict[str, Any] = {}
    with LoadMonitor() as load:
        for seed in args.seeds:
            dense, _ = pretrained(task, seed, args.cache)
            res: dict[str, Any] = {"dense": task.evaluate(dense, final=True)["loss"]}
            models = {}
            for label, method, windows, schedule in RUNS:
                model = pruned(dense, method, calibration(task, seed, windows), schedule)
                models[label] = model
                errors = [r.rel_error for r in prune_summary(model).sparse]
                res[label] = task.evaluate(model, final=True)["loss"]
                res[f"{label}_mean_rel_error"] = statistics.fmean(errors)
            gap = res["magnitude"] - res["dense"]
            res["gap_closed"] = {k: (res["magnitude"] - res[k]) / gap for k, *_ in RUNS[1:]}
            if args.ablation:
                res["single_layer_increase"] = ablation(task, dense, models, res["dense"])
            results[str(seed)] = res
            print(seed, json.dumps(res), flush=True)
    payload = {"script": "benchmarks/oneshot/wanda_check.py",
               "argv": sys.argv[1:] if argv is None else argv, "results": results,
               "machine": machine_info(), "load": load.result}  # fmt: skip
    write_json("wanda_check", payload, args.out)
    print(f"wrote {args.out}")
    return 0


def ablation(task: Any, dense: nn.Module, models: dict, base: float) -> dict[str, dict]:
    """Loss increase of each layer pruned alone (its weights from each method's model)."""
    names = [r.param for r in prune_summary(models["wanda"]).sparse]
    out: dict[str, dict] = {}
    for name in names:
        out[name] = {}
        for label in ("magnitude", "wanda", "sparsegpt"):
            model = copy.deepcopy(dense)
            model.get_parameter(name).data.copy_(models[label].get_parameter(name))
            out[name][label] = task.evaluate(model, final=True)["loss"] - base
    return out


if __name__ == "__main__":
    raise SystemExit(main())
