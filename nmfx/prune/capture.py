"""Reading each target's calibration inputs with hooks on the real model.

Nothing here needs a whole-model FX graph: ``nn.Linear`` / ``nn.ConvNd`` owners get a
forward pre-hook; other owners (GPT-2 ``Conv1D``, custom modules with functional weight
ops) run their own FX graph in an interpreter that records the op's activation operand.
Inputs are folded into one ``[cols, cols]`` Gram matrix per distinct input (q, k and v of
an attention block share one), so only that matrix is kept, never the activations.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import fx, nn

from nmfx.prune.targets import PruneTarget
from nmfx.prune.views import input_rows

__all__ = ["CalibrationError", "GramStats", "Stop", "call_model", "first_tensor", "install_capture"]


class CalibrationError(RuntimeError):
    """A calibration batch did not run through the model (the model's error is the cause)."""


class Stop(BaseException):
    """Raised by a hook to end a calibration forward early (the rest is not needed).
    A BaseException, so models that catch ``Exception`` around submodules do not swallow it."""


def call_model(model: nn.Module, batch: Any) -> Any:
    """``model(batch)``, ``model(*batch)`` for a tuple/list, ``model(**batch)`` for a dict."""
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, tuple | list):
        return model(*batch)
    return model(batch)


def first_tensor(args: Iterable[Any], kwargs: dict[str, Any] | None = None) -> torch.Tensor | None:
    for value in [*args, *(kwargs or {}).values()]:
        if isinstance(value, torch.Tensor):
            return value
    return None


def tensor_key(x: torch.Tensor | None) -> tuple | None:
    """Identity of an activation: same storage, offset, shape, strides and version (an
    in-place write in between makes it a different activation). Two keys only say "the same
    activation" while the first tensor is still alive: a freed activation's memory can come
    back as another one (a 2048-wide attention output and the norm after it), so callers
    that compare keys hold a reference to the tensor of the first."""
    if x is None:
        return None
    try:
        version = x._version
    except RuntimeError:  # inference-mode tensors have no version counter
        version = -1
    return (x.data_ptr(), tuple(x.shape), tuple(x.stride()), x.dtype, version)


_GRAM_SPLIT = 1024  # wider inputs accumulate only the upper block-triangle of X^T X


class GramStats:
    """``H = X^T X / rows`` of one input, accumulated in fp32 (the papers' Hessian up to 2x).

    For wide inputs only the block rows' upper parts are accumulated, ``X_i^T X[:, i:]`` per
    column block ``i``, and the lower blocks are mirrored once in ``hessian()``: with four
    blocks 10/16 of the full product's arithmetic, the largest cost of calibration after the
    forwards (a 5632-wide MLP input over 4,096 tokens is 260 GFLOP as one product).
    """

    def __init__(self, cols: int, device: torch.device) -> None:
        self.gram = torch.zeros(cols, cols, dtype=torch.float32, device=device)
        self.rows = 0
        self.last: tuple | None = None  # the activation added last (q, k, v add it once)
        self.last_tensor: torch.Tensor | None = None  # kept alive so its key stays unique
        self.bounds = _block_bounds(cols)

    def add(self, rows: torch.Tensor) -> None:
        for i0, i1 in self.bounds:
            self.gram[i0:i1, i0:].addmm_(rows[:, i0:i1].t(), rows[:, i0:])
        self.rows += rows.shape[0]

    def hessian(self) -> torch.Tensor:
        h = self.gram / max(self.rows, 1)
        for i0, i1 in self.bounds[:-1]:
            h[i1:, i0:i1] = h[i0:i1, i1:].t()
        return h


def _block_bounds(cols: int) -> list[tuple[int, int]]:
    if cols <= _GRAM_SPLIT:
        return [(0, cols)]
    parts = 4
    step = -(-cols // parts)
    return [(i, min(i + step, cols)) for i in range(0, cols, step)]


class _OperandRecorder(fx.Interpreter):
    """Runs an owner's own graph and hands each wanted node's argument list to callbacks."""

    def __init__(self, gm: fx.GraphModule, wanted: dict[str, list[Callable]]) -> None:
        super().__init__(gm)
        self.wanted = wanted

    def run_node(self, n: fx.Node) -> Any:
        callbacks = self.wanted.get(n.name)
        if callbacks:
            args, _ = self.fetch_args_kwargs_from_env(n)
            for cb in callbacks:
                cb(args)
        return super().run_node(n)


def _adder(target: PruneTarget, stats: dict[tuple, GramStats], input_key: object) -> Callable:
    key = target.stats_key(input_key)

    def add(x: torch.Tensor) -> None:
        entry = stats.get(key)
        if entry is None:
            entry = stats[key] = GramStats(target.cols, target.weight.device)
        ident = tensor_key(x)
        if entry.last == ident:  # q, k and v see the same activation: count it once
            return
        entry.last, entry.last_tensor = ident, x
        entry.add(input_rows(x, target.cols, target.contract_last, target.geometry))

    return add


def install_capture(
    targets: list[PruneTarget], stats: dict[tuple, GramStats], input_keys: dict[int, object]
) -> Callable[[], None]:
    """Hooks feeding ``stats`` from ``targets``' inputs; returns the function removing them."""
    handles: list[Any] = []
    patched: list[tuple[nn.Module, Any]] = []
    by_owner: dict[int, list[PruneTarget]] = {}
    for t in targets:
        by_owner.setdefault(id(t.owner), []).append(t)
    for group in by_owner.values():
        owner = group[0].owner
        in_key = input_keys.get(id(owner))
        direct = [_adder(t, stats, in_key) for t in group if t.node is None]
        if direct:

            def pre_hook(_m: nn.Module, args: tuple, kwargs: dict, adders=direct) -> None:
                x = first_tensor(args, kwargs)
                for add in adders:
                    add(x)

            handles.append(owner.register_forward_pre_hook(pre_hook, with_kwargs=True))
        wanted: dict[str, list[Callable]] = {}
        for t in group:
            if t.node is not None:
                add = _adder(t, stats, in_key)
                wanted.setdefault(t.node, []).append(lambda a, add=add, p=t.act_pos: add(a[p]))
        if wanted:
            patched.append((owner, owner.__dict__.get("forward")))
            owner.forward = _recording_forward(group[0].facts["graph"], wanted)

    def remove() -> None:
        for h in handles:
            h.remove()
        for owner, before in patched:
            if before is None:
                del owner.forward
            else:
                owner.forward = before

    return remove


def _recording_forward(gm: fx.GraphModule, wanted: dict[str, list[Callable]]) -> Callable:
    names = [n.target for n in gm.graph.nodes if n.op == "placeholder"]

    def forward(*args: Any, **kwargs: Any) -> Any:
        values = list(args) + [kwargs[n] for n in names[len(args) :] if n in kwargs]
        return _OperandRecorder(gm, wanted).run(*values)

    return forward
