"""Lowering to NVIDIA GPUs: 2:4 ``nn.Linear`` weights as PyTorch semi-structured sparse tensors.

This is the documented PyTorch recipe (``linear.weight = nn.Parameter(
to_sparse_semi_structured(w), requires_grad=False)``) wrapped in the decisions it needs and
does not make itself: which weights are 2:4 and of a shape and dtype the kernels accept, which
backend (CUTLASS or cuSPARSELt) converts them, and — measured per layer at each rows-of-x
bucket (:mod:`nmfx.lowering.cuda_dispatch`) — where the layer runs faster sparse. Where sparse
measures slower the layer runs dense: nmfx must never make a layer slower than dense. Every
layer gets a ``LayerDecision`` with its reason.

Facts about torch's API this module relies on (torch 2.13, ``torch/sparse/semi_structured.py``):

- ``to_sparse_semi_structured`` picks its subclass from the class attribute
  ``SparseSemiStructuredTensor._FORCE_CUTLASS`` — default ``False``, i.e. **cuSPARSELt** — at
  conversion time; it does not fall back to CUTLASS when cuSPARSELt is missing.
- Conversion accepts only CUDA, 2-D, contiguous tensors whose dims are >= and a multiple of the
  subclass's ``_DTYPE_SHAPE_CONSTRAINTS[dtype]`` ``(sparse_min_rows, sparse_min_cols)``.
- CUTLASS's table also lists float32, but there the encoding is 1:2 (TF32), not 2:4; cuSPARSELt
  lists float8_e4m3fn, whose plain matmul is refused (``_scaled_mm`` only). nmfx lowers
  fp16/bf16 (and int8) only.
- ``SparseSemiStructuredTensorCUTLASS.from_dense`` compresses with the pure-PyTorch
  ``sparse_semi_structured_from_dense_cutlass``, which also runs on CPU tensors: the layout
  is checked here with :func:`cutlass_layout_roundtrip`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nmfx.config import close_match_hint
from nmfx.lowering import cuda_dispatch
from nmfx.lowering.cuda_dispatch import ROW_BUCKETS
from nmfx.masks import is_nm
from nmfx.pattern import NMPattern
from nmfx.plan import DENSE, SPARSE, LayerDecision, NMWeight

__all__ = [
    "BACKENDS",
    "CUDA_OPTIONS",
    "FALLBACK_SHAPE_CONSTRAINTS",
    "CudaOptions",
    "cuda_options",
    "cuda_weight_decision",
    "cutlass_layout_roundtrip",
    "implies_2_4",
    "lower_cuda",
    "semi_structured_constraint",
    "shape_constraints",
    "weight_reason",
]

log = logging.getLogger("nmfx.lowering")

TARGET = "cuda"
BACKENDS = ("cutlass", "cusparselt")
_SUBCLASS = {
    "cutlass": "SparseSemiStructuredTensorCUTLASS",
    "cusparselt": "SparseSemiStructuredTensorCUSPARSELT",
}
_LABEL = {"cutlass": "CUTLASS", "cusparselt": "cuSPARSELt"}
# (min_rows, min_cols): both weight dims must be >= and a multiple of these.
# Used where torch's own table lacks an entry; tests check the two agree.
FALLBACK_SHAPE_CONSTRAINTS: dict[str, dict[torch.dtype, tuple[int, int]]] = {
    "cutlass": {torch.float16: (32, 64), torch.bfloat16: (32, 64), torch.int8: (16, 128)},
    "cusparselt": {torch.float16: (16, 16), torch.bfloat16: (16, 16), torch.int8: (32, 32)},
}
_CASTS = (torch.float16, torch.bfloat16)
_FP32_REASON = (
    "2:4 on GPU needs fp16/bf16 (torch's fp32 semi-structured path is 1:2 on TF32, not 2:4): "
    "pass cast_dtype=torch.float16 or keep dense"
)
# Relative error (||sparse - dense|| / ||dense||) above which a converted layer is rejected.
_MAX_REL_ERR = {torch.float16: 1e-2, torch.bfloat16: 3e-2, torch.int8: 0.0}


def shape_constraints(backend: str) -> dict[torch.dtype, tuple[int, int]]:
    """``dtype -> (min_rows, min_cols)`` for the 2:4 dtypes of ``backend``, read from torch's
    ``_DTYPE_SHAPE_CONSTRAINTS`` where it has the entry, else from ``FALLBACK_SHAPE_CONSTRAINTS``."""
    _check_backend(backend)
    table = getattr(getattr(torch.sparse, _SUBCLASS[backend], None), "_DTYPE_SHAPE_CONSTRAINTS", {})
    out = {}
    for dtype, fallback in FALLBACK_SHAPE_CONSTRAINTS[backend].items():
        entry = table.get(dtype)
        out[dtype] = (entry.sparse_min_rows, entry.sparse_min_cols) if entry else fallback
    return out


def semi_structured_constraint(
    shape: tuple[int, ...], dtype: torch.dtype, backend: str
) -> str | None:
    """``None`` if a 2-D ``[out, in]`` weight of this shape and dtype converts with
    ``to_sparse_semi_structured`` on ``backend`` ("cutlass" or "cusparselt"), else why not:
    the value, the constraint and the fix."""
    table = shape_constraints(backend)
    label = _LABEL[backend]
    if len(shape) != 2:
        return (
            f"weight has shape {tuple(shape)}: semi-structured sparse tensors are 2-D [out, in]; "
            "only nn.Linear weights lower to them"
        )
    if dtype == torch.float32:
        return f"dtype float32: {_FP32_REASON}"
    if dtype not in table:
        names = ", ".join(str(d).removeprefix("torch.") for d in table)
        return (
            f"dtype {str(dtype).removeprefix('torch.')} has no 2:4 {label} kernel (supported: "
            f"{names}): pass cast_dtype=torch.float16 or keep dense"
        )
    rows, cols = table[dtype]
    out, inp = shape
    bad = [
        f"{name}={size}"
        for name, size, need in (("out_features", out, rows), ("in_features", inp, cols))
        if size < need or size % need
    ]
    if not bad:
        return None
    reason = (
        f"shape [out={out}, in={inp}]: {label} {str(dtype).removeprefix('torch.')} needs both "
        f"dims >= and a multiple of ({rows}, {cols}); {' and '.join(bad)} "
        f"{'fails' if len(bad) == 1 else 'fail'}: pad the layer or keep it dense"
    )
    other = BACKENDS[1 - BACKENDS.index(backend)]
    if _fits(shape, shape_constraints(other).get(dtype)):
        reason += f" (backend={other!r} accepts this shape)"
    return reason


def _fits(shape: tuple[int, ...], minimum: tuple[int, int] | None) -> bool:
    return minimum is not None and all(
        size >= need and size % need == 0 for size, need in zip(shape, minimum, strict=True)
    )


def implies_2_4(pattern: NMPattern) -> bool:
    """True when every N:M weight is also 2:4: no aligned group of 4 can hold 3 non-zeros.

    M a multiple of 4 (2:4, 1:4, 2:8, 1:8, ...): a group of 4 lies inside one group of M, so
    it holds at most N. M dividing 4 (1:2): a group of 4 holds 4/M groups, at most N*4/M."""
    if pattern.m % 4 == 0:
        return pattern.n <= 2
    return 4 % pattern.m == 0 and pattern.n * 4 // pattern.m <= 2


def cutlass_layout_roundtrip(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Compress a 2:4 ``[out, in]`` weight to PyTorch's CUTLASS layout and rebuild it exactly.

    Returns ``(values [out, in/2], metadata)``; metadata is int16 ``[out, in/16]`` for
    fp16/bf16 and int32 ``[out, in/32]`` for int8, reordered as CUTLASS's sparse GEMM reads it.
    These are the functions ``SparseSemiStructuredTensorCUTLASS.from_dense`` calls; they are
    plain PyTorch and run on CPU tensors too. Raises if the rebuilt weight differs anywhere.
    """
    from torch.sparse._semi_structured_conversions import (
        sparse_semi_structured_from_dense_cutlass,
        sparse_semi_structured_to_dense_cutlass,
    )

    if w.dim() != 2 or w.dtype not in FALLBACK_SHAPE_CONSTRAINTS["cutlass"]:
        raise ValueError(
            f"need a 2-D fp16/bf16/int8 weight, got shape {tuple(w.shape)} dtype {w.dtype}; "
            "fp32 uses CUTLASS's 1:2 (TF32) encoding, not 2:4: cast to fp16 first"
        )
    reason = semi_structured_constraint(tuple(w.shape), w.dtype, "cutlass")
    if reason is not None:
        raise ValueError(reason)
    if not is_nm(w, "2:4", 1):
        raise ValueError("weight is not 2:4 along in_features (dim 1): mask it with nm_mask first")
    dense = w.detach().contiguous()
    values, meta = sparse_semi_structured_from_dense_cutlass(dense)
    rebuilt = sparse_semi_structured_to_dense_cutlass(values, meta)
    same = rebuilt == dense
    if dense.is_floating_point():
        same |= rebuilt.isnan() & dense.isnan()
    if rebuilt.shape != dense.shape or not bool(same.all()):
        raise RuntimeError(
            f"CUTLASS layout round trip is not exact: {int((~same).sum())} of {dense.numel()} "
            "elements differ"
        )
    return values, meta


