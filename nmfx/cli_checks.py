"""Checks of the command line's arguments, all before any model is built or timed.

Bad arguments exit 2 with ``nmfx: error:`` and say what is allowed (a count of 0, a
pattern like ``5:4``, an output folder that does not exist or cannot be written): failing
after minutes of work, or inside torch, told the user neither.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

__all__ = ["UsageError", "check_args", "check_out_dir", "parse_shape"]


class UsageError(Exception):
    """Bad arguments: exit code 2."""


def _check_counts(args: argparse.Namespace) -> None:
    """Counts must be positive (warm-up may be 0): checked before any model is built."""
    minimum = {"batch": 1, "seq": 1, "repeats": 1, "warmup": 0, "epochs": 1, "steps": 1}
    what = {"batch": "rows of the example input", "seq": "tokens per sequence",
            "repeats": "timed repeats", "warmup": "untimed runs", "epochs": "training epochs",
            "steps": "training steps"}  # fmt: skip
    for name, low in minimum.items():
        for value in _as_list(getattr(args, name, None)):
            if value < low:
                raise UsageError(
                    f"--{name} {value} is not allowed: --{name} counts {what[name]} and must be "
                    f"an integer >= {low}, e.g. --{name} {max(low, 1)}"
                )


def _as_list(value: Any) -> list[int]:
    return [] if value is None else value if isinstance(value, list) else [value]


def _check_pattern(args: argparse.Namespace) -> None:
    from nmfx.pattern import parse_pattern

    try:
        parse_pattern(args.pattern)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"--pattern {args.pattern!r}: {exc}") from exc


def parse_shape(text: str, flag: str, example: str) -> list[int]:
    try:
        dims = [int(s) for s in text.lower().split("x")]
    except ValueError:
        dims = []
    if not dims or any(d < 1 for d in dims):
        raise UsageError(
            f"{flag} {text!r} must be positive sizes joined by 'x', e.g. {flag} {example}"
        )
    return dims


def _check_file_target(flag: str, path: str) -> None:
    """Fail before the work when ``path`` cannot be written (missing or read-only folder)."""
    target = Path(path)
    if target.is_dir():
        raise UsageError(
            f"{flag} {path}: is a directory; give a file path, e.g. {flag} {target / 'report.json'}"
        )
    if not target.parent.is_dir():
        raise UsageError(
            f"{flag} {path}: folder {target.parent} does not exist; create it first or pick another path"
        )
    existed = target.exists()
    try:
        with open(target, "a"):
            pass
    except OSError as exc:
        raise UsageError(
            f"{flag} {path}: cannot write there ({exc.strerror}); pick a writable path"
        ) from exc
    if not existed:
        target.unlink()


def check_out_dir(flag: str, path: str) -> Path:
    """Create the output folder ``path`` now and check it is writable, before the work."""
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".nmfx-write-check"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise UsageError(
            f"{flag} {path}: cannot create or write this folder ({exc.strerror or exc}); "
            f"pick a writable folder path"
        ) from exc
    return out


def _check_outputs(args: argparse.Namespace) -> None:
    for flag in ("json", "markdown", "csv", "plot"):
        path = getattr(args, flag, None)
        if path:
            _check_file_target(f"--{flag}", path)
    if args.command == "demo":
        check_out_dir("--out", args.out)


def check_args(args: argparse.Namespace) -> None:
    """Every argument checked before any work: bad ones exit 2 with ``nmfx: error:``."""
    _check_counts(args)
    if getattr(args, "pattern", None) is not None:
        _check_pattern(args)
    if getattr(args, "input_shape", None):
        parse_shape(args.input_shape, "--input-shape", "1x1024")
    if args.command == "bench":
        parse_shape(args.shape, "--shape", "4096x4096")
        if len(args.shape.split("x")) != 2:
            raise UsageError(f"--shape {args.shape!r} must be OUTxIN, e.g. --shape 4096x4096")
    _check_outputs(args)
