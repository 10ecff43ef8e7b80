"""Rewrites clean up dead nodes but never drop an in-place update whose result is unused
(HF's static KV cache writes ``cache.index_copy_(...)`` and ignores the result)."""

from __future__ import annotations

import torch
from torch import fx, nn

from nmfx.passes.infra import eliminate_dead_code


class CacheWriter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("cache", torch.zeros(4, 8))
        self.unused = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        self.cache.index_copy_(0, pos, x)  # result unused: the mutation is the point
        x.clone().add_(1)  # in place on a temporary: dead, removable only with its input
        y = self.unused(x)  # noqa: F841 - dead
        return self.cache.sum(0, keepdim=True)


def test_dead_code_keeps_in_place_updates_and_drops_dead_ops():
    gm = fx.symbolic_trace(CacheWriter())
    eliminate_dead_code(gm)
    methods = [n.target for n in gm.graph.nodes if n.op == "call_method"]
    assert "index_copy_" in methods and "add_" in methods  # mutations kept
    assert not [n for n in gm.graph.nodes if n.op == "call_module"]  # the dead Linear went
    gm.recompile()
    gm(torch.ones(1, 8), torch.tensor([2]))
    assert gm.cache[2].sum() == 8
