"""fuse_shared_input_linears: packed linears reading one input become one packed call."""

from __future__ import annotations

import pytest
import torch
from torch import fx, nn

import nmfx
from nmfx import nm_mask
from nmfx.passes import BACKEND_PASSES, fuse_shared_input_linears, run_passes
from nmfx.passes.lower_nm_linear import BackendContext


def nm(shape, dtype=torch.float32):
    w = torch.randn(shape)
    return torch.where(nm_mask(w, "2:4", -1), w, 0).to(dtype)


def graph_of(weights: dict, inputs: dict, calls: list[tuple[str, str, str | None]]):
    """A Dynamo-like graph: weights/biases and inputs are placeholders; ``calls`` are
    ``(input, weight, bias)`` linears whose outputs are all returned."""
    g = fx.Graph()
    nodes = {name: g.placeholder(name) for name in [*weights, *inputs]}
    outs = [
        g.call_function(torch._C._nn.linear, (nodes[x], nodes[w], nodes[b] if b else None))
        for x, w, b in calls
    ]
    g.output(tuple(outs))
    values = [nn.Parameter(t, requires_grad=False) for t in weights.values()] + list(
        inputs.values()
    )
    return fx.GraphModule(nn.Module(), g), values


def calls_of(gm: fx.GraphModule) -> list:
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def lower_and_fuse(gm, inputs, **ctx_options):
    ctx = BackendContext(inputs, **ctx_options)
    return run_passes(gm, BACKEND_PASSES, ctx).graph_module, ctx


def test_qkv_and_gate_up_fuse_into_one_call_each_and_match_dense():
    weights = {"q": nm((64, 32)), "k": nm((16, 32)), "v": nm((16, 32)),
               "gate": nm((48, 32)), "up": nm((48, 32)), "o": nm((32, 64))}  # fmt: skip
    inputs = {"x": torch.randn(3, 32), "h": torch.randn(3, 32), "a": torch.randn(3, 64)}
    calls = [("x", "q", None), ("x", "k", None), ("x", "v", None),
             ("h", "gate", None), ("h", "up", None), ("a", "o", None)]  # fmt: skip
    gm, values = graph_of(weights, inputs, calls)
    expected = [inputs[x] @ weights[w].t() for x, w, _ in calls]
    fused, ctx = lower_and_fuse(gm, values)
    nm_linear = torch.ops.nmfx.nm_linear.default
    assert calls_of(fused).count(nm_linear) == 3  # qkv, gate/up, o alone
    assert calls_of(fused).count(torch.narrow) == 5
    for got, want in zip(fused(*values), expected, strict=True):
        torch.testing.assert_close(got, want)
    reasons = {d.name: d.reason for d in ctx.decisions}
    assert "fused with k, v (same input): one 96x32 call" in reasons["q"]
    assert "fused with gate (same input): one 96x32 call" in reasons["up"]
    assert "fused" not in reasons["o"]
    # the members' own packed weights are gone: each weight is held once
    held = sum(b.numel() * b.element_size() for b in fused.buffers())
    packed = sum(w.numel() * w.element_size() // 2 + w.numel() // 8 for w in weights.values())
    assert held == packed


def test_biases_are_concatenated_and_mixed_bias_groups_stay_apart():
    weights = {"q": nm((16, 32)), "k": nm((8, 32)), "bq": torch.randn(16), "bk": torch.randn(8),
               "u": nm((8, 32)), "w": nm((8, 32)), "bu": torch.randn(8)}  # fmt: skip
    inputs = {"x": torch.randn(2, 32), "y": torch.randn(2, 32)}
    calls = [("x", "q", "bq"), ("x", "k", "bk"), ("y", "u", "bu"), ("y", "w", None)]
    gm, values = graph_of(weights, inputs, calls)
    expected = [torch.nn.functional.linear(inputs[x], weights[w], weights[b] if b else None)
                for x, w, b in calls]  # fmt: skip
    fused, _ = lower_and_fuse(gm, values)
    assert calls_of(fused).count(torch.ops.nmfx.nm_linear.default) == 3
    assert calls_of(fused).count(torch.cat) == 1
    for got, want in zip(fused(*values), expected, strict=True):
        torch.testing.assert_close(got, want)


def test_different_dtypes_or_widths_are_not_fused_and_option_turns_it_off():
    weights = {"a": nm((16, 32)), "b": nm((16, 32), torch.bfloat16), "c": nm((16, 32))}
    inputs = {"x": torch.randn(2, 32)}
    gm, values = graph_of(weights, inputs, [("x", "a", None), ("x", "b", None)])
    fused, _ = lower_and_fuse(gm, values)
    assert calls_of(fused).count(torch.narrow) == 0
    gm, values = graph_of(weights, inputs, [("x", "a", None), ("x", "c", None)])
    fused, ctx = lower_and_fuse(gm, values, fuse_linears=False)
    assert calls_of(fused).count(torch.ops.nmfx.nm_linear.default) == 2
    assert not fuse_shared_input_linears(fused, ctx).modified


class Block(nn.Module):
    """q/k/v and gate/up on shared inputs, the way HF Llama layers call them."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(64, 64), nn.Linear(64, 32), nn.Linear(64, 32)
        self.gate, self.up = nn.Linear(64, 128, bias=False), nn.Linear(64, 128, bias=False)
        self.down = nn.Linear(128, 64, bias=False)

    def forward(self, x):
        q, k, v = self.q(x), self.k(x), self.v(x)
        h = x + q + torch.cat([k, v], -1)
        return self.down(nn.functional.silu(self.gate(h)) * self.up(h))


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
def test_compiled_block_fuses_and_matches_eager(fuse):
    torch.manual_seed(0)
    model = nmfx.finalize(nmfx.sparsify(Block(), keep_output_dense=False)).eval()
    x = torch.randn(1, 3, 64)
    torch._dynamo.reset()
    compiled = torch.compile(
        model, backend="nmfx", options={"inner": "eager", "fuse_linears": fuse}
    )
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)
    reasons = [d.reason for d in nmfx.lowering_decisions(compiled)]
    assert sum("fused with" in r for r in reasons) == (5 if fuse else 0)


def test_bad_fuse_option_is_an_error():
    from nmfx.backend import nmfx_backend

    gm, values = graph_of({"a": nm((16, 32))}, {"x": torch.randn(2, 32)}, [("x", "a", None)])
    with pytest.raises(TypeError, match="fuse_linears='yes' must be True or False"):
        nmfx_backend(gm, values, options={"fuse_linears": "yes"})
