"""``nmfx.prune``: one-shot N:M pruning of a trained model, in place.

Order matters: options and calibration are checked, the eligibility analysis runs and
every calibration batch goes through the dense model once *before* any weight changes, so
a bad input leaves the model as it was. Then channels are permuted (if asked; the dense
function is unchanged) and the layers are pruned stage by stage (``sequential``).
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from nmfx import model_state
from nmfx.analysis import analyse
from nmfx.model_state import is_sparsified
from nmfx.passes.decide_eligibility import decide_eligibility
from nmfx.passes.find_weight_ops import find_weight_ops
from nmfx.pattern import NMPattern
from nmfx.prune.capture import CalibrationError, call_model
from nmfx.prune.config import PruneConfig, prune_config
from nmfx.prune.methods import HessianCache, prune_target
from nmfx.prune.permute import apply_permutations
from nmfx.prune.sequential import (
    BlockInputs,
    Schedule,
    find_block_stack,
    plan_schedule,
    run_stage,
    trace_calls,
)
from nmfx.prune.summary import LayerPrune, PermutationGroup, PruneSummary, dense_rows
from nmfx.prune.targets import PruneTarget, build_targets

__all__ = ["CalibrationError", "permute_channels", "prune"]

log = logging.getLogger("nmfx.prune")
ANALYSIS_PASSES = (find_weight_ops, decide_eligibility)


def prune(
    model: nn.Module,
    pattern: str | tuple[int, int] | NMPattern = "2:4",
    method: str = "magnitude",
    calibration: Iterable[Any] | None = None,
    permute: bool = False,
    **options: Any,
) -> nn.Module:
    """Prune every eligible weight op of ``model`` to N:M, in place; returns ``model``.

    ``calibration``: an iterable of example inputs, each a tensor, a tuple of positional
    arguments or a dict of keyword arguments of ``model(...)``; needed by ``"wanda"`` and
    ``"sparsegpt"``, optional for ``"magnitude"`` (then per-layer errors are measured).
    Options: the fields of :class:`PruneConfig` (``nsamples``, ``percdamp``, ``blocksize``,
    ``permute_rounds``, ``progress``, ...) and sparsify's eligibility options
    (``exclude``, ``keep_output_dense``, ``min_weight_numel``). ``nmfx.summary(model)``
    shows the result per layer.
    """
    cfg = prune_config(pattern, method, permute, options)
    _check_model(model)
    batches = _calibration(calibration, cfg)
    found = analyse(model, cfg.sparsity, ANALYSIS_PASSES)
    targets = build_targets(model, found.candidates)
    if not targets:
        raise ValueError(
            "no layer of the model can be made N:M with these options; nothing was changed. "
            "Reasons per layer: " + "; ".join(f"{c.name}: {c.reason}" for c in found.candidates)
        )
    calibrated = [t for t in targets if not t.fallback]
    with _calibration_mode(model), torch.no_grad():
        schedule = None
        if batches:
            blocks = find_block_stack(model, calibrated)
            trace = trace_calls(model, batches, calibrated, blocks)
            schedule = plan_schedule(calibrated, trace, blocks)
        groups = apply_permutations(model, found, targets, cfg, batches) if cfg.permute else []
        results = _prune_all(model, targets, schedule, batches, cfg)
    permuted = {p for g in groups if g.applied for p in g.consumers}
    skipped = {p: g.reason for g in groups if not g.applied for p in g.consumers}
    rows = []
    for t in targets:
        used, err = results[t.cand.param]
        perm = ""
        if cfg.permute:
            perm = (
                "yes" if t.name in permuted else f"no: {skipped.get(t.name, 'in no channel group')}"
            )
        reason = t.cand.reason + (f"; {t.fallback}, pruned by magnitude" if t.fallback else "")
        rows.append(
            LayerPrune(t.name, t.cand.param, t.cand.shape, "sparse", used, perm, err, reason)
        )
    order = {c.param: i for i, c in enumerate(found.candidates)}
    layers = sorted(rows + dense_rows(found.candidates), key=lambda r: order[r.param])
    how = _schedule_text(schedule)
    summary = PruneSummary(str(cfg.pattern), cfg.method, layers, groups, how, _count(batches))
    model_state.set_prune_summary(model, summary)
    log.info("nmfx.prune: %s %s: %d weight ops N:M", cfg.pattern, cfg.method, len(targets))
    return model


def permute_channels(
    model: nn.Module,
    pattern: str | tuple[int, int] | NMPattern = "2:4",
    example: Any = None,
    **options: Any,
) -> list[PermutationGroup]:
    """Permute ``model``'s channels (dense, in place) so that N:M magnitude pruning keeps more;
    the model computes the same outputs. ``example`` is one input batch (for shapes).
    Returns every channel group feeding a layer ``sparsify`` would prune, applied or skipped
    with its reason. ``nmfx.prune(..., permute=True)`` runs this before pruning."""
    cfg = prune_config(pattern, "magnitude", True, options)
    _check_model(model)
    batches = _calibration([example] if example is not None else None, cfg)
    found = analyse(model, cfg.sparsity, ANALYSIS_PASSES)
    targets = build_targets(model, found.candidates)
    with _calibration_mode(model), torch.no_grad():
        return apply_permutations(model, found, targets, cfg, batches)


def _schedule_text(schedule: Schedule | None) -> str:
    if schedule is None:
        return "none (magnitude only)"
    if schedule.blocks:
        return f"sequential over {len(schedule.blocks)} blocks (inputs of each block cached)"
    return f"sequential, whole-model forward per stage ({schedule.note})"


def _prune_all(
    model: nn.Module, targets: list[PruneTarget], schedule: Schedule | None,
    batches: list[Any], cfg: PruneConfig,
) -> dict[str, tuple[str, float | None]]:  # fmt: skip
    out: dict[str, tuple[str, float | None]] = {}
    bar = _progress(len(targets), cfg)
    cache = HessianCache(cfg.percdamp)
    if schedule is not None:
        inputs, current = BlockInputs(), None
        for stage in schedule.stages:
            if stage.block is None:
                run, n = (lambda i: call_model(model, batches[i])), len(batches)
            else:
                current = _advance(model, batches, schedule, inputs, current, stage.block)
                block = schedule.blocks[stage.block]
                run, n = (
                    (lambda i, b=block: b(*inputs.items[i][0], **inputs.items[i][1])),
                    len(batches),
                )
            stats = run_stage(stage, run, n, schedule.input_keys)
            cache.factors.clear()
            for t in stage.targets:
                key = t.stats_key(schedule.input_keys.get(id(t.owner)))
                entry = stats.get(key)
                hessian = entry.hessian() if entry is not None and entry.rows else None
                out[t.cand.param] = prune_target(t, hessian, key, cache, cfg)
                bar.update(1)
            del stats
            cache.factors.clear()
    for t in targets:
        if t.cand.param not in out:  # no calibration, not reached by it, or not capturable
            out[t.cand.param] = prune_target(t, None, None, cache, cfg)
            bar.update(1)
    bar.close()
    return out


def _advance(model: nn.Module, batches: list[Any], schedule: Schedule, inputs: BlockInputs,
             current: int | None, block: int) -> int:  # fmt: skip
    """Bring the cached block inputs to ``block`` (capturing block 0's on first use)."""
    if current is None:
        inputs.capture(model, batches, schedule.blocks[0])
        current = 0
    while current < block:
        inputs.advance(schedule.blocks[current])
        current += 1
    return current


def _progress(total: int, cfg: PruneConfig) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"nmfx.prune {cfg.method} {cfg.pattern}", unit="layer",
                disable=not cfg.progress, leave=False)  # fmt: skip


