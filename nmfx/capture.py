"""Capture: FX graphs of a model, whole and per module, with per-module fallback.

Two kinds of graph are taken:

- the *whole-model* graph (children from ``torch.nn`` are leaves) answers structural
  questions: which layer produces the output, which weights several ops consume;
- each module's *own* graph (every child a leaf) is what gets rewritten, so a module
  that cannot be traced (data-dependent control flow) costs only its own direct weight
  ops — its children are traced on their own and still sparsified.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx, nn

from nmfx.modules import NMMasker

__all__ = ["OwnGraph", "capture_own_graphs", "trace_own_forward", "trace_whole_model"]

# Modules whose forward FX can trace and whose weight op nmfx rewrites.
TRACED_LEAVES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
# Modules that cannot be traced but are handled natively (see modules.MHAForward).
NATIVE: tuple[type[nn.Module], ...] = (nn.MultiheadAttention,)


class _WholeModelTracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (NMMasker, *NATIVE)) or super().is_leaf_module(m, qualname)


class _OwnForwardTracer(fx.Tracer):
    """Traces one module's own forward: every child module is a leaf."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return True


@dataclass
class OwnGraph:
    fqn: str
    module: nn.Module
    graph: fx.Graph | None
    error: str = ""


def trace_own_forward(module: nn.Module) -> fx.Graph:
    """The graph of ``module.forward`` alone, every child module a leaf."""
    return _OwnForwardTracer().trace(module)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def trace_whole_model(model: nn.Module) -> tuple[fx.Graph | None, str]:
    """The whole-model graph, or ``(None, error)`` when the model is not traceable as a whole."""
    try:
        return _WholeModelTracer().trace(model), ""
    except Exception as exc:  # any tracing failure means: fall back per module
        return None, _first_line(exc)


def _owns_weight_ops(module: nn.Module) -> bool:
    """Modules whose own forward may consume a weight: custom ones and the traced leaves.

    Other ``torch.nn`` modules (norms, embeddings, containers, activations) never run a
    reduction over a weight, so they are not traced.
    """
    if isinstance(module, NMMasker):
        return False
    if isinstance(module, TRACED_LEAVES):
        return True
    if type(module).forward is nn.Module.forward:  # ModuleList / ModuleDict: no forward
        return False
    return not type(module).__module__.startswith("torch.nn")


def capture_own_graphs(model: nn.Module) -> list[OwnGraph]:
    """One entry per module whose own forward may consume weights, in registration order."""
    out = []
    native = [f"{fqn}." for fqn, m in model.named_modules() if isinstance(m, NATIVE)]
    for fqn, module in model.named_modules():
        if not _owns_weight_ops(module) or any(fqn.startswith(p) for p in native):
            continue  # children of natively handled modules are handled with them
        try:
            graph = trace_own_forward(module)
            out.append(OwnGraph(fqn, module, graph))
        except Exception as exc:  # recorded per module; the summary reports it
            out.append(OwnGraph(fqn, module, None, _first_line(exc)))
    return out
