"""Whole-model analysis, shared by ``sparsify`` and N:M detection: changes nothing.

Traces the model (whole, for structural facts; then each module's own forward, for the
rewrite), runs a pass pipeline on every own graph and returns the candidates with their
verdicts plus what ``sparsify`` would install (``model_state.Install``). The verbs
(``nmfx.api``, ``nmfx.finalize``) decide what to do with it.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import fx, nn

from nmfx.capture import (
    EXPORT,
    NATIVE,
    OwnGraph,
    capture_own_graphs,
    capture_whole_model,
    trace_own_forward,
)
from nmfx.config import SparsityConfig
from nmfx.model_state import Install
from nmfx.modules import MHAForward, NMMasker, rewritten_forward
from nmfx.opgraph import ModelFacts, build_op_graph
from nmfx.passes import Pass, PassContext, run_passes
from nmfx.passes.decide_eligibility import dense_reason
from nmfx.passes.insert_srste_masks import masker_name
from nmfx.pattern import NMPattern
from nmfx.plan import DENSE, SPARSE, Candidate, Coverage
from nmfx.weight_ops import find_weight_uses, mha_weights, no_nm_form, no_nm_module_weights

__all__ = ["Analysis", "analyse", "mha_candidates"]

log = logging.getLogger("nmfx")


def _forward_defaults(module: nn.Module) -> tuple[str, ...]:
    try:
        sig = inspect.signature(module.forward)
    except (TypeError, ValueError):
        return ()
    return tuple(
        f"{p.name}={p.default!r}" if p.default is not p.empty else f"*{p.name}"
        for p in sig.parameters.values()
        if p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    )


def _trace_modes(own: OwnGraph) -> list[tuple[bool, fx.Graph]]:
    """The module's own graph in train and eval mode; one entry when both are the same code.

    FX evaluates ``if self.training`` at trace time, so a forward that branches on it
    gives two graphs and the rewritten forward picks one at run time. Forwards whose
    source never reads ``training`` are traced once.
    """
    module = own.module
    if not _reads_training(type(module)):
        return [(module.training, own.graph)]
    was = module.training
    graphs = []
    try:
        for mode in (True, False):
            module.training = mode  # this module only: children are leaves here
            graphs.append((mode, own.graph if mode == was else trace_own_forward(module)))
    finally:
        module.training = was
    codes = {g.python_code("self").src for _, g in graphs}
    return graphs if len(codes) > 1 else [(was, own.graph)]


@functools.cache
def _reads_training(cls: type) -> bool:
    """False only when the source of ``cls.forward`` is known and never mentions training."""
    try:
        return "training" in inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return True


def _plan_own_graph(
    own: OwnGraph, scope: Scope, passes: tuple[Pass, ...]
) -> tuple[list[Candidate], Install | None]:
    defaults = _forward_defaults(own.module)
    maskers: dict[str, NMMasker] = {}
    results: dict[bool, fx.GraphModule] = {}
    candidates: list[Candidate] = []
    temporary: list[fx.GraphModule] = []  # torn down below: see _discard
    try:
        for mode, graph in _trace_modes(own):
            ctx = scope.context(own.fqn, own.module, maskers=maskers, forward_defaults=defaults)
            gm = fx.GraphModule(own.module, graph)
            temporary.append(gm)
            result = run_passes(gm, passes, ctx)
            temporary.append(result.graph_module)
            sparse = [c.param for c in ctx.candidates if c.sparse]
            if candidates and [c.param for c in candidates if c.sparse] != sparse:
                before = [c.param for c in candidates if c.sparse]
                raise ValueError(
                    f"{own.fqn or '<root>'} ({type(own.module).__name__}): its forward makes N:M "
                    f"weights {before} in training mode but {sparse} in eval mode; nmfx needs the "
                    f"same ones in both. Exclude them (exclude=[...]) or keep the mode switch out of "
                    f"this module; nothing was changed"
                )
            candidates = candidates or ctx.candidates
            if result.modified:
                results[mode] = result.graph_module.graph
        if not maskers:
            return candidates, None
        return candidates, Install(own.module, maskers, rewritten_forward(own.module, results))
    finally:
        for gm in temporary:
            _discard(gm)


def _discard(gm: fx.GraphModule) -> None:
    """Drop a pass pipeline's GraphModule's hold on the module's children and the maskers.

    A GraphModule and its Graph refer to each other (``graph.owning_module``) and a graph's
    nodes form a linked list, so a discarded GraphModule is freed only by Python's cyclic GC.
    Until that ran, the children it copied from the module and the maskers the passes added to
    it stayed alive: after ``finalize`` had removed the maskers, their masks (a byte per weight
    element, 0.9 GB on a 22-layer TinyLlama-sized Llama) stayed resident. The graph lives on
    where the rewritten forward uses it (``modules.rewritten_forward``); only the module's side
    is dropped.
    """
    for store in (gm._modules, gm._parameters, gm._buffers):
        store.clear()
    if gm.graph.owning_module is gm:
        gm.graph.owning_module = None


def mha_candidates(fqn: str, mha: nn.MultiheadAttention) -> list[Candidate]:
    out = []
    for path, op in mha_weights(mha):
        weight = mha.get_parameter(path)
        param = f"{fqn}.{path}" if fqn else path
        name = f"{fqn}.{op.split('.')[1]}" if fqn else op.split(".")[1]
        out.append(Candidate(name, param, fqn, path, op, tuple(weight.shape), weight.dtype, 1))
    return out


def _plan_mha(
    fqn: str, mha: nn.MultiheadAttention, ctx: PassContext
) -> tuple[list[Candidate], Install | None]:
    cfg = ctx.config
    candidates, maskers, by_path = [], {}, {}
    for cand in mha_candidates(fqn, mha):
        path = cand.local_param
        reason = dense_reason(cand, ctx)
        cand.verdict, cand.reason = (
            (DENSE, reason) if reason else (SPARSE, f"{cfg.pattern} along in_features")
        )
        candidates.append(cand)
        if cand.sparse:
            name = masker_name(mha, path, maskers)
            maskers[name] = NMMasker(
                mha, path, cfg.pattern.n, cfg.pattern.m, 1,
                cfg.srste_lambda, cfg.mask_mode, cfg.mask_interval,
            )  # fmt: skip
            by_path[path] = name
    install = Install(mha, maskers, MHAForward(mha, by_path)) if maskers else None
    return candidates, install


def _untraceable_candidates(own: OwnGraph) -> list[Candidate]:
    """The module's own (not its children's) weights: their ops could not be seen."""
    out = []
    for name, p in own.module.named_parameters(recurse=False):
        if p.dim() >= 2:
            param = f"{own.fqn}.{name}" if own.fqn else name
            out.append(Candidate(
                param, param, own.fqn, name, "unknown", tuple(p.shape), p.dtype, None, DENSE,
                f"{type(own.module).__name__}.forward is not traceable by torch.fx ({own.error}); "
                f"its own weight ops stay dense (its submodules are still sparsified)",
            ))  # fmt: skip
    return out


def no_nm_candidates(fqn: str, module: nn.Module) -> list[Candidate]:
    """Dense rows for the weights of torch.nn ops with no N:M form (LSTM, ConvTranspose2d, ...)."""
    out = []
    for path, op in no_nm_module_weights(module):
        p = module.get_parameter(path)
        param = f"{fqn}.{path}" if fqn else path
        out.append(Candidate(param, param, fqn, path, op, tuple(p.shape), p.dtype, None, DENSE,
                             no_nm_form(f"nn.{type(module).__name__}")))  # fmt: skip
    return out


@dataclass
class Analysis:
    """The candidates of a model and what to install, before anything is changed."""

    candidates: list[Candidate]
    coverage: list[Coverage]
    installs: list[Install]
    traced: bool
    trace_error: str
    facts: ModelFacts


@dataclass
class Scope:
    """What every module's pass context shares: options and whole-model facts."""

    config: SparsityConfig
    facts: ModelFacts
    traced: bool
    detect_pattern: NMPattern | None = None
    last_weight: str | None = None

    def context(self, fqn: str, module: nn.Module, **fields: Any) -> PassContext:
        return PassContext(
            self.config, fqn, module, self.facts, self.traced,
            detect_pattern=self.detect_pattern, last_weight=self.last_weight, **fields,
        )  # fmt: skip


