"""Lowering to nmfx's CPU kernels: each N:M ``nn.Linear`` becomes an ``NMLinear`` holding
the packed weight and calling the ``nmfx::nm_linear`` custom op (traceable by
``torch.compile`` and ``torch.export``). The op picks sparse kernel or dense per call
shape from the machine's calibration, so a lowered layer is never slower than dense.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from nmfx.kernels.module import PackedLinearBase
from nmfx.packed import SUPPORTED_DTYPES, SUPPORTED_M, PackedNM, pack
from nmfx.plan import DENSE, SPARSE, LayerDecision, NMWeight

__all__ = ["NMLinear", "cpu_eligibility", "lower_cpu"]

log = logging.getLogger("nmfx.lowering")


class NMLinear(PackedLinearBase):
    """Inference ``nn.Linear`` with a packed N:M weight (values + bitmask buffers)."""

    def __init__(self, packed: PackedNM, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = packed.shape
        self.n, self.m = packed.pattern.n, packed.pattern.m
        self.register_buffer("values", packed.values)
        self.register_buffer("mask", packed.mask)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear, pattern: object) -> NMLinear:
        return cls(pack(linear.weight.detach(), pattern), linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from nmfx.kernels import _ops

        args = (
            self.values,
            self.mask,
            self.bias,
            self.out_features,
            self.in_features,
            self.n,
            self.m,
        )
        if _ops.eager_fast_path_ok(x, self.bias):
            return _ops.compute(x, *args)
        return torch.ops.nmfx.nm_linear(x, *args)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"pattern={self.n}:{self.m}, dtype={self.values.dtype}, bias={self.bias is not None}"
        )


def cpu_eligibility(module: nn.Module, nm: NMWeight) -> str | None:
    """Why this N:M weight's layer stays dense on the CPU target, or None."""
    if nm.op.startswith("mha."):
        return (
            "nn.MultiheadAttention runs its projections inside F.multi_head_attention_forward; "
            "use separate nn.Linear q/k/v/out projections to lower them"
        )
    if not isinstance(module, nn.Linear):
        if nm.op.startswith("conv"):
            return (
                "convolutions stay dense on CPU: the packed kernel is a GEMV/GEMM and "
                "implicit-GEMM conv is not implemented"
            )
        return f"{nm.op} is not an nn.Linear; only nn.Linear lowers to the packed CPU kernel"
    weight = module.weight
    if nm.reduce_dim != 1:
        return f"N:M along dim {nm.reduce_dim}, the CPU kernel needs it along in_features"
    if nm.pattern.m not in SUPPORTED_M:
        return (
            f"pattern {nm.pattern} has M={nm.pattern.m}; the CPU kernel supports M in {SUPPORTED_M}"
        )
    if weight.dtype not in SUPPORTED_DTYPES:
        return f"dtype {weight.dtype} is not one of {sorted(map(str, SUPPORTED_DTYPES))}"
    if weight.device.type != "cpu":
        return f"weight is on {weight.device}; move the model to CPU for target='cpu'"
    from nmfx.kernels._dispatch import MIN_SPARSE_NUMEL

    if weight.numel() < MIN_SPARSE_NUMEL:
        return (
            f"{weight.numel():,} weights < {MIN_SPARSE_NUMEL:,}: below this size the sparse kernel "
            f"measured slower than dense at some batch sizes; kept as nn.Linear"
        )
    return None


def lower_cpu(
    model: nn.Module, nm_weights: dict[str, NMWeight]
) -> tuple[nn.Module, list[LayerDecision]]:
    """Swap every eligible N:M ``nn.Linear`` of ``model`` (changed in place) for ``NMLinear``."""
    from nmfx.kernels import dispatch_table  # the op and its calibration, loaded lazily

    decisions, swaps = [], []
    modules = dict(model.named_modules())
    for nm in nm_weights.values():
        owner_fqn = nm.param.rpartition(".")[0]
        module = modules.get(owner_fqn)
        reason = (
            "weight is not a module's own parameter"
            if module is None
            else cpu_eligibility(module, nm)
        )
        if reason is None and not nm.param.endswith(".weight") and nm.param != "weight":
            reason = f"{nm.param} is not the layer's .weight"
        if reason is not None:
            decisions.append(LayerDecision(nm.name, nm.param, nm.op, "cpu", DENSE, reason))
            continue
        packed = pack(module.weight.detach(), nm.pattern)
        swaps.append((owner_fqn, NMLinear(packed, module.bias)))
        decisions.append(LayerDecision(
            nm.name, nm.param, nm.op, "cpu", SPARSE,
            f"packed {nm.pattern}, {packed.nbytes / packed.dense_nbytes:.0%} of dense bytes "
            f"(sparse kernel or dense per call shape, as calibrated)",
            {"packed_bytes": packed.nbytes, "dense_bytes": packed.dense_nbytes},
        ))  # fmt: skip
    for fqn, new in swaps:
        parent_fqn, _, attr = fqn.rpartition(".")
        setattr(model.get_submodule(parent_fqn), attr, new)
    if swaps:
        dispatch_table()  # calibrate (or load the cached table) now, not in the first forward
    log.info("lower(cpu): %d of %d N:M layers packed", len(swaps), len(nm_weights))
    return model, decisions
