"""Lowering to nmfx's CPU kernels: each N:M linear layer (``nn.Linear``, GPT-2 ``Conv1D``)
becomes an ``NMLinear`` holding the packed weight and calling the ``nmfx::nm_linear`` custom op (traceable by
``torch.compile`` and ``torch.export``). The op runs, per call, the kernel path (or the dense
branch) that the layer's autotuning measured fastest on this host for the call's rows of x.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from nmfx.kernels import _cpp_linear, _ops
from nmfx.kernels.module import PackedLinearBase
from nmfx.lowering.memory import release_kernel_scratch
from nmfx.packed import SUPPORTED_DTYPES, SUPPORTED_M, PackedNM, pack
from nmfx.pattern import NMPattern
from nmfx.plan import DENSE, SPARSE, LayerDecision, NMWeight

__all__ = ["NMLinear", "cpu_decision", "cpu_reason", "lower_cpu"]

log = logging.getLogger("nmfx.lowering")


class NMLinear(PackedLinearBase):
    """Inference ``nn.Linear`` with a packed N:M weight (values + bitmask buffers)."""

    def __init__(self, packed: PackedNM, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = packed.shape
        self.n, self.m = packed.pattern.n, packed.pattern.m
        # Its own storage, exactly its size (safetensors' save_model refuses a view of a larger
        # one, e.g. the SIMD slack of PackedNM.values; the kernels pad the last rows per call).
        self.register_buffer("values", packed.values.clone())
        self.register_buffer("mask", packed.mask)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear, pattern: object) -> NMLinear:
        return cls(pack(linear.weight.detach(), pattern), linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The buffers straight from _buffers: nn.Module.__getattr__ costs ~0.4 us per buffer,
        # a lot next to a GEMV of a few tens of microseconds.
        buffers = self._buffers
        bias = buffers["bias"]
        args = (
            buffers["values"],
            buffers["mask"],
            bias,
            self.out_features,
            self.in_features,
            self.n,
            self.m,
            self.dispatch,
        )
        if _ops.eager_fast_path_ok(x, bias):
            op = _cpp_linear.EAGER_OP[0]  # the C++ op (choice settled in C++), once loaded
            return _ops.compute(x, *args) if op is None else op(x, *args)
        if torch.compiler.is_compiling() and _cpp_linear.applies(x, bias):
            return torch.ops.nmfx_cpu.nm_linear(x, *args)  # compiled: no Python wrapper per call
        return torch.ops.nmfx.nm_linear(x, *args)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"pattern={self.n}:{self.m}, dtype={self.values.dtype}, bias={self.bias is not None}"
        )


def cpu_reason(weight: torch.Tensor, pattern: NMPattern | None, reduce_dim: int = 1) -> str | None:
    """Why an N:M ``[out, in]`` weight stays dense on the CPU target, or None: the one rule
    that ``nmfx.lower(..., "cpu")`` and ``backend="nmfx"`` both apply."""
    if pattern is None:
        return "weight is not N:M along in_features"
    if reduce_dim not in (1, -1):
        return f"N:M along dim {reduce_dim}, the CPU kernel needs it along in_features"
    if pattern.m not in SUPPORTED_M:
        return f"pattern {pattern} has M={pattern.m}; the CPU kernel supports M in {SUPPORTED_M}"
    if weight.dtype not in SUPPORTED_DTYPES:
        return f"dtype {weight.dtype} is not one of {sorted(map(str, SUPPORTED_DTYPES))}"
    if weight.device.type != "cpu":
        return f"weight is on {weight.device}; move the model to CPU for target='cpu'"
    return None


def cpu_decision(
    name: str, param: str, op: str, weight: torch.Tensor, pattern: NMPattern | None,
    reduce_dim: int = 1,
) -> tuple[LayerDecision, PackedNM | None]:  # fmt: skip
    """The CPU conversion of one ``[out, in]`` weight: its decision, and the packed weight
    when it goes sparse. Used by ``lower_cpu`` and by the ``backend="nmfx"`` pass alike."""
    reason = cpu_reason(weight, pattern, reduce_dim)
    if reason is not None:
        return LayerDecision(name, param, op, "cpu", DENSE, reason), None
    packed = pack(weight.detach().contiguous(), pattern)
    # Which kernel path (or dense) runs per rows of x: measured on this host now (or cached),
    # not in the first forward.
    from nmfx.kernels import autotune, dense_call_reason, dispatch_summary, encode_choices

    choices = next(iter(autotune([packed]).values()))
    kept = dense_call_reason(packed)  # a small layer whose lowered call measured slower
    release_kernel_scratch()  # what tuning's probes (up to 512 rows of x) left per thread
    if kept is not None:
        return LayerDecision(name, param, op, "cpu", DENSE, kept), None
    return LayerDecision(
        name, param, op, "cpu", SPARSE,
        f"packed {pattern}, {packed.nbytes / packed.dense_nbytes:.0%} of dense bytes; runs "
        f"{dispatch_summary(encode_choices(choices))}",
        {"packed_bytes": packed.nbytes, "dense_bytes": packed.dense_nbytes, "dispatch": choices},
    ), packed  # fmt: skip


def _linear_form(
    module: nn.Module | None, nm: NMWeight
) -> tuple[torch.Tensor, torch.Tensor | None, int] | str:
    """``(weight [out, in], bias, reduce dim of that weight)`` when ``module`` computes
    ``linear(x, weight, bias)`` and can be swapped for an ``NMLinear``; else why not."""
    if module is None:
        return "weight is not a module's own parameter"
    local = nm.param.rpartition(".")[2]
    if nm.op.startswith("mha."):
        return (
            "nn.MultiheadAttention runs its projections inside F.multi_head_attention_forward; "
            "use separate nn.Linear q/k/v/out projections to lower them"
        )
    if isinstance(module, nn.Linear):
        if local != "weight":
            return f"{nm.param} is not the layer's .weight"
        return module.weight, module.bias, nm.reduce_dim
    if nm.op.startswith("conv"):
        return (
            "convolutions stay dense on CPU: the packed kernel is a GEMV/GEMM and "
            "implicit-GEMM conv is not implemented"
        )
    if nm.op in ("addmm", "matmul") and local == "weight" and _is_x_at_w(module):
        # GPT-2 Conv1D: y = x @ W + b with W [in, out], i.e. linear(x, W.T, b)
        return module.weight.t(), module.bias, 1 - nm.reduce_dim % 2
    return f"{nm.op} is not an nn.Linear; only nn.Linear lowers to the packed CPU kernel"


@torch.no_grad()
def _is_x_at_w(module: nn.Module) -> bool:
    """True when ``module(x) == x @ module.weight + module.bias`` on a probe (HF ``Conv1D``)."""
    w, b = getattr(module, "weight", None), getattr(module, "bias", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or not w.is_floating_point():
        return False
    if b is not None and (not isinstance(b, torch.Tensor) or tuple(b.shape) != (w.shape[1],)):
        return False
    probe = torch.randn(3, w.shape[0], dtype=w.dtype, device=w.device)
    try:
        out = module(probe)
    except Exception:  # any failure means: not a plain x @ W + b layer
        return False
    ref = probe @ w + (b if b is not None else 0)
    tol = 1e-3 if w.dtype == torch.float32 else 3e-2
    return (
        isinstance(out, torch.Tensor)
        and out.shape == ref.shape
        and bool(torch.allclose(out, ref, rtol=tol, atol=tol))
    )


def lower_cpu(
    model: nn.Module, nm_weights: dict[str, NMWeight]
) -> tuple[nn.Module, list[LayerDecision]]:
    """Swap every eligible N:M linear layer of ``model`` (changed in place) for ``NMLinear``:
    ``nn.Linear`` and layers computing ``x @ W + b`` (GPT-2 ``Conv1D``, op ``addmm``)."""
    from nmfx.kernels import autotune  # the op and its tuning, loaded lazily

    decisions, swaps = [], []
    modules = dict(model.named_modules())
    for nm in nm_weights.values():
        owner_fqn = nm.param.rpartition(".")[0]
        form = _linear_form(modules.get(owner_fqn), nm)
        if isinstance(form, str):
            decisions.append(LayerDecision(nm.name, nm.param, nm.op, "cpu", DENSE, form))
            continue
        weight, bias, reduce_dim = form
        decision, packed = cpu_decision(nm.name, nm.param, nm.op, weight, nm.pattern, reduce_dim)
        decisions.append(decision)
        if packed is not None:
            swaps.append((owner_fqn, NMLinear(packed, bias)))
    for fqn, new in swaps:
        parent_fqn, _, attr = fqn.rpartition(".")
        setattr(model.get_submodule(parent_fqn), attr, new)
    if swaps:  # each layer carries its tuned choices (tuned in cpu_decision; from memory now)
        autotune([new for _, new in swaps], progress=False)
    log.info("lower(cpu): %d of %d N:M layers packed", len(swaps), len(nm_weights))
    return model, decisions
