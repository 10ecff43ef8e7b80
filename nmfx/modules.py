"""The runtime pieces that sparsify installs into a model.

- ``NMMasker``: the SR-STE masked op ``W -> E (.) W`` for one weight. A submodule of the
  module that consumes the weight, holding no persistent state (``state_dict`` keys stay the
  original model's; masks are derived from weights).
- ``RewrittenForward``: a module's forward replaced by the code of its rewritten FX graph.
  The module keeps its class, parameters and hooks; only ``forward`` is an instance attribute.
  A graph that is exactly ``linear(x, masker(W), b)`` runs, in an eager CPU fp32 training
  forward, the masked weight's GEMM on its packed N:M form (``_PackedLinear``) where the
  kernel tuner measured the sparse GEMM faster than dense at that shape and batch.
- ``MHAForward``: ``nn.MultiheadAttention`` cannot be FX-traced; its forward is re-stated here
  with masked in/out projection weights.
"""

from __future__ import annotations

import sys
import warnings
import weakref
from operator import attrgetter
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from nmfx.masks import MaskOutputs, _use_kernel, kernel_supports, masked_with_mask, nm_mask
from nmfx.ops import compiled_mask_op_applies, srste_masked_op, srste_packed_linear_op

__all__ = [
    "MHAForward",
    "NMMasker",
    "RewrittenForward",
    "live_maskers",
    "rewritten_forward",
    "track",
]

_LIVE: weakref.WeakSet[NMMasker] = weakref.WeakSet()
_WARNED_NO_TERM = False  # the "stepped without the SR-STE term" warning is given once


def live_maskers() -> list[NMMasker]:
    """Every installed NMMasker alive in this process (the SR-STE optimizer hook walks these)."""
    return list(_LIVE)


def track(masker: NMMasker) -> None:
    """Let the SR-STE hook see ``masker``: called when sparsify installs it, not before, so
    the maskers of a sparsify call that failed (kept alive by a traceback) never touch the
    user's weights."""
    _LIVE.add(masker)


class _StraightThroughMask(torch.autograd.Function):
    """Forward ``where(mask, w, 0)``; backward passes the gradient to *all* weights (STE),
    or only to kept ones when ``block_pruned`` (fixed-mask fine-tuning).

    Both Functions here define ``forward(ctx, ...)`` (no ``setup_context``): that style skips
    the ``inspect.signature`` binding ``Function.apply`` does on every call otherwise
    (~20 us a weight a step). No functorch transform runs them.
    """

    @staticmethod
    def forward(
        ctx: Any, weight: torch.Tensor, mask: torch.Tensor, block_pruned: bool
    ) -> torch.Tensor:
        ctx.block_pruned = block_pruned
        if block_pruned:
            ctx.save_for_backward(mask)
        return torch.where(mask, weight, 0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        if ctx.block_pruned:
            (mask,) = ctx.saved_tensors
            return torch.where(mask, grad, 0), None, None
        return grad, None, None


class _FusedStraightThroughMask(torch.autograd.Function):
    """Eager-CPU twin of ``_StraightThroughMask`` (dynamic masks): the masked weight comes
    from one fused kernel pass (mask computed in registers) into the masker's reused buffer;
    no mask is stored, the SR-STE term recomputes it. ``tracks``: the backward tells the
    masker it ran (the check for optimizers that skip the term), instead of a tensor hook."""

    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, masker: NMMasker, tracks: bool) -> torch.Tensor:
        ctx.masker = masker if tracks else None
        return masker._fused_forward(weight)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        if ctx.masker is not None:
            ctx.masker._note_backward(grad)
        return grad, None, None


# Weights with fewer elements keep the masked copy's dense GEMM: the first call at a new
# shape tunes the sparse kernels (as nmfx.lower does), which small layers do not repay.
SPARSE_GEMM_MIN_NUMEL = 1 << 18


