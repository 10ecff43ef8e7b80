"""The pass runner and the context passes share. A pass is ``fn(gm, ctx) -> PassResult``."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassResult

from nmfx.config import SparsityConfig
from nmfx.opgraph import ModelFacts
from nmfx.pattern import NMPattern
from nmfx.plan import Candidate

__all__ = ["Pass", "PassContext", "PassResult", "eliminate_dead_code", "run_passes"]

log = logging.getLogger("nmfx.passes")


@dataclass
class PassContext:
    """What a pass over one module's own graph may read (and the candidates it fills in)."""

    config: SparsityConfig
    fqn: str  # the module whose own forward the graph is ("" = root)
    module: nn.Module
    facts: ModelFacts
    whole_model_traced: bool
    candidates: list[Candidate] = field(default_factory=list)
    maskers: dict[str, nn.Module] = field(default_factory=dict)  # to install on ``module``
    forward_defaults: tuple[str, ...] = ()  # forward parameters that have default values
    detect_pattern: NMPattern | None = None  # detection: check this pattern, do not search
    last_weight: str | None = None  # output-layer fallback when the model is not traced whole
    # Pass scratch, never shown to users: id(candidate) -> (op node name, operand node name)
    sites: dict[int, tuple[str, str | None]] = field(default_factory=dict)


Pass = Callable[[fx.GraphModule, PassContext], PassResult]


def run_passes(gm: fx.GraphModule, passes: Sequence[Pass], ctx: PassContext) -> PassResult:
    """Run ``passes`` in order, linting the graph after each; errors name the failing pass."""
    modified = False
    done: list[str] = []
    for p in passes:
        name = getattr(p, "__name__", repr(p))
        try:
            result = p(gm, ctx)
            result.graph_module.graph.lint()
        except Exception as exc:
            after = f" (after {', '.join(done)})" if done else ""
            raise RuntimeError(
                f"nmfx pass {name}{after} failed on {ctx.fqn or '<root>'}: {exc}"
            ) from exc
        gm, modified = result.graph_module, modified or result.modified
        done.append(name)
    return PassResult(gm, modified)


def _keeps_effect(node: fx.Node) -> bool:
    """FX's purity check, plus what it misses in Dynamo and FX-traced graphs: in-place
    Tensor methods (``cache.index_copy_(...)``: HF's static KV cache), in-place torch
    functions and ``x[i] = v``. Their results are often unused, yet they are the point."""
    if node.is_impure():
        return True
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    if node.op in ("call_method", "call_function") and isinstance(name, str):
        return (name.endswith("_") and not name.endswith("__")) or name == "setitem"
    return False


def eliminate_dead_code(gm: fx.GraphModule) -> None:
    """Remove the nodes a rewrite left unused, never one that mutates its input."""
    gm.graph.eliminate_dead_code(is_impure_node=_keeps_effect)
