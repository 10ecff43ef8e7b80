"""The eager implementation of the ``nmfx::nm_linear`` custom op (registered in ``nmfx.ops``).

The choice of kernel path or dense is made inside the op at run time, per call shape, from the
layer's tuned per-bucket choices (its ``dispatch`` int argument), so compiled and exported graphs
keep it too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nmfx.kernels import _autotune, _build, _dispatch
from nmfx.kernels._autotune import UNTUNED
from nmfx.packed import unpack_buffers

_ISA_ENV = "NMFX_ISA"
_isa_override: list[str | None] = [None]


def current_isa() -> str:
    """The ISA path the next call will use ("auto" picks the best supported)."""
    return _isa_override[0] or _dispatch.env(_ISA_ENV) or "auto"


def isa_code() -> int:
    name = current_isa()
    if name == "auto":
        return 0
    return _named_isa_code(name)


def _named_isa_code(name: str) -> int:
    if name not in _build.ISA_CODES:
        raise ValueError(
            f"{_ISA_ENV}={name!r} is not one of {['auto', *_build.ISA_CODES]}; unset it or pick one"
        )
    supported = _build.supported_isas()
    if name not in supported:
        raise ValueError(
            f"ISA path {name!r} is not supported on this CPU (supported: {supported}); "
            f"use one of those or 'auto'"
        )
    return _build.ISA_CODES[name]


def compute(
    x: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    bias: torch.Tensor | None,
    rows: int,
    cols: int,
    n: int,
    m: int,
    dispatch: int = UNTUNED,
) -> torch.Tensor:
    """Eager implementation shared by the op and the eager fast path."""
    x2 = x if x.dim() == 2 else x.reshape(-1, cols)
    choice = _dispatch.choose(x2.shape[0], values.dtype, n, m, rows, cols, dispatch)
    if not _build.extension_available():
        y = F.linear(x2, unpack_buffers(values, mask, (rows, cols)), bias)
    elif choice == "dense":  # dense GEMM on W expanded block by block (no resident dense copy)
        isa_code()  # a bad NMFX_ISA is an error on every path, whichever this call runs
        y = _op("nm_dense")(x2, values, mask, bias, rows, cols, n, m)
    else:
        y = _op("nm_gemm")(x2, values, mask, bias, rows, cols, n, m, _kernel_code(choice))
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], rows)


_PATH_CODES: dict[str, int] = {}
_op_cache: dict[str, torch._ops.OpOverload] = {}


def _op(name: str) -> torch._ops.OpOverload:
    """``torch.ops.nmfx_cpu.<name>.default``, looked up once (~0.3 us a call otherwise)."""
    op = _op_cache.get(name)
    if op is None:
        op = _op_cache[name] = getattr(torch.ops.nmfx_cpu, name).default
    return op


def _kernel_code(choice: str) -> int:
    """nm_gemm's ISA | path argument: the choice's, under a forced ISA (NMFX_ISA / use_isa)."""
    forced = isa_code()
    if choice == "sparse":
        return forced
    code = _PATH_CODES.get(choice)
    if code is None:
        code = _PATH_CODES[choice] = _autotune.path_code(choice)
    if forced == 0:
        return code
    if forced == _build.ISA_CODES["portable"]:
        return forced  # one path only
    return forced | (code & ~0xFF)


# The op's schema, fake kernel and autograd live in nmfx.ops (registered by ``import nmfx``,
# no build); its eager implementation is ``compute`` above.
from nmfx.ops import nm_linear_op  # noqa: E402, F401


def eager_fast_path_ok(x: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """True when calling :func:`compute` directly is indistinguishable from the op.

    The op's dispatcher costs ~20 us per call, a lot for a small GEMV, so plain eager calls
    skip it; anything tracing, compiling or needing autograd goes through the op.
    """
    return (
        type(x) is torch.Tensor
        and not x.requires_grad
        and (bias is None or (type(bias) is torch.Tensor and not bias.requires_grad))
        and not torch.compiler.is_compiling()
        and torch._C._len_torch_dispatch_stack() == 0
        and not torch._C._is_torch_function_mode_enabled()
    )
