"""nmfx: N:M structured sparsity for PyTorch.

``model = nmfx.sparsify(model)`` rewrites a model's FX graph to train it N:M sparse with
SR-STE; ``nmfx.finalize`` bakes the masks; ``nmfx.lower`` makes it fast for a target;
``nmfx.report`` measures what it gained, per layer. Importing nmfx is light: no C++ build,
no optional backends; it registers the ``nmfx::nm_linear`` op (so saved exported graphs
load), and ``nmfx.nm_linear`` loads the kernels on first use.
"""

from __future__ import annotations

from typing import Any

import nmfx.ops  # noqa: F401  (registers torch.ops.nmfx.nm_linear; builds nothing)
from nmfx.api import Summary, is_sparsified, sparsify, summary
from nmfx.config import SparsityConfig
from nmfx.finalize import detect_nm, finalize, nm_weights
from nmfx.lowering import lower, lowering_decisions
from nmfx.masks import is_nm, nm_mask
from nmfx.packed import PackedNM, load_packed, pack, save_packed, unpack
from nmfx.pattern import NMPattern, parse_pattern
from nmfx.prune import prune
from nmfx.reporting import Report, report
from nmfx.srste import add_srste_terms
from nmfx.stats import mask_snapshot, mask_stats

__version__ = "0.1.0.dev0"

__all__ = [
    "NMPattern",
    "PackedNM",
    "Report",
    "SparsityConfig",
    "Summary",
    "__version__",
    "add_srste_terms",
    "detect_nm",
    "finalize",
    "is_nm",
    "is_sparsified",
    "load_packed",
    "lower",
    "lowering_decisions",
    "mask_snapshot",
    "mask_stats",
    "nm_linear",
    "nm_mask",
    "nm_weights",
    "pack",
    "parse_pattern",
    "prune",
    "report",
    "save_packed",
    "sparsify",
    "summary",
    "unpack",
]


def __getattr__(name: str) -> Any:
    # nm_linear lives with the kernels; importing them eagerly would make `import nmfx` heavier.
    if name == "nm_linear":
        from nmfx.kernels import nm_linear

        return nm_linear
    raise AttributeError(f"module 'nmfx' has no attribute {name!r}")
