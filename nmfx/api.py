"""``nmfx.sparsify`` and ``nmfx.summary``: the one-liner and what it decided."""

from __future__ import annotations

import functools
import inspect
import logging
import sys
from dataclasses import dataclass
from typing import Any

import torch
from tabulate import tabulate
from torch import fx, nn

from nmfx.capture import (
    EXPORT,
    NATIVE,
    OwnGraph,
    capture_own_graphs,
    capture_whole_model,
    trace_own_forward,
)
from nmfx.config import SparsityConfig, config_from_options
from nmfx.modules import MHAForward, NMMasker, RewrittenForward, track
from nmfx.opgraph import ModelFacts, build_op_graph
from nmfx.passes import SPARSIFY_PASSES, Pass, PassContext, run_passes
from nmfx.passes.decide_eligibility import dense_reason
from nmfx.passes.insert_srste_masks import masker_name
from nmfx.plan import DENSE, SPARSE, Candidate, Coverage, SparsityPlan
from nmfx.preconditions import check_materialized, outside_inference_mode
from nmfx.srste import ensure_optimizer_hook
from nmfx.weight_ops import find_weight_uses, mha_weights, no_nm_form, no_nm_module_weights

__all__ = ["Summary", "is_sparsified", "sparsify", "summary"]

log = logging.getLogger("nmfx")
PLAN_ATTR = "_nmfx_plan"


@dataclass
class _Install:
    """What to change on one module, computed before anything is changed."""

    module: nn.Module
    maskers: dict[str, nn.Module]
    forward: Any


def is_sparsified(model: nn.Module) -> bool:
    return any(isinstance(m, NMMasker) for m in model.modules())


def _is_compiled(model: Any) -> bool:
    # A torch.compile'd module implies torch._dynamo is imported; importing it just to
    # check would cost ~2 s on the first sparsify call.
    dynamo = sys.modules.get("torch._dynamo.eval_frame")
    return dynamo is not None and isinstance(model, dynamo.OptimizedModule)


def _check_model(model: Any) -> None:
    if _is_compiled(model):
        raise TypeError(
            "model is a torch.compile'd module; call nmfx.sparsify on the original module "
            "first, then torch.compile the result"
        )
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError(
            "model is a TorchScript module (torch.jit.script/trace); nmfx rewrites Python "
            "forwards: call nmfx.sparsify on the eager nn.Module, then script the result"
        )
    if not isinstance(model, nn.Module):
        raise TypeError(f"sparsify expects an nn.Module, got {type(model).__name__}")
    check_materialized(model)
    if is_sparsified(model):
        raise ValueError(
            "model is already sparsified by nmfx (it contains NMMasker modules); sparsify the "
            "original model once, or call nmfx.finalize first to bake the masks"
        )


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


def _stand_ins(graph: fx.Graph) -> dict[str, Any]:
    """Placeholders for the attributes a graph names: the code runs on the real module."""
    out: dict[str, Any] = {}
    for node in graph.nodes:
        if node.op == "get_attr":
            out[node.target] = torch.empty(0)
        elif node.op == "call_module":
            out[node.target] = nn.Identity()
    return out


_CODE_CACHE: dict[str, fx.GraphModule] = {}


def _code_module(graph: fx.Graph) -> fx.GraphModule:
    """A GraphModule whose only job is its generated forward; shared by every module whose
    rewritten forward is the same code (e.g. all nn.Linear layers)."""
    for node in graph.nodes:  # string annotations (postponed) would make the code unpicklable
        node.type = None
    src = graph.python_code("self").src
    code = _CODE_CACHE.get(src)
    if code is None:
        code = _CODE_CACHE[src] = fx.GraphModule(_stand_ins(graph), graph)
    return code


class _ModeDispatch(RewrittenForward):
    """RewrittenForward with separate train/eval code (see ``_trace_modes``)."""

    def __init__(self, owner: nn.Module, train: fx.GraphModule, evaluate: fx.GraphModule) -> None:
        super().__init__(owner, train)
        self._eval_code = (evaluate,)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        owner = self._owner[0]
        code = self._code[0] if owner.training else self._eval_code[0]
        return type(code).forward(owner, *args, **kwargs)