# (fqn, module, ctx) -> (candidates, install | None): how natively handled modules are analysed
NativeHandler = Callable[[str, nn.Module, PassContext], tuple[list[Candidate], "Install | None"]]


def analyse(
    model: nn.Module,
    cfg: SparsityConfig,
    passes: tuple[Pass, ...],
    native: NativeHandler | None = None,
    detect_pattern: NMPattern | None = None,
) -> Analysis:
    """Trace ``model`` (whole, then each module's own forward) and run ``passes`` on every
    own graph. Changes nothing on the model."""
    whole = capture_whole_model(model)  # torch.fx, else torch.export
    whole_graph, trace_error = whole.graph, whole.error
    traced = whole_graph is not None
    facts = build_op_graph(model, whole_graph, whole.how)
    owns = capture_own_graphs(model, facts.weight_op_owners() if whole.how == EXPORT else None)
    scope = Scope(cfg, facts, traced, detect_pattern)
    if not traced:
        scope.last_weight = _last_weight(model, owns)
    native = native or _plan_mha
    out = Analysis([], [], [], traced, trace_error, facts)
    by_module = {id(o.module): o for o in owns}
    for fqn, module in model.named_modules():
        if isinstance(module, NATIVE):
            cands, install = native(fqn, module, scope.context(fqn, module))
            out.coverage.append(
                Coverage(fqn, "native", "nn.MultiheadAttention: in/out projections")
            )
        else:
            own = by_module.get(id(module))
            if own is None:
                out.candidates += no_nm_candidates(fqn, module)
                continue
            if own.graph is None:
                cands, install = _untraceable_candidates(own), None
                out.coverage.append(Coverage(fqn, "untraceable", own.error))
            else:
                cands, install = _plan_own_graph(own, scope, passes)
                out.coverage.append(Coverage(fqn, "fx"))
        out.candidates += cands
        if install is not None:
            out.installs.append(install)
    return out


def _last_weight(model: nn.Module, owns: list[OwnGraph]) -> str | None:
    """Without a whole-model graph, the output layer is taken to be the last weight op
    in registration order (the usual ``head`` / ``fc`` / ``lm_head`` placement)."""
    last = None
    by_module = {id(o.module): o for o in owns}
    for fqn, module in model.named_modules():
        if isinstance(module, NATIVE):
            last = f"{fqn}.out_proj.weight"
            continue
        own = by_module.get(id(module))
        if own is not None and own.graph is not None:
            uses = find_weight_uses(fx.GraphModule(module, own.graph))
            if uses:
                last = f"{fqn}.{uses[-1].target}" if fqn else uses[-1].target
    return last
