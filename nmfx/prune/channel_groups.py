"""Channel groups from the whole-model FX graph: the channels that must be permuted together.

A group starts at a sparse layer's input and is closed in both directions through ops that
treat channels one by one: activations, dropout, dtype casts, pooling, per-channel norms
(BatchNorm; LayerNorm over the channel dim; GroupNorm with 1 or C groups), elementwise
arithmetic (a residual add joins both sides), reductions *over* the channel dim (their
result does not depend on the order) and over other dims. It ends at the layers producing
the channels (Linear / Conv output channels, Embedding columns) and the layers consuming
them (Linear / Conv input channels). Anything else touching the channels (a reshape into
heads, a flatten over spatial dims, a cat, the model input or output, a tied weight) makes
the group unsafe, and the reason is kept.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

__all__ = ["ChannelGroup", "find_channel_group"]

_UNARY_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.Mish,
    nn.Hardswish, nn.Hardtanh, nn.Softplus, nn.Dropout, nn.Identity,
)  # fmt: skip
_SPATIAL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Dropout2d,
)  # fmt: skip
_UNARY_FUNCTIONS = {
    F.relu, F.gelu, F.silu, F.dropout, F.leaky_relu, F.elu, F.tanh, F.sigmoid, F.hardswish,
    torch.relu, torch.tanh, torch.sigmoid, torch.exp, torch.sqrt, torch.rsqrt, torch.abs,
    torch.neg, operator.neg, torch.square,
}  # fmt: skip
_UNARY_METHODS = {
    "relu", "sigmoid", "tanh", "exp", "sqrt", "rsqrt", "abs", "neg", "float", "half",
    "bfloat16", "double", "to", "type_as", "contiguous", "clone", "detach", "square", "pow",
}  # fmt: skip
_BINARY_FUNCTIONS = {
    operator.add, operator.mul, operator.sub, operator.truediv, torch.add, torch.mul,
    torch.sub, torch.div,
}  # fmt: skip
_BINARY_METHODS = {"add", "mul", "sub", "div", "__add__", "__mul__", "__sub__", "__truediv__"}
_REDUCE_METHODS = {"mean", "sum", "amax", "amin", "var", "std", "norm"}
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class ChannelGroup:
    """Nodes carrying the group's channels (with the channel dim), and what permuting needs."""

    channels: int = 0
    dims: dict[fx.Node, int] = field(default_factory=dict)
    consumers: dict[str, fx.Node] = field(default_factory=dict)  # module fqn -> node
    producers: dict[str, fx.Node] = field(default_factory=dict)
    params: set[tuple[str, int]] = field(default_factory=set)  # (param / buffer FQN, dim)
    unsafe: str = ""


def _shape(node: object) -> tuple[int, ...] | None:
    meta = getattr(node, "meta", {}).get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _describe(node: fx.Node) -> str:
    target = (
        node.target
        if isinstance(node.target, str)
        else getattr(node.target, "__name__", node.target)
    )
    return f"{node.op} {target} ({node.name})"