@dataclass(frozen=True)
class CudaOptions:
    """Options of ``nmfx.lower(model, "cuda", **options)``, validated once.

    - ``backend``: ``"cutlass"`` (default) or ``"cusparselt"`` kernels.
    - ``cast_dtype``: ``torch.float16`` or ``torch.bfloat16`` casts the whole model first (2:4
      on GPU needs them; fp32 stays dense); feed inputs in that dtype.
    - ``measure``: time dense vs sparse per layer at each rows-of-x bucket in ``rows`` and
      keep sparse only where it wins by ``min_speedup`` (per-call dispatch where it wins at
      some buckets only); ``False`` converts every eligible layer unmeasured.
    - ``rows``: the buckets measured (default ``ROW_BUCKETS``: decode 1-16, prefill 256-4096).
    - ``keep_dense``: a layer that wins at some buckets only keeps its dense weight too and
      dispatches per call (weight memory about 1.56x); ``False`` keeps such layers dense.
    - ``dry_run``: decide pattern, shape, dtype and values only, on any device.
    """

    backend: str = "cutlass"
    cast_dtype: torch.dtype | None = None
    measure: bool = True
    min_speedup: float = 1.0
    rows: tuple[int, ...] = ROW_BUCKETS
    keep_dense: bool = True
    dry_run: bool = False

    def __post_init__(self) -> None:
        _check_args(self.backend, self.cast_dtype, self.min_speedup)
        rows = tuple(self.rows) if isinstance(self.rows, list | tuple) else None
        if not rows or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in rows):
            raise ValueError(
                f"rows={self.rows!r} must be a non-empty tuple of positive ints (rows of x to "
                f"time each layer at), e.g. {ROW_BUCKETS}"
            )
        object.__setattr__(self, "rows", tuple(sorted(set(rows))))
        for name in ("measure", "keep_dense", "dry_run"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name}={getattr(self, name)!r} must be True or False")


