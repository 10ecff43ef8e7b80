"""Capture: FX graphs of a model, whole and per module, with per-module fallback.

Two kinds of graph are taken:

- the *whole-model* graph (children from ``torch.nn`` are leaves) answers structural
  questions: which layer produces the output, which weights several ops consume. It is
  taken by ``torch.fx.symbolic_trace``; where that fails (Hugging Face models: control
  flow, ``**kwargs`` forwards) by ``torch.export`` (non-strict) on example inputs, whose
  graph is turned back into one that names each weight by its FQN (``get_attr``);
- each module's *own* graph (every child a leaf) is what gets rewritten, so a module
  that cannot be traced (data-dependent control flow) costs only its own direct weight
  ops — its children are traced on their own and still sparsified.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from nmfx.modules import NMMasker

__all__ = [
    "OwnGraph",
    "WholeCapture",
    "capture_own_graphs",
    "capture_whole_model",
    "example_inputs",
    "trace_own_forward",
    "trace_whole_model",
]

FX = "torch.fx"
EXPORT = "torch.export (non-strict)"

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


@dataclass
class WholeCapture:
    """The whole-model graph, which capture gave it, and why the captures before it failed."""

    graph: fx.Graph | None
    how: str = ""  # FX, EXPORT, or "" when no capture worked
    error: str = ""  # the failures, "" when torch.fx worked


def capture_whole_model(model: nn.Module) -> WholeCapture:
    """torch.fx first (cheap, keeps module calls); torch.export when FX cannot trace it."""
    graph, fx_error = trace_whole_model(model)
    if graph is not None:
        return WholeCapture(graph, FX)
    inputs = example_inputs(model)
    if inputs is None:
        why = f"torch.export: no example inputs known for {type(model).__name__}"
        return WholeCapture(None, "", f"{fx_error}; {why}")
    try:
        return WholeCapture(export_graph(model, inputs), EXPORT, fx_error)
    except Exception as exc:  # any export failure means: fall back per module
        return WholeCapture(None, "", f"{fx_error}; torch.export: {_first_line(exc)}")


def example_inputs(model: nn.Module) -> dict[str, Any] | None:
    """Keyword inputs for one forward of a Hugging Face model, built from its config
    (token ids or pixels, batch 1), or None for a model that is not one.

    Values never matter (export runs on fake tensors); only shapes and dtypes do.
    """
    config, name = getattr(model, "config", None), getattr(model, "main_input_name", None)
    params = list(model.parameters())
    if config is None or not isinstance(name, str) or not params:
        return None
    device = params[0].device
    dtype = next((p.dtype for p in params if p.is_floating_point()), torch.float32)
    if name == "input_ids":
        inputs: dict[str, Any] = {name: torch.zeros(1, 8, dtype=torch.long, device=device)}
    elif name == "pixel_values":
        size = getattr(config, "image_size", 64)
        h, w = (size, size) if isinstance(size, int) else tuple(size)[:2]
        channels = getattr(config, "num_channels", 3)
        inputs = {name: torch.zeros(1, channels, h, w, dtype=dtype, device=device)}
    else:
        return None
    if getattr(config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = torch.zeros(1, 8, dtype=torch.long, device=device)
    try:
        accepted = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        accepted = {}
    if "use_cache" in accepted:
        inputs["use_cache"] = False  # no cache object in the graph's outputs
    return inputs


def export_graph(model: nn.Module, inputs: dict[str, Any]) -> fx.Graph:
    """``torch.export`` (non-strict) of ``model(**inputs)``, as an FX graph whose parameter
    and buffer inputs are ``get_attr`` nodes of their FQN (like a torch.fx graph's).

    Stack traces are not recorded and autograd is off: the facts drawn from the graph need
    neither, and they cost a third and a sixth of the export time.
    """
    from torch.export import export  # imports Dynamo (~2 s): only when FX failed

    config = torch.fx.config
    before = getattr(config, "do_not_emit_stack_traces", False)
    config.do_not_emit_stack_traces = True
    try:
        with torch.no_grad():
            program = export(model, (), inputs, strict=False)
    finally:
        config.do_not_emit_stack_traces = before
    sig = program.graph_signature
    attrs = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}
    graph, env = fx.Graph(), {}
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in attrs:
            env[node] = graph.get_attr(attrs[node.name])
        elif node.op == "get_attr":  # higher-order op bodies: not weights, kept as inputs
            env[node] = graph.placeholder(node.name)
        else:
            env[node] = graph.node_copy(node, env.__getitem__)
        env[node].meta = dict(node.meta)
    _drop_export_leftovers()
    return graph


def _drop_export_leftovers() -> None:
    """torch.export keeps its last graph reachable until the next export, from a module-level map
    of fake tensor ids to nodes (``proxy_tensor._FAKE_TENSOR_ID_TO_PROXY_MAP_FOR_EXPORT``, torch
    2.13), and with it every fake tensor, their FakeTensorMode and ShapeEnv. Nothing reads the
    map once export has returned (each export clears it first), so it is cleared here."""
    from torch.fx.experimental import proxy_tensor

    leftover = getattr(proxy_tensor, "_FAKE_TENSOR_ID_TO_PROXY_MAP_FOR_EXPORT", None)
    if isinstance(leftover, dict):
        leftover.clear()


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


def _holds_weight(module: nn.Module) -> bool:
    return any(p.dim() >= 2 for p in module.parameters(recurse=False))


def capture_own_graphs(model: nn.Module, owners: set[str] | None = None) -> list[OwnGraph]:
    """One entry per module whose own forward may consume weights, in registration order.

    ``owners``, when given, are the modules a whole-model graph shows running weight ops
    (see ``ModelFacts.weight_op_owners``): other modules are traced only if they hold a
    weight themselves. On an exported LLM this skips the decoder layers and attention
    blocks, which FX cannot trace and which run no weight op of their own.
    """
    out = []
    native = [f"{fqn}." for fqn, m in model.named_modules() if isinstance(m, NATIVE)]
    for fqn, module in model.named_modules():
        if not _owns_weight_ops(module) or any(fqn.startswith(p) for p in native):
            continue  # children of natively handled modules are handled with them
        if owners is not None and fqn not in owners and not _holds_weight(module):
            continue
        try:
            graph = trace_own_forward(module)
            out.append(OwnGraph(fqn, module, graph))
        except Exception as exc:  # recorded per module; the summary reports it
            out.append(OwnGraph(fqn, module, None, _first_line(exc)))
    return out