def _plan_own_graph(
    own: OwnGraph, cfg: SparsityConfig, facts: ModelFacts, traced: bool, passes: tuple[Pass, ...]
) -> tuple[list[Candidate], _Install | None]:
    defaults = _forward_defaults(own.module)
    maskers: dict[str, nn.Module] = {}
    results: dict[bool, fx.GraphModule] = {}
    candidates: list[Candidate] = []
    for mode, graph in _trace_modes(own):
        ctx = PassContext(
            cfg, own.fqn, own.module, facts, traced, maskers=maskers, forward_defaults=defaults
        )
        gm = fx.GraphModule(own.module, graph)
        result = run_passes(gm, passes, ctx)
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
            results[mode] = _code_module(result.graph_module.graph)
    if not maskers:
        return candidates, None
    if len(results) == 1:
        forward = RewrittenForward(own.module, next(iter(results.values())))
    else:
        forward = _ModeDispatch(own.module, results[True], results[False])
    return candidates, _Install(own.module, maskers, forward)


def mha_candidates(fqn: str, mha: nn.MultiheadAttention) -> list[Candidate]:
    out = []
    for path, op in mha_weights(mha):
        weight = mha.get_parameter(path)
        param = f"{fqn}.{path}" if fqn else path
        name = f"{fqn}.{op.split('.')[1]}" if fqn else op.split(".")[1]
        out.append(Candidate(name, param, fqn, path, op, tuple(weight.shape), weight.dtype, 1))
    return out


def _plan_mha(
    fqn: str, mha: nn.MultiheadAttention, cfg: SparsityConfig, facts: ModelFacts, traced: bool
) -> tuple[list[Candidate], _Install | None]:
    ctx = PassContext(cfg, fqn, mha, facts, traced)
    candidates, maskers, by_path = [], {}, {}
    for cand in mha_candidates(fqn, mha):
        path = cand.local_param
        reason = dense_reason(cand, ctx)
        cand.verdict, cand.reason = (
            (DENSE, reason) if reason else (SPARSE, f"{cfg.pattern} along in_features")
        )
        candidates.append(cand)
        if cand.sparse:
            name = masker_name(path)
            maskers[name] = NMMasker(
                mha,
                path,
                cfg.pattern.n,
                cfg.pattern.m,
                1,
                cfg.srste_lambda,
                cfg.mask_mode,
                cfg.mask_interval,
            )
            by_path[path] = name
    install = _Install(mha, maskers, MHAForward(mha, by_path)) if maskers else None
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
    installs: list[_Install]
    traced: bool
    trace_error: str
    facts: ModelFacts


NativeHandler = Any  # (fqn, module, cfg, facts, traced) -> (candidates, install | None)


def analyse(
    model: nn.Module,
    cfg: SparsityConfig,
    passes: tuple[Pass, ...],
    native: NativeHandler | None = None,
    detect_pattern: Any = None,
) -> Analysis:
    """Trace ``model`` (whole, then each module's own forward) and run ``passes`` on every
    own graph. Changes nothing on the model."""
    whole = capture_whole_model(model)  # torch.fx, else torch.export
    whole_graph, trace_error = whole.graph, whole.error
    traced = whole_graph is not None
    facts = build_op_graph(model, whole_graph, whole.how)
    facts.graph.graph["detect_pattern"] = detect_pattern
    owns = capture_own_graphs(model, facts.weight_op_owners() if whole.how == EXPORT else None)
    if not traced:
        facts.graph.graph["last_weight"] = _last_weight(model, owns)
    native = native or _plan_mha
    out = Analysis([], [], [], traced, trace_error, facts)
    by_module = {id(o.module): o for o in owns}
    for fqn, module in model.named_modules():
        if isinstance(module, NATIVE):
            cands, install = native(fqn, module, cfg, facts, traced)
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
                cands, install = _plan_own_graph(own, cfg, facts, traced, passes)
                out.coverage.append(Coverage(fqn, "fx"))
        out.candidates += cands
        if install is not None:
            out.installs.append(install)
    return out


