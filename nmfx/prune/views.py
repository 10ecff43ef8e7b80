"""Every prunable weight as a 2-D ``[out, cols]`` matrix, and its inputs as ``[rows, cols]``.

The pruning methods only see these views. Groups of M are M consecutive columns, which is
nmfx's grouping (DESIGN: M consecutive input channels): for a linear the columns are
``in_features``; for a convolution (groups=1) they are ordered (kernel position, input
channel), so the weight view is ``W.movedim(1, -1)`` flattened and the inputs are the
im2col rows in the same order; for ``x @ W`` with ``W`` of shape ``[in, out]`` (GPT-2
``Conv1D``) the view is ``W.T``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["ConvGeometry", "im2col", "input_rows", "unview_weight", "view_weight"]


class ConvGeometry:
    """Stride, padding, dilation and padding mode of one convolution."""

    def __init__(self, kernel: Sequence[int], stride: object, padding: object,
                 dilation: object, padding_mode: str = "zeros") -> None:  # fmt: skip
        d = len(kernel)
        self.kernel = tuple(int(k) for k in kernel)
        self.stride = _tuple(stride, d)
        self.dilation = _tuple(dilation, d)
        self.padding_mode = padding_mode
        if isinstance(padding, str):
            total = [dl * (k - 1) for dl, k in zip(self.dilation, self.kernel, strict=True)]
            self.padding = tuple(
                (0, 0) if padding == "valid" else (t // 2, t - t // 2) for t in total
            )
        else:
            self.padding = tuple((p, p) for p in _tuple(padding, d))

    def key(self) -> tuple:
        return (self.kernel, self.stride, self.dilation, self.padding, self.padding_mode)


def _tuple(value: object, d: int) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * d
    return tuple(int(v) for v in value)  # type: ignore[union-attr]


def im2col(x: torch.Tensor, geo: ConvGeometry) -> torch.Tensor:
    """``[rows, prod(kernel) * C]`` patches of ``x`` ``[B, C, *spatial]``, columns ordered
    (kernel position, channel): M consecutive columns are M input channels at one position."""
    d = len(geo.kernel)
    if x.dim() == d + 1:  # unbatched input
        x = x.unsqueeze(0)
    pads = [p for pair in reversed(geo.padding) for p in pair]
    if any(pads):
        mode = "constant" if geo.padding_mode == "zeros" else geo.padding_mode
        x = F.pad(x, pads, mode=mode)
    for i in range(d):
        span = geo.dilation[i] * (geo.kernel[i] - 1) + 1
        x = x.unfold(2 + i, span, geo.stride[i])[..., :: geo.dilation[i]]
    # x: [B, C, *out_spatial, *kernel] -> [B, *out_spatial, *kernel, C]
    x = x.movedim(1, -1)
    return x.reshape(-1, math.prod(geo.kernel) * x.shape[-1])


def view_weight(weight: torch.Tensor, kind: str) -> torch.Tensor:
    """The ``[out, cols]`` fp32 view of ``weight`` (a copy)."""
    w = weight.detach().float()
    if kind == "conv":
        return w.movedim(1, -1).reshape(w.shape[0], -1).clone()
    if kind == "transposed":
        return w.t().contiguous()
    return w.clone()


def unview_weight(w2: torch.Tensor, weight: torch.Tensor, kind: str) -> torch.Tensor:
    """Inverse of ``view_weight``, in ``weight``'s shape and dtype."""
    if kind == "conv":
        moved = (weight.shape[0], *weight.shape[2:], weight.shape[1])
        out = w2.reshape(moved).movedim(-1, 1)
    elif kind == "transposed":
        out = w2.t()
    else:
        out = w2
    return out.to(weight.dtype).contiguous()


def input_rows(x: torch.Tensor, cols: int, contract_last: bool,
               geo: ConvGeometry | None = None) -> torch.Tensor:  # fmt: skip
    """The op's input as ``[rows, cols]`` fp32 rows matching ``view_weight``'s columns."""
    x = x.detach()
    if geo is not None:
        return im2col(x, geo).float()
    if not contract_last:
        x = x.transpose(-1, -2)
    return x.reshape(-1, cols).float()
