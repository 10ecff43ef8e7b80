"""Parsing and validation of N:M patterns ("keep N of every M")."""

from __future__ import annotations

import re
from dataclasses import dataclass

_PATTERN_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class NMPattern:
    """Keep ``n`` of every ``m`` consecutive weights along the reduction dimension."""

    n: int
    m: int

    def __post_init__(self) -> None:
        for name, value in (("N", self.n), ("M", self.m)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(
                    f"pattern {name} must be an int, got {value!r}; write e.g. '2:4' or (2, 4)"
                )
        if not 0 < self.n < self.m:
            raise ValueError(
                f"pattern {self.n}:{self.m} is invalid: need 0 < N < M (keep N of every M), "
                f"e.g. '2:4' or '1:4'"
            )

    @property
    def density(self) -> float:
        return self.n / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


def parse_pattern(pattern: str | tuple[int, int] | NMPattern) -> NMPattern:
    """Turn ``"2:4"``, ``(2, 4)`` or an :class:`NMPattern` into a validated :class:`NMPattern`."""
    if isinstance(pattern, NMPattern):
        return pattern
    if isinstance(pattern, str):
        match = _PATTERN_RE.match(pattern)
        if match is None:
            raise ValueError(
                f"pattern {pattern!r} is not of the form 'N:M' with integers 0 < N < M; "
                f"write e.g. '2:4'"
            )
        return NMPattern(int(match.group(1)), int(match.group(2)))
    if isinstance(pattern, tuple | list) and len(pattern) == 2:
        return NMPattern(*pattern)
    raise TypeError(
        f"pattern must be a string 'N:M', a tuple (N, M) or an NMPattern, got {pattern!r}"
    )
