"""One-shot N:M pruning of trained models: magnitude, Wanda and SparseGPT, with optional
channel permutation (NVIDIA ASP's idea) first. ``nmfx.prune(model, "2:4", "sparsegpt",
calibration=batches)`` prunes in place; ``nmfx.sparsify(model, init="sparsegpt", ...)``
fine-tunes from there with SR-STE.

Files: ``api`` (the verb), ``config`` (options), ``targets`` (eligibility -> what to prune),
``views`` (weights and inputs as 2-D matrices, im2col), ``capture`` and ``sequential``
(calibration with hooks, layer by layer), ``wanda`` / ``sparsegpt`` (the methods),
``methods`` (one layer end to end), ``channel_groups`` / ``permute_search`` / ``permute``
(channel permutation), ``summary`` (what was done, per layer).
"""

from nmfx.prune.api import CalibrationError, permute_channels, prune
from nmfx.prune.config import METHODS, PruneConfig
from nmfx.prune.summary import LayerPrune, PermutationGroup, PruneSummary, prune_summary

__all__ = [
    "METHODS",
    "CalibrationError",
    "LayerPrune",
    "PermutationGroup",
    "PruneConfig",
    "PruneSummary",
    "permute_channels",
    "prune",
    "prune_summary",
]
