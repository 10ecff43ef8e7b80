"""The ordered pass pipelines. Customise by passing another list, never by mutating this one.

Both run on each module's own FX graph (``nmfx.capture``), with the whole-model facts
(output layers, shared weights) already in the context. ``SPARSIFY_PASSES`` is
``nmfx.sparsify``; ``DETECT_PASSES`` finds N:M weights in models nmfx did not train
(``nmfx.finalize``).
"""

from __future__ import annotations

from nmfx.passes.call_cpp_nm_linear import call_cpp_nm_linear
from nmfx.passes.decide_eligibility import decide_eligibility
from nmfx.passes.detect_nm_weights import detect_nm_weights
from nmfx.passes.find_weight_ops import find_weight_ops
from nmfx.passes.fuse_shared_input_linears import fuse_shared_input_linears
from nmfx.passes.infra import Pass, PassContext, PassResult, run_passes
from nmfx.passes.insert_srste_masks import insert_srste_masks
from nmfx.passes.lower_nm_linear import lower_nm_linear

SPARSIFY_PASSES: tuple[Pass, ...] = (
    find_weight_ops,  # analysis: every op reducing over a weight becomes a candidate
    decide_eligibility,  # analysis: verdict + reason; needs the candidates above
    insert_srste_masks,  # rewrite: masker(weight) into each sparse op; needs verdicts
)

DETECT_PASSES: tuple[Pass, ...] = (
    find_weight_ops,  # analysis: the candidates, as above
    detect_nm_weights,  # analysis: which candidate weights already are N:M
)

BACKEND_PASSES: tuple[Pass, ...] = (
    lower_nm_linear,  # rewrite: N:M linear (weights frozen at compile time) -> packed op
    fuse_shared_input_linears,  # rewrite: packed ops sharing an input -> one; needs them packed
    call_cpp_nm_linear,  # rewrite: packed calls -> the C++ op; last, on the final packed calls
)

__all__ = [
    "BACKEND_PASSES",
    "DETECT_PASSES",
    "SPARSIFY_PASSES",
    "Pass",
    "PassContext",
    "PassResult",
    "call_cpp_nm_linear",
    "decide_eligibility",
    "detect_nm_weights",
    "find_weight_ops",
    "fuse_shared_input_linears",
    "insert_srste_masks",
    "lower_nm_linear",
    "run_passes",
]
