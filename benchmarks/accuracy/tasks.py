"""One frozen setting per task, shared by every method: model, data, optimizer, budget.

The hyper-parameters were chosen once, on the dense model only (``run.py --tune``: a
learning-rate sweep on a split held out from the training data, results in
``docs/accuracy/tuning.json``), and are used unchanged for SR-STE, STE and the fixed-mask
fine-tune. ``SMOKE`` holds tiny versions of both tasks for the CI test.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import model_zoo
from benchmarks.accuracy.data import load_digits, stdlib_corpus

__all__ = ["SMOKE", "SPECS", "TaskSpec", "build_task"]

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class TaskSpec:
    """Everything a run of one task depends on, except the method, pattern and seed."""

    name: str  # "digits" | "charlm"
    model: str  # model_zoo name
    overrides: dict[str, Any] = field(hash=False)
    optimizer: str  # "sgd" (momentum 0.9) | "adamw" (betas 0.9, 0.95)
    lr: float  # peak learning rate
    weight_decay: float
    batch_size: int
    epochs: int  # the total training budget T of every method
    steps_per_epoch: int | None = None  # None: one pass over the training split
    seq_len: int = 0  # charlm context (bytes)
    warmup_steps: int = 0  # linear warm-up, then cosine decay
    min_lr_ratio: float = 0.0  # the cosine ends at min_lr_ratio * lr
    curve_windows: int = 0  # charlm: validation windows evaluated each epoch (0 = all)
    data_limit: int | None = None  # digits: cap on train/eval images (smoke only)
    corpus_bytes: int = 1 << 20

    @property
    def higher_is_better(self) -> bool:
        return self.name == "digits"

    @property
    def metric(self) -> str:
        """The headline metric: test accuracy (digits) or validation loss (charlm)."""
        return "accuracy" if self.name == "digits" else "loss"


SPECS: dict[str, TaskSpec] = {
    "digits": TaskSpec(
        name="digits",
        model="small_cnn",
        overrides={"in_channels": 1, "image_size": 8},
        optimizer="sgd",
        lr=0.1,
        weight_decay=5e-4,
        batch_size=64,
        epochs=30,
    ),
    "charlm": TaskSpec(
        name="charlm",
        model="llama",
        overrides={
            "vocab_size": 256,
            "dim": 128,
            "n_layers": 2,
            "n_heads": 4,
            "hidden_dim": 352,
            "max_seq_len": 128,
        },
        optimizer="adamw",
        lr=2e-3,
        weight_decay=0.01,
        batch_size=16,
        epochs=6,
        steps_per_epoch=50,
        seq_len=128,
        warmup_steps=15,
        min_lr_ratio=0.1,
        curve_windows=128,
    ),
}

SMOKE: dict[str, TaskSpec] = {
    "digits": replace(
        SPECS["digits"],
        overrides={"in_channels": 1, "image_size": 8, "stem_channels": 16, "channels": (16,)},
        epochs=2,
        data_limit=128,
    ),
    "charlm": replace(
        SPECS["charlm"],
        overrides={
            "vocab_size": 256,
            "dim": 32,
            "n_layers": 1,
            "n_heads": 2,
            "hidden_dim": 64,
            "max_seq_len": 32,
        },
        batch_size=4,
        epochs=2,
        steps_per_epoch=3,
        seq_len=32,
        warmup_steps=1,
        curve_windows=8,
        corpus_bytes=1 << 15,
    ),
}


def lr_at(spec: TaskSpec, step: int, total_steps: int) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine from ``lr`` to ``min_lr_ratio*lr``."""
    if step < spec.warmup_steps:
        return spec.lr * (step + 1) / spec.warmup_steps
    span = max(total_steps - spec.warmup_steps, 1)
    t = min((step - spec.warmup_steps) / span, 1.0)
    floor = spec.min_lr_ratio
    return spec.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))


def make_optimizer(spec: TaskSpec, model: nn.Module) -> torch.optim.Optimizer:
    if spec.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=spec.lr, momentum=0.9, weight_decay=spec.weight_decay
        )
    if spec.optimizer == "adamw":
        return torch.optim.AdamW(
            model.parameters(), lr=spec.lr, betas=(0.9, 0.95), weight_decay=spec.weight_decay
        )
    raise ValueError(f"optimizer={spec.optimizer!r} is not one of ('sgd', 'adamw')")


