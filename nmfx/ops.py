"""The ``nmfx::nm_linear`` and ``nmfx::srste_masked`` custom ops, registered by ``import nmfx``
without building anything.

Graphs saved with ``torch.export`` name the op; a fresh process must resolve it right after
``import nmfx``, so the schema, the fake (shape) kernel and autograd live here, in a module
that imports no C++ extension. The eager implementation is looked up on first call in
``nmfx.kernels._ops`` (which builds the kernels lazily). The packed weight travels as
plain tensors and ints (values, mask, rows, cols, n, m) so graphs hold nothing nmfx-specific.

``nmfx::srste_masked`` is the SR-STE masked weight under ``torch.compile``: one opaque call
to the fused C++ mask kernel (mask + masked weight in one pass) with an identity
(straight-through) backward, where the comparisons of ``nmfx.masks`` would be decomposed by
inductor into many small kernels. Its output goes into a buffer reused step after step per
weight (as the eager masker's): a fresh multi-MB output per call was page-faulted in again
on every step (~4000 minor faults per step for the 4 x 1024 MLP, none for dense).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from nmfx.packed import unpack_buffers

if TYPE_CHECKING:
    from nmfx.masks import MaskOutputs

__all__ = [
    "compiled_mask_op_applies",
    "nm_linear_op",
    "srste_masked_op",
    "srste_packed_linear_op",
]


@torch.library.custom_op("nmfx::nm_linear", mutates_args=(), device_types="cpu")
def nm_linear_op(
    x: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    bias: torch.Tensor | None,
    rows: int,
    cols: int,
    n: int,
    m: int,
    dispatch: int = -1,
) -> torch.Tensor:
    """y = x @ W.T + bias for the packed N:M weight W given as (values, mask, rows, cols, n, m);
    ``dispatch``: the layer's tuned per-bucket kernel choices (-1: tuned on first call)."""
    from nmfx.kernels._ops import compute  # the kernels load (and build) on first call only

    return compute(x, values, mask, bias, rows, cols, n, m, dispatch)


@nm_linear_op.register_fake
def _nm_linear_fake(
    x: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    bias: torch.Tensor | None,
    rows: int,
    cols: int,
    n: int,
    m: int,
    dispatch: int = -1,
) -> torch.Tensor:
    torch._check(x.shape[-1] == cols)
    return x.new_empty((*x.shape[:-1], rows))


def _setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: object) -> None:
    _x, values, mask, bias, rows, cols, n, m, *_dispatch = inputs
    if values.requires_grad:
        raise RuntimeError(
            f"nmfx::nm_linear: the packed values of a lowered [{rows}, {cols}] {n}:{m} layer "
            f"require grad, but packed weights are frozen (gradients reach the input and the "
            f"bias only): call values.requires_grad_(False) on the layer, or train the model "
            f"before nmfx.lower (nmfx.sparsify keeps dense, trainable weights)"
        )
    ctx.save_for_backward(values, mask)
    ctx.meta = (rows, cols, n, m, bias is not None)


def _backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple:
    # Gradients reach x and bias only: packed weights are frozen inference artifacts.
    values, mask = ctx.saved_tensors
    rows, cols, _n, _m, has_bias = ctx.meta
    w = unpack_buffers(values, mask, (rows, cols))
    grad_x = grad @ w
    grad_bias = grad.reshape(-1, rows).sum(0) if has_bias else None
    return grad_x, None, None, grad_bias, None, None, None, None, None


nm_linear_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("nmfx::srste_masked", mutates_args=(), device_types="cpu")
def srste_masked_op(weight: torch.Tensor, n: int, m: int, dim: int) -> torch.Tensor:
    """``where(E, weight, 0)``, E the N:M mask of groups of ``m`` along ``dim`` (contiguous)."""
    from nmfx.kernels import _build
    from nmfx.masks import nm_mask

    w = weight.contiguous()
    if not _build.extension_available():  # a compiled graph loaded where the kernels fail
        return torch.where(nm_mask(w, (n, m), dim), w, 0)
    out = _masked_output(weight, w)
    torch.ops.nmfx_cpu.nm_mask_apply_out(w, n, m, dim, None, out)
    return out


# weight -> its reused masked output (a ReusedTensor); entries die with their weight.
_MASKED_OUTPUTS: WeakIdKeyDictionary = WeakIdKeyDictionary()
_MASKED_OUTPUTS_LOCK = threading.Lock()


