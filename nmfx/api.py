"""The training-side verbs: ``nmfx.sparsify`` and ``nmfx.summary``.

``sparsify`` = analyse (``nmfx.analysis``: changes nothing) then install
(``nmfx.model_state``: all or nothing). ``summary`` renders the recorded plan.
"""

from __future__ import annotations

import logging
import sys
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from nmfx import model_state
from nmfx.analysis import analyse
from nmfx.config import SparsityConfig, config_from_options
from nmfx.model_state import is_sparsified
from nmfx.passes import SPARSIFY_PASSES, Pass
from nmfx.plan import Candidate, SparsityPlan
from nmfx.preconditions import check_materialized, outside_inference_mode
from nmfx.srste import ensure_optimizer_hook

__all__ = ["Summary", "is_sparsified", "render_candidates", "sparsify", "summary"]

log = logging.getLogger("nmfx")


def _is_compiled(model: Any) -> bool:
    # A torch.compile'd module implies torch._dynamo is imported; importing it just to
    # check would cost ~2 s on the first sparsify call.
    dynamo = sys.modules.get("torch._dynamo.eval_frame")
    return dynamo is not None and isinstance(model, dynamo.OptimizedModule)


def _check_model(model: Any) -> None:
    if _is_compiled(model):
        raise TypeError(
            "model is a torch.compile'd module; call nmfx.sparsify on the original module "
            "first, then torch.compile the result"
        )
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError(
            "model is a TorchScript module (torch.jit.script/trace); nmfx rewrites Python "
            "forwards: call nmfx.sparsify on the eager nn.Module, then script the result"
        )
    if not isinstance(model, nn.Module):
        raise TypeError(f"sparsify expects an nn.Module, got {type(model).__name__}")
    check_materialized(model)
    if is_sparsified(model):
        raise ValueError(
            "model is already sparsified by nmfx (it contains NMMasker modules); sparsify the "
            "original model once, or call nmfx.finalize first to bake the masks"
        )


@outside_inference_mode
def sparsify(
    model: nn.Module,
    config: SparsityConfig | None = None,
    *,
    passes: tuple[Pass, ...] = SPARSIFY_PASSES,
    init: str | None = None,
    calibration: Any = None,
    prune_options: dict[str, Any] | None = None,
    **options: Any,
) -> nn.Module:
    """Make ``model`` train N:M sparse with SR-STE; returns the same object, changed in place.

    Options are the fields of :class:`SparsityConfig` (``pattern="2:4"``,
    ``srste_lambda=2e-4``, ``exclude=[...]``, ...). Parameter names, shapes and
    ``state_dict`` keys are unchanged. Errors are raised before anything is changed.
    ``init="sparsegpt"`` (or ``"wanda"``, ``"magnitude"``) first prunes one-shot with
    ``nmfx.prune(model, pattern, init, calibration=calibration, **prune_options)``.
    """
    cfg = config_from_options(config, options)
    _check_model(model)
    if init is not None:  # one-shot pruning first; the masks then start from its zeros
        from nmfx.prune import prune

        prune(model, cfg.pattern, init, calibration=calibration, exclude=cfg.exclude,
              keep_output_dense=cfg.keep_output_dense, min_weight_numel=cfg.min_weight_numel,
              **(prune_options or {}))  # fmt: skip
    found = analyse(model, cfg, passes)
    plan = SparsityPlan(
        cfg, found.candidates, found.coverage, found.traced, found.trace_error, found.facts.capture
    )
    _warn_unused_excludes(cfg, found.candidates)
    if not found.installs:
        raise ValueError(
            "no layer of the model can be made N:M sparse with these options; nothing was "
            "changed. Reasons per layer:\n" + render_candidates(found.candidates)
        )
    model_state.install(model, found.installs, plan)
    ensure_optimizer_hook()
    log.info(
        "nmfx.sparsify: %d of %d weight ops N:M (%s)",
        len(plan.sparse),
        len(plan.candidates),
        cfg.pattern,
    )
    return model


def _warn_unused_excludes(cfg: SparsityConfig, candidates: list[Candidate]) -> None:
    """A glob or regex that matches no layer is most likely a typo: say so (never silent)."""
    for rule in cfg.exclude:
        if callable(rule) and not hasattr(rule, "pattern"):
            continue  # a callable may legitimately match nothing
        probe = SparsityConfig(exclude=(rule,))
        if not any(probe.is_excluded(c.name, c.param) for c in candidates):
            names = sorted({c.name for c in candidates})
            shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
            warnings.warn(
                f"nmfx.sparsify: exclude rule {getattr(rule, 'pattern', rule)!r} matches no layer "
                f"or weight name (layers: {shown}); check its spelling",
                UserWarning,
                stacklevel=3,
            )


def render_candidates(candidates: list[Candidate], fmt: str = "simple") -> str:
    rows = [
        (
            c.name,
            c.op,
            "x".join(map(str, c.shape)),
            str(c.dtype).replace("torch.", ""),
            c.verdict,
            c.reason,
        )
        for c in candidates
    ]
    from tabulate import tabulate  # lazy: only tables need it

    return tabulate(
        rows, headers=["layer", "op", "weight", "dtype", "verdict", "reason"], tablefmt=fmt
    )


@dataclass
class Summary:
    """What ``sparsify`` did to a model: per-layer verdicts and how each part was analysed."""

    plan: SparsityPlan

    @property
    def candidates(self) -> list[Candidate]:
        return self.plan.candidates

    def __str__(self) -> str:
        plan = self.plan
        sparse = plan.sparse
        n_sparse = sum(_numel(c.shape) for c in sparse)
        n_all = sum(_numel(c.shape) for c in plan.candidates)
        lines = [
            f"nmfx: {plan.config.pattern} SR-STE (lambda_W={plan.config.srste_lambda:g}, "
            f"mask_mode={plan.config.mask_mode}): {len(sparse)} of {len(plan.candidates)} weight ops N:M, "
            f"{n_sparse:,} of {n_all:,} weights in N:M layers",
            render_candidates(plan.candidates),
        ]
        if plan.whole_model_traced:
            failed = f" (torch.fx failed: {plan.trace_error})" if plan.trace_error else ""
            lines.append(f"coverage: whole model captured by {plan.capture}{failed}")
        else:
            lines.append(
                f"coverage: model not traceable as a whole ({plan.trace_error}); analysed per module"
            )
        counts: dict[str, int] = {}
        for cov in plan.coverage:
            counts[cov.how] = counts.get(cov.how, 0) + 1
        lines.append("  " + ", ".join(f"{n} module(s) {how}" for how, n in sorted(counts.items())))
        lines += [
            f"  untraceable: {c.module or '<root>'}: {c.detail}"
            for c in plan.coverage
            if c.how == "untraceable"
        ]
        return "\n".join(lines)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def summary(model: nn.Module) -> Any:
    """The plan ``sparsify`` recorded on ``model`` (a ``Summary``), or, for a model only
    pruned by ``nmfx.prune``, its ``PruneSummary``."""
    plan = model_state.get_plan(model)
    if plan is None and model_state.get_prune_summary(model) is not None:
        return model_state.get_prune_summary(model)
    if plan is None:
        raise ValueError(
            "model was not sparsified by nmfx.sparsify; call nmfx.sparsify(model) first"
        )
    return Summary(plan)
