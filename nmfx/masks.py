"""N:M masks: which N of every M consecutive weights along the reduction dim are kept.

The mask is computed by comparisons inside each group (rank of every element among its
M neighbours), never by sorting: for M = 4 that is six compares per group and it fuses
under ``torch.compile``.

Ties and non-finite values, the documented rules:

- equal magnitudes: the element with the lower index in its group wins (deterministic);
- NaN counts as the largest magnitude (like +/-Inf), so a diverged weight is kept and
  shows up in the output instead of being hidden by the mask; among NaN/Inf the lower
  index wins. Every group therefore keeps exactly N elements, whatever its values.
"""

from __future__ import annotations

import threading

import torch

from nmfx.pattern import NMPattern, parse_pattern

__all__ = ["MaskOutputs", "ReusedTensor", "is_nm", "masked_with_mask", "nm_mask"]


def _group_view(weight: torch.Tensor, m: int, dim: int) -> torch.Tensor:
    """``weight`` with ``dim`` moved last and split into ``[..., K // m, m]`` groups."""
    moved = weight.movedim(dim, -1)
    k = moved.shape[-1]
    if k % m:
        raise ValueError(
            f"reduction dim {dim} has size {k}, which is not a multiple of M={m}; "
            f"exclude the layer or pad it to a multiple of {m}"
        )
    return moved.reshape(*moved.shape[:-1], k // m, m)


def _check_weight(weight: object, dim: int, fn: str) -> int:
    """``dim`` as a non-negative index into ``weight``; errors name the value and the fix.

    ``dim`` must lie in ``[-ndim, ndim)`` (torch's own rule): wrapping 5 to 1 on a 2-D
    weight would group along a dim nobody asked for.
    """
    if not isinstance(weight, torch.Tensor):
        raise TypeError(
            f"{fn} expects a torch.Tensor weight, got {type(weight).__name__}; "
            f"wrap it with torch.tensor(...)"
        )
    if weight.dim() == 0:
        raise ValueError(
            f"{fn}: the weight is a 0-dim tensor (a scalar); N:M groups run along a dim of a "
            f"weight with at least one dim, e.g. shape [out, in]"
        )
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"{fn}: dim must be an int, got {dim!r}")
    ndim = weight.dim()
    if not -ndim <= dim < ndim:
        raise IndexError(
            f"{fn}: dim={dim} is out of range for a weight with ndim={ndim} (shape "
            f"{tuple(weight.shape)}); pass a dim in [{-ndim}, {ndim - 1}], e.g. -1 or 1 for "
            f"nn.Linear's in_features"
        )
    return dim % ndim


def _keep_from_magnitudes(mag: torch.Tensor, n: int) -> torch.Tensor:
    """Bool keep-mask for groups along the last dim of ``mag`` (no NaN in ``mag``)."""
    m = mag.shape[-1]
    cols = [mag[..., i] for i in range(m)]
    # rank[i] = how many group members beat element i; element j beats i when it is
    # larger, or equal with a lower index. Each pair (i < j) is compared once.
    ranks = [torch.zeros_like(cols[0], dtype=torch.uint8) for _ in range(m)]
    for i in range(m):
        for j in range(i + 1, m):
            i_wins = cols[i] >= cols[j]
            ranks[j] += i_wins
            ranks[i] += ~i_wins
    return torch.stack([r < n for r in ranks], dim=-1)


_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def kernel_supports(w: torch.Tensor, m: int) -> bool:
    """The C++ mask kernels take ``w`` (CPU, dtype, M, at least 4096 elements) and built."""
    if w.device.type != "cpu" or m > 16 or w.numel() < 4096:
        return False
    if w.dtype not in _KERNEL_DTYPES:  # the kernel ranks in fp32: fp64 ties would be lost
        return False
    return _kernels_built()


@torch.compiler.assume_constant_result
def _kernels_built() -> bool:
    """Build/load the kernels; under torch.compile, called once while tracing (its lock would
    otherwise break the graph) and the answer baked into the graph."""
    from nmfx.kernels import _build

    return _build.extension_available()


def _use_kernel(w: torch.Tensor, m: int) -> bool:
    """Eager CPU masks go to the fused C++ kernel (one pass); under torch.compile and FX
    tracing, and where the kernels cannot be built, the comparisons below run instead."""
    if torch.compiler.is_compiling() or torch.fx._symbolic_trace.is_fx_symbolic_tracing():
        return False
    return kernel_supports(w, m)


def nm_mask(
    weight: torch.Tensor, pattern: str | tuple[int, int] | NMPattern, dim: int = -1
) -> torch.Tensor:
    """Boolean mask keeping the N largest-magnitude weights of every M along ``dim``.

    ``dim`` is the reduction dim: 1 (``in_features``) for Linear ``[out, in]``, 1 (input
    channels) for ConvNd ``[out, in, *k]`` — groups then run over input channels at each
    kernel position — and 0 for a ``[in, out]`` weight used as ``x @ W``.
    """
    p = parse_pattern(pattern)
    dim = _check_weight(weight, dim, "nm_mask")
    w = weight.detach()
    if not (w.is_floating_point()):
        raise TypeError(f"N:M masks need a floating-point weight, got dtype {w.dtype}")
    if w.shape[dim] % p.m == 0 and _use_kernel(w, p.m):
        return torch.ops.nmfx_cpu.nm_mask(w.movedim(dim, -1), p.n, p.m).movedim(-1, dim)
    return reference_nm_mask(w, p, dim)


