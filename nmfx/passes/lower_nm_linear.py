"""Backend pass: ``linear(x, W, b)`` with an N:M weight -> ``nmfx::nm_linear`` on packed W.

Runs on the graph Dynamo hands ``backend="nmfx"``. The weight operand may be a parameter
(a placeholder or get_attr) or any computation on parameters only — e.g. the inlined
SR-STE masker of a sparsified model — which is folded at compile time. Weights are thus
frozen into the compiled graph, like inductor's ``freezing``: the pass only runs when
grad mode is off at compile time (Dynamo guards on it) or the weights do not require grad.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from nmfx.passes.detect_nm_weights import detect_pattern
from nmfx.passes.infra import PassResult, eliminate_dead_code, log
from nmfx.plan import DENSE, SPARSE, LayerDecision

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
        name = w_node.name
        if torch.is_grad_enabled() and _needs_grad(w_node, values):
            reason = "grad mode is on and the weight requires grad: not frozen (compile under torch.no_grad())"
            ctx.decisions.append(LayerDecision(name, name, op, ctx.target, DENSE, reason))
            continue
        weight = _fold(w_node, values, gm)
        if weight.dim() != 2:
            continue
        if transposed:  # x @ W with W [in, out] is linear(x, W.T)
            weight = weight.t().contiguous()
        build = _sparse_cpu if ctx.target == "cpu" else _sparse_cuda
        target, constants, extra, reason = build(weight, ctx)
        if target is None:
            ctx.decisions.append(LayerDecision(name, name, op, ctx.target, DENSE, reason))
            continue
        with gm.graph.inserting_before(node):
            attrs = []
            for i, tensor in enumerate(constants):
                _add_constant(gm, f"_nmfx_sparse_{count}_{i}", tensor)
                attrs.append(gm.graph.get_attr(f"_nmfx_sparse_{count}_{i}"))
            # cpu: nm_linear(x, values, mask, b, rows, cols, n, m); cuda: linear(x, W_sparse, b)
            new = gm.graph.call_function(target, (x, *attrs, bias, *extra))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        count += 1
        ctx.decisions.append(LayerDecision(name, name, op, ctx.target, SPARSE, reason))
    if count:
        eliminate_dead_code(gm)
        gm.recompile()
    log.debug("lower_nm_linear: %d linears lowered for %s", count, ctx.target)
    return PassResult(gm, bool(count))


def _pattern(weight: torch.Tensor, ctx: BackendContext) -> Any:
    return detect_pattern(weight, 1) if ctx.pattern is None else ctx.pattern


def _sparse_cpu(weight: torch.Tensor, ctx: BackendContext) -> tuple[Any, list, tuple, str]:
    """(op, constants, extra args, reason) for the packed CPU kernel, or (None, ..., why not)."""
    import nmfx.kernels._ops  # noqa: F401  (registers nmfx::nm_linear; builds nothing)
    from nmfx.packed import SUPPORTED_DTYPES, SUPPORTED_M, pack

    if weight.dtype not in SUPPORTED_DTYPES:
        return None, [], (), f"dtype {weight.dtype} has no packed kernel"
    if weight.device.type != "cpu":
        return None, [], (), f"weight on {weight.device}; the packed kernel is CPU-only"
    pattern = _pattern(weight, ctx)
    if pattern is None or pattern.m not in SUPPORTED_M:
        return None, [], (), "weight is not N:M along in_features"
    packed = pack(weight, pattern)
    share = packed.nbytes / packed.dense_nbytes
    extra = (*packed.shape, pattern.n, pattern.m)
    why = f"packed {pattern} ({share:.0%} of dense bytes)"
    return torch.ops.nmfx.nm_linear.default, [packed.values, packed.mask], extra, why


def _sparse_cuda(weight: torch.Tensor, ctx: BackendContext) -> tuple[Any, list, tuple, str]:
    """(linear, [semi-structured weight], (), reason), or (None, ..., why not)."""
    from nmfx.lowering.cuda import implies_2_4, semi_structured_constraint

    pattern = _pattern(weight, ctx)
    if pattern is None or not implies_2_4(pattern):
        why = f"weight is not 2:4 along in_features (found {pattern}); semi-structured needs 2:4"
        return None, [], (), why
    reason = semi_structured_constraint(tuple(weight.shape), weight.dtype, ctx.cuda_backend)
    if reason is not None:
        return None, [], (), reason
    if weight.device.type != "cuda":
        return None, [], (), f"weight on {weight.device}; semi-structured sparse tensors need CUDA"
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    old = SparseSemiStructuredTensor._FORCE_CUTLASS
    SparseSemiStructuredTensor._FORCE_CUTLASS = ctx.cuda_backend == "cutlass"
    try:
        sparse = to_sparse_semi_structured(weight)
    finally:
        SparseSemiStructuredTensor._FORCE_CUTLASS = old
    return _LINEAR, [sparse], (), f"semi-structured 2:4 ({ctx.cuda_backend})"


def _add_constant(gm: fx.GraphModule, name: str, tensor: torch.Tensor) -> None:
    """A buffer on the graph module; Dynamo graphs also need a source for it (AOTAutograd
    maps every lifted parameter/buffer of a Dynamo graph back to where it came from)."""
    gm.register_buffer(name, tensor)
    sources = getattr(gm, "_param_name_to_source", None)
    if sources is not None:
        from torch._dynamo.source import ConstantSource

        sources[name] = ConstantSource(f"nmfx_{name}")