def _masked_output(weight: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The output of ``srste_masked(weight)``: the buffer of the previous call on the same
    weight once nothing holds it any more (autograd frees it after the backward), else a new
    one. ``w`` is ``weight`` made contiguous; a copy (strided weight) gets a fresh output."""
    from nmfx.masks import ReusedTensor

    if w is not weight:
        return torch.empty_like(w)
    with _MASKED_OUTPUTS_LOCK:
        reused = _MASKED_OUTPUTS.get(weight)
        if reused is None:
            reused = _MASKED_OUTPUTS[weight] = ReusedTensor()
    return reused.take(w.shape, w.dtype)


@srste_masked_op.register_fake
def _srste_masked_fake(weight: torch.Tensor, n: int, m: int, dim: int) -> torch.Tensor:
    return torch.empty_like(weight, memory_format=torch.contiguous_format)


def _srste_masked_backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple:
    return grad, None, None, None  # straight-through: every weight gets the gradient


srste_masked_op.register_autograd(_srste_masked_backward)


def compiled_mask_op_applies(weight: torch.Tensor, n: int, m: int, dim: int) -> bool:
    """Whether a compiled SR-STE forward masks ``weight`` with ``nmfx::srste_masked``."""
    from nmfx.masks import kernel_supports

    return weight.shape[dim] % m == 0 and kernel_supports(weight, m)


@torch.library.custom_op("nmfx::srste_packed_linear", mutates_args=(), device_types="cpu")
def srste_packed_linear_op(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, n: int, m: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(linear(x, Wm, bias), Wm)``, ``Wm = where(E, weight, 0)`` with E the N:M mask of a
    contiguous fp32 ``[rows, cols]`` weight grouped along dim 1: a compiled SR-STE training
    forward's ``linear(x, masker(W), b)`` as one node. Where the kernel tuner picks a sparse
    kernel for this batch, one pass writes Wm and its packed form and the GEMM runs on the
    packed form; else Wm and ``F.linear``. Wm is returned for the backward (``F.linear``'s, on
    Wm), into a buffer reused step after step per weight, like ``srste_masked``'s."""
    from nmfx.kernels import _dispatch, _ops

    rows, cols = weight.shape
    x2 = x.reshape(-1, cols).contiguous()
    outputs = _packed_outputs(weight)
    choice = _dispatch.choose(x2.shape[0], weight.dtype, n, m, rows, cols)
    if choice == "dense":
        masked = outputs.fill(weight, n, m, 1)
        y = F.linear(x2, masked, bias)
    else:
        masked, values, bits = outputs.fill_packed(weight, n, m)
        code = _ops._kernel_code(choice)
        y = _ops._op("nm_gemm")(x2, values, bits, bias, rows, cols, n, m, code)
    return y.reshape(*x.shape[:-1], rows), masked


# weight -> the MaskOutputs of srste_packed_linear; entries die with their weight.
_PACKED_OUTPUTS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _packed_outputs(weight: torch.Tensor) -> MaskOutputs:
    from nmfx.masks import MaskOutputs

    with _MASKED_OUTPUTS_LOCK:
        outputs = _PACKED_OUTPUTS.get(weight)
        if outputs is None:
            outputs = _PACKED_OUTPUTS[weight] = MaskOutputs()
    return outputs


@srste_packed_linear_op.register_fake
def _srste_packed_linear_fake(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, n: int, m: int
) -> tuple[torch.Tensor, torch.Tensor]:
    torch._check(x.shape[-1] == weight.shape[1])
    y = x.new_empty((*x.shape[:-1], weight.shape[0]))
    return y, torch.empty_like(weight, memory_format=torch.contiguous_format)


def _packed_setup_context(
    ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: tuple
) -> None:
    x, weight, _bias, n, m = inputs
    masked = output[1]
    ctx.save_for_backward(x, masked)
    ctx.mark_non_differentiable(masked)
    ctx.set_materialize_grads(False)
    # not saved: the optimizer steps W in place after the backward (a retained graph's second
    # backward must not trip the version check); read only by a double backward
    ctx.weight, ctx.nm = weight, (n, m)


def _packed_backward(
    ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor | None, _grad_masked: object
) -> tuple:
    """``F.linear``'s backward on the saved masked weight; the weight's gradient is the
    straight-through one (every weight gets it). Under ``create_graph`` the masked weight is
    recomputed differentiably (``srste_masked``: straight-through) for the double backward."""
    x, masked = ctx.saved_tensors
    if grad is None:
        return None, None, None, None, None
    if torch.is_grad_enabled():
        masked = srste_masked_op(ctx.weight, *ctx.nm, 1)
    g2 = grad.reshape(-1, grad.shape[-1])
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    grad_x = (g2 @ masked).reshape(x.shape) if need_x else None
    grad_w = g2.t().mm(x.reshape(-1, x.shape[-1])) if need_w else None
    grad_b = g2.sum(0) if need_b else None
    return grad_x, grad_w, grad_b, None, None


srste_packed_linear_op.register_autograd(_packed_backward, setup_context=_packed_setup_context)
