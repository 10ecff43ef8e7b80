"""The frozen options of ``nmfx.prune``: eligibility as ``sparsify`` decides it, plus the
papers' calibration defaults. Validated once; unknown options are errors with a close match."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from nmfx.config import SparsityConfig, close_match_hint
from nmfx.pattern import NMPattern, parse_pattern

__all__ = ["METHODS", "PruneConfig", "prune_config"]

METHODS = ("magnitude", "wanda", "sparsegpt")
CALIBRATED = ("wanda", "sparsegpt")
_ELIGIBILITY = ("exclude", "keep_output_dense", "min_weight_numel")


@dataclass(frozen=True)
class PruneConfig:
    """How ``nmfx.prune`` prunes.

    - ``method``: ``"magnitude"`` (keep the N largest |w| of every M), ``"wanda"`` (Sun et al.
      2024: score |w| * ||x_j||_2, compared within each group of M) or ``"sparsegpt"``
      (Frantar & Alistarh 2023: layer-wise OBS reconstruction, masks chosen per M columns).
    - ``nsamples``: calibration samples used (first dim of each batch; 128 in both papers).
    - ``percdamp``: Hessian dampening, a fraction of its mean diagonal (SparseGPT: 0.01).
    - ``blocksize``: SparseGPT's lazy-update block of columns (128 in the paper).
    - ``permute``: search input-channel permutations that raise the N:M-kept magnitude first.
    - ``permute_rounds`` / ``permute_time_s``: bounds of the channel-swap search per group.
    - ``progress``: show a tqdm bar over layers.
    - ``exclude``, ``keep_output_dense``, ``min_weight_numel``: as in ``nmfx.sparsify``.
    """

    pattern: NMPattern
    method: str = "magnitude"
    nsamples: int = 128
    percdamp: float = 0.01
    blocksize: int = 128
    permute: bool = False
    permute_rounds: int = 200
    permute_time_s: float = 30.0
    progress: bool = True
    sparsity: SparsityConfig | None = None  # eligibility rules shared with sparsify

    def __post_init__(self) -> None:
        object.__setattr__(self, "pattern", parse_pattern(self.pattern))
        if self.method not in METHODS:
            raise ValueError(
                f"method={self.method!r} is not one of {METHODS}{close_match_hint(self.method, METHODS)}"
            )
        for name in ("nsamples", "blocksize", "permute_rounds"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an int >= 1")
        for name in ("percdamp", "permute_time_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ValueError(f"{name}={value!r} must be a number > 0")
        for name in ("permute", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name}={getattr(self, name)!r} must be a bool")
        if self.sparsity is None:
            object.__setattr__(self, "sparsity", SparsityConfig(pattern=self.pattern))

    @property
    def calibrated(self) -> bool:
        return self.method in CALIBRATED


def prune_config(pattern: Any, method: str, permute: bool, options: dict[str, Any]) -> PruneConfig:
    """Build the config from ``nmfx.prune``'s keyword options; unknown names are a TypeError."""
    own = [
        f.name
        for f in fields(PruneConfig)
        if f.name not in ("pattern", "method", "permute", "sparsity")
    ]
    known = own + list(_ELIGIBILITY)
    for key in options:
        if key not in known:
            raise TypeError(
                f"unknown prune option {key!r}{close_match_hint(key, known)}; "
                f"known options: {', '.join(known)}"
            )
    eligibility = {k: v for k, v in options.items() if k in _ELIGIBILITY}
    sparsity = SparsityConfig(pattern=pattern, **eligibility)
    mine = {k: v for k, v in options.items() if k in own}
    return PruneConfig(sparsity.pattern, method, permute=permute, sparsity=sparsity, **mine)
