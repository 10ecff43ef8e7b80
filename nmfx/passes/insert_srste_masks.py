"""Rewrite: feed each sparse op ``masker(weight)`` instead of ``weight``.

Before: ``w = get_attr weight; y = linear(x, w, b)``.
After:  ``w = get_attr weight; w_nm = call_module _nmfx_weight(w); y = linear(x, w_nm, b)``.
The weight node itself is untouched, so other users (``w.shape``, ...) still see the
original parameter, and the parameter keeps its name.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import fx, nn

from nmfx.modules import NMMasker
from nmfx.passes.infra import PassContext, PassResult, eliminate_dead_code, log


def masker_name(module: nn.Module, local_param: str, taken: Mapping[str, NMMasker]) -> str:
    """The attribute name of ``local_param``'s masker on ``module``: ``_nmfx_<param>`` with
    dots as underscores, suffixed where that is already another masker's name or an
    attribute of the module (``ws.0`` of a ParameterList and a parameter ``ws_0``)."""
    for name, masker in taken.items():
        if masker.param_name == local_param:
            return name  # the eval-mode graph of a module reuses the train-mode graph's masker
    base = name = "_nmfx_" + local_param.replace(".", "_")
    i = 1
    while name in taken or hasattr(module, name):
        name, i = f"{base}_{i}", i + 1
    return name


def insert_srste_masks(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Insert an ``NMMasker`` call between every sparse candidate and its weight."""
    nodes = {n.name: n for n in gm.graph.nodes}
    todo = [c for c in ctx.candidates if c.sparse]
    for cand in todo:
        node_name, operand_name = ctx.sites[id(cand)]
        op_node, operand = nodes[node_name], nodes[operand_name]
        weight_node = next(
            n for n in gm.graph.nodes if n.op == "get_attr" and n.target == cand.local_param
        )
        name = masker_name(ctx.module, cand.local_param, ctx.maskers)
        cfg = ctx.config
        masker = ctx.maskers.get(name) or NMMasker(
            ctx.module, cand.local_param, cfg.pattern.n, cfg.pattern.m, cand.reduce_dim,
            cfg.srste_lambda, cfg.mask_mode, cfg.mask_interval,
        )  # fmt: skip
        gm.add_submodule(name, masker)
        ctx.maskers[name] = masker
        with gm.graph.inserting_after(weight_node):
            masked = gm.graph.call_module(name, (weight_node,))
        masked.meta = {**weight_node.meta, "nmfx_masked": cand.param}
        # Through a transpose, the transpose now reads the masked weight.
        (operand if operand is not weight_node else op_node).replace_input_with(weight_node, masked)
    if todo:
        eliminate_dead_code(gm)
        gm.recompile()
    log.debug("insert_srste_masks: %s: %d masks inserted", ctx.fqn or "<root>", len(todo))
    return PassResult(gm, bool(todo))
