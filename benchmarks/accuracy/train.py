"""Train one run (one task, method, pattern and seed) and measure what the study reports.

Per epoch: mean training loss, the evaluation metrics, the learning rate and, for sparse
runs, SAD from ``nmfx.mask_snapshot`` / ``nmfx.mask_stats`` three ways: against the mask
one epoch earlier, against the mask at the start of the run, and against the final mask.
At the end of a sparse run: mask density from ``nmfx.mask_stats`` (must be exactly N/M),
then ``nmfx.finalize`` and the N:M checks of the baked weights (``nmfx.nm_weights``,
``nmfx.is_nm``, ``nmfx.detect_nm``), and the metric of the finalized model.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

import nmfx
from benchmarks.accuracy.tasks import Task, lr_at, make_optimizer

__all__ = ["RunRecord", "final_checks", "train"]

log = logging.getLogger("nmfx.accuracy")


@dataclass
class RunRecord:
    """What one run produced; ``asdict`` of it is one entry of the JSON ``runs`` list."""

    task: str
    method: str  # dense | dense_half | srste | ste | fixed
    pattern: str | None
    seed: int
    srste_lambda: float | None
    epochs: int
    steps: int
    epoch_offset: int = 0  # fixed: its fine-tune starts after the dense_half epochs
    curve: dict[str, list[float | None]] = field(default_factory=dict)  # index 0 = start
    sad: dict[str, Any] = field(default_factory=dict)
    final: dict[str, float] = field(default_factory=dict)  # full evaluation at the end
    checks: dict[str, Any] = field(default_factory=dict)
    wall_s: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _flip_fraction(model: nn.Module, since: dict[str, torch.Tensor]) -> tuple[float, int]:
    stats = nmfx.mask_stats(model, since=since)
    return float(stats.flip_fraction or 0.0), int(stats.flips or 0)


def train(task: Task, model: nn.Module, record: RunRecord) -> RunRecord:
    """Train ``model`` for ``record.epochs`` epochs of ``task`` with the task's one setting;
    fill ``record.curve``, ``record.sad``, ``record.final`` and ``record.wall_s``."""
    spec = task.spec
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(record.seed)
    opt = make_optimizer(spec, model)
    total = record.epochs * task.steps_per_epoch()
    sparse = nmfx.is_sparsified(model)
    snaps = [nmfx.mask_snapshot(model)] if sparse else []
    curve: dict[str, list[float | None]] = {"epoch": [0.0], "train_loss": [None], "lr": [None]}
    for key, value in task.evaluate(model, final=False).items():
        curve[key] = [value]
    sad_prev: list[float] = []
    sad_prev_flips: list[int] = []
    sad_init: list[float] = []
    step = 0
    model.train()
    for epoch in range(1, record.epochs + 1):
        losses = []
        for batch in task.batches(gen):
            lr = lr_at(spec, step, total)
            for group in opt.param_groups:
                group["lr"] = lr
            loss = task.loss(model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()  # nmfx's step pre-hook adds lambda_W * (1 - E) * W here
            losses.append(loss.item())
            step += 1
        curve["epoch"].append(float(epoch))
        curve["train_loss"].append(sum(losses) / len(losses))
        curve["lr"].append(lr)
        for key, value in task.evaluate(model, final=False).items():
            curve[key].append(value)
        if sparse:
            frac, flips = _flip_fraction(model, snaps[-1])
            sad_prev.append(frac)
            sad_prev_flips.append(flips)
            sad_init.append(_flip_fraction(model, snaps[0])[0])
            snaps.append(nmfx.mask_snapshot(model))
        log.info(
            "%s %s %s seed %d epoch %d/%d: train loss %.4f, eval %s",
            record.task, record.method, record.pattern or "-", record.seed, epoch,
            record.epochs, curve["train_loss"][-1],
            ", ".join(f"{k} {v[-1]:.4f}" for k, v in curve.items() if k not in _NOT_EVAL),
        )  # fmt: skip
    record.steps = step
    record.curve = curve
    if sparse:
        final_mask = snaps[-1]
        record.sad = {
            "vs_previous_epoch": sad_prev,
            "vs_previous_epoch_flips": sad_prev_flips,
            "vs_start": sad_init,
            "vs_final": [_sad_between(s, final_mask) for s in snaps[:-1]],
            "numel": sum(m.numel() for m in final_mask.values()),
            "per_layer_vs_start": {
                s.param: s.flip_fraction for s in nmfx.mask_stats(model, since=snaps[0]).layers
            },
        }
    record.final = task.evaluate(model, final=True)
    record.wall_s = time.perf_counter() - t0
    return record


_NOT_EVAL = ("epoch", "train_loss", "lr")


def _sad_between(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    flips = sum(int(torch.count_nonzero(a[k] ^ b[k])) for k in b)
    return flips / max(sum(m.numel() for m in b.values()), 1)


def _pruned_vs_kept(model: nn.Module, masks: dict[str, torch.Tensor]) -> dict[str, float]:
    """Mean |w| of the pruned and of the kept weights before baking: what the SR-STE term
    acts on (it decays only pruned weights; with lambda_W = 0 nothing does)."""
    params = dict(model.named_parameters())
    kept = pruned = 0.0
    n_kept = n_pruned = 0
    for name, mask in masks.items():
        w = params[name].detach().abs()
        kept += float(w[mask].sum())
        pruned += float(w[~mask].sum())
        n_kept += int(mask.sum())
        n_pruned += int((~mask).sum())
    mean_kept, mean_pruned = kept / max(n_kept, 1), pruned / max(n_pruned, 1)
    return {
        "mean_abs_kept": mean_kept,
        "mean_abs_pruned": mean_pruned,
        "pruned_to_kept_abs_ratio": mean_pruned / mean_kept if mean_kept else float("nan"),
    }


@torch.no_grad()
def final_checks(task: Task, model: nn.Module, pattern: str | None) -> dict[str, Any]:
    """Density and N:M checks at the end of a run; finalizes a sparse ``model`` in place.

    Dense runs must have no masks. Sparse runs: every mask keeps exactly N of M
    (``mask_stats``), ``nmfx.finalize`` bakes and verifies them, every recorded weight
    passes ``nmfx.is_nm``, ``nmfx.detect_nm`` finds the same weights independently, and the
    finalized model scores what the masked one did.
    """
    masks = nmfx.mask_snapshot(model)
    if pattern is None:
        return {"masked_weights": len(masks), "sparsified": nmfx.is_sparsified(model)}
    p = nmfx.parse_pattern(pattern)
    stats = nmfx.mask_stats(model)
    before = task.evaluate(model, final=True)
    planned = sorted(c.param for c in nmfx.summary(model).plan.sparse)
    magnitudes = _pruned_vs_kept(model, masks)
    nmfx.finalize(model)
    record = nmfx.nm_weights(model)
    params = dict(model.named_parameters())
    baked_ok = all(
        w.pattern == p and nmfx.is_nm(params[name], p, w.reduce_dim) for name, w in record.items()
    )
    nonzero = sum(int(torch.count_nonzero(params[name])) for name in record)
    numel = sum(params[name].numel() for name in record)
    detected = sorted(nmfx.detect_nm(model, pattern))
    after = task.evaluate(model, final=True)
    return {
        "masked_weights": len(masks),
        "mask_density": stats.density,
        "mask_density_per_layer": {s.param: s.density for s in stats.layers},
        "expected_density": p.n / p.m,
        "nm_weights_after_finalize": sorted(record),
        "planned_sparse_weights": planned,
        "all_nm_after_finalize": baked_ok and sorted(record) == planned,
        "detect_nm_matches": detected == sorted(record),
        "weight_density_after_finalize": nonzero / max(numel, 1),
        **magnitudes,
        "sparse_numel": numel,
        "metric_before_finalize": before,
        "metric_after_finalize": after,
        "max_metric_change_on_finalize": max(abs(after[k] - before[k]) for k in before),
    }
