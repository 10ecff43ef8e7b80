"""``nmfx_cpu::nm_linear``: the packed linear that compiled graphs call, with no Python per call.

``nmfx::nm_linear`` (``nmfx.ops``) is a Python custom op: from a compiled graph each call went
through its Python wrapper, ~100 us against ~27 us for the kernel at one row of x. The C++ op
(``nmfx/csrc/nm_linear_op.cpp``) takes the same arguments and makes the same per-call choice from
the layer's ``dispatch`` code; what it cannot settle in C++ (an untuned layer, a choice this CPU
lacks, an override in force) it hands to ``nmfx::nm_linear``, so both give the same answer.

Graphs that are saved (``torch.export``) keep ``nmfx::nm_linear``, which resolves after
``import nmfx`` without building anything; only graphs compiled in this process, where the
kernels are loaded, call the C++ op. It has no backward: it is used only where no input of the
call requires grad.

This module gives the op its fake (shape) kernel and pushes the tables it decides from
(:data:`~nmfx.kernels._autotune.BUCKETS`, :data:`~nmfx.kernels._autotune.CHOICES` as ``nm_gemm``
codes) once the kernels load, and tells it how many overrides are in force.
"""

from __future__ import annotations

import threading

import torch

# [None]: not set up yet; [True]/[False]: the C++ op is / is not usable in this process. A plain
# list read by NMLinear.forward while Dynamo traces (a constant there, no call).
READY: list[bool | None] = [None]
# The C++ op's OpOverload once set up, else None: what an eager call of a lowered layer runs when
# no gradient, tracing or mode is involved (NMLinear.forward). It settles the layer's tuned
# choice in C++ and hands overrides, untuned layers and choices this CPU lacks to
# ``nmfx::nm_linear``, as for compiled graphs; the Python op's wrapper and choice lookup had
# cost ~3.5 us of a lowered layer's ~4 us of extra call cost over nn.Linear.
EAGER_OP: list[torch._ops.OpOverload | None] = [None]
_lock = threading.Lock()
_CODE_DENSE = -1  # nm_linear_op.cpp kChoiceDense
_CODE_PYTHON = -2  # nm_linear_op.cpp kChoicePython: nmfx::nm_linear decides
# Overrides in force across threads (force_dispatch blocks; set_isa/use_isa count once).
_forced_blocks = [0]


def ready() -> bool:
    """Set the C++ op up (first call) once the kernels are loaded; whether it is usable.
    Never builds the kernels: False until they are loaded."""
    if READY[0] is not None:
        return bool(READY[0])
    from nmfx.kernels import _build

    if not _build.loaded():
        return False
    with _lock:
        if READY[0] is None:
            READY[0] = _setup()
    return bool(READY[0])


def _setup() -> bool:
    if not hasattr(torch.ops.nmfx_cpu, "nm_linear"):
        return False
    from nmfx.ops import _nm_linear_fake

    torch.library.register_fake("nmfx_cpu::nm_linear")(_nm_linear_fake)
    if hasattr(torch.ops.nmfx_cpu, "nm_linear_group"):
        torch.library.register_fake("nmfx_cpu::nm_linear_group")(_nm_linear_group_fake)
    torch.ops.nmfx_cpu.set_linear_table(*tables())
    torch.ops.nmfx_cpu.set_linear_overrides(_override_count())
    EAGER_OP[0] = torch.ops.nmfx_cpu.nm_linear.default
    return True


def _nm_linear_group_fake(
    x: torch.Tensor, values: list[torch.Tensor], masks: list[torch.Tensor], rows: list[int],
    cols: int, n: int, m: int, dispatch: list[int],
) -> list[torch.Tensor]:  # fmt: skip
    torch._check(x.shape[-1] == cols)
    return [x.new_empty((*x.shape[:-1], r)) for r in rows]


def tables() -> tuple[list[int], list[int]]:
    """``(bucket upper bounds (-1: open), nm_gemm code per choice index)`` for the C++ op."""
    from nmfx.kernels import _autotune, _build

    bucket_hi = [-1 if hi is None else hi for _lo, hi in _autotune.BUCKETS]
    supported = _build.supported_isas()
    codes = []
    for choice in _autotune.CHOICES:
        isa = _autotune.choice_isa(choice)
        if isa is None:
            codes.append(_CODE_DENSE)
        elif isa not in supported:
            codes.append(_CODE_PYTHON)  # Python warns once and runs the nearest path
        else:
            codes.append(_autotune.path_code(choice))
    return bucket_hi, codes


def _override_count() -> int:
    from nmfx.kernels import _ops

    return _forced_blocks[0] + (1 if _ops._isa_override[0] is not None else 0)


def overrides_changed() -> None:
    """Called whenever ``force_dispatch``/``use_isa``/``set_isa`` change what runs: while any
    is in force, the C++ op hands every call to ``nmfx::nm_linear``."""
    if READY[0]:
        torch.ops.nmfx_cpu.set_linear_overrides(_override_count())


def force_block(delta: int) -> None:
    """A ``force_dispatch`` block starts (+1) or ends (-1), on any thread."""
    with _lock:
        _forced_blocks[0] += delta
    overrides_changed()


def applies(x: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether a call being compiled (not exported) can run the C++ op: set up, and no
    gradient needed from it. Cheap and side-effect free (Dynamo traces it)."""
    if not READY[0] or torch.compiler.is_exporting():
        return False
    needs_grad = x.requires_grad or (bias is not None and bias.requires_grad)
    return not (needs_grad and torch.is_grad_enabled())
