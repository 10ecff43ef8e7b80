"""A networkx graph of a model's ops and weights, for structural questions.

Nodes are the FX nodes of the whole-model graph plus one node per distinct weight
parameter (tied weights are one node); edges are data flow, weight -> consuming op.
Questions answered: which weight ops produce the model output, and which weights more
than one op consumes (tied embeddings, reused functional weights). The whole-model graph
comes from torch.fx or torch.export (see ``nmfx.capture``); ``ModelFacts.capture`` says which.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import fx, nn

from nmfx.weight_ops import WeightUse, find_weight_uses, module_weight_uses

if TYPE_CHECKING:  # networkx (~10 MB resident) loads when a graph is built, not at `import nmfx`
    import networkx as nx

__all__ = ["ModelFacts", "build_op_graph"]


class ModelFacts:
    """Answers from the op graph, keyed by canonical weight FQN."""

    def __init__(
        self,
        graph: nx.DiGraph,
        canonical: dict[str, str],
        holders: dict[str, int],
        capture: str = "",
    ) -> None:
        self.graph = graph
        self.capture = capture  # which capture gave the whole-model graph ("" = none)
        self.canonical = canonical  # any FQN of a weight -> its first registered FQN
        self.holders = holders  # any FQN of a weight -> id of the module object holding it
        self.output_weights = self._output_weights()

    def _weight_op_nodes(self) -> dict[str, str]:
        return {n: d["weight"] for n, d in self.graph.nodes(data=True) if d.get("weight_op")}

    def _output_weights(self) -> set[str]:
        """Weights of the weight ops that reach an output with no other weight op between."""
        out = self.graph.graph.get("output")
        if out is None:
            return set()
        weight_ops = self._weight_op_nodes()
        found, seen, stack = set(), {out}, [out]
        while stack:
            for pred in self.graph.predecessors(stack.pop()):
                if pred in seen:
                    continue
                seen.add(pred)
                if pred in weight_ops:
                    found.add(weight_ops[pred])
                else:
                    stack.append(pred)
        return found

    def weight_op_owners(self) -> set[str]:
        """Modules whose own forward runs a weight op in the whole-model graph."""
        return {d.get("label", "") for _, d in self.graph.nodes(data=True) if d.get("weight_op")}

    def consumers(self, fqn: str) -> list[str]:
        """Modules whose forward consumes the weight ``fqn`` (a reused module counts once)."""
        key = ("weight", self.canonical.get(fqn, fqn))
        if key not in self.graph:
            return []
        return sorted({self.graph.nodes[s].get("label", s) for s in self.graph.successors(key)})

    def tied_with(self, fqn: str) -> list[str]:
        """Other names of the same parameter held by a *different* module (tied weights).
        A module registered twice (``Sequential(lin, act, lin)``) is one op, not a tie."""
        canon = self.canonical.get(fqn, fqn)
        mine = self.holders.get(fqn)
        return [n for n, c in self.canonical.items() if c == canon and self.holders[n] != mine]

    def is_output_weight(self, fqn: str) -> bool:
        return self.canonical.get(fqn, fqn) in self.output_weights


def _canonical_names(model: nn.Module) -> tuple[dict[str, str], dict[str, int]]:
    first: dict[int, str] = {}
    canonical, holders = {}, {}
    for name, p in model.named_parameters(remove_duplicate=False):
        canonical[name] = first.setdefault(id(p), name)
        holders[name] = id(model.get_submodule(name.rpartition(".")[0]))
    return canonical, holders


class _GraphOn:
    """A whole-model graph with the model its ``get_attr``/``call_module`` targets name:
    what ``find_weight_uses`` reads, without a GraphModule's code generation (seconds on
    an exported LLM graph)."""

    def __init__(self, model: nn.Module, graph: fx.Graph) -> None:
        self.graph = graph
        self.get_submodule = model.get_submodule
        self.get_parameter = model.get_parameter


def build_op_graph(model: nn.Module, graph: fx.Graph | None, capture: str = "") -> ModelFacts:
    """Build the op graph from the whole-model FX graph (or from weights alone when the
    model could not be captured as a whole: then only tied-weight facts are known).
    ``capture`` names what gave ``graph`` (torch.fx, torch.export)."""
    import networkx as nx

    canonical, holders = _canonical_names(model)
    g = nx.DiGraph()
    for name, p in model.named_parameters(remove_duplicate=False):
        g.add_node(("weight", canonical[name]), shape=tuple(p.shape))
    if graph is None:  # only tied-weight facts (``canonical``) are known
        return ModelFacts(g, canonical, holders)

    gm = _GraphOn(model, graph)
    for node in graph.nodes:
        g.add_node(node.name, op=node.op, label=_owner_label(node))
        if node.op == "output":  # by op, not name: a module called "output" takes that name
            g.graph["output"] = node.name
        for inp in node.all_input_nodes:
            g.add_edge(inp.name, node.name)
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            for pname, _ in module.named_parameters(prefix=node.target):
                g.add_edge(("weight", canonical.get(pname, pname)), node.name)
            for use in module_weight_uses(node, module):
                _mark(g, use, canonical)
        elif node.op == "get_attr" and node.target in canonical:
            g.add_edge(("weight", canonical[node.target]), node.name)
    for use in find_weight_uses(gm):  # type: ignore[arg-type]
        _mark(g, use, canonical)
    # A get_attr node only forwards its weight: its users are the weight's consumers.
    for node in graph.nodes:
        if node.op == "get_attr" and node.target in canonical:
            key = ("weight", canonical[node.target])
            for user in node.users:
                g.add_edge(key, user.name)
            g.remove_edge(key, node.name)
    return ModelFacts(g, canonical, holders, capture)


def _mark(g: nx.DiGraph, use: WeightUse, canonical: dict[str, str]) -> None:
    data = g.nodes[use.node.name]
    data["weight_op"] = True
    data["weight"] = canonical.get(use.target, use.target)


def _owner_label(node: fx.Node) -> str:
    """The module an op belongs to: the leaf itself for call_module, else the innermost
    module whose forward ran it ("" for the root)."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack") or {}
    return next(reversed(stack.values()))[0] if stack else ""