CUDA_OPTIONS = tuple(f.name for f in fields(CudaOptions))


def cuda_options(options: dict[str, Any]) -> CudaOptions:
    """``CudaOptions`` from keyword options; an unknown name is a ``TypeError`` listing them."""
    for key in options:
        if key not in CUDA_OPTIONS:
            raise TypeError(
                f"target='cuda' has no option {key!r}{close_match_hint(key, CUDA_OPTIONS)}; "
                f"its options are {', '.join(CUDA_OPTIONS)}"
            )
    return CudaOptions(**options)


def lower_cuda(
    model: nn.Module,
    nm_weights: dict[str, NMWeight],
    *,
    example_inputs: tuple | None = None,
    **options: Any,
) -> tuple[nn.Module, list[LayerDecision]]:
    """Replace eligible 2:4 ``nn.Linear`` weights with semi-structured sparse tensors, in place.

    ``options`` are :class:`CudaOptions`. Each eligible layer is converted, checked against
    dense on its real input (captured from ``example_inputs`` by a forward hook, else on random
    rows) and, with ``measure``, timed dense vs sparse per rows bucket (see
    :mod:`nmfx.lowering.cuda_dispatch`). Returns the model and one decision per entry of
    ``nm_weights``. Raises before changing anything when no CUDA device can run it.
    """
    opts = cuda_options(options)
    if not opts.dry_run:
        _check_device([_get_param(model, fqn) for fqn in nm_weights], opts.backend)
    decisions, todo = _decide(model, nm_weights, opts.backend, opts.cast_dtype)
    if opts.dry_run:
        for decision, _ in todo:
            decision.reason += " (dry run: not converted, not measured)"
            decision.facts["dry_run"] = True
        log.info(
            "nmfx.lower_cuda (dry run): %d of %d N:M weights eligible", len(todo), len(decisions)
        )
        return model, decisions
    _warn_if_all_fp32(decisions, todo)
    if opts.cast_dtype is not None:
        model.to(opts.cast_dtype)
    inputs = (
        _capture_inputs(model, [m for _, m in todo], example_inputs, opts.cast_dtype)
        if (example_inputs is not None and todo)
        else {}
    )
    cache: dict[tuple, dict[str, float]] = {}
    with _force_cutlass(opts.backend == "cutlass"):
        for decision, module in todo:
            _convert(decision, module, inputs.get(id(module)), opts, cache)
    n_sparse = sum(d.verdict == SPARSE for d in decisions)
    log.info(
        "nmfx.lower_cuda: %d of %d N:M weights sparse (%s)",
        n_sparse,
        len(decisions),
        _LABEL[opts.backend],
    )
    return model, decisions


