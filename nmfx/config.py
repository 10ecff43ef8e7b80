"""The one frozen config behind ``nmfx.sparsify``: validated once, named errors, no silent drops."""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from nmfx.pattern import NMPattern, parse_pattern

__all__ = ["MASK_MODES", "SparsityConfig", "config_from_options"]

MASK_MODES = ("srste", "fixed")
# lambda_W above 1 makes SR-STE overshoot: one step flips pruned weights' signs and grows them
# (at 1e308, or inf, every weight is NaN after one step). NaN fails both comparisons.
_MAX_LAMBDA = 1.0

ExcludeRule = str | re.Pattern | Callable[[str], bool]


@dataclass(frozen=True)
class SparsityConfig:
    """How to make a model N:M sparse.

    - ``pattern``: ``"N:M"`` or ``(N, M)``; keep N of every M weights along the reduction dim.
    - ``srste_lambda``: lambda_W of SR-STE, the decay of pruned weights applied once per
      optimizer step (paper default 2e-4); 0 gives plain STE; at most 1 (finite).
    - ``mask_mode``: ``"srste"`` recomputes masks from the weights (every
      ``mask_interval`` training forwards); ``"fixed"`` freezes the mask of the weights
      at sparsify time, zeroes the pruned weights and blocks their gradient (the
      magnitude-prune-then-fine-tune recipe).
    - ``keep_output_dense``: keep the layer(s) producing the model output dense (paper).
    - ``exclude``: layers to keep dense; each rule is an fnmatch glob or compiled regex
      matched against the layer name and the weight's FQN, or a callable on the name.
    - ``min_weight_numel``: weights with fewer elements stay dense.
    """

    pattern: NMPattern = field(default_factory=lambda: NMPattern(2, 4))
    srste_lambda: float = 2e-4
    mask_mode: str = "srste"
    mask_interval: int = 1
    keep_output_dense: bool = True
    exclude: tuple[ExcludeRule, ...] = ()
    min_weight_numel: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "pattern", parse_pattern(self.pattern))
        lam = self.srste_lambda
        if isinstance(lam, bool) or not isinstance(lam, int | float) or not 0 <= lam <= _MAX_LAMBDA:
            raise ValueError(
                f"srste_lambda={lam!r} must be a finite float in [0, {_MAX_LAMBDA:g}] (the decay "
                f"of pruned weights per step; paper default 2e-4, 0 = plain STE)"
            )
        object.__setattr__(self, "srste_lambda", float(lam))
        if self.mask_mode not in MASK_MODES:
            raise ValueError(
                f"mask_mode={self.mask_mode!r} is not one of {MASK_MODES}{_hint(self.mask_mode, MASK_MODES)}"
            )
        if (
            isinstance(self.mask_interval, bool)
            or not isinstance(self.mask_interval, int)
            or self.mask_interval < 1
        ):
            raise ValueError(
                f"mask_interval={self.mask_interval!r} must be an int >= 1 (1 = every forward)"
            )
        if (
            isinstance(self.min_weight_numel, bool)
            or not isinstance(self.min_weight_numel, int)
            or self.min_weight_numel < 0
        ):
            raise ValueError(f"min_weight_numel={self.min_weight_numel!r} must be an int >= 0")
        if not isinstance(self.keep_output_dense, bool):
            raise TypeError(f"keep_output_dense={self.keep_output_dense!r} must be a bool")
        object.__setattr__(self, "exclude", _normalise_exclude(self.exclude))

    def is_excluded(self, *names: str) -> ExcludeRule | None:
        """The first exclude rule matching any of ``names``, else None."""
        for rule in self.exclude:
            for name in names:
                if isinstance(rule, str) and _glob(rule).fullmatch(name):
                    return rule
                if isinstance(rule, re.Pattern) and rule.search(name):
                    return rule
                if callable(rule) and not isinstance(rule, str | re.Pattern) and rule(name):
                    return rule
        return None


def _glob(rule: str) -> re.Pattern:
    # fnmatch semantics where '*' also crosses dots: "encoder.*.attn.*" matches deep names.
    return re.compile(re.escape(rule).replace(r"\*", ".*").replace(r"\?", "."))


def _normalise_exclude(exclude: Any) -> tuple[ExcludeRule, ...]:
    if exclude is None:
        return ()
    if isinstance(exclude, str | re.Pattern) or callable(exclude):
        exclude = (exclude,)
    if not isinstance(exclude, Sequence):
        raise TypeError(
            f"exclude={exclude!r} must be a glob, a regex, a callable or a list of them"
        )
    for rule in exclude:
        if not (isinstance(rule, str | re.Pattern) or callable(rule)):
            raise TypeError(
                f"exclude rule {rule!r} must be a glob string, a compiled regex or a callable(name) -> bool"
            )
    return tuple(exclude)


def close_match_hint(value: object, allowed: Sequence[str]) -> str:
    """``"; did you mean 'x'?"`` for the closest allowed value, or ``""``."""
    close = difflib.get_close_matches(str(value), list(allowed), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


_hint = close_match_hint


def config_from_options(config: SparsityConfig | None, options: dict[str, Any]) -> SparsityConfig:
    """Build the config from keyword options; unknown names are a TypeError with a close match."""
    names = [f.name for f in fields(SparsityConfig)]
    for key in options:
        if key not in names:
            raise TypeError(
                f"unknown sparsify option {key!r}{_hint(key, names)}; known options: {', '.join(names)}"
            )
    if config is None:
        return SparsityConfig(**options)
    if not isinstance(config, SparsityConfig):
        raise TypeError(f"config must be a SparsityConfig, got {type(config).__name__}")
    if options:
        return SparsityConfig(**{**{n: getattr(config, n) for n in names}, **options})
    return config

