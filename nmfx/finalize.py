"""``nmfx.finalize``: bake the masks into the weights and remove the SR-STE machinery.

The result is the user's own model again (module classes were never changed) whose
sparse weights are exactly N:M, plus a plain-data record of which weights are N:M — the
input of every lowering (``nmfx.model_state`` says what that record is). A model nmfx did
not train (an N:M checkpoint) is finalized by detection.
"""

from __future__ import annotations

import logging
import weakref

import torch
from torch import nn

from nmfx import model_state
from nmfx.analysis import analyse, mha_candidates
from nmfx.config import SparsityConfig
from nmfx.masks import is_nm
from nmfx.passes import DETECT_PASSES, PassContext
from nmfx.passes.detect_nm_weights import detect_pattern
from nmfx.pattern import NMPattern, parse_pattern
from nmfx.plan import Candidate, NMWeight

__all__ = ["detect_nm", "finalize", "nm_weights"]

log = logging.getLogger("nmfx")


def finalize(model: nn.Module, *, pattern: str | tuple[int, int] | None = None) -> nn.Module:
    """Bake masks (or detect N:M weights), verify every N:M weight, record them.

    Changes ``model`` in place and returns it. ``state_dict`` keys are unchanged. For a
    model nmfx did not sparsify, ``pattern`` checks one pattern instead of detecting; for
    a sparsified one it must be the pattern it was sparsified with.
    """
    wanted = parse_pattern(pattern) if pattern is not None else None
    if model_state.is_sparsified(model):
        plan = model_state.get_plan(model)
        removed = [(weakref.ref(m), m.weight.nbytes) for _, m in model_state.maskers(model)]
        record = _bake(model, wanted)
        layers = plan.candidates if plan is not None else None
        _release_maskers(removed)
    else:
        record = detect_nm(model, wanted)
        layers = None
        if not record and model_state.nm_record(model) is None:
            raise ValueError(
                "no N:M weights found: the model was not sparsified by nmfx and no weight op's "
                "weight is N:M (M in 4, 8, 16, N/M <= 1/2) along its reduction dim; train it "
                "with nmfx.sparsify first, or pass pattern='2:4' to check a specific pattern"
            )
    model_state.set_nm_record(model, record, layers)
    log.info("nmfx.finalize: %d N:M weights", len(model_state.nm_record(model) or {}))
    return model


def _release_maskers(removed: list[tuple[weakref.ref, int]]) -> None:
    """Hand the removed maskers' masks and buffers back to the OS.

    Nothing of nmfx's keeps a removed masker (sparsify tears down its temporary GraphModules,
    ``analysis._discard``), so they are freed as ``uninstall`` drops them, with no full
    collection. One still alive is held by a reference cycle of someone else's; from
    ``memory.COLLECT_FROM_BYTES`` of such masked weights a full collection runs.
    """
    from nmfx.lowering.memory import release_dropped

    release_dropped(removed)


def nm_weights(model: nn.Module) -> dict[str, NMWeight]:
    """The N:M record of a finalized model (detected on the fly for other models)."""
    record = model_state.nm_record(model)
    return record if record is not None else detect_nm(model)


@torch.no_grad()
def _bake(model: nn.Module, wanted: NMPattern | None) -> dict[str, NMWeight]:
    plan = model_state.get_plan(model)
    by_param = {c.param: c for c in plan.candidates} if plan is not None else {}
    work = []
    for owner_fqn, masker in model_state.maskers(model):
        pattern = NMPattern(masker.n, masker.m)
        param = f"{owner_fqn}.{masker.param_name}" if owner_fqn else masker.param_name
        if wanted is not None and wanted != pattern:
            raise ValueError(
                f"finalize(pattern={str(wanted)!r}) but {param} was sparsified with "
                f"{pattern}; pass pattern={str(pattern)!r} or leave it out. Nothing was changed"
            )
        weight, mask = masker.weight, masker.current_mask()
        # One baked copy at a time (all of them at once were 2.4x a 22-layer Llama's weights)
        if not is_nm(torch.where(mask, weight, 0), pattern, masker.reduce_dim):  # a bug if so
            raise RuntimeError(f"{param}: baked weight is not {pattern}; the model was not changed")
        cand = by_param.get(param)
        record = NMWeight(param, cand.name if cand else param, cand.op if cand else "unknown",
                          pattern, masker.reduce_dim)  # fmt: skip
        work.append((weight, mask, record))
    for weight, mask, _ in work:  # verified: now change the model (as torch.where above)
        weight.masked_fill_(mask.logical_not(), 0)
    model_state.uninstall(model)
    return {r.param: r for *_, r in work}


def detect_nm(
    model: nn.Module, pattern: str | tuple[int, int] | NMPattern | None = None
) -> dict[str, NMWeight]:
    """Every weight op's weight that already is N:M, found by the detection pass."""
    wanted = parse_pattern(pattern) if pattern is not None else None
    found = analyse(
        model, SparsityConfig(), DETECT_PASSES, native=_detect_mha, detect_pattern=wanted
    )
    out = {}
    for cand in found.candidates:
        nm = cand.facts.get("nm")
        if nm is not None and cand.param not in out and not found.facts.tied_with(cand.param):
            out[cand.param] = NMWeight(cand.param, cand.name, cand.op, nm, cand.reduce_dim)
    return out


def _detect_mha(
    fqn: str, mha: nn.MultiheadAttention, ctx: PassContext
) -> tuple[list[Candidate], None]:
    wanted = ctx.detect_pattern
    cands = mha_candidates(fqn, mha)
    for cand in cands:
        weight = mha.get_parameter(cand.local_param)
        if wanted is not None:
            cand.facts["nm"] = wanted if is_nm(weight, wanted, 1) else None
        else:
            cand.facts["nm"] = detect_pattern(weight, 1)
    return cands, None