def _warn_if_all_fp32(decisions: list[LayerDecision], todo: list) -> None:
    if not todo and decisions and all("dtype float32" in d.reason for d in decisions):
        log.warning(
            "nmfx.lower(model, 'cuda'): every N:M layer is float32 and stays dense; pass "
            "cast_dtype=torch.float16 (or torch.bfloat16) to lower them"
        )


# ---- decisions ----------------------------------------------------------------------------


def _decide(
    model: nn.Module,
    nm_weights: dict[str, NMWeight],
    backend: str,
    cast_dtype: torch.dtype | None,
) -> tuple[list[LayerDecision], list[tuple[LayerDecision, nn.Linear]]]:
    """One decision per N:M weight, and the (decision, layer) pairs eligible to convert."""
    owners = _linear_owners(model)
    in_mha = _mha_children(model)
    shared = _shared_params(model)
    decisions: list[LayerDecision] = []
    todo: list[tuple[LayerDecision, nn.Linear]] = []
    for fqn, nmw in nm_weights.items():
        param = _get_param(model, fqn)
        module = owners.get(fqn)
        decision = LayerDecision(nmw.name, fqn, nmw.op, TARGET, DENSE, "")
        if module is not None and id(module) in in_mha:
            decision.reason = (
                "out_proj of nn.MultiheadAttention: MHA reads the weight inside its own kernels, "
                "which do not take semi-structured tensors"
            )
        else:
            decision.reason = _ineligible(nmw, param, module, shared.get(fqn), backend, cast_dtype)
        if cast_dtype is not None and param.dtype != cast_dtype:
            decision.facts["cast"] = f"{_name(param.dtype)} -> {_name(cast_dtype)}"
        if decision.reason is None:
            decision.verdict = SPARSE
            decision.reason = f"eligible: 2:4 along in_features, {_LABEL[backend]}"
            todo.append((decision, module))
        decisions.append(decision)
    return decisions, todo


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        hint = close_match_hint(str(backend), BACKENDS)
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}{hint}")


def _check_args(backend: str, cast_dtype: torch.dtype | None, min_speedup: float) -> None:
    _check_backend(backend)
    if cast_dtype is not None and cast_dtype not in _CASTS:
        raise ValueError(
            f"cast_dtype={cast_dtype} is not supported: use torch.float16, torch.bfloat16 or None"
        )
    if (
        isinstance(min_speedup, bool)
        or not isinstance(min_speedup, int | float)
        or min_speedup <= 0
    ):
        raise ValueError(f"min_speedup={min_speedup!r} must be a positive number, e.g. 1.0")


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _get_param(model: nn.Module, fqn: str) -> torch.Tensor:
    try:
        return model.get_parameter(fqn)
    except AttributeError:
        names = [n for n, _ in model.named_parameters()]
        hint = close_match_hint(fqn, names)
        raise ValueError(
            f"nm_weights names {fqn!r}, which is not a parameter of the model{hint}"
        ) from None


