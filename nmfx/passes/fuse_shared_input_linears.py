"""Backend pass: packed N:M linears that read the same input -> one packed call, then slices.

A transformer block reads its normed hidden state three times (q, k, v projections) and its
MLP input twice (gate, up). After ``lower_nm_linear`` each is its own ``nmfx::nm_linear``
call; at decode (one row of x) each call streams its weight once and pays the op's fixed
cost (dispatch, thread fork/join, the small k/v projections running below the memory
bandwidth). Their packed weights are rows of one longer packed weight (the format is row by
row), so this pass concatenates them and emits one call whose output columns are sliced
back: ``y = nm_linear(x, [Wq; Wk; Wv]) -> y[..., :q], y[..., q:q+k], ...``. Biases, when
every member has one, are concatenated in the graph.

Runs after ``lower_nm_linear`` (it only sees its packed calls) on CPU graphs.

``group_packed_calls`` does the same for a graph of a model already lowered by ``nmfx.lower``
(``nmfx.hf.fast_generate``'s compiled step, whose calls read the model's own packed buffers),
without copying a weight: the calls become one ``nmfx_cpu::nm_linear_group`` call, which stages x
once and runs the members' rows in one parallel region (``nmfx/csrc/nm_linear_op.cpp``). Fused members
must share the input node, the pattern, the dtype and in_features, and have all or no bias.
The fused weight is tuned (``autotune``) as its own shape and its choices travel in the
call's ``dispatch`` argument. Each member's ``LayerDecision`` says what it was fused with.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import fx

from nmfx.passes.infra import PassResult, eliminate_dead_code, log
from nmfx.passes.lower_nm_linear import BackendContext, _add_constant

_ARGS = ("x", "values", "mask", "bias", "rows", "cols", "n", "m")


def _nm_linear() -> torch._ops.OpOverload:
    import nmfx.ops  # noqa: F401  (registers the op)

    return torch.ops.nmfx.nm_linear.default


def _call_args(node: fx.Node) -> dict | None:
    """The packed call's arguments by name when ``node`` is a fusible ``nm_linear`` call
    (weights as graph constants, bias absent or a graph input/constant); else None."""
    if node.op != "call_function" or node.target is not _nm_linear() or node.kwargs:
        return None
    if len(node.args) not in (len(_ARGS), len(_ARGS) + 1):
        return None
    args = dict(zip(_ARGS, node.args, strict=False))
    if not all(
        isinstance(args[k], fx.Node) and args[k].op == "get_attr" for k in ("values", "mask")
    ):
        return None
    bias = args["bias"]
    if bias is not None and (
        not isinstance(bias, fx.Node) or bias.op not in ("placeholder", "get_attr")
    ):
        return None
    return args


def _groups(gm: fx.GraphModule) -> list[list[tuple[fx.Node, dict]]]:
    """Fusible calls grouped by (input node, n, m, cols, dtype, has bias), in graph order."""
    by_key: dict[tuple, list[tuple[fx.Node, dict]]] = defaultdict(list)
    for node in gm.graph.nodes:
        args = _call_args(node)
        if args is None:
            continue
        values = gm.get_buffer(args["values"].target)
        key = (args["x"], args["n"], args["m"], args["cols"], values.dtype, args["bias"] is None)
        by_key[key].append((node, args))
    return [group for group in by_key.values() if len(group) > 1]


def _fused_weight(gm: fx.GraphModule, group: list[tuple[fx.Node, dict]]) -> tuple:
    """``(values, mask, dispatch)`` of the members' packed weights stacked row-wise."""
    from nmfx.kernels import autotune, encode_choices
    from nmfx.packed import PackedNM
    from nmfx.pattern import NMPattern

    first = group[0][1]
    rows = [args["rows"] for _, args in group]
    values = torch.cat([gm.get_buffer(a["values"].target) for _, a in group])
    mask = torch.cat([gm.get_buffer(a["mask"].target) for _, a in group])
    packed = PackedNM(
        values=values, mask=mask, shape=(sum(rows), first["cols"]),
        pattern=NMPattern(first["n"], first["m"]),
    )  # fmt: skip
    choices = next(iter(autotune([packed], progress=False).values()))
    return packed.values, packed.mask, encode_choices(choices)


def _fuse(gm: fx.GraphModule, group: list[tuple[fx.Node, dict]], index: int) -> None:
    first_node, first = group[0]
    values, mask, dispatch = _fused_weight(gm, group)
    _add_constant(gm, f"_nmfx_fused_{index}_values", values)
    _add_constant(gm, f"_nmfx_fused_{index}_mask", mask)
    graph = gm.graph
    with graph.inserting_before(first_node):
        v = graph.get_attr(f"_nmfx_fused_{index}_values")
        mk = graph.get_attr(f"_nmfx_fused_{index}_mask")
        bias = None
        if first["bias"] is not None:
            bias = graph.call_function(torch.cat, ([a["bias"] for _, a in group],))
        total = sum(a["rows"] for _, a in group)
        fused = graph.call_function(
            _nm_linear(), (first["x"], v, mk, bias, total, first["cols"], first["n"], first["m"], dispatch)
        )  # fmt: skip
        fused.meta = {k: v for k, v in first_node.meta.items() if k != "example_value"}
        start = 0
        for node, args in group:
            part = graph.call_function(torch.narrow, (fused, -1, start, args["rows"]))
            part.meta = {k: v for k, v in node.meta.items() if k != "example_value"}
            node.replace_all_uses_with(part)
            start += args["rows"]
    for node, _ in group:
        graph.erase_node(node)