class _Walker:
    def __init__(self, gm: fx.GraphModule, group: ChannelGroup) -> None:
        self.gm, self.g = gm, group
        self.stack: list[fx.Node] = []

    def module(self, node: fx.Node) -> nn.Module | None:
        return self.gm.get_submodule(node.target) if node.op == "call_module" else None

    def fail(self, why: str) -> None:
        if not self.g.unsafe:
            self.g.unsafe = why

    def add(self, node: object, dim: int) -> None:
        if not isinstance(node, fx.Node):
            return
        shape = _shape(node)
        if shape is None:
            return self.fail(f"no shape recorded for {node.name}")
        dim %= len(shape)
        if self.g.channels == 0:
            self.g.channels = shape[dim]
        if shape[dim] != self.g.channels:
            return self.fail(f"{node.name} has {shape[dim]} channels, not {self.g.channels}")
        if node in self.g.dims:
            if self.g.dims[node] != dim:
                self.fail(f"{node.name} carries the channels on two dims")
            return
        self.g.dims[node] = dim
        self.stack.append(node)

    def run(self) -> ChannelGroup:
        while self.stack and not self.g.unsafe:
            node = self.stack.pop()
            self.backward(node, self.g.dims[node])
            for user in list(node.users):
                if not self.g.unsafe:
                    self.forward(node, user, self.g.dims[node])
        return self.g

    # -- how a channel-carrying node was produced
    def backward(self, node: fx.Node, dim: int) -> None:
        mod = self.module(node)
        if node.op == "placeholder":
            return self.fail("the channels come from the model input")
        if node.op == "get_attr":
            return self.fail(f"the channels come from the tensor {node.target}")
        if _is_producer(node, mod):
            return self._producer(node, mod, dim)
        if self._through(node, mod, dim, backward=True):
            return
        self.fail(f"the channels are produced by {_describe(node)}")

    def _producer(self, node: fx.Node, mod: nn.Module | None, dim: int) -> None:
        rank = len(_shape(node) or ())
        expected = 1 if isinstance(mod, _CONVS) else rank - 1
        if dim != expected:
            return self.fail(f"{node.target} produces the channels on another dim")
        self.g.producers[str(node.target)] = node

    # -- who reads a channel-carrying node
    def forward(self, node: fx.Node, user: fx.Node, dim: int) -> None:
        mod = self.module(user)
        if user.op == "output":
            return self.fail("the channels reach the model output")
        if _is_consumer(user, mod) and user.args and user.args[0] is node:
            rank = len(_shape(node) or ())
            expected = 1 if isinstance(mod, _CONVS) else rank - 1
            if dim != expected:
                return self.fail(f"{user.target} reads the channels on another dim")
            self.g.consumers[str(user.target)] = user
            return
        if self._through(user, mod, dim, backward=False, source=node):
            return
        self.fail(f"the channels are read by {_describe(user)}")

    def _through(self, node: fx.Node, mod: nn.Module | None, dim: int, backward: bool,
                 source: fx.Node | None = None) -> bool:  # fmt: skip
        """Ops the channels pass through; adds the other side. False: not such an op."""
        args = node.args
        first = args[0] if args else None
        in_shape, out_shape = _shape(first), _shape(node)
        if _is_metadata(node):
            return not backward  # reads dtype / device / sizes: unchanged by a permutation
        if out_shape is None:
            return False
        if mod is not None:
            if not backward and first is not source:
                return False
            return self._module_through(node, mod, dim, backward, first)
        if _is_unary(node):
            if backward:
                self.add(first, dim)
            elif first is source:
                self.add(node, dim)
            # else: type_as(y, x) / to(y, x) read only x's dtype
            return True
        if _is_binary(node):
            return self._binary(node, dim, backward, source)
        if node.op == "call_method" and node.target in _REDUCE_METHODS and in_shape is not None:
            return self._reduce(node, in_shape, out_shape, dim, backward)
        return False

    def _module_through(self, node: fx.Node, mod: nn.Module, dim: int, backward: bool,
                        first: object) -> bool:  # fmt: skip
        spatial = isinstance(mod, _SPATIAL_MODULES)
        if not isinstance(mod, _UNARY_MODULES) and not spatial and not _norm_params(mod, node, dim):
            return False
        if spatial and dim != 1:
            return False
        for name in _norm_params(mod, node, dim) or ():
            self.g.params.add((f"{node.target}.{name}", 0))
        self.add(first if backward else node, dim)
        return True

    def _binary(self, node: fx.Node, dim: int, backward: bool, source: fx.Node | None) -> bool:
        out_shape = _shape(node)
        assert out_shape is not None  # checked by the caller
        out_dim = dim if backward else dim + len(out_shape) - len(_shape(source) or out_shape)
        for arg in node.args[:2]:
            if not isinstance(arg, fx.Node) or arg is source:
                continue
            shape = _shape(arg)
            if shape is None:
                return False
            d = out_dim - (len(out_shape) - len(shape))
            if d < 0 or shape[d] == 1:
                continue  # broadcast over the channels: order does not matter
            if arg.op == "get_attr":
                self.g.params.add((str(arg.target), d))
            else:
                self.add(arg, d)
        self.add(node, out_dim)
        return True

    def _reduce(self, node: fx.Node, in_shape: tuple, out_shape: tuple, dim: int,
                backward: bool) -> bool:  # fmt: skip
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if dims is None:
            return False
        dims = [d % len(in_shape) for d in (dims if isinstance(dims, tuple | list) else [dims])]
        keep = len(out_shape) == len(in_shape)
        if backward:  # the output's channel dim, found in the input
            kept = (
                range(len(in_shape)) if keep else [d for d in range(len(in_shape)) if d not in dims]
            )
            self.add(node.args[0], list(kept)[dim])
            return True
        if dim in dims:
            return True  # reduced over the channels: invariant to their order
        self.add(node, dim if keep else dim - sum(d < dim for d in dims))
        return True


def _norm_params(mod: nn.Module, node: fx.Node, dim: int) -> list[str] | None:
    """Per-channel parameters of a norm that is safe to permute, or None."""
    if isinstance(mod, nn.modules.batchnorm._BatchNorm) and dim == 1:
        return [
            n
            for n in ("weight", "bias", "running_mean", "running_var")
            if getattr(mod, n) is not None
        ]
    rank = len(_shape(node) or ())
    if isinstance(mod, nn.LayerNorm) and len(mod.normalized_shape) == 1 and dim == rank - 1:
        return [n for n in ("weight", "bias") if getattr(mod, n, None) is not None]
    if isinstance(mod, nn.GroupNorm) and dim == 1 and mod.num_groups in (1, mod.num_channels):
        return [n for n in ("weight", "bias") if getattr(mod, n, None) is not None]
    return None


def _is_unary(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target in _UNARY_FUNCTIONS:
        return True
    if node.op != "call_method" or node.target not in _UNARY_METHODS:
        return False
    if node.target == "pow":
        return len(node.args) > 1 and isinstance(node.args[1], int | float)
    if node.target == "type_as" or node.target == "to":
        return all(not isinstance(a, fx.Node) or _shape(a) is not None for a in node.args[1:])
    return True


def _is_metadata(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target is getattr:
        return node.args[1] in ("dtype", "device", "shape", "ndim", "is_cuda")
    return node.op == "call_method" and node.target in ("size", "dim")


def _is_binary(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target in _BINARY_FUNCTIONS:
        return True
    return node.op == "call_method" and node.target in _BINARY_METHODS


def _is_consumer(node: fx.Node, mod: nn.Module | None) -> bool:
    return isinstance(mod, nn.Linear) or (isinstance(mod, _CONVS) and mod.groups == 1)


def _is_producer(node: fx.Node, mod: nn.Module | None) -> bool:
    return _is_consumer(node, mod) or isinstance(mod, nn.Embedding)


def find_channel_group(gm: fx.GraphModule, consumer: fx.Node) -> ChannelGroup:
    """The closed channel group feeding ``consumer`` (a call_module Linear/Conv node)."""
    group = ChannelGroup()
    walker = _Walker(gm, group)
    mod = gm.get_submodule(consumer.target)
    first = consumer.args[0]
    rank = len(_shape(first) or ())
    walker.add(first, 1 if isinstance(mod, _CONVS) else rank - 1)
    return walker.run()
