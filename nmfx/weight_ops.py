"""Recognising ops that reduce over a weight parameter, and along which of its dims.

Shared by the passes that analyse whole-model graphs and per-module graphs, so the two
always agree on what a "weight op" is. Graphs come from torch.fx (torch functions and
Tensor methods) or from torch.export (ATen ops): both spellings are listed.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass

import torch
from torch import fx, nn

__all__ = [
    "NO_NM_MODULES",
    "WeightUse",
    "find_weight_uses",
    "module_weight_uses",
    "no_nm_form",
    "no_nm_module_weights",
]

# target -> (op name, {position of the weight operand: dim of the weight reduced over})
_aten = torch.ops.aten
_FUNCTIONS: dict[object, tuple[str, dict[int, int]]] = {
    torch._C._nn.linear: ("linear", {1: -1}),
    _aten.linear.default: ("linear", {1: -1}),
    _aten.conv1d.default: ("conv1d", {1: 1}),
    _aten.conv2d.default: ("conv2d", {1: 1}),
    _aten.conv3d.default: ("conv3d", {1: 1}),
    _aten.matmul.default: ("matmul", {0: -1, 1: -2}),
    _aten.mm.default: ("mm", {0: -1, 1: -2}),
    _aten.addmm.default: ("addmm", {1: -1, 2: -2}),
    _aten.bmm.default: ("bmm", {0: -1, 1: -2}),
    torch.conv1d: ("conv1d", {1: 1}),
    torch.conv2d: ("conv2d", {1: 1}),
    torch.conv3d: ("conv3d", {1: 1}),
    torch.matmul: ("matmul", {0: -1, 1: -2}),
    operator.matmul: ("matmul", {0: -1, 1: -2}),
    torch.mm: ("mm", {0: -1, 1: -2}),
    torch.addmm: ("addmm", {1: -1, 2: -2}),
    torch.bmm: ("bmm", {0: -1, 1: -2}),
}
_METHODS: dict[str, tuple[str, dict[int, int]]] = {
    "matmul": ("matmul", {0: -1, 1: -2}),
    "mm": ("mm", {0: -1, 1: -2}),
    "bmm": ("bmm", {0: -1, 1: -2}),
    "__matmul__": ("matmul", {0: -1, 1: -2}),
}
_CONV_GROUPS_ARG = 6  # F.convNd(input, weight, bias, stride, padding, dilation, groups)
_EINSUM = (torch.einsum, _aten.einsum.default)
# Ops that hand a weight on unchanged (export inserts them around tied and cast weights).
_PASS_THROUGH: tuple[object, ...] = (
    _aten.alias.default,
    _aten.detach.default,
    _aten.to.dtype,
    _aten.contiguous.default,
)

# Weight ops with no N:M form in nmfx: found so that their weights get a dense row with the
# reason, never silently left out. target -> (op name, position of the weight operand).
_NO_NM_FUNCTIONS: dict[object, tuple[str, int]] = {
    torch.bilinear: ("bilinear", 2),
    torch.conv_transpose1d: ("conv_transpose1d", 1),
    torch.conv_transpose2d: ("conv_transpose2d", 1),
    torch.conv_transpose3d: ("conv_transpose3d", 1),
}
# torch.nn modules that run such ops on their own weights (not traced: torch.nn leaves).
NO_NM_MODULES: tuple[type[nn.Module], ...] = (
    nn.RNNBase,  # RNN, LSTM, GRU
    nn.RNNCellBase,  # RNNCell, LSTMCell, GRUCell
    nn.Bilinear,
    nn.modules.conv._ConvTransposeNd,  # ConvTranspose1d/2d/3d
)


def no_nm_form(what: str) -> str:
    """The dense reason of a weight op (``what``: op or module kind) nmfx cannot make N:M."""
    return f"{what}: no N:M form in nmfx (it covers linear, conv1d-3d, matmul-style and einsum)"


def no_nm_module_weights(module: nn.Module) -> list[tuple[str, str]]:
    """(weight path, op name) of a ``NO_NM_MODULES`` module's own weights (2-D or more)."""
    if not isinstance(module, NO_NM_MODULES):
        return []
    kind = type(module).__name__
    op = {"ConvTranspose1d": "conv_transpose1d", "ConvTranspose2d": "conv_transpose2d",
          "ConvTranspose3d": "conv_transpose3d"}.get(kind, kind.lower())  # fmt: skip
    return [(n, op) for n, p in module.named_parameters(recurse=False) if p.dim() >= 2]


