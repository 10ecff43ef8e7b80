"""Backend pass: ``linear(x, W, b)`` with an N:M weight -> the target's sparse form of it.

Runs on the graph Dynamo hands ``backend="nmfx"``. The weight operand may be a parameter
(a placeholder or get_attr) or any computation on parameters only — e.g. the inlined
SR-STE masker of a sparsified model — which is folded at compile time. Weights are thus
frozen into the compiled graph, like inductor's ``freezing``: the pass only runs when
grad mode is off at compile time (Dynamo guards on it) or the weights do not require grad;
the backend re-lowers when a frozen weight changes (``ctx.frozen`` lists them).

This pass only finds linears and folds their weights. What a weight becomes on each target
— eligibility, checks, conversion, the ``LayerDecision`` — is the target's own conversion
in ``nmfx.lowering`` (``cpu_decision``, ``cuda_weight_decision``), the same code
``nmfx.lower`` runs, so the two cannot disagree.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from nmfx.masks import is_nm
from nmfx.passes.detect_nm_weights import detect_pattern
from nmfx.passes.infra import PassResult, eliminate_dead_code, log
from nmfx.pattern import NMPattern
from nmfx.plan import DENSE, LayerDecision

_LINEAR = torch._C._nn.linear
_MATMUL = (torch.matmul, operator.matmul, torch.mm)


def _as_linear(node: fx.Node) -> tuple[Any, Any, Any, bool, str] | None:
    """``(x, weight, bias, transposed, op)`` when ``node`` computes a linear layer:
    ``linear(x, W, b)``, ``addmm(b, x, W)`` (GPT-2 ``Conv1D``, W is ``[in, out]``) or
    ``x @ W``; None otherwise."""
    if node.op != "call_function":
        return None
    args = node.args
    if node.target is _LINEAR:
        bias = args[2] if len(args) > 2 else node.kwargs.get("bias")
        return args[0], args[1], bias, False, "linear"
    if node.target is torch.addmm and len(args) == 3 and not node.kwargs:
        return args[1], args[2], args[0], True, "addmm"
    if node.target in _MATMUL and len(args) == 2 and not node.kwargs:
        return args[0], args[1], None, True, "matmul"
    return None


@dataclass
class BackendContext:
    """What the backend passes read: example inputs, target, options; decisions written."""

    example_inputs: list[Any]
    target: str = "cpu"
    pattern: Any = None  # restrict detection to one NMPattern
    cuda_backend: str = "cutlass"  # semi-structured kernels for target "cuda"
    fqn: str = "<dynamo graph>"
    decisions: list[LayerDecision] = field(default_factory=list)
    # (placeholder index, parameter, its _version) of every weight frozen into the graph
    frozen: list[tuple[int, torch.Tensor, int]] = field(default_factory=list)
    # the parameter each decision is about (by decision index), for per-model bookkeeping
    params: dict[int, torch.Tensor] = field(default_factory=dict)
    # placeholder name -> parameter FQN, read before Dynamo strips the graph's sources
    sources: dict[str, str] = field(default_factory=dict)
    fuse_linears: bool = True  # fuse_shared_input_linears: one packed call per shared input


def _leaves(node: fx.Node) -> Iterator[fx.Node]:
    """The nodes ``node`` is computed from that have no inputs (placeholders, get_attr), or
    any node that is not a function/method call (where folding must stop)."""
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op in ("call_function", "call_method"):
            stack += n.all_input_nodes
        else:
            yield n


def _parameter_only(node: fx.Node, values: dict[fx.Node, Any]) -> bool:
    """True when every leaf that ``node`` depends on is a parameter (foldable)."""
    return all(
        n.op == "get_attr" or (n.op == "placeholder" and isinstance(values.get(n), nn.Parameter))
        for n in _leaves(node)
    )


def _needs_grad(node: fx.Node, values: dict[fx.Node, Any]) -> bool:
    return any(getattr(values.get(n), "requires_grad", False) for n in _leaves(node))


@torch.no_grad()
def _fold(node: fx.Node, values: dict[fx.Node, Any], gm: fx.GraphModule) -> torch.Tensor:
    """Evaluate ``node`` from parameter values (the sub-graph is parameter-only)."""
    env: dict[fx.Node, Any] = {}

    def run(n: fx.Node) -> None:  # inputs are already in env (post-order below)
        args = fx.node.map_arg(n.args, lambda a: env[a])
        kwargs = fx.node.map_arg(n.kwargs, lambda a: env[a])
        if n.op == "placeholder":
            out = values[n]
        elif n.op == "get_attr":
            out = operator.attrgetter(n.target)(gm)
        elif n.op == "call_method":
            out = getattr(args[0], n.target)(*args[1:], **kwargs)
        else:
            out = n.target(*args, **kwargs)
        env[n] = out

    # iterative post-order to avoid deep recursion on long chains
    order, stack, seen = [], [node], set()
    while stack:
        n = stack[-1]
        pending = [i for i in n.all_input_nodes if i not in seen]
        if pending:
            stack += pending
            continue
        stack.pop()
        if n not in seen:
            seen.add(n)
            order.append(n)
    for n in order:
        run(n)
    return env[node].detach()


_SOURCE_STEPS = re.compile(r"\._(?:modules|parameters|buffers)\['([^']*)'\]|\['([^']*)'\]|\.(\w+)")


def _source_fqn(node: fx.Node) -> str | None:
    """``b.weight`` for a Dynamo placeholder whose source is
    ``L['self']._modules['b']._parameters['weight']`` (or a get_attr target); else None."""
    if node.op == "get_attr":
        return str(node.target)
    arg = node.meta.get("grapharg")
    source = getattr(arg, "source", None)
    if source is None:
        return None
    text = source.name if isinstance(source.name, str) else source.name()
    root = re.match(r"L\['[^']*'\]", text)
    if root is None:
        return None
    parts = [
        next(g for g in m.groups() if g is not None)
        for m in _SOURCE_STEPS.finditer(text[root.end() :])
    ]
    return ".".join(parts) or None


def source_fqns(gm: fx.GraphModule) -> dict[str, str]:
    """Placeholder name -> parameter FQN for every placeholder Dynamo gave a source."""
    names = {n.name: _source_fqn(n) for n in gm.graph.nodes if n.op == "placeholder"}
    return {k: v for k, v in names.items() if v is not None}


def _weight_param(
    w_node: fx.Node, values: dict[fx.Node, Any], sources: dict[str, str]
) -> tuple[str, str, torch.Tensor | None, int | None]:
    """``(layer name, weight FQN, parameter, placeholder index)`` of the one parameter a
    (possibly masked) weight is computed from; the node's own name when it has none."""
    placeholders = list(values)
    for leaf in _leaves(w_node):
        fqn = sources.get(leaf.name) or _source_fqn(leaf)
        value = values.get(leaf)
        if fqn is not None and (leaf.op == "get_attr" or isinstance(value, nn.Parameter)):
            index = placeholders.index(leaf) if leaf in values else None
            name = fqn[: -len(".weight")] if fqn.endswith(".weight") else fqn
            return name, fqn, value if isinstance(value, torch.Tensor) else None, index
    return w_node.name, w_node.name, None, None