def _linear_owners(model: nn.Module) -> dict[str, nn.Linear]:
    """Weight FQN -> the nn.Linear that registers it."""
    return {
        f"{name}.weight" if name else "weight": mod
        for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear)
    }


def _mha_children(model: nn.Module) -> set[int]:
    """ids of modules owned by an nn.MultiheadAttention (its out_proj): MHA's forward and its
    fused inference kernel read the weight directly and do not take tensor subclasses."""
    return {
        id(child)
        for mod in model.modules()
        if isinstance(mod, nn.MultiheadAttention)
        for child in mod.children()
    }


def _shared_params(model: nn.Module) -> dict[str, list[str]]:
    """Parameter FQN -> the other modules that register the same Parameter (ties)."""
    users: dict[int, list[str]] = {}
    first: dict[int, str] = {}
    for name, mod in model.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            fqn = f"{name}.{pname}" if name else pname
            first.setdefault(id(p), fqn)
            users.setdefault(id(p), []).append(name or "<root>")
    return {first[k]: v[1:] for k, v in users.items() if len(v) > 1}


def _ineligible(
    nmw: NMWeight,
    param: torch.Tensor,
    module: nn.Linear | None,
    tied_with: list[str] | None,
    backend: str,
    cast_dtype: torch.dtype | None,
) -> str | None:
    """Why this weight stays dense on ``backend``, or None when it can lower."""
    if module is None:
        return (
            f"op {nmw.op!r}: only nn.Linear lowers to semi-structured sparse "
            "(conv and functional ops stay dense on target 'cuda'; try target 'tensorrt')"
        )
    if tied_with:
        return f"weight is shared with {', '.join(tied_with)}; converting it would break the tie"
    return weight_reason(param, nmw.pattern, nmw.reduce_dim, backend, cast_dtype)


def weight_reason(
    weight: torch.Tensor,
    pattern: NMPattern | None,
    reduce_dim: int,
    backend: str,
    cast_dtype: torch.dtype | None = None,
) -> str | None:
    """Why an N:M ``[out, in]`` weight stays dense on target 'cuda', or None: the one rule
    that ``nmfx.lower(..., "cuda")`` and ``backend="nmfx"`` both apply."""
    if pattern is None:
        return "weight is not N:M along in_features; semi-structured sparsity needs 2:4"
    if not implies_2_4(pattern):
        return (
            f"pattern {pattern} does not imply 2:4 (4 consecutive weights can hold more than "
            "2 non-zeros): sparse tensor cores need 2:4 (semi-structured needs 2:4); retrain "
            "with '2:4' (or 1:4, 2:8, ...)"
        )
    if reduce_dim not in (1, -1):
        return (
            f"groups run along dim {reduce_dim}; sparse tensor cores need them along "
            "in_features (dim 1)"
        )
    dtype = cast_dtype or weight.dtype
    reason = semi_structured_constraint(tuple(weight.shape), dtype, backend)
    if reason is not None:
        return reason
    if not weight.is_contiguous():
        return "weight is not contiguous: call .contiguous() on it first"
    if not is_nm(weight, "2:4", 1):
        return (
            f"declared {pattern} but the values are not 2:4 along in_features: some group of "
            "4 holds 3+ non-zeros; run nmfx.finalize first"
        )
    return None