def _check_model(model: Any) -> None:
    dynamo = sys.modules.get("torch._dynamo.eval_frame")
    if dynamo is not None and isinstance(model, dynamo.OptimizedModule):
        raise TypeError(
            "model is a torch.compile'd module; call nmfx.prune on the original module first"
        )
    if not isinstance(model, nn.Module):
        raise TypeError(f"prune expects an nn.Module, got {type(model).__name__}")
    if is_sparsified(model):
        raise ValueError(
            "model is already sparsified by nmfx (it contains NMMasker modules); prune the "
            "dense model, or call nmfx.finalize first"
        )


def _count(batches: list[Any]) -> int:
    total = 0
    for b in batches:
        total += _batch_size(b)
    return total


def _batch_size(batch: Any) -> int:
    values = (
        batch.values()
        if isinstance(batch, dict)
        else batch
        if isinstance(batch, tuple | list)
        else [batch]
    )
    for v in values:
        if isinstance(v, torch.Tensor):
            return int(v.shape[0]) if v.dim() else 1
    return 1


def _calibration(calibration: Iterable[Any] | None, cfg: PruneConfig) -> list[Any]:
    """The batches to use: the first ones covering ``nsamples`` samples."""
    if calibration is None:
        if cfg.permute:
            raise ValueError(
                "permute=True needs an example input to follow the channels through the model: "
                "pass calibration=[x] (one batch is enough for magnitude); nothing was changed"
            )
        if cfg.calibrated:
            raise ValueError(
                f"method={cfg.method!r} needs calibration data: pass calibration=batches, an "
                f"iterable of example inputs (tensors, tuples of positional args or dicts of "
                f"keyword args), e.g. calibration=[x1, x2]; nothing was changed"
            )
        return []
    if isinstance(calibration, torch.Tensor | dict) or not isinstance(calibration, Iterable):
        raise TypeError(
            f"calibration must be an iterable of batches, got {type(calibration).__name__}; "
            f"wrap a single batch in a list: calibration=[x]"
        )
    batches, count = [], 0
    for batch in calibration:
        batches.append(batch)
        count += _batch_size(batch)
        if count >= cfg.nsamples:
            break
    if not batches:
        raise ValueError(
            f"calibration is empty; method={cfg.method!r} needs at least one batch "
            f"(calibration=[x]); nothing was changed"
        )
    return batches


@contextlib.contextmanager
def _calibration_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) and no KV cache (HF ``config.use_cache``) while calibrating."""
    modes = {m: m.training for m in model.modules()}
    config = getattr(model, "config", None)
    cache = getattr(config, "use_cache", None)
    model.eval()
    if isinstance(cache, bool):
        config.use_cache = False
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode
        if isinstance(cache, bool):
            config.use_cache = cache
