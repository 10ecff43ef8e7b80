"""Detect which candidate weights already are N:M (checkpoints nmfx did not train)."""

from __future__ import annotations

import torch
from torch import fx

from nmfx.masks import is_nm
from nmfx.passes.infra import PassContext, PassResult, log
from nmfx.pattern import NMPattern
from nmfx.plan import Candidate

DETECT_MS = (4, 8, 16)


@torch.no_grad()
def detect_pattern(weight: torch.Tensor, reduce_dim: int) -> NMPattern | None:
    """The sparsest N:M (M in 4, 8, 16; N/M <= 1/2) that ``weight`` satisfies along
    ``reduce_dim``, ties going to the smaller M; None when there is none."""
    if not weight.is_floating_point() or weight.numel() == 0 or weight.device.type == "meta":
        return None
    best: NMPattern | None = None
    k = weight.shape[reduce_dim]
    nonzero = weight.detach() != 0
    for m in DETECT_MS:
        if k % m:
            continue
        groups = nonzero.movedim(reduce_dim, -1).reshape(-1, m)
        n = max(int(groups.sum(-1).max()), 1)
        if 2 * n > m:
            continue
        if best is None or n / m < best.n / best.m:
            best = NMPattern(n, m)
    return best


def detect_nm_weights(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Analysis only: ``cand.facts["nm"]`` = the detected pattern (or the configured one,
    checked) for every candidate with a known reduction dim."""
    wanted = ctx.detect_pattern
    for cand in ctx.candidates:
        cand.facts["nm"] = _detect(gm, cand, wanted)
    log.debug("detect_nm_weights: %s: %d N:M", ctx.fqn or "<root>",
              sum(c.facts["nm"] is not None for c in ctx.candidates))  # fmt: skip
    return PassResult(gm, False)


def _detect(gm: fx.GraphModule, cand: Candidate, wanted: NMPattern | None) -> NMPattern | None:
    if cand.reduce_dim is None or cand.groups != 1:
        return None
    weight = gm.get_parameter(cand.local_param)
    if wanted is not None:
        return wanted if is_nm(weight, wanted, cand.reduce_dim) else None
    return detect_pattern(weight, cand.reduce_dim)