def _drop_unused_constants(gm: fx.GraphModule, names: set[str]) -> None:
    """Free the members' own packed weights once no node reads them (else held twice)."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    sources = getattr(gm, "_param_name_to_source", None)
    for name in names - used:
        del gm._buffers[name]
        if sources is not None:
            sources.pop(name, None)


def _note(ctx: BackendContext, group: list[tuple[fx.Node, dict]]) -> None:
    """Each member's decision says which call it runs in."""
    indices = [node.meta.get("nmfx_decision") for node, _ in group]
    names = [ctx.decisions[i].name for i in indices if i is not None]
    total = sum(args["rows"] for _, args in group)
    for i in indices:
        if i is not None:
            others = ", ".join(n for n in names if n != ctx.decisions[i].name)
            ctx.decisions[
                i
            ].reason += (
                f"; fused with {others} (same input): one {total}x{group[0][1]['cols']} call"
            )


def fuse_shared_input_linears(gm: fx.GraphModule, ctx: BackendContext) -> PassResult:
    """Fuse the packed ``nm_linear`` calls that share an input into one call per group."""
    if ctx.target != "cpu" or not ctx.fuse_linears:
        return PassResult(gm, False)
    groups = _groups(gm)
    members = {a[k].target for g in groups for _, a in g for k in ("values", "mask")}
    for index, group in enumerate(groups):
        _note(ctx, group)
        _fuse(gm, group, index)
    if groups:
        eliminate_dead_code(gm)
        _drop_unused_constants(gm, members)
        gm.recompile()
    log.debug("fuse_shared_input_linears: %d groups of %d calls", len(groups),
              sum(map(len, groups)))  # fmt: skip
    return PassResult(gm, bool(groups))


# ---- a lowered model's calls of the C++ op: one nm_linear_group call per shared input ----


def _cpp_call_args(node: fx.Node) -> dict | None:
    """The call's arguments by name when ``node`` calls ``nmfx_cpu::nm_linear`` without a
    bias, with constant sizes and dispatch code; else None."""
    if node.op != "call_function" or node.kwargs or len(node.args) != len(_ARGS) + 1:
        return None
    op = getattr(torch.ops.nmfx_cpu, "nm_linear", None)
    if op is None or node.target not in (op, op.default):
        return None
    args = dict(zip((*_ARGS, "dispatch"), node.args, strict=True))
    ints = ("rows", "cols", "n", "m", "dispatch")
    if args["bias"] is not None or not all(type(args[k]) is int for k in ints):
        return None
    if not all(isinstance(args[k], fx.Node) for k in ("x", "values", "mask")):
        return None
    return args


def group_packed_calls(gm: fx.GraphModule) -> int:
    """Replace the bias-free ``nmfx_cpu::nm_linear`` calls that share their input (and
    pattern and in_features) by one ``nmfx_cpu::nm_linear_group`` call each; returns how many
    groups. Each member's output is the group's output of the same index (bit-identical to its
    own call: nm_linear_op.cpp)."""
    if not hasattr(torch.ops.nmfx_cpu, "nm_linear_group"):
        return 0
    import operator

    by_key: dict[tuple, list[tuple[fx.Node, dict]]] = defaultdict(list)
    for node in gm.graph.nodes:
        args = _cpp_call_args(node)
        if args is not None:
            by_key[(args["x"], args["cols"], args["n"], args["m"])].append((node, args))
    groups = [g for g in by_key.values() if len(g) > 1]
    graph = gm.graph
    for group in groups:
        first_node, first = group[0]
        with graph.inserting_before(first_node):
            call = graph.call_function(
                torch.ops.nmfx_cpu.nm_linear_group.default,
                (first["x"], [a["values"] for _, a in group], [a["mask"] for _, a in group],
                 [a["rows"] for _, a in group], first["cols"], first["n"], first["m"],
                 [a["dispatch"] for _, a in group]),
            )  # fmt: skip
            for i, (node, _) in enumerate(group):
                part = graph.call_function(operator.getitem, (call, i))
                part.meta = dict(node.meta)
                node.replace_all_uses_with(part)
        for node, _ in group:
            graph.erase_node(node)
    if groups:
        gm.recompile()
    log.debug("group_packed_calls: %d groups of %d calls", len(groups), sum(map(len, groups)))
    return len(groups)
