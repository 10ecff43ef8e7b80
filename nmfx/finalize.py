"""``nmfx.finalize``: bake the masks into the weights and remove the SR-STE machinery.

The result is the user's own model again (module classes were never changed) whose
sparse weights are exactly N:M, plus a record of which weights are N:M — the input of
every lowering. A model nmfx did not train (an N:M checkpoint) is finalized by detection.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from nmfx.api import PLAN_ATTR, analyse, is_sparsified, mha_candidates
from nmfx.config import SparsityConfig
from nmfx.masks import is_nm
from nmfx.modules import NMMasker
from nmfx.passes import DETECT_PASSES
from nmfx.passes.detect_nm_weights import detect_pattern
from nmfx.pattern import NMPattern, parse_pattern
from nmfx.plan import Candidate, NMWeight

__all__ = ["detect_nm", "finalize", "nm_weights"]

log = logging.getLogger("nmfx")
NM_ATTR = "_nmfx_nm_weights"


def finalize(model: nn.Module, *, pattern: str | tuple[int, int] | None = None) -> nn.Module:
    """Bake masks (or detect N:M weights), verify every N:M weight, record them.

    Changes ``model`` in place and returns it. ``state_dict`` keys are unchanged. For a
    model nmfx did not sparsify, ``pattern`` checks one pattern instead of detecting.
    """
    if is_sparsified(model):
        record = _bake(model)
    else:
        record = detect_nm(model, pattern)
        if not record:
            raise ValueError(
                "no N:M weights found: the model was not sparsified by nmfx and no weight op's "
                "weight is N:M (M in 4, 8, 16, N/M <= 1/2) along its reduction dim; train it "
                "with nmfx.sparsify first, or pass pattern='2:4' to check a specific pattern"
            )
    record_nm(model, record)
    log.info("nmfx.finalize: %d N:M weights", len(record))
    return model


def record_nm(model: nn.Module, record: dict[str, NMWeight]) -> None:
    """Keep ``record`` (verified N:M weights) on ``model`` for lowering and reports."""
    model.__dict__[NM_ATTR] = record


def nm_weights(model: nn.Module) -> dict[str, NMWeight]:
    """The N:M record of a finalized model (detected on the fly for other models)."""
    record = model.__dict__.get(NM_ATTR)
    return dict(record) if record is not None else detect_nm(model)


@torch.no_grad()
def _bake(model: nn.Module) -> dict[str, NMWeight]:
    plan = model.__dict__.get(PLAN_ATTR)
    by_param = {c.param: c for c in plan.candidates} if plan is not None else {}
    owners = dict(model.named_modules())
    work = []
    for fqn, masker in list(owners.items()):
        if not isinstance(masker, NMMasker):
            continue
        owner_fqn, _, attr = fqn.rpartition(".")
        weight = masker.weight
        baked = torch.where(masker.current_mask(), weight, 0)
        pattern = NMPattern(masker.n, masker.m)
        if not is_nm(baked, pattern, masker.reduce_dim):  # cannot happen unless a bug
            raise RuntimeError(f"{fqn}: baked weight is not {pattern}; the model was not changed")
        param = f"{owner_fqn}.{masker.param_name}" if owner_fqn else masker.param_name
        cand = by_param.get(param)
        record = NMWeight(param, cand.name if cand else param, cand.op if cand else "unknown",
                          pattern, masker.reduce_dim)  # fmt: skip
        work.append((owners[owner_fqn], attr, weight, baked, record))
    for owner, attr, weight, baked, _ in work:  # verified: now change the model
        weight.copy_(baked)
        del owner._modules[attr]
        owner.__dict__.pop("forward", None)
    return {r.param: r for *_, r in work}


def detect_nm(
    model: nn.Module, pattern: str | tuple[int, int] | None = None
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
    fqn: str, mha: nn.MultiheadAttention, cfg: Any, facts: Any, traced: bool
) -> tuple[list[Candidate], None]:
    wanted = facts.graph.graph.get("detect_pattern")
    cands = mha_candidates(fqn, mha)
    for cand in cands:
        weight = mha.get_parameter(cand.local_param)
        if wanted is not None:
            cand.facts["nm"] = wanted if is_nm(weight, wanted, 1) else None
        else:
            cand.facts["nm"] = detect_pattern(weight, 1)
    return cands, None
