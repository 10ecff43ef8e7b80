"""The calibration schedule: layer by layer, each layer seeing the already-pruned ones.

1. ``trace_calls`` runs every calibration batch through the dense model once (a batch that
   fails is reported before anything changes) and records, on the first batch, the order
   in which the target layers run and which ones read the same activation.
2. Stages are runs of consecutive layers reading one activation (q/k/v; gate/up); each
   stage is calibrated, then pruned, before the next one is calibrated.
3. Where the model is a stack of blocks (the ``ModuleList`` of a transformer, found and
   checked on the first batch), the inputs of block 0 are cached once and every block is
   replayed on the previous block's pruned outputs, as the papers do; a stage's forward
   stops at the next stage's first layer. Elsewhere each stage re-runs the model from its
   input, stopping at the next stage.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from nmfx.prune.capture import (
    CalibrationError,
    GramStats,
    Stop,
    call_model,
    first_tensor,
    install_capture,
    tensor_key,
)
from nmfx.prune.targets import PruneTarget

__all__ = ["Schedule", "Stage", "plan_schedule", "run_stage", "trace_calls"]

log = logging.getLogger("nmfx.prune")


@dataclass
class Stage:
    targets: list[PruneTarget]
    block: int | None  # index in the block stack, or None: the whole model is run
    stop: nn.Module | None  # the first owner of the next stage (its pre-hook ends the run)
    # where the run ends once the stage's input is captured, when every owner of the stage
    # runs once per forward (see _set_end); end_before: in a pre-hook, else a forward hook
    end: nn.Module | None = None
    end_before: bool = True


@dataclass
class Trace:
    order: list[int] = field(default_factory=list)  # id(owner) in first-call order
    input_keys: dict[int, object] = field(default_factory=dict)
    calls: dict[int, int] = field(default_factory=dict)  # id(owner): calls on the first batch
    block_calls: list[tuple[int, tuple | None, tuple | None]] = field(default_factory=list)
    replay_ok: bool = False
    replay_note: str = ""


@dataclass
class Schedule:
    stages: list[Stage]
    blocks: list[nn.Module]
    unreached: list[PruneTarget]
    input_keys: dict[int, object]
    note: str = ""


def _wrap(i: int, exc: Exception) -> CalibrationError:
    return CalibrationError(
        f"calibration batch {i} does not run through the model: {type(exc).__name__}: {exc}; "
        f"the model was not changed. Each batch must be a tensor, a tuple of positional "
        f"arguments or a dict of keyword arguments for model(...)"
    )


def find_block_stack(model: nn.Module, targets: list[PruneTarget]) -> list[nn.Module]:
    """The ``ModuleList`` of same-type blocks holding the most targets (a transformer's layers)."""
    best: list[nn.Module] = []
    best_count = 0
    for module in model.modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2:
            continue
        blocks = list(module)
        if len({type(b) for b in blocks}) != 1:
            continue
        inside = [{id(m) for m in b.modules()} for b in blocks]
        counts = [sum(id(t.owner) in s for t in targets) for s in inside]
        if min(counts) > 0 and sum(counts) > best_count:
            best, best_count = blocks, sum(counts)
    return best


def trace_calls(model: nn.Module, batches: list[Any], targets: list[PruneTarget],
                blocks: list[nn.Module]) -> Trace:  # fmt: skip
    """Run every batch once, dense; record call order, input identities and block chaining."""
    trace = Trace()
    state = {"batch": 0, "replaying": False}
    handles = []
    owners = {id(t.owner): t.owner for t in targets}

    def owner_hook(m: nn.Module, args: tuple, kwargs: dict) -> None:
        if state["batch"] != 0 or state["replaying"]:
            return
        trace.calls[id(m)] = trace.calls.get(id(m), 0) + 1
        if id(m) not in trace.input_keys:
            x = first_tensor(args, kwargs)
            trace.order.append(id(m))
            trace.input_keys[id(m)] = tensor_key(x)
            state["alive"] = x  # until the next layer's key is taken (see tensor_key)

    for owner in owners.values():
        handles.append(owner.register_forward_pre_hook(owner_hook, with_kwargs=True))
    for k, block in enumerate(blocks):
        handles.append(block.register_forward_hook(_block_hook(k, state, trace), with_kwargs=True))
    try:
        for i, batch in enumerate(batches):
            state["batch"] = i
            try:
                call_model(model, batch)
            except Exception as exc:
                raise _wrap(i, exc) from exc
    finally:
        for h in handles:
            h.remove()
    return trace


def _block_hook(k: int, state: dict, trace: Trace) -> Callable:
    def hook(block: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        if state["batch"] != 0 or state["replaying"]:
            return
        trace.block_calls.append(
            (k, tensor_key(first_tensor(args, kwargs)), tensor_key(_hidden(out)))
        )
        state["block_out"] = _hidden(out)  # alive until the next block's input key is taken
        if k == 0:
            state["replaying"] = True
            try:
                again = _hidden(block(*args, **kwargs))
                first = _hidden(out)
                trace.replay_ok = (
                    again is not None
                    and first is not None
                    and torch.allclose(again, first, atol=1e-6)
                )
                trace.replay_note = (
                    "" if trace.replay_ok else "replaying block 0 changed its output"
                )
            except Exception as exc:  # a block that cannot be replayed: run the whole model
                trace.replay_note = f"block 0 cannot be replayed ({type(exc).__name__}: {exc})"
            finally:
                state["replaying"] = False

    return hook


def _hidden(out: Any) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, tuple | list) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return getattr(out, "last_hidden_state", None) if not isinstance(out, dict) else None


def _chained(trace: Trace, n_blocks: int) -> str:
    calls = trace.block_calls
    if [k for k, _, _ in calls] != list(range(n_blocks)):
        return "the blocks do not run once each, in order"
    for (_, _, out), (_, nxt, _) in itertools.pairwise(calls):
        if out is None or out != nxt:
            return "a block's input is not the previous block's output"
    return trace.replay_note if not trace.replay_ok else ""


def plan_schedule(targets: list[PruneTarget], trace: Trace, blocks: list[nn.Module]) -> Schedule:
    """Stages in execution order; block replay where the stack checks out."""
    owner_of = {id(t.owner): t.owner for t in targets}
    by_owner: dict[int, list[PruneTarget]] = {}
    for t in targets:
        by_owner.setdefault(id(t.owner), []).append(t)
    unreached = [t for t in targets if id(t.owner) not in trace.input_keys]
    note = _chained(trace, len(blocks)) if blocks else "no stack of blocks found"
    block_of: dict[int, int] = {}
    if not note:
        for k, b in enumerate(blocks):
            for m in b.modules():
                block_of[id(m)] = k
        seq = [block_of.get(o) for o in trace.order]
        inside = [i for i, k in enumerate(seq) if k is not None]
        if inside and any(seq[i] is None for i in range(inside[0], inside[-1] + 1)):
            note = "layers outside the blocks run between them"
    if note:
        block_of = {}
        blocks = []
    stages: list[Stage] = []
    for oid in trace.order:
        k = block_of.get(oid)
        last = stages[-1] if stages else None
        if (
            last is not None
            and last.block == k
            and trace.input_keys[oid] == trace.input_keys[id(last.targets[-1].owner)]
            and trace.input_keys[oid] is not None
        ):
            last.targets += by_owner[oid]
        else:
            stages.append(Stage(list(by_owner[oid]), k, None))
    for cur, nxt in itertools.pairwise(stages):
        if cur.block is None or cur.block == nxt.block:
            cur.stop = owner_of[id(nxt.targets[0].owner)]
    for stage in stages:
        if all(trace.calls.get(id(t.owner)) == 1 for t in stage.targets):
            _set_end(stage)
    return Schedule(stages, blocks, unreached, trace.input_keys, note)


def _set_end(stage: Stage) -> None:
    """Where a stage's forward can end. Its owners read one activation (that is what makes
    them a stage), so when all of them capture it in a pre-hook the first owner's hook has
    it all (q, k and v share one Gram matrix); an owner capturing inside its forward (a
    functional weight op) ends it after the last owner's forward."""
    if all(t.node is None for t in stage.targets):
        stage.end, stage.end_before = stage.targets[0].owner, True
    else:
        stage.end, stage.end_before = stage.targets[-1].owner, False


class BlockInputs:
    """The cached inputs of the current block, one ``(args, kwargs)`` per batch."""

    def __init__(self) -> None:
        self.items: list[tuple[tuple, dict]] = []

    def capture(self, model: nn.Module, batches: list[Any], block: nn.Module) -> None:
        def grab(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            self.items.append((args, kwargs))
            raise Stop

        handle = block.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            for i, batch in enumerate(batches):
                try:
                    call_model(model, batch)
                except Stop:
                    pass
                except Exception as exc:
                    raise _wrap(i, exc) from exc
        finally:
            handle.remove()

    def advance(self, block: nn.Module) -> None:
        """Replace each item's hidden state by ``block``'s output on it."""
        new = []
        for args, kwargs in self.items:
            hidden = _hidden(block(*args, **kwargs))
            if args and isinstance(args[0], torch.Tensor):
                new.append(((hidden, *args[1:]), kwargs))
            else:
                key = next(k for k, v in kwargs.items() if isinstance(v, torch.Tensor))
                new.append((args, {**kwargs, key: hidden}))
        self.items = new


def run_stage(stage: Stage, run: Callable[[int], Any], n_items: int,
              input_keys: dict[int, object]) -> dict[tuple, GramStats]:  # fmt: skip
    """Calibrate one stage: run every item with capture hooks, stopping once the stage's
    inputs are captured (``stage.end``) or else at the next stage (``stage.stop``)."""
    stats: dict[tuple, GramStats] = {}
    remove = install_capture(stage.targets, stats, input_keys)
    stop_handle = None

    def stop(*_: Any) -> None:
        raise Stop

    if stage.end is not None:  # registered after the capture hooks, so it runs after them
        if stage.end_before:
            stop_handle = stage.end.register_forward_pre_hook(stop)
        else:
            stop_handle = stage.end.register_forward_hook(stop)
    elif stage.stop is not None:
        stop_handle = stage.stop.register_forward_pre_hook(stop)
    try:
        for i in range(n_items):
            for entry in stats.values():
                entry.last = entry.last_tensor = None  # next item: new activations
            try:
                run(i)
            except Stop:
                pass
            except Exception as exc:
                raise _wrap(i, exc) from exc
    finally:
        remove()
        if stop_handle is not None:
            stop_handle.remove()
    return stats
