"""Give every candidate a verdict and a reason. Never skip silently."""

from __future__ import annotations

import torch
from torch import fx

from nmfx.passes.infra import PassContext, PassResult, log
from nmfx.plan import DENSE, SPARSE, Candidate

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _dim_label(cand: Candidate) -> str:
    if cand.op == "linear" or cand.op.startswith("mha"):
        return "in_features"
    if cand.op.startswith("conv"):
        return "in_channels"
    return f"dim {cand.reduce_dim}"


def dense_reason(cand: Candidate, ctx: PassContext) -> str | None:
    """Why ``cand`` must stay dense, or None when it can be N:M. First reason wins."""
    cfg, m = ctx.config, ctx.config.pattern.m
    rule = cfg.is_excluded(cand.name, cand.param)
    if rule is not None:
        return f"excluded by the user (rule {getattr(rule, 'pattern', rule)!r})"
    if cand.dtype not in _SUPPORTED_DTYPES:
        return f"dtype {cand.dtype} is not a floating-point weight; N:M needs fp32/fp16/bf16"
    if 0 in cand.shape:
        return f"empty weight (shape {cand.shape})"
    if cand.groups != 1:
        return f"grouped/depthwise conv (groups={cand.groups}); N:M needs groups=1"
    if cand.reduce_dim is None:
        return cand.facts.get("why_unknown") or "reduction dim of the weight is ambiguous"
    if ctx.forward_defaults:
        args = ", ".join(ctx.forward_defaults)
        return (
            f"{type(ctx.module).__name__}.forward has optional arguments ({args}) that an FX "
            f"rewrite would specialise; move the op into an nn.Linear or exclude it"
        )
    k = cand.shape[cand.reduce_dim]
    if k % m:
        return f"{_dim_label(cand)}={k} is not a multiple of M={m}; exclude it or pad it"
    others = [c or "<root>" for c in ctx.facts.consumers(cand.param) if c != cand.owner]
    if cand.facts.get("uses_in_forward", 1) > 1:
        return f"weight used by {cand.facts['uses_in_forward']} ops in {ctx.fqn or '<root>'}.forward (shared)"
    aliases = ctx.facts.tied_with(cand.param)
    if aliases:
        return f"weight shared with {', '.join(aliases)} (tied); N:M would also prune the other use"
    if others:
        return f"weight also consumed by {', '.join(others[:3])} (shared); N:M would change that use too"
    if cfg.keep_output_dense and _is_output(cand, ctx):
        how = (
            ""
            if ctx.whole_model_traced
            else " (by registration order: the model is not traceable as a whole)"
        )
        return f"produces the model output{how}; pass keep_output_dense=False to sparsify it"
    numel = 1
    for s in cand.shape:
        numel *= s
    if numel < cfg.min_weight_numel:
        return f"{numel} weights < min_weight_numel={cfg.min_weight_numel}"
    return None


def _is_output(cand: Candidate, ctx: PassContext) -> bool:
    if ctx.whole_model_traced:
        return ctx.facts.is_output_weight(cand.param)
    return cand.param == ctx.last_weight


def decide_eligibility(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Analysis only: sets ``verdict`` and ``reason`` on ``ctx.candidates``."""
    for cand in ctx.candidates:
        reason = dense_reason(cand, ctx)
        if reason is None:
            p = ctx.config.pattern
            cand.verdict, cand.reason = SPARSE, f"{p} along {_dim_label(cand)}"
        else:
            cand.verdict, cand.reason = DENSE, reason
    log.debug(
        "decide_eligibility: %s: %d sparse of %d",
        ctx.fqn or "<root>",
        sum(c.sparse for c in ctx.candidates),
        len(ctx.candidates),
    )
    return PassResult(gm, False)
