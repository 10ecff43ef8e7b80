"""Everything nmfx leaves on a user's model, in one place: install and uninstall side by side.

``sparsify`` installs, and ``finalize`` removes again:

- an ``NMMasker`` child per sparse weight, on the module whose forward consumes it
  (``_nmfx_<param>``; no persistent state, so ``state_dict`` keys are the model's own);
- an instance ``forward`` on each of those modules (the rewritten FX code, or ``MHAForward``);
- the ``SparsityPlan`` on the root module (``nmfx.summary`` reads it);
- the maskers' stored masks in DDP's ``_ddp_params_and_buffers_to_ignore`` list.

``finalize`` leaves one thing: a record of which weights are N:M, kept as plain Python data
(str, int, list, dict) so that a finalized model saved with ``torch.save`` loads where nmfx
is not installed. ``lower`` keeps its ``LayerDecision``s on its result (a lowered model holds
nmfx modules, so it needs nmfx anyway).

No other module reads or writes these attributes: they go through the accessors below.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from nmfx.modules import NMMasker, track
from nmfx.pattern import NMPattern
from nmfx.plan import Candidate, LayerDecision, NMWeight, SparsityPlan

__all__ = [
    "Install",
    "finalized_layers",
    "get_decisions",
    "get_plan",
    "get_prune_summary",
    "install",
    "is_sparsified",
    "maskers",
    "nm_record",
    "set_decisions",
    "set_nm_record",
    "set_prune_summary",
    "uninstall",
]

_PLAN = "_nmfx_plan"  # SparsityPlan, on the root of a sparsified model
_RECORD = "_nmfx_nm_record"  # plain data, on the root of a finalized model
_DECISIONS = "_nmfx_lowering"  # list[LayerDecision], on a lowered model
_DDP_IGNORE = "_ddp_params_and_buffers_to_ignore"  # DDP's own attribute name
_RECORD_VERSION = 1
_PRUNE = "_nmfx_prune"  # PruneSummary of nmfx.prune, on the root; finalize removes it


@dataclass
class Install:
    """What to change on one module, computed before anything is changed."""

    module: nn.Module
    maskers: dict[str, NMMasker]
    forward: Any


# ---- sparsify: install / uninstall --------------------------------------------------------


def is_sparsified(model: nn.Module) -> bool:
    return any(isinstance(m, NMMasker) for m in model.modules())


def maskers(model: nn.Module) -> list[tuple[str, NMMasker]]:
    """``(fqn of the masker's owner, masker)`` for every installed masker, in module order."""
    return [
        (fqn.rpartition(".")[0], m) for fqn, m in model.named_modules() if isinstance(m, NMMasker)
    ]


def install(model: nn.Module, installs: list[Install], plan: SparsityPlan) -> None:
    """Put maskers and rewritten forwards in place (nothing here can fail: all-or-nothing)."""
    for item in installs:
        for name, masker in item.maskers.items():
            item.module.add_module(name, masker)
            track(masker)
            if masker.mask_mode == "fixed":
                with torch.no_grad():
                    masker.weight.masked_fill_(~masker.mask, 0)  # NaN or Inf * 0 is NaN
        item.module.forward = item.forward
    model.__dict__[_PLAN] = plan
    _ddp_ignore_stored_masks(model)


def uninstall(model: nn.Module) -> None:
    """Remove every masker, rewritten forward, the plan and the DDP entries from ``model``."""
    for module in list(model.modules()):
        names = [n for n, child in module._modules.items() if isinstance(child, NMMasker)]
        for name in names:
            del module._modules[name]
        if names or _rewritten(module):
            module.__dict__.pop("forward", None)
        module.__dict__.pop(_PLAN, None)
        module.__dict__.pop(_PRUNE, None)
        ignored = module.__dict__.get(_DDP_IGNORE)
        if ignored is not None:
            kept = [n for n in ignored if not _is_masker_buffer(n)]
            if kept:
                module.__dict__[_DDP_IGNORE] = kept
            else:
                del module.__dict__[_DDP_IGNORE]


def _rewritten(module: nn.Module) -> bool:
    from nmfx.modules import MHAForward, RewrittenForward

    return isinstance(module.__dict__.get("forward"), RewrittenForward | MHAForward)


def _is_masker_buffer(name: str) -> bool:
    parts = name.split(".")
    return len(parts) >= 2 and parts[-2].startswith("_nmfx_") and parts[-1] == "mask"


def _ddp_ignore_stored_masks(model: nn.Module) -> list[str]:
    """Tell DDP not to broadcast the maskers' stored masks (fixed/interval modes).

    A mask is a function of the weights, which DDP keeps equal on every rank, so syncing it
    is communication for nothing. Uses DDP's ``_ddp_params_and_buffers_to_ignore`` on
    ``model`` (names relative to it, so DDP must wrap ``model`` itself), keeping entries the
    user set. Returns the names added.
    """
    names = [
        f"{fqn}.mask"
        for fqn, m in model.named_modules()
        if isinstance(m, NMMasker) and m.stores_mask and m.mask is not None
    ]
    if not names:
        return []
    ignored = list(getattr(model, _DDP_IGNORE, ()))
    added = [n for n in names if n not in ignored]
    ddp = nn.parallel.DistributedDataParallel
    ddp._set_params_and_buffers_to_ignore_for_model(model, ignored + added)
    return added


def get_plan(model: nn.Module) -> SparsityPlan | None:
    """The plan ``sparsify`` recorded on ``model`` (None once finalized, or never sparsified)."""
    return model.__dict__.get(_PLAN)


def set_prune_summary(model: nn.Module, summary: Any) -> None:
    """Keep what ``nmfx.prune`` did (a ``PruneSummary``) on ``model`` for ``nmfx.summary``."""
    model.__dict__[_PRUNE] = summary


def get_prune_summary(model: nn.Module) -> Any:
    """The ``PruneSummary`` of the last ``nmfx.prune`` on ``model``, or None."""
    return model.__dict__.get(_PRUNE)


# ---- finalize: the plain-data N:M record --------------------------------------------------


def set_nm_record(
    model: nn.Module, record: dict[str, NMWeight], layers: list[Candidate] | None = None
) -> None:
    """Keep ``record`` (verified N:M weights) and the other layers' verdicts on ``model``.

    Stored as builtins only. Records that ``finalize`` left on submodules (a submodule
    finalized first) are folded into this one, their names prefixed, and removed there.
    """
    data = {
        "version": _RECORD_VERSION,
        "nm": {
            p: [w.name, w.op, w.pattern.n, w.pattern.m, w.reduce_dim] for p, w in record.items()
        },
        "layers": [_plain_layer(c) for c in layers or ()],
    }
    for fqn, module in model.named_modules():
        sub = module.__dict__.pop(_RECORD, None) if fqn else None
        if sub is not None:
            _merge_prefixed(data, sub, fqn)
    named = {c.param: c for c in layers or ()}
    for p, entry in data["nm"].items():  # a submodule finalized on its own had no plan
        if entry[1] == "unknown" and p in named:
            entry[0], entry[1] = named[p].name, named[p].op
    model.__dict__[_RECORD] = data


def _plain_layer(c: Candidate) -> list:
    dtype = str(c.dtype).removeprefix("torch.")
    return [c.name, c.param, c.op, list(c.shape), dtype, c.verdict, c.reason]


def _merge_prefixed(data: dict, sub: dict, prefix: str) -> None:
    def pre(name: str) -> str:
        return f"{prefix}.{name}" if name not in ("", "<root>") else prefix

    for p, (name, op, n, m, dim) in sub["nm"].items():
        data["nm"].setdefault(pre(p), [pre(name), op, n, m, dim])
    known = {row[1] for row in data["layers"]}
    for name, param, *rest in sub["layers"]:
        if pre(param) not in known:
            data["layers"].append([pre(name), pre(param), *rest])


def nm_record(model: nn.Module) -> dict[str, NMWeight] | None:
    """The N:M weights ``finalize`` recorded on ``model`` and on its submodules (prefixed),
    or None when nothing was finalized."""
    found: dict[str, NMWeight] | None = None
    for fqn, module in model.named_modules():
        data = module.__dict__.get(_RECORD)
        if data is None:
            continue
        found = {} if found is None else found
        for p, (name, op, n, m, dim) in data["nm"].items():
            key = f"{fqn}.{p}" if fqn else p
            label = (f"{fqn}.{name}" if name != "<root>" else fqn) if fqn else name
            found.setdefault(key, NMWeight(key, label, op, NMPattern(n, m), dim))
    return found


def finalized_layers(model: nn.Module) -> list[Candidate] | None:
    """Every weight op's verdict as ``finalize`` saw it (from the sparsify plan), or None."""
    data = model.__dict__.get(_RECORD)
    if data is None or not data["layers"]:
        return None
    return [
        Candidate(name, param, param.rpartition(".")[0], param.rpartition(".")[2], op,
                  tuple(shape), getattr(torch, dtype), None, verdict, reason)
        for name, param, op, shape, dtype, verdict, reason in data["layers"]
    ]  # fmt: skip


# ---- lower: decisions on the result -------------------------------------------------------


def set_decisions(model: nn.Module, decisions: list[LayerDecision]) -> None:
    model.__dict__[_DECISIONS] = list(decisions)


def get_decisions(model: nn.Module) -> list[LayerDecision] | None:
    decisions = model.__dict__.get(_DECISIONS)
    return None if decisions is None else list(decisions)