@torch.no_grad()
def cuda_weight_decision(
    name: str,
    param: str,
    op: str,
    weight: torch.Tensor,
    pattern: NMPattern | None,
    backend: str = "cutlass",
) -> tuple[LayerDecision, torch.Tensor | None]:
    """The CUDA conversion of one ``[out, in]`` weight for ``backend="nmfx"``: the same
    eligibility (``weight_reason``) and output check as ``lower_cuda``; the semi-structured
    weight when it goes sparse. Not timed: a compiled graph has no per-layer input to time."""
    decision = LayerDecision(name, param, op, TARGET, DENSE, "")
    reason = weight_reason(weight, pattern, 1, backend)
    if reason is None and weight.device.type != "cuda":
        reason = f"weight on {weight.device}; semi-structured sparse tensors need CUDA"
    if reason is not None:
        decision.reason = reason
        return decision, None
    with _force_cutlass(backend == "cutlass"):
        sparse = _checked_conversion(decision, weight, None, None)
    if sparse is None:
        return decision, None
    decision.verdict = SPARSE
    decision.reason = (
        f"semi-structured 2:4 ({backend}); not measured (frozen into a compiled graph)"
    )
    return decision, sparse


def _checked_conversion(
    decision: LayerDecision, w: torch.Tensor, b: torch.Tensor | None, x: torch.Tensor | None
) -> torch.Tensor | None:
    """``to_sparse_semi_structured(w)``, checked against dense on ``x`` (else random rows);
    None, with the decision made dense and why, when conversion fails or the output differs."""
    from torch.sparse import to_sparse_semi_structured

    probe = x if x is not None else torch.randn(64, w.shape[1], device=w.device).to(w.dtype)
    try:
        sparse_w = to_sparse_semi_structured(w)
        dense_out = F.linear(probe, w, b)
        sparse_out = F.linear(probe, sparse_w, b)
    except (RuntimeError, NotImplementedError, ValueError) as err:
        decision.verdict, decision.reason = DENSE, f"conversion failed, kept dense: {err}"
        return None
    rel = float(
        (sparse_out.float() - dense_out.float()).norm() / dense_out.float().norm().clamp_min(1e-12)
    )
    decision.facts["rel_err"] = rel
    decision.facts["backend"] = type(sparse_w).__name__
    if rel > _MAX_REL_ERR.get(w.dtype, 1e-2):
        decision.verdict = DENSE
        decision.reason = f"sparse output differs from dense (relative error {rel:.2e}): kept dense"
        return None
    return sparse_w


def _check_device(weights: Sequence[torch.Tensor], backend: str) -> None:
    """Raise unless every N:M weight is on an sm80+ GPU that ``backend`` can run on."""
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"target='cuda': no CUDA device (torch.cuda.is_available() is False; torch "
            f"{torch.__version__}, CUDA {torch.version.cuda}): semi-structured 2:4 needs an "
            "sm80+ NVIDIA GPU; run there, or pass dry_run=True to see each layer's decision"
        )
    devices = {w.device for w in weights}
    cpu = [d for d in devices if d.type != "cuda"]
    if cpu:
        raise RuntimeError(
            f"2:4 weights are on {cpu[0]}: semi-structured sparse tensors are CUDA-only; move the "
            "model to an sm80+ NVIDIA GPU (model.cuda()), or pass dry_run=True to only decide"
        )
    for dev in devices:
        major, minor = torch.cuda.get_device_capability(dev)
        if major < 8:
            raise RuntimeError(
                f"{dev} is sm{major}{minor}: 2:4 sparse tensor cores need sm80+ (Ampere or newer); "
                "keep the model dense"
            )
        if backend == "cutlass" and major >= 9:
            log.warning(
                "%s is sm%d%d: PyTorch's CUTLASS 2:4 path is validated on sm8x; "
                "prefer backend='cusparselt' there",
                dev,
                major,
                minor,
            )
    if backend == "cusparselt" and not torch.backends.cusparselt.is_available():
        raise RuntimeError(
            "backend='cusparselt' but this torch build has no cuSPARSELt "
            "(torch.backends.cusparselt.is_available() is False): use backend='cutlass'"
        )


# ---- conversion and measurement -----------------------------------------------------------


@contextlib.contextmanager
def _force_cutlass(value: bool) -> Iterator[None]:
    """Set ``SparseSemiStructuredTensor._FORCE_CUTLASS`` (read at conversion time) and restore
    it, so no process-wide setting leaks out of ``lower_cuda``."""
    cls = torch.sparse.SparseSemiStructuredTensor
    old = cls._FORCE_CUTLASS
    cls._FORCE_CUTLASS = value
    try:
        yield
    finally:
        cls._FORCE_CUTLASS = old