def masked_with_mask(
    weight: torch.Tensor, pattern: str | tuple[int, int] | NMPattern, dim: int = -1
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mask, where(mask, weight, 0))``; one fused pass over the weight on eager CPU."""
    p = parse_pattern(pattern)
    dim = _check_weight(weight, dim, "masked_with_mask")
    w = weight.detach()
    if w.is_floating_point() and w.shape[dim] % p.m == 0 and _use_kernel(w, p.m):
        mask, masked = torch.ops.nmfx_cpu.nm_mask_apply(w.movedim(dim, -1), p.n, p.m)
        return mask.movedim(-1, dim), masked.movedim(-1, dim)
    mask = nm_mask(w, p, dim)
    return mask, torch.where(mask, w, 0)


def _storage_users(t: torch.Tensor) -> int:
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


class ReusedTensor:
    """An output tensor handed out again by the next call once nothing else holds its storage.

    A training step's masked weight is saved by autograd until the backward frees the graph;
    the next forward then writes into the same memory instead of a fresh multi-MB allocation
    (which glibc returns to the OS and page-faults in again, every step). Whoever still holds
    the last one (a retained graph, a second call in one forward, the user) keeps it: a new
    tensor is allocated instead. Thread-safe.
    """

    def __init__(self) -> None:
        self._tensor: torch.Tensor | None = None
        self._idle_users = 0  # storage users of the buffer when only this object holds it
        self._lock = threading.Lock()

    def take(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """A tensor of ``shape`` and ``dtype`` that no one else holds (contents undefined)."""
        with self._lock:
            t = self._tensor
            if (
                t is None
                or t.shape != shape
                or t.dtype != dtype
                or (_storage_users(t) != self._idle_users)
                # made under inference_mode: autograd could not save it (and vice versa)
                or t.is_inference() != torch.is_inference_mode_enabled()
            ):
                t = self._tensor = torch.empty(shape, dtype=dtype)
                self._idle_users = _storage_users(t)
            return t.detach()  # an alias: while the caller holds it, the storage is busy

    def __getstate__(self) -> dict:
        return {}  # a cache: copies start empty

    def __setstate__(self, state: dict) -> None:
        self.__init__()


class MaskOutputs:
    """The reused outputs of one weight's fused mask pass: the masked weight and, for the
    forward that runs the sparse GEMM, the packed N:M form of the same weight.

    No bool mask is written: the SR-STE term recomputes it in registers from the weight it
    reads anyway (``srste_decay_nm_``), which moves fewer bytes than writing a mask here and
    reading it back in the optimizer hook.
    """

    def __init__(self) -> None:
        self.masked = ReusedTensor()
        self.values = ReusedTensor()
        self.bits = ReusedTensor()

    def __getstate__(self) -> dict:
        return {}  # caches: copies start empty

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    def fill_packed(
        self, w: torch.Tensor, n: int, m: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(masked, values, mask_bits)`` of a contiguous 2-D ``w`` grouped along dim 1, in one
        pass: the masked weight as :meth:`fill`, and its packed form (``nmfx.packed``'s values,
        with the kernels' slack after them, and mask bytes) into reused buffers."""
        from nmfx.packed import VALUE_SLACK

        rows, cols = w.shape
        kept = rows * (cols // m * n)
        masked = self.masked.take(w.shape, w.dtype)
        buf = self.values.take(torch.Size([kept + VALUE_SLACK]), w.dtype)
        buf[kept:].zero_()  # the kernels may read the slack; it multiplies nothing
        values = buf[:kept].view(rows, cols // m * n)
        bits = self.bits.take(torch.Size([rows, (cols + 7) // 8]), torch.uint8)
        torch.ops.nmfx_cpu.nm_mask_pack_out(w, n, m, masked, values, bits)
        return masked, values, bits

    def fill(self, w: torch.Tensor, n: int, m: int, dim: int) -> torch.Tensor:
        """``where(nm_mask(w, (n, m), dim), w, 0)`` of a contiguous ``w``, into a reused buffer
        laid out like ``w`` (a conv weight's groups run along its input channels in place)."""
        masked = self.masked.take(w.shape, w.dtype)
        torch.ops.nmfx_cpu.nm_mask_apply_out(w, n, m, dim, None, masked)
        return masked


def reference_nm_mask(w: torch.Tensor, p: NMPattern, dim: int) -> torch.Tensor:
    """The same mask from tensor ops only (traceable by torch.compile; any device)."""
    groups = _group_view(w, p.m, dim)
    mag = groups.abs()
    if mag.dtype in (torch.float16, torch.bfloat16):
        mag = mag.float()
    mag = torch.nan_to_num(mag, nan=float("inf"), posinf=float("inf"))
    keep = _keep_from_magnitudes(mag, p.n)
    moved_shape = w.movedim(dim, -1).shape
    return keep.reshape(moved_shape).movedim(-1, dim)


def is_nm(weight: torch.Tensor, pattern: str | tuple[int, int] | NMPattern, dim: int = -1) -> bool:
    """True when every group of M along ``dim`` holds at most N non-zeros."""
    p = parse_pattern(pattern)
    dim = _check_weight(weight, dim, "is_nm")
    if weight.shape[dim] % p.m:
        return False
    nonzero = _group_view(weight.detach() != 0, p.m, dim).sum(-1)
    return bool((nonzero <= p.n).all())
