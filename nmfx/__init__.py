"""nmfx: N:M structured sparsity for PyTorch.

``model = nmfx.sparsify(model)`` rewrites a model's FX graph to train it N:M sparse with
SR-STE; ``nmfx.finalize`` bakes the masks; ``nmfx.lower`` makes it fast for a target.
Importing nmfx is light: no C++ build, no optional backends.
"""

from nmfx.api import Summary, is_sparsified, sparsify, summary
from nmfx.config import SparsityConfig
from nmfx.finalize import detect_nm, finalize, nm_weights
from nmfx.lowering import lower, lowering_decisions
from nmfx.masks import is_nm, nm_mask
from nmfx.pattern import NMPattern, parse_pattern
from nmfx.prune import prune
from nmfx.srste import add_srste_terms
from nmfx.stats import mask_snapshot, mask_stats

__version__ = "0.1.0.dev0"

__all__ = [
    "NMPattern",
    "SparsityConfig",
    "Summary",
    "__version__",
    "add_srste_terms",
    "detect_nm",
    "finalize",
    "is_nm",
    "is_sparsified",
    "lower",
    "lowering_decisions",
    "mask_snapshot",
    "mask_stats",
    "nm_mask",
    "nm_weights",
    "parse_pattern",
    "prune",
    "sparsify",
    "summary",
]
