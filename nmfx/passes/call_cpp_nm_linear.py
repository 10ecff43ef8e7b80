"""Backend pass: packed ``nmfx::nm_linear`` calls -> ``nmfx_cpu::nm_linear`` (the C++ op).

``nmfx::nm_linear`` is a Python custom op: a compiled graph calling it pays its Python wrapper
on every call (~100 us against ~27 us for the kernel at one row of x). ``nmfx_cpu::nm_linear``
(``nmfx.kernels._cpp_linear``) takes the same arguments and makes the same per-call choice in
C++. Runs last on CPU graphs, after the packed calls exist and are fused. A call keeps the
Python op when a gradient could flow through it (grad mode on and x or the bias requiring grad:
the C++ op has no backward), when it carries no tuned ``dispatch`` code, or when the kernels are
not loaded in this process.
"""

from __future__ import annotations

import torch
from torch import fx

from nmfx.passes.infra import PassResult, log
from nmfx.passes.lower_nm_linear import BackendContext

_DISPATCH_ARG = 8  # nm_linear(x, values, mask, bias, rows, cols, n, m, dispatch)


def _needs_grad(arg: object) -> bool:
    if not isinstance(arg, fx.Node):
        return False
    value = arg.meta.get("example_value", arg.meta.get("val"))
    # Unknown (no example value): assume it may need grad, and keep the Python op.
    return not isinstance(value, torch.Tensor) or value.requires_grad


def _movable(node: fx.Node) -> bool:
    import nmfx.ops  # noqa: F401  (registers the Python op)

    if node.op != "call_function" or node.target is not torch.ops.nmfx.nm_linear.default:
        return False
    args = node.args
    if node.kwargs or len(args) <= _DISPATCH_ARG or not isinstance(args[_DISPATCH_ARG], int):
        return False
    if args[_DISPATCH_ARG] < 0:  # untuned: the Python op tunes it on first call
        return False
    return not torch.is_grad_enabled() or not (_needs_grad(args[0]) or _needs_grad(args[3]))


def call_cpp_nm_linear(gm: fx.GraphModule, ctx: BackendContext) -> PassResult:
    """Point every packed call that needs no gradient at the C++ op."""
    from nmfx.kernels import _cpp_linear

    if ctx.target != "cpu" or not _cpp_linear.ready():
        return PassResult(gm, False)
    count = 0
    for node in gm.graph.nodes:
        if _movable(node):
            node.target = torch.ops.nmfx_cpu.nm_linear.default
            count += 1
    if count:
        gm.recompile()
    log.debug("call_cpp_nm_linear: %d packed calls run the C++ op", count)
    return PassResult(gm, bool(count))