def _to_device(x: Any, device: torch.device, dtype: torch.dtype | None) -> Any:
    if isinstance(x, torch.Tensor):
        x = x.to(device)
        return x.to(dtype) if dtype is not None and x.is_floating_point() else x
    if isinstance(x, tuple | list):
        return type(x)(_to_device(v, device, dtype) for v in x)
    return x


@torch.no_grad()
def _capture_inputs(
    model: nn.Module, layers: list[nn.Linear], example_inputs: tuple, cast_dtype: torch.dtype | None
) -> dict[int, torch.Tensor]:
    """Run ``model`` once and keep each layer's first real input (by module id)."""
    seen: dict[int, torch.Tensor] = {}

    def hook(mod: nn.Module, args: tuple) -> None:
        if args and isinstance(args[0], torch.Tensor):
            seen.setdefault(id(mod), args[0].detach())

    handles = [layer.register_forward_pre_hook(hook) for layer in layers]
    try:
        model(*_to_device(tuple(example_inputs), layers[0].weight.device, cast_dtype))
    finally:
        for handle in handles:
            handle.remove()
    return seen


@torch.no_grad()
def _convert(
    decision: LayerDecision,
    linear: nn.Linear,
    x: torch.Tensor | None,
    opts: CudaOptions,
    cache: dict[tuple, dict[str, float]],
) -> None:
    """Convert one eligible layer and check it against dense on ``x`` (its real input, else
    random rows); with ``opts.measure`` keep sparse only at the rows buckets where it wins."""
    w, b = linear.weight.detach(), linear.bias
    sparse_w = _checked_conversion(decision, w, b, x)
    if sparse_w is None:
        return
    if not opts.measure:
        decision.reason += "; not measured (decode-sized inputs can run slower than dense)"
        linear.weight = nn.Parameter(sparse_w, requires_grad=False)
        return
    _dispatch(decision, linear, sparse_w, x, opts, cache)


def _dispatch(
    decision: LayerDecision,
    linear: nn.Linear,
    sparse_w: torch.Tensor,
    x: torch.Tensor | None,
    opts: CudaOptions,
    cache: dict[tuple, dict[str, float]],
) -> None:
    """Time the layer per rows bucket; convert, keep dense, or dispatch per call."""
    timings = cuda_dispatch.time_buckets(
        linear.weight.detach(), sparse_w, linear.bias, opts.rows, cache, timer=_time_ms
    )
    wins = [r for r, t in timings.items() if t["speedup"] >= opts.min_speedup]
    summary = cuda_dispatch.describe(timings, wins)
    decision.facts.update(rows=timings, sparse_rows=wins)
    if x is not None:
        decision.facts["input_shape"] = tuple(x.shape)
    margin = f" (min_speedup={opts.min_speedup})" if opts.min_speedup != 1.0 else ""
    if len(wins) == len(timings):
        decision.reason += f"; measured {summary}{margin}"
        linear.weight = nn.Parameter(sparse_w, requires_grad=False)
    elif not wins:
        decision.verdict = DENSE
        decision.reason = f"measured slower sparse at every rows bucket: {summary}{margin}"
    elif not opts.keep_dense:
        decision.verdict = DENSE
        decision.reason = (
            f"measured {summary}{margin}; keep_dense=False keeps such layers dense "
            "(keep_dense=True dispatches per call)"
        )
    else:
        decision.reason += f"; per call: {summary}{margin} (keeps the dense weight too)"
        cuda_dispatch.RowDispatchLinear.convert(linear, sparse_w, opts.rows, wins)
    if x is not None:
        rows = x.numel() // max(x.shape[-1], 1)
        path = SPARSE if cuda_dispatch.row_bucket(rows, opts.rows) in wins else DENSE
        decision.facts["example_rows_path"] = path
        decision.reason += f"; the example input ({rows} rows) runs {path}"


def _time_ms(fn: Any) -> float:
    """The timer every measurement goes through (tests replace it)."""
    return cuda_dispatch.time_ms(fn)