def lower_nm_linear(gm: fx.GraphModule, ctx: BackendContext) -> PassResult:
    """Replace every N:M linear with its sparse form for ``ctx.target``; record a decision
    per linear. cpu: the packed ``nmfx::nm_linear`` op; cuda: ``F.linear`` on a
    semi-structured sparse weight (``torch.sparse.to_sparse_semi_structured``)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    values = dict(zip(placeholders, ctx.example_inputs, strict=False))
    count = 0
    for node in list(gm.graph.nodes):
        found = _as_linear(node)
        if found is None:
            continue
        x, w_node, bias, transposed, op = found
        if not isinstance(w_node, fx.Node) or not _parameter_only(w_node, values):
            if op == "linear":  # matmul/addmm of two activations are not layers: no row
                ctx.decisions.append(LayerDecision(
                    node.name, node.name, op, ctx.target, DENSE,
                    "weight is computed from activations, not from parameters",
                ))  # fmt: skip
            continue
        name, param, source, index = _weight_param(w_node, values, ctx.sources)
        if source is not None:
            ctx.params[len(ctx.decisions)] = source
        if torch.is_grad_enabled() and _needs_grad(w_node, values):
            reason = "grad mode is on and the weight requires grad: not frozen (compile under torch.no_grad())"
            ctx.decisions.append(LayerDecision(name, param, op, ctx.target, DENSE, reason))
            continue
        weight = _fold(w_node, values, gm)
        if weight.dim() != 2:
            ctx.params.pop(len(ctx.decisions), None)
            continue
        if transposed:  # x @ W with W [in, out] is linear(x, W.T)
            weight = weight.t().contiguous()
        if index is not None:
            ctx.frozen.append((index, source, source._version))
        build = _sparse_cpu if ctx.target == "cpu" else _sparse_cuda
        decision, target, constants, extra = build(name, param, op, weight, ctx)
        ctx.decisions.append(decision)
        if target is None:
            continue
        with gm.graph.inserting_before(node):
            attrs = []
            for i, tensor in enumerate(constants):
                _add_constant(gm, f"_nmfx_sparse_{count}_{i}", tensor)
                attrs.append(gm.graph.get_attr(f"_nmfx_sparse_{count}_{i}"))
            # cpu: nm_linear(x, values, mask, b, rows, cols, n, m, dispatch);
            # cuda: linear(x, W_sparse, b)
            new = gm.graph.call_function(target, (x, *attrs, bias, *extra))
        new.meta = dict(node.meta)
        new.meta["nmfx_decision"] = len(ctx.decisions) - 1  # for later passes' notes
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        count += 1
    if count:
        eliminate_dead_code(gm)
        gm.recompile()
    log.debug("lower_nm_linear: %d linears lowered for %s", count, ctx.target)
    return PassResult(gm, bool(count))


def _pattern(weight: torch.Tensor, ctx: BackendContext) -> NMPattern | None:
    """The weight's N:M pattern along in_features: detected, or ``ctx.pattern`` if it holds."""
    if ctx.pattern is None:
        return detect_pattern(weight, 1)
    return ctx.pattern if is_nm(weight, ctx.pattern, 1) else None