@dataclass
class WeightUse:
    """``op`` (an FX node) reduces over dim ``reduce_dim`` of the weight at ``target``."""

    node: fx.Node
    weight_node: fx.Node | None  # the get_attr node (None for call_module leaves)
    operand: fx.Node | None  # weight_node, or the first node of the transpose/pass-through path
    target: str  # the weight's path relative to the traced root
    op: str
    reduce_dim: int | None
    groups: int = 1
    why_unknown: str = ""


def _is_transpose(node: fx.Node) -> bool:
    if node.op == "call_method" and node.target in ("t", "transpose"):
        return node.target == "t" or sorted(int(d) % 2 for d in node.args[1:3]) == [0, 1]
    if node.op != "call_function":
        return False
    if node.target in (torch.t, _aten.t.default, _aten.numpy_T.default):
        return True
    if node.target is _aten.transpose.int:
        return sorted(int(d) % 2 for d in node.args[1:3]) == [0, 1]
    if node.target is _aten.permute.default:
        return [int(d) % 2 for d in node.args[1]] == [1, 0]
    return node.target is getattr and node.args[1] in ("T", "mT")


def _is_pass_through(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in _PASS_THROUGH


def _einsum_reduce_dim(node: fx.Node, position: int) -> tuple[int | None, str]:
    equation = node.args[0]  # torch.einsum(eq, *ops) and aten.einsum(eq, [ops]) alike
    if not isinstance(equation, str) or "..." in equation or "->" not in equation:
        return None, f"einsum equation {equation!r} has no explicit output"
    inputs, output = equation.replace(" ", "").split("->")
    subs = inputs.split(",")
    mine = subs[position - 1]
    others = "".join(s for i, s in enumerate(subs) if i != position - 1)
    reduced = [i for i, ch in enumerate(mine) if ch not in output and ch in others]
    if len(reduced) != 1:
        return None, f"einsum {equation!r} reduces the weight over {len(reduced)} dims, not one"
    return reduced[0], ""


def _uses_of(
    weight_node: fx.Node, operand: fx.Node, arg: fx.Node, consumer: fx.Node, transposed: bool
) -> list[WeightUse]:
    """Uses of ``weight_node`` by ``consumer``, which reads it as ``arg`` (itself, a
    pass-through of it, or a 2-D transpose of it); ``operand`` is the path's first node."""
    rank = weight_node.meta.get("nmfx_rank", 2)
    uses = []
    if consumer.op == "call_function" and consumer.target in _EINSUM:
        operands = consumer.args[1:] if consumer.target is torch.einsum else consumer.args[1]
        for pos, value in enumerate(operands, start=1):
            if value is arg and not transposed:
                dim, why = _einsum_reduce_dim(consumer, pos)
                uses.append(
                    WeightUse(
                        consumer,
                        weight_node,
                        operand,
                        weight_node.target,
                        "einsum",
                        dim,
                        why_unknown=why,
                    )
                )
        return uses
    if consumer.op == "call_function" and consumer.target in _NO_NM_FUNCTIONS:
        name, pos = _NO_NM_FUNCTIONS[consumer.target]
        if operand in (*consumer.args[pos : pos + 1], consumer.kwargs.get("weight")):
            why = no_nm_form(name)
            uses.append(WeightUse(consumer, weight_node, operand, weight_node.target, name, None,
                                  why_unknown=why))  # fmt: skip
        return uses
    if consumer.op == "call_function":
        spec = _FUNCTIONS.get(consumer.target)
    elif consumer.op == "call_method":
        spec = _METHODS.get(consumer.target)
    else:
        spec = None
    if spec is None:
        return uses
    name, positions = spec
    for pos, dim in positions.items():
        if pos < len(consumer.args) and consumer.args[pos] is arg:
            dim = dim % rank
            if transposed:
                if rank != 2:
                    continue
                dim = 1 - dim
            groups = 1
            if name.startswith("conv"):
                groups = (
                    consumer.args[_CONV_GROUPS_ARG]
                    if len(consumer.args) > _CONV_GROUPS_ARG
                    else consumer.kwargs.get("groups", 1)
                )
            uses.append(
                WeightUse(
                    consumer, weight_node, operand, weight_node.target, name, dim, int(groups)
                )
            )
    return uses


def _operands(weight: fx.Node) -> list[tuple[fx.Node, fx.Node, fx.Node, bool]]:
    """(head, arg, consumer, transposed) for each op reached from ``weight`` through
    pass-through ops and at most one 2-D transpose: ``consumer`` reads ``arg``; ``head`` is
    the first node of the path (``weight`` itself when the op reads it directly), where a
    masked weight is fed in."""
    out = []
    # depth first, users in graph order: candidates keep the order of the ops
    stack = [(user, user, weight, False) for user in reversed(weight.users)]
    while stack:
        node, head, arg, transposed = stack.pop()  # node, path head, what node reads, transposed
        through = _is_pass_through(node)
        if through or (_is_transpose(node) and not transposed):
            stack += [(user, head, node, transposed or not through) for user in reversed(node.users)]
        else:
            out.append((weight if node is head else head, arg, node, transposed))
    return out


def find_weight_uses(gm: fx.GraphModule) -> list[WeightUse]:
    """Every (op, weight) pair where an op of ``gm``'s graph reduces over a weight parameter.

    Weights reached through a 2-D transpose (``w.t()``, ``w.T``) count, with the dims swapped;
    ``gm`` is anything with a ``graph`` and ``get_parameter`` (a GraphModule, or the model
    a whole-model graph was captured from).
    """
    uses: list[WeightUse] = []
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        try:
            value = gm.get_parameter(node.target)
        except AttributeError:
            continue
        if value.dim() < 2:
            continue
        node.meta["nmfx_rank"] = value.dim()
        for operand, arg, consumer, transposed in _operands(node):
            uses += _uses_of(node, operand, arg, consumer, transposed)
    return uses


def module_weight_uses(node: fx.Node, module: nn.Module) -> list[WeightUse]:
    """Weight uses of a ``call_module`` leaf: Linear / ConvNd / MultiheadAttention."""
    prefix = f"{node.target}."
    if isinstance(module, nn.Linear):
        return [WeightUse(node, None, None, prefix + "weight", "linear", 1)]
    if isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d):
        op = (
            re.sub(r"^Conv", "conv", type(module).__name__)
            if type(module).__module__.startswith("torch.nn")
            else "conv"
        )
        return [WeightUse(node, None, None, prefix + "weight", op.lower(), 1, module.groups)]
    no_nm = no_nm_module_weights(module)
    if no_nm:
        return [WeightUse(node, None, None, prefix + path, op, None) for path, op in no_nm]
    if isinstance(module, nn.MultiheadAttention):
        return [
            WeightUse(node, None, None, prefix + path, op, 1) for path, op in mha_weights(module)
        ]
    return []


def mha_weights(mha: nn.MultiheadAttention) -> list[tuple[str, str]]:
    """(weight path inside the MHA, op name) for its projections."""
    if mha._qkv_same_embed_dim:
        paths = [("in_proj_weight", "mha.in_proj")]
    else:
        paths = [(f"{x}_proj_weight", f"mha.{x}_proj") for x in "qkv"]
    return [*paths, ("out_proj.weight", "mha.out_proj")]