class _PackedLinear(torch.autograd.Function):
    """``linear(x, masker(W), b)`` with the forward's GEMM on the packed N:M weight.

    One pass over W writes the masked weight (saved for the backward, as ``F.linear`` saves
    it) and its packed form (values + mask bits, reused buffers), then the sparse GEMM runs on
    the packed form: it multiplies N of every M weights. The backward is ``F.linear``'s on the
    masked weight, with the straight-through gradient of ``_FusedStraightThroughMask``: grad_W
    reaches every weight. The forward's output differs from ``F.linear``'s by the rounding of
    a different summation order only.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        masker: NMMasker,
        tracks: bool,
        code: int,
    ) -> torch.Tensor:
        rows, cols = weight.shape
        masked, values, bits = masker._outputs.fill_packed(weight.detach(), masker.n, masker.m)
        x2 = x.reshape(-1, cols)
        b = None if bias is None else bias.detach()
        y = torch.ops.nmfx_cpu.nm_gemm(x2, values, bits, b, rows, cols, masker.n, masker.m, code)
        ctx.save_for_backward(x, masked)
        ctx.masker, ctx.tracks, ctx.weight = masker, tracks, weight
        return y.reshape(*x.shape[:-1], rows)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        x, masked = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: a differentiable masked weight (STE)
            mask = ctx.masker.compute_mask(ctx.weight)
            masked = _StraightThroughMask.apply(ctx.weight, mask, False)
        g2 = grad.reshape(-1, grad.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x = (g2 @ masked).reshape(x.shape) if need_x else None
        grad_w = g2.t().mm(x2) if need_w else None
        grad_b = g2.sum(0) if need_b else None
        if ctx.tracks and need_w:
            ctx.masker._note_backward(grad_w)
        return grad_x, grad_w, grad_b, None, None, None


class NMMasker(nn.Module):
    """Applies the N:M mask of one weight. Called as ``masker(weight) -> masked weight``."""

    def __init__(
        self,
        owner: nn.Module,
        param_name: str,
        n: int,
        m: int,
        reduce_dim: int,
        srste_lambda: float,
        mask_mode: str = "srste",
        mask_interval: int = 1,
    ) -> None:
        super().__init__()
        self.param_name = param_name
        self.n, self.m, self.reduce_dim = n, m, reduce_dim
        self.srste_lambda = srste_lambda
        self.mask_mode = mask_mode
        self.mask_interval = mask_interval
        self.forward_count = 0
        # A plain tuple: the owner is not registered as a child (no cycle in the module tree),
        # but deepcopy/pickle carry it along with the rest of the model.
        self._owner = (owner,)
        stored = None
        if self.stores_mask:
            stored = nm_mask(owner.get_parameter(param_name), (n, m), reduce_dim)
        self.register_buffer("mask", stored, persistent=False)
        # A stored mask is recomputed from the weights at the first forward: DDP does not sync
        # it (model_state) but replaces the weights with rank 0's when it wraps
        # the model. For fixed masks that is the same mask (pruned weights are zero by then).
        self._refresh_pending = stored is not None
        self._last: tuple[int, torch.Tensor] | None = None  # (weight version, mask), eager only
        self._outputs = MaskOutputs()  # the fused forward's reused output buffers (eager CPU)
        # False: the eager forward keeps F.linear on the masked copy (benchmarks compare both)
        self.sparse_gemm = True
        self._init_step_tracking()

    def _init_step_tracking(self) -> None:
        # SR-STE term bookkeeping (eager, per process; never pickled):
        # the gradient that last received the term and its version right after, so the term
        # goes in once per gradient however many optimizers step this weight;
        self._term_grad: tuple[weakref.ref, int] | None = None
        # the weight's version when a backward last reached it, and whether the term has been
        # added since: a weight that changes after a backward without it was stepped by an
        # optimizer that nmfx's step hook never saw.
        self._backward_version: int | None = None
        self._term_since_backward = False

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_last"] = None  # a cache, rebuilt by the next forward
        for key in ("_term_grad", "_backward_version", "_term_since_backward"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict) -> None:
        state.setdefault("_refresh_pending", False)  # pickled before the attribute existed
        state.setdefault("_outputs", MaskOutputs())
        state.setdefault("sparse_gemm", True)
        super().__setstate__(state)
        self._init_step_tracking()
        _LIVE.add(self)  # a copy of an installed masker (deepcopy, pickle, torch.load)
        from nmfx.srste import ensure_optimizer_hook

        ensure_optimizer_hook()  # a fresh process that only unpickles must train SR-STE too

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        # Runs after the owner's own parameters were loaded (parents load before children):
        # a stored mask must describe the loaded weights, not the ones sparsify saw.
        super()._load_from_state_dict(*args, **kwargs)
        if self.stores_mask:
            with torch.no_grad():
                self.mask.copy_(self.compute_mask(self.weight))

    @property
    def stores_mask(self) -> bool:
        return self.mask_mode == "fixed" or self.mask_interval > 1

    @property
    def owner(self) -> nn.Module:
        return self._owner[0]

    @property
    def weight(self) -> torch.Tensor:
        return self.owner.get_parameter(self.param_name)

    def compute_mask(self, weight: torch.Tensor) -> torch.Tensor:
        return nm_mask(weight, (self.n, self.m), self.reduce_dim)

    def current_mask(self) -> torch.Tensor:
        """The mask the last forward used (recomputed from the weight where not stored)."""
        if self.mask is not None:
            return self.mask
        weight = self.weight
        cached = self._cached_mask(weight)
        return cached if cached is not None else self.compute_mask(weight)

    def _cached_mask(self, weight: torch.Tensor) -> torch.Tensor | None:
        """The mask the last eager forward computed, if ``weight`` has not changed since."""
        last = self._last
        if (
            last is not None
            and last[0] == weight._version
            and last[1].device == weight.device
            and last[1].shape == weight.shape
        ):
            return last[1]
        return None

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        tracks = self._tracks_steps(weight)
        if tracks:
            self._check_stepped_with_term(weight)
        if not self.stores_mask and _use_kernel(weight, self.m):  # eager CPU, dynamic mask
            return _FusedStraightThroughMask.apply(weight, self, tracks)
        masked = self._masked(weight)
        if tracks:
            masked.register_hook(self._note_backward)
        return masked

    def packed_linear(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor | None:
        """``linear(x, self(weight), bias)`` with the GEMM on the packed weight, or None where
        that path does not apply (then the caller runs the graph: masker, then F.linear)."""
        code = self._sparse_gemm_code(x, weight, bias)
        if code is None:
            return None
        tracks = self._tracks_steps(weight)
        if tracks:
            self._check_stepped_with_term(weight)
        return _PackedLinear.apply(x, weight, bias, self, tracks, code)

    def compiled_packed_linear(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor | None:
        """Under ``torch.compile``: ``linear(x, self(weight), bias)`` as one
        ``nmfx::srste_packed_linear`` node where :meth:`packed_linear`'s static conditions
        hold (the op asks the tuner per call, and runs ``F.linear`` on the masked copy where
        it picks dense), else None. As the compiled masked-copy forward, it tracks no steps:
        the optimizer hook adds the SR-STE term either way."""
        if (
            torch.compiler.is_exporting()  # an exported graph keeps plain aten ops
            or torch.is_autocast_enabled("cpu")
            or not self._packed_applies(x, weight, bias)
        ):
            return None
        return srste_packed_linear_op(x, weight, bias, self.n, self.m)[0]

    def _packed_applies(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> bool:
        """The static conditions of the packed forward: a training forward (an eval forward
        stays bit-identical to ``F.linear`` on the masked weight; inference runs
        ``nmfx.lower``'s model), CPU fp32, a plain 2-D weight grouped along dim 1 of at least
        ``SPARSE_GEMM_MIN_NUMEL`` elements, and no hook on the masker."""
        return (
            self.sparse_gemm
            and self.training
            and weight.requires_grad
            and torch.is_grad_enabled()
            and not self.stores_mask
            and type(x) is torch.Tensor
            and weight.dtype == torch.float32
            and x.dtype == torch.float32
            and weight.dim() == 2
            and self.reduce_dim in (1, -1)
            and self.m in (4, 8, 16)
            and weight.numel() >= SPARSE_GEMM_MIN_NUMEL
            and x.dim() >= 2
            and x.shape[-1] == weight.shape[1]
            and x.numel() > 0
            and x.device.type == "cpu"
            and weight.is_contiguous()
            and (bias is None or (bias.dtype == torch.float32 and bias.dim() == 1))
            and not (self._forward_hooks or self._forward_pre_hooks or _global_module_hooks())
            and kernel_supports(weight, self.m)
        )

    def _sparse_gemm_code(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> int | None:
        """nm_gemm's path code for this eager call, or None: the static conditions, eager
        state (no compile, tracing, autocast, modes) and the tuner's choice of a sparse kernel
        at this batch."""
        if _eager_state_differs() or not self._packed_applies(x, weight, bias):
            return None
        from nmfx.kernels import _dispatch, _ops

        rows, cols = weight.shape
        batch = x.numel() // cols
        choice = _dispatch.choose(batch, weight.dtype, self.n, self.m, rows, cols)
        if choice == "dense":
            return None
        return _ops._kernel_code(choice)

    def _tracks_steps(self, weight: torch.Tensor) -> bool:
        return (
            self.training
            and weight.requires_grad
            and torch.is_grad_enabled()
            and self.srste_lambda != 0
            and self.mask_mode != "fixed"
            and not torch.compiler.is_compiling()
        )

    def _note_backward(self, grad: torch.Tensor) -> None:
        self._backward_version = self.weight._version

    def _check_stepped_with_term(self, weight: torch.Tensor) -> None:
        """Warn (once per process) when the weight changed after a backward without the term."""
        global _WARNED_NO_TERM
        seen = self._backward_version
        if seen is None or weight._version == seen:
            return  # no backward yet, or not stepped yet (gradient accumulation)
        if not self._term_since_backward and not _WARNED_NO_TERM:
            _WARNED_NO_TERM = True
            warnings.warn(
                f"nmfx: {type(self.owner).__name__}.{self.param_name} changed after a backward "
                f"pass without the SR-STE term (lambda_W={self.srste_lambda:g}): the optimizer "
                f"that stepped it is not a torch.optim.Optimizer (or bypasses its step hooks), "
                f"so it trains as plain STE. Call nmfx.add_srste_terms(params) right before "
                f"that optimizer's step",
                UserWarning,
                stacklevel=2,
            )
        self._backward_version, self._term_since_backward = None, False

    def _fused_forward(self, weight: torch.Tensor) -> torch.Tensor:
        w = weight.detach()
        if w.is_contiguous():
            return self._outputs.fill(w, self.n, self.m, self.reduce_dim)
        # a transposed or sliced parameter: fresh outputs
        return masked_with_mask(w, (self.n, self.m), self.reduce_dim)[1]

    def _masked(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.stores_mask:
            if not torch.compiler.is_compiling():  # no kernel here: the comparisons
                mask = self.compute_mask(weight)
                self._last = (weight._version, mask)
                return _StraightThroughMask.apply(weight, mask, False)
            if compiled_mask_op_applies(weight, self.n, self.m, self.reduce_dim):
                return srste_masked_op(weight, self.n, self.m, self.reduce_dim)
            mask = self.compute_mask(weight)
        else:
            refresh = self._refresh_pending
            if self.training and self.mask_mode != "fixed":
                refresh = refresh or self.forward_count % self.mask_interval == 0
                self.forward_count += 1
            if refresh:
                self.mask.copy_(self.compute_mask(weight))
                self._refresh_pending = False
            mask = self.mask
        return _StraightThroughMask.apply(weight, mask, self.mask_mode == "fixed")

    @torch.no_grad()
    def add_srste_term(self) -> bool:
        """grad += lambda_W * (1 - E) (.) W, on the unscaled gradient, once per gradient: a
        second optimizer stepping the same weight on the same gradient adds nothing. Returns
        whether the term was added."""
        weight = self.weight
        if weight.grad is None or self.srste_lambda == 0:
            return False
        self._term_since_backward = True
        done = self._term_grad
        if done is not None and done[0]() is weight.grad and weight.grad._version == done[1]:
            return False
        self._apply_term(weight)
        self._term_grad = (weakref.ref(weight.grad), weight.grad._version)
        return True

    def _apply_term(self, weight: torch.Tensor) -> None:
        grad, w = weight.grad, weight.detach()
        if _is_dtensor(w):  # FSDP2 / DTensor: work on this rank's shard, no communication
            mask = self._shard_mask(w, grad)
            grad, w = grad.to_local(), w.to_local()
        elif self.mask is None:
            if (
                grad.is_contiguous() and w.is_contiguous()
                and grad.dtype == w.dtype and _use_kernel(w, self.m)
            ):  # fmt: skip
                # the mask recomputed in registers from the weight this pass reads anyway:
                # one pass over (w, grad), nothing stored by the forward (eager or compiled)
                torch.ops.nmfx_cpu.srste_decay_nm_(
                    grad, w, self.n, self.m, self.reduce_dim, self.srste_lambda
                )
                return
            mask = self.current_mask()
        else:
            mask = self.mask
        if (
            grad.is_contiguous() and w.is_contiguous() and mask.is_contiguous()
            and grad.dtype == w.dtype and _use_kernel(w, self.m)
        ):  # fmt: skip
            torch.ops.nmfx_cpu.srste_decay_(grad, w, mask, self.srste_lambda)
        else:
            grad.add_(torch.where(mask, 0, w), alpha=self.srste_lambda)

    def _shard_mask(self, w: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """The mask of the full logical weight, restricted to this rank's shard of DTensor ``w``.

        Groups of M run along ``reduce_dim``. A shard that cuts no group (FSDP2 shards dim 0:
        the rows of a Linear ``[out, in]``, whose groups run along ``in``) has the slice of
        the full mask as its own mask, so it is computed from the local shard alone. A
        stored (fixed/interval) mask is full size on every rank and is sliced.
        """
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        if not _is_dtensor(grad) or tuple(grad.placements) != tuple(w.placements):
            raise RuntimeError(
                f"{type(self.owner).__name__}.{self.param_name} is a DTensor with placements "
                f"{w.placements} but "
                f"its .grad has {getattr(grad, 'placements', type(grad).__name__)}; nmfx adds "
                f"the SR-STE term shard by shard and needs both laid out alike"
            )
        local = w.to_local()
        _, offset = compute_local_shape_and_global_offset(w.shape, w.device_mesh, w.placements)
        if self.mask is not None:
            return self.mask[
                tuple(slice(o, o + s) for o, s in zip(offset, local.shape, strict=True))
            ]
        dim = self.reduce_dim % w.dim()
        size, start = local.shape[dim], offset[dim]
        if size != w.shape[dim] and (size % self.m or start % self.m):
            raise RuntimeError(
                f"{type(self.owner).__name__}.{self.param_name} {tuple(w.shape)} is sharded along "
                f"its reduction dim {dim} (this rank holds {start}..{start + size - 1}, "
                f"placements {w.placements}), "
                f"which cuts groups of M={self.m}: the mask of a shard would not be the mask of "
                f"the full weight. Shard it along another dim (fully_shard(..., "
                f"shard_placement_fn=lambda p: Shard({1 - dim if w.dim() == 2 else 0}))) or use "
                f"a world size for which ceil({w.shape[dim]} / world) is a multiple of {self.m}"
            )
        return nm_mask(local, (self.n, self.m), dim)

    def extra_repr(self) -> str:
        return (
            f"{self.param_name}, {self.n}:{self.m} along dim {self.reduce_dim}, "
            f"mode={self.mask_mode}, lambda_W={self.srste_lambda:g}"
        )


class RewrittenForward:
    """A module's forward, replaced by the code generated from its rewritten FX graph.

    The graph module holds only stand-ins for the attributes it names; the code runs with
    the real module as ``self``, so parameters, buffers and children stay where they were.
    """

    def __init__(self, owner: nn.Module, code: fx.GraphModule) -> None:
        self._owner = (owner,)
        self._code = (code,)
        self._linear = _masked_linear_names(code.graph)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        linear = getattr(self, "_linear", None)  # pickled before the attribute existed: None
        if (
            linear is not None
            and len(args) == 1
            and not kwargs
            and isinstance(args[0], torch.Tensor)  # not an FX proxy
        ):
            owner = self._owner[0]
            # dotted targets (``inner.weight``) where the module reads a child's parameter
            masker, weight, bias = (None if a is None else attrgetter(a)(owner) for a in linear)
            if torch.compiler.is_compiling():
                y = masker.compiled_packed_linear(args[0], weight, bias)
            else:
                y = masker.packed_linear(args[0], weight, bias)
            if y is not None:
                return y
        return type(self._code[0]).forward(self._owner[0], *args, **kwargs)

    @property
    def graph(self) -> fx.Graph:
        return self._code[0].graph


class _ModeDispatch(RewrittenForward):
    """RewrittenForward with separate train/eval code (a forward that reads ``self.training``
    traces to two graphs; the one matching the module's mode runs)."""

    def __init__(self, owner: nn.Module, train: fx.GraphModule, evaluate: fx.GraphModule) -> None:
        super().__init__(owner, train)
        self._eval_code = (evaluate,)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        owner = self._owner[0]
        code = self._code[0] if owner.training else self._eval_code[0]
        return type(code).forward(owner, *args, **kwargs)


_LINEARS = (torch._C._nn.linear, F.linear)


def _masked_linear_names(graph: fx.Graph) -> tuple[str, str, str | None] | None:
    """``(masker, weight, bias)`` attribute names when ``graph`` is exactly
    ``linear(x, masker(weight), bias)`` (a sparsified ``nn.Linear``), else None."""
    nodes = list(graph.nodes)
    ops = [n.op for n in nodes]
    if ops[0] != "placeholder" or ops.count("placeholder") != 1 or ops[-1] != "output":
        return None
    out = nodes[-1].args[0]
    if not isinstance(out, fx.Node) or out.op != "call_function" or out.target not in _LINEARS:
        return None
    if out.kwargs or len(out.args) not in (2, 3) or out.args[0] is not nodes[0]:
        return None
    masked, bias = out.args[1], out.args[2] if len(out.args) == 3 else None
    if not (isinstance(masked, fx.Node) and masked.op == "call_module" and len(masked.args) == 1):
        return None
    weight = masked.args[0]
    if not (isinstance(weight, fx.Node) and weight.op == "get_attr") or masked.kwargs:
        return None
    if bias is not None and not (isinstance(bias, fx.Node) and bias.op == "get_attr"):
        return None
    used = {nodes[0], weight, masked, out, nodes[-1]} | ({bias} if bias is not None else set())
    if len(nodes) != len(used):
        return None  # any other node: not this pattern
    return masked.target, weight.target, None if bias is None else bias.target


def _global_module_hooks() -> bool:
    """Whether a process-wide module hook is registered (it would see the masker's call)."""
    from torch.nn.modules import module as torch_module

    return bool(torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks)


def _eager_state_differs() -> bool:
    """Whether anything could make the fused path differ from the graph's ops: compiling or
    FX tracing, autocast, torch function/dispatch modes, functorch transforms."""
    return (
        torch.compiler.is_compiling()
        or fx._symbolic_trace.is_fx_symbolic_tracing()
        or torch.is_autocast_enabled("cpu")
        or torch._C._len_torch_dispatch_stack() > 0
        or torch._C._is_torch_function_mode_enabled()
        or torch._C._are_functorch_transforms_active()
    )


def rewritten_forward(owner: nn.Module, graphs: dict[bool, fx.Graph]) -> RewrittenForward:
    """The forward to install on ``owner``: one graph, or one per ``training`` mode."""
    if len(graphs) == 1:
        return RewrittenForward(owner, _code_module(next(iter(graphs.values()))))
    return _ModeDispatch(owner, _code_module(graphs[True]), _code_module(graphs[False]))


def _stand_ins(graph: fx.Graph) -> dict[str, Any]:
    """Placeholders for the attributes a graph names: the code runs on the real module."""
    out: dict[str, Any] = {}
    for node in graph.nodes:
        if node.op == "get_attr":
            out[node.target] = torch.empty(0)
        elif node.op == "call_module":
            out[node.target] = nn.Identity()
    return out


_CODE_CACHE: dict[str, fx.GraphModule] = {}


def _code_module(graph: fx.Graph) -> fx.GraphModule:
    """A GraphModule whose only job is its generated forward; shared by every module whose
    rewritten forward is the same code (e.g. all nn.Linear layers)."""
    for node in graph.nodes:  # string annotations (postponed) would make the code unpicklable
        node.type = None
    src = graph.python_code("self").src
    code = _CODE_CACHE.get(src)
    if code is None:
        code = _CODE_CACHE[src] = fx.GraphModule(_stand_ins(graph), graph)
    return code


class MHAForward:
    """``nn.MultiheadAttention.forward`` (the general path) with masked projection weights."""

    def __init__(self, owner: nn.MultiheadAttention, maskers: dict[str, str]) -> None:
        self._owner = (owner,)
        self.maskers = dict(maskers)  # weight path in the MHA -> masker attribute name

    def _weight(self, mha: nn.MultiheadAttention, path: str) -> torch.Tensor | None:
        weight = mha.get_parameter(path) if _has_param(mha, path) else None
        if weight is not None and path in self.maskers:
            return getattr(mha, self.maskers[path])(weight)
        return weight

    def __call__(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        mha = self._owner[0]
        batched = query.dim() == 3
        if mha.batch_first and batched:
            query, key, value = (t.transpose(1, 0) for t in (query, key, value))
        separate = not mha._qkv_same_embed_dim
        out, weights = F.multi_head_attention_forward(
            query, key, value, mha.embed_dim, mha.num_heads,
            self._weight(mha, "in_proj_weight"), mha.in_proj_bias,
            mha.bias_k, mha.bias_v, mha.add_zero_attn, mha.dropout,
            self._weight(mha, "out_proj.weight"), mha.out_proj.bias,
            training=mha.training, key_padding_mask=key_padding_mask,
            need_weights=need_weights, attn_mask=attn_mask,
            use_separate_proj_weight=separate,
            q_proj_weight=self._weight(mha, "q_proj_weight") if separate else None,
            k_proj_weight=self._weight(mha, "k_proj_weight") if separate else None,
            v_proj_weight=self._weight(mha, "v_proj_weight") if separate else None,
            average_attn_weights=average_attn_weights, is_causal=is_causal,
        )  # fmt: skip
        if mha.batch_first and batched:
            out = out.transpose(1, 0)
        return out, weights


def _is_dtensor(t: object) -> bool:
    # No DTensor can exist unless torch.distributed.tensor was imported: do not import it here.
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(t, mod.DTensor)


def _has_param(module: nn.Module, path: str) -> bool:
    try:
        return module.get_parameter(path) is not None
    except AttributeError:
        return False