@outside_inference_mode
def sparsify(
    model: nn.Module,
    config: SparsityConfig | None = None,
    *,
    passes: tuple[Pass, ...] = SPARSIFY_PASSES,
    init: str | None = None,
    calibration: Any = None,
    prune_options: dict[str, Any] | None = None,
    **options: Any,
) -> nn.Module:
    """Make ``model`` train N:M sparse with SR-STE; returns the same object, changed in place.

    Options are the fields of :class:`SparsityConfig` (``pattern="2:4"``,
    ``srste_lambda=2e-4``, ``exclude=[...]``, ...). Parameter names, shapes and
    ``state_dict`` keys are unchanged. Errors are raised before anything is changed.
    ``init="sparsegpt"`` (or ``"wanda"``, ``"magnitude"``) first prunes one-shot with
    ``nmfx.prune(model, pattern, init, calibration=calibration, **prune_options)``.
    """
    cfg = config_from_options(config, options)
    _check_model(model)
    if init is not None:  # one-shot pruning first; the masks then start from its zeros
        from nmfx.prune import prune

        prune(model, cfg.pattern, init, calibration=calibration, exclude=cfg.exclude,
              keep_output_dense=cfg.keep_output_dense, min_weight_numel=cfg.min_weight_numel,
              **(prune_options or {}))  # fmt: skip
    found = analyse(model, cfg, passes)
    plan = SparsityPlan(
        cfg, found.candidates, found.coverage, found.traced, found.trace_error, found.facts.capture
    )
    if not found.installs:
        raise ValueError(
            "no layer of the model can be made N:M sparse with these options; nothing was "
            "changed. Reasons per layer:\n" + render_candidates(found.candidates)
        )
    for install in found.installs:  # from here on nothing can fail: all-or-nothing
        for name, masker in install.maskers.items():
            install.module.add_module(name, masker)
            track(masker)
            if masker.mask_mode == "fixed":
                with torch.no_grad():
                    masker.weight.masked_fill_(~masker.mask, 0)  # NaN or Inf * 0 is NaN
        install.module.forward = install.forward
    model.__dict__[PLAN_ATTR] = plan
    ddp_ignore_stored_masks(model)
    ensure_optimizer_hook()
    log.info(
        "nmfx.sparsify: %d of %d weight ops N:M (%s)",
        len(plan.sparse),
        len(plan.candidates),
        cfg.pattern,
    )
    return model


def ddp_ignore_stored_masks(model: nn.Module) -> list[str]:
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
    ignored = list(getattr(model, "_ddp_params_and_buffers_to_ignore", ()))
    added = [n for n in names if n not in ignored]
    ddp = nn.parallel.DistributedDataParallel
    ddp._set_params_and_buffers_to_ignore_for_model(model, ignored + added)
    return added


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


def render_candidates(candidates: list[Candidate], fmt: str = "simple") -> str:
    rows = [
        (
            c.name,
            c.op,
            "x".join(map(str, c.shape)),
            str(c.dtype).replace("torch.", ""),
            c.verdict,
            c.reason,
        )
        for c in candidates
    ]
    return tabulate(
        rows, headers=["layer", "op", "weight", "dtype", "verdict", "reason"], tablefmt=fmt
    )


@dataclass
class Summary:
    """What ``sparsify`` did to a model: per-layer verdicts and how each part was analysed."""

    plan: SparsityPlan

    @property
    def candidates(self) -> list[Candidate]:
        return self.plan.candidates

    def __str__(self) -> str:
        plan = self.plan
        sparse = plan.sparse
        n_sparse = sum(_numel(c.shape) for c in sparse)
        n_all = sum(_numel(c.shape) for c in plan.candidates)
        lines = [
            f"nmfx: {plan.config.pattern} SR-STE (lambda_W={plan.config.srste_lambda:g}, "
            f"mask_mode={plan.config.mask_mode}): {len(sparse)} of {len(plan.candidates)} weight ops N:M, "
            f"{n_sparse:,} of {n_all:,} weights in N:M layers",
            render_candidates(plan.candidates),
        ]
        if plan.whole_model_traced:
            failed = f" (torch.fx failed: {plan.trace_error})" if plan.trace_error else ""
            lines.append(f"coverage: whole model captured by {plan.capture}{failed}")
        else:
            lines.append(
                f"coverage: model not traceable as a whole ({plan.trace_error}); analysed per module"
            )
        counts: dict[str, int] = {}
        for cov in plan.coverage:
            counts[cov.how] = counts.get(cov.how, 0) + 1
        lines.append("  " + ", ".join(f"{n} module(s) {how}" for how, n in sorted(counts.items())))
        lines += [
            f"  untraceable: {c.module or '<root>'}: {c.detail}"
            for c in plan.coverage
            if c.how == "untraceable"
        ]
        return "\n".join(lines)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def summary(model: nn.Module) -> Any:
    """The plan ``sparsify`` recorded on ``model`` (a ``Summary``), or, for a model only
    pruned by ``nmfx.prune``, its ``PruneSummary``."""
    plan = model.__dict__.get(PLAN_ATTR)
    if plan is None and "_nmfx_prune" in model.__dict__:
        return model.__dict__["_nmfx_prune"]
    if plan is None:
        raise ValueError(
            "model was not sparsified by nmfx.sparsify; call nmfx.sparsify(model) first"
        )
    return Summary(plan)
