"""The two offline data sets of the accuracy study, built the same way on every machine.

- ``digits``: scikit-learn's bundled 8x8 digits (1,797 images, no download), one fixed
  80/20 train/test split (its seed is not a training seed: every run sees the same split).
- ``stdlib`` corpus: the Python standard library's own top-level ``.py`` files, sorted by
  name, concatenated and truncated to a fixed number of bytes; byte-level tokens (0-255).
  Its SHA-256 and the Python version are recorded: another patch release of Python ships
  other sources, hence another corpus.
"""

from __future__ import annotations

import hashlib
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["Corpus", "Digits", "load_digits", "stdlib_corpus"]

SPLIT_SEED = 0  # fixed data split; training seeds only change init and batch order


@dataclass(frozen=True)
class Digits:
    """Images [N, 1, 8, 8] in [0, 1] and labels [N] for training and evaluation."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_eval: torch.Tensor
    y_eval: torch.Tensor
    info: dict[str, Any]


def load_digits(test_fraction: float = 0.2, tune: bool = False, limit: int | None = None) -> Digits:
    """The fixed train/test split; with ``tune`` the test set is dropped and the last 20% of
    the training split is held out instead (for choosing hyper-parameters on dense only)."""
    from sklearn.datasets import load_digits as sk_load_digits

    data = sk_load_digits()
    x = torch.tensor(data.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_train = len(y) - round(test_fraction * len(y))
    train, test = perm[:n_train], perm[n_train:]
    split = "train/test"
    if tune:
        n_fit = len(train) - round(0.2 * len(train))
        train, test = train[:n_fit], train[n_fit:]
        split = "tune: first 80% of the train split / last 20% of it (test set unused)"
    if limit is not None:
        train, test = train[:limit], test[:limit]
    info = {
        "source": "sklearn.datasets.load_digits",
        "images": len(y),
        "train": len(train),
        "eval": len(test),
        "split": split,
        "split_seed": SPLIT_SEED,
        "scaling": "pixel / 16",
    }
    return Digits(x[train], y[train], x[test], y[test], info)


@dataclass(frozen=True)
class Corpus:
    """Byte tokens of the training and evaluation parts, and where they came from."""

    train: torch.Tensor  # uint8 -> int64 on use
    eval: torch.Tensor
    info: dict[str, Any]


def stdlib_files(root: str | None = None) -> list[Path]:
    """The standard library's top-level ``.py`` files, sorted by name (bytewise)."""
    base = Path(root or os.path.dirname(os.__file__))
    return sorted((p for p in base.glob("*.py") if p.is_file()), key=lambda p: p.name)


def stdlib_corpus(n_bytes: int = 1 << 20, eval_fraction: float = 0.1, tune: bool = False) -> Corpus:
    """The first ``n_bytes`` of the concatenated stdlib sources; the last ``eval_fraction``
    is the validation split. With ``tune``, the validation split is dropped and the last
    ``eval_fraction`` of the training split is held out instead."""
    files = stdlib_files()
    chunks, total, used = [], 0, []
    for path in files:
        if total >= n_bytes:
            break
        blob = path.read_bytes()
        chunks.append(blob)
        used.append(path.name)
        total += len(blob)
    raw = b"".join(chunks)[:n_bytes]
    if len(raw) < n_bytes:
        raise ValueError(
            f"the stdlib sources hold {len(raw)} bytes, fewer than n_bytes={n_bytes}; "
            "pass a smaller corpus size"
        )
    tokens = torch.frombuffer(bytearray(raw), dtype=torch.uint8).clone()
    n_train = len(tokens) - round(eval_fraction * len(tokens))
    train, val = tokens[:n_train], tokens[n_train:]
    split = f"first {1 - eval_fraction:.0%} train / last {eval_fraction:.0%} validation"
    if tune:
        n_fit = len(train) - round(eval_fraction * len(train))
        train, val = train[:n_fit], train[n_fit:]
        split = "tune: the train split's first 90% / its last 10% (validation split unused)"
    info = {
        "source": "Python standard library top-level *.py files, sorted by name, concatenated",
        "stdlib_dir": os.path.dirname(os.__file__),
        "python": platform.python_version(),
        "files_used": len(used),
        "first_file": used[0],
        "last_file": used[-1],
        "bytes": len(raw),
        "sha256": hashlib.sha256(raw).hexdigest(),
        "vocab": "bytes (256)",
        "train_bytes": len(train),
        "eval_bytes": len(val),
        "split": split,
    }
    return Corpus(train, val, info)
