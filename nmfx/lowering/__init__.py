"""``nmfx.lower``: turn a finalized N:M model into a fast one for one target.

Each target is one late step on the finalized model: ``cpu`` packs
N:M Linears for nmfx's kernels, ``cuda`` makes semi-structured sparse weights,
``tensorrt`` compiles with sparse tactics allowed. Per-layer decisions are recorded.
"""

from __future__ import annotations

import copy
import sys
import weakref
from typing import Any

from torch import nn

from nmfx import model_state
from nmfx.config import close_match_hint
from nmfx.finalize import nm_weights
from nmfx.masks import is_nm
from nmfx.plan import LayerDecision, NMWeight

__all__ = ["TARGETS", "lower", "lowering_decisions"]

TARGETS = ("cpu", "cuda", "tensorrt")


def lower(
    model: nn.Module,
    target: str = "cpu",
    example_inputs: tuple | None = None,
    *,
    inplace: bool = False,
    **options: Any,
) -> nn.Module:
    """Lower ``model`` (finalized, or any model whose weights are N:M) to ``target``.

    Returns a lowered copy (``inplace=True`` changes ``model`` itself). ``options`` go to
    the target: ``cuda``: :class:`nmfx.lowering.cuda.CudaOptions` (``backend``,
    ``cast_dtype``, ``measure``, ``min_speedup``, ``rows``, ``keep_dense``, ``dry_run``);
    ``tensorrt``: ``enabled_precisions`` and ``torch_tensorrt.compile``
    options. ``cpu`` takes none.
    """
    if target not in TARGETS:
        raise ValueError(
            f"target={target!r} is not one of {TARGETS}{close_match_hint(target, TARGETS)}"
        )
    if model_state.is_sparsified(model):
        raise ValueError(
            "model still carries SR-STE masks; call nmfx.finalize(model) before nmfx.lower"
        )
    record = nm_weights(model)
    if not record:
        raise ValueError(
            "no N:M weights to lower: sparsify and train the model with nmfx.sparsify, then "
            "nmfx.finalize it (or load an N:M checkpoint)"
        )
    if target == "cpu":
        if options:
            raise TypeError(f"target='cpu' takes no options, got {sorted(options)}")
        from nmfx.lowering.memory import large_blocks_mapped

        with large_blocks_mapped():  # the copy, packed weights and temporaries leave no heap holes
            _check_still_nm(model, record)
            out, decisions = _lower_cpu(model if inplace else copy.deepcopy(model), record)
    else:
        _check_still_nm(model, record)
        out = model if inplace else copy.deepcopy(model)
        if target == "cuda":
            from nmfx.lowering.cuda import lower_cuda

            out, decisions = lower_cuda(out, record, example_inputs=example_inputs, **options)
        else:
            from nmfx.lowering.tensorrt import lower_tensorrt

            if example_inputs is None:
                raise ValueError(
                    "target='tensorrt' needs example_inputs=(tensor, ...) to build engines"
                )
            out, decisions = lower_tensorrt(out, record, example_inputs, **options)
    model_state.set_decisions(out, decisions)
    return out


def _lower_cpu(out: nn.Module, record: dict[str, NMWeight]) -> tuple[nn.Module, list]:
    """``lower_cpu``, then hand the dense weights it dropped back to the OS (else still
    resident: glibc's heap, reference cycles)."""
    from nmfx.lowering.cpu import lower_cpu
    from nmfx.lowering.memory import release_dropped

    weights = [out.get_parameter(nm.param) for nm in record.values()]
    dense = [(weakref.ref(w), w.nbytes) for w in weights]
    del weights
    out, decisions = lower_cpu(out, record)
    kept = {id(p) for p in out.parameters()}  # weights that stayed dense are not dropped
    release_dropped([(r, n) for r, n in dense if id(r()) not in kept])
    return out, decisions


def _check_still_nm(model: nn.Module, record: dict[str, NMWeight]) -> None:
    """Every recorded weight must still be N:M: weights edited after finalize are an error."""
    for nm in record.values():
        weight = model.get_parameter(nm.param)
        if not is_nm(weight, nm.pattern, nm.reduce_dim):
            raise ValueError(
                f"{nm.name} ({nm.param}): the weight is no longer {nm.pattern} along dim "
                f"{nm.reduce_dim}, as nmfx.finalize recorded it: the weights changed after "
                f"finalize (training, load_state_dict or an in-place edit). Lower the weights "
                f"finalize produced, or sparsify and finalize the model again; nothing was lowered"
            )


def lowering_decisions(model: nn.Module) -> list[LayerDecision]:
    """Per-layer verdicts ``nmfx.lower`` recorded on its result, or, for a model compiled
    with ``backend="nmfx"``, those of every graph compiled so far (by module path)."""
    decisions = model_state.get_decisions(getattr(model, "_orig_mod", model))
    if decisions is None and "nmfx.backend" in sys.modules:  # no compiled graph without it
        decisions = sys.modules["nmfx.backend"].compiled_decisions(model)
    if decisions is None:
        raise ValueError(
            "model was not produced by nmfx.lower, nor compiled with torch.compile(model, "
            "backend='nmfx') and run once (graphs are lowered on their first call)"
        )
    return decisions