class Task:
    """A task's data and the three things a training loop needs: batches, loss, evaluation."""

    spec: TaskSpec
    data_info: dict[str, Any]

    def build_model(self) -> nn.Module:
        return model_zoo.build(self.spec.model, **self.spec.overrides)

    def steps_per_epoch(self) -> int:
        raise NotImplementedError

    def batches(self, gen: torch.Generator) -> Iterator[Batch]:
        """One epoch of training batches, in an order drawn from ``gen``."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        raise NotImplementedError

    def evaluate(self, model: nn.Module, final: bool) -> dict[str, float]:
        raise NotImplementedError


class DigitsTask(Task):
    def __init__(self, spec: TaskSpec, tune: bool = False) -> None:
        self.spec = spec
        self.data = load_digits(tune=tune, limit=spec.data_limit)
        self.data_info = self.data.info

    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.data.y_train) / self.spec.batch_size)

    def batches(self, gen: torch.Generator) -> Iterator[Batch]:
        d = self.data
        for idx in torch.randperm(len(d.y_train), generator=gen).split(self.spec.batch_size):
            yield d.x_train[idx], d.y_train[idx]

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(model(batch[0]), batch[1])

    @torch.no_grad()
    def evaluate(self, model: nn.Module, final: bool) -> dict[str, float]:
        was = model.training
        model.eval()
        logits = model(self.data.x_eval)
        model.train(was)
        return {
            "loss": F.cross_entropy(logits, self.data.y_eval).item(),
            "accuracy": (logits.argmax(-1) == self.data.y_eval).float().mean().item(),
        }


class CharLMTask(Task):
    def __init__(self, spec: TaskSpec, tune: bool = False) -> None:
        self.spec = spec
        corpus = stdlib_corpus(spec.corpus_bytes, tune=tune)
        self.train_tokens = corpus.train.long()
        self.eval_tokens = corpus.eval.long()
        t = spec.seq_len
        n_windows = (len(self.eval_tokens) - 1) // t  # non-overlapping, every byte predicted once
        self.eval_starts = torch.arange(n_windows) * t
        k = spec.curve_windows or n_windows
        pick = torch.linspace(0, n_windows - 1, min(k, n_windows)).round().long()
        self.curve_starts = self.eval_starts[pick]
        self.data_info = {
            **corpus.info,
            "seq_len": t,
            "eval_windows_final": n_windows,
            "eval_windows_per_epoch": len(self.curve_starts),
            "batches": "random windows, offsets drawn uniformly from the training split",
        }

    def steps_per_epoch(self) -> int:
        assert self.spec.steps_per_epoch is not None  # invariant of the charlm specs
        return self.spec.steps_per_epoch

    def _windows(self, tokens: torch.Tensor, starts: torch.Tensor) -> Batch:
        offsets = starts[:, None] + torch.arange(self.spec.seq_len + 1)
        chunk = tokens[offsets]
        return chunk[:, :-1], chunk[:, 1:]

    def batches(self, gen: torch.Generator) -> Iterator[Batch]:
        high = len(self.train_tokens) - self.spec.seq_len - 1
        for _ in range(self.steps_per_epoch()):
            starts = torch.randint(0, high, (self.spec.batch_size,), generator=gen)
            yield self._windows(self.train_tokens, starts)

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        logits = model(batch[0])
        return F.cross_entropy(logits.flatten(0, 1), batch[1].flatten())

    @torch.no_grad()
    def evaluate(self, model: nn.Module, final: bool) -> dict[str, float]:
        was = model.training
        model.eval()
        starts = self.eval_starts if final else self.curve_starts
        total, count = 0.0, 0
        for chunk in starts.split(64):
            x, y = self._windows(self.eval_tokens, chunk)
            logits = model(x)
            total += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
            count += y.numel()
        model.train(was)
        loss = total / count
        return {"loss": loss, "bits_per_byte": loss / math.log(2)}


def build_task(spec: TaskSpec, tune: bool = False) -> Task:
    """The task object for ``spec`` (loads its data once)."""
    kinds: dict[str, type[Task]] = {"digits": DigitsTask, "charlm": CharLMTask}
    if spec.name not in kinds:
        raise ValueError(f"unknown task {spec.name!r}; known tasks: {', '.join(kinds)}")
    return kinds[spec.name](spec, tune=tune)