Built = tuple[LayerDecision, Any, list, tuple]  # (decision, op or None, constants, extra args)


def _sparse_cpu(name: str, param: str, op: str, weight: torch.Tensor, ctx: BackendContext) -> Built:
    """nmfx.lower's CPU conversion (``cpu_decision``), as ``nm_linear`` on packed constants."""
    from nmfx.lowering.cpu import cpu_decision

    decision, packed = cpu_decision(name, param, op, weight, _pattern(weight, ctx))
    if packed is None:
        return decision, None, [], ()
    from nmfx.kernels import encode_choices

    # The tuned per-bucket choices travel with the call (as NMLinear.dispatch does).
    dispatch = encode_choices(decision.facts["dispatch"])
    extra = (*packed.shape, packed.pattern.n, packed.pattern.m, dispatch)
    return decision, torch.ops.nmfx.nm_linear.default, [packed.values, packed.mask], extra


def _sparse_cuda(
    name: str, param: str, op: str, weight: torch.Tensor, ctx: BackendContext
) -> Built:
    """nmfx.lower's CUDA checks and conversion, as ``linear`` on a semi-structured constant."""
    from nmfx.lowering.cuda import cuda_weight_decision

    decision, sparse = cuda_weight_decision(
        name, param, op, weight, _pattern(weight, ctx), ctx.cuda_backend
    )
    if sparse is None:
        return decision, None, [], ()
    return decision, _LINEAR, [sparse], ()


def _add_constant(gm: fx.GraphModule, name: str, tensor: torch.Tensor) -> None:
    """A buffer on the graph module; Dynamo graphs also need a source for it (AOTAutograd
    maps every lifted parameter/buffer of a Dynamo graph back to where it came from)."""
    gm.register_buffer(name, tensor)
    sources = getattr(gm, "_param_name_to_source", None)
    if sources is not None:
        from torch._dynamo.source import ConstantSource

        sources[name] = ConstantSource(f"nmfx_{name}")
