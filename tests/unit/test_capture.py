"""Whole-model capture by torch.export when torch.fx cannot trace a model, and weight ops
recognised in the exported (ATen) graph: the facts sparsify draws for HF models, here on
a plain module so that they are pinned without transformers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nmfx.capture import EXPORT, capture_whole_model, example_inputs, export_graph
from nmfx.opgraph import _GraphOn, build_op_graph
from nmfx.weight_ops import find_weight_uses


class Loopy(nn.Module):
    """FX fails (range over a traced size); export takes it. Three weight ops, each reached
    differently, one weight tied into two modules."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 16)
        self.w = nn.Parameter(torch.randn(32, 16))  # F.linear(x, w): reduces dim 1
        self.v = nn.Parameter(torch.randn(32, 8))  # h @ v.t(): reduces dim 1
        self.head = nn.Linear(16, 10, bias=False)
        self.head.weight = self.embed.weight  # tied, as in GPT-2

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for _ in range(ids.shape[0]):  # a Python loop over a size: FX cannot trace it
            x = x + 0
        h = F.linear(x, self.w)[..., :8]
        y = h @ self.v.t()
        return self.head(y[..., :16])


def test_export_capture_names_weights_and_finds_output_and_tie():
    model = Loopy()
    graph = export_graph(model, {"ids": torch.zeros(2, 4, dtype=torch.long)})
    targets = {n.target for n in graph.nodes if n.op == "get_attr"}
    assert {"w", "v"} <= targets  # parameters by FQN, as in a torch.fx graph
    facts = build_op_graph(model, graph, EXPORT)
    assert facts.capture == EXPORT
    weights = {d["weight"]: n for n, d in facts.graph.nodes(data=True) if d.get("weight_op")}
    assert {"w", "v"} <= set(weights)
    assert facts.is_output_weight("head.weight")  # the tied head produces the output
    assert not facts.is_output_weight("w")
    assert facts.tied_with("head.weight") == ["embed.weight"]
    uses = {u.target: u for u in find_weight_uses(_GraphOn(model, graph))}
    assert (uses["w"].op, uses["w"].reduce_dim) == ("linear", 1)
    assert (uses["v"].op, uses["v"].reduce_dim) == ("matmul", 1)  # through aten.t / permute


def test_capture_falls_back_with_both_reasons_when_no_inputs_are_known():
    whole = capture_whole_model(Loopy())
    assert whole.graph is None and whole.how == ""
    assert "torch.export: no example inputs known for Loopy" in whole.error
    assert example_inputs(Loopy()) is None  # not a Hugging Face model
