"""Find every op in a module's own graph that reduces over a weight parameter."""

from __future__ import annotations

from torch import fx

from nmfx.passes.infra import PassContext, PassResult, log
from nmfx.plan import Candidate
from nmfx.weight_ops import find_weight_uses


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def find_weight_ops(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Analysis only: one ``Candidate`` per (op, weight), recorded in ``ctx`` and node meta."""
    uses = find_weight_uses(gm)
    for use in uses:
        weight = gm.get_parameter(use.target)
        layer_like = use.target == "weight" and use.op in ("linear", "conv1d", "conv2d", "conv3d")
        param = _join(ctx.fqn, use.target)
        cand = Candidate(
            name=(ctx.fqn or "<root>") if layer_like else param,
            param=param,
            owner=ctx.fqn,
            local_param=use.target,
            op=use.op,
            shape=tuple(weight.shape),
            dtype=weight.dtype,
            reduce_dim=use.reduce_dim,
            groups=use.groups,
        )
        cand.facts["why_unknown"] = use.why_unknown
        cand.facts["uses_in_forward"] = sum(u.target == use.target for u in uses)
        use.node.meta.setdefault("nmfx_candidates", []).append(cand)
        ctx.sites[id(cand)] = (use.node.name, use.operand.name if use.operand else None)
        ctx.candidates.append(cand)
    log.debug("find_weight_ops: %s: %d weight ops", ctx.fqn or "<root>", len(uses))
    return PassResult(gm, False)
