"""detect_nm_weights and lower_nm_linear on hand-built graphs."""

from __future__ import annotations

import pytest
import torch
from torch import fx, nn

import nmfx
from nmfx import SparsityConfig, nm_mask
from nmfx.capture import _OwnForwardTracer
from nmfx.opgraph import build_op_graph
from nmfx.passes import PassContext, detect_nm_weights, find_weight_ops, run_passes
from nmfx.passes.detect_nm_weights import detect_pattern
from nmfx.passes.lower_nm_linear import BackendContext, lower_nm_linear
from nmfx.pattern import NMPattern


def nm(shape, pattern="2:4", dim=-1):
    w = torch.randn(shape)
    return torch.where(nm_mask(w, pattern, dim), w, 0)


@pytest.mark.parametrize(
    "pattern,expected",
    [("2:4", (2, 4)), ("1:4", (1, 4)), ("4:8", (4, 8)), ("1:8", (1, 8)), ("2:16", (2, 16))],
)
def test_detect_pattern_finds_the_sparsest(pattern, expected):
    found = detect_pattern(nm((8, 32), pattern), 1)
    assert (found.n, found.m) == expected


def test_detect_pattern_none_for_dense_or_wrong_dim():
    assert detect_pattern(torch.randn(8, 32), 1) is None
    w = nm((16, 8), "2:4", dim=0)  # N:M along dim 0 only
    assert detect_pattern(w, 0) == NMPattern(2, 4)
    assert detect_pattern(w, 1) is None


def test_detect_nm_weights_annotates_candidates():
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Parameter(nm((8, 16)))
            self.b = nn.Parameter(torch.randn(8, 16))

        def forward(self, x):
            return torch.nn.functional.linear(x, self.a) + torch.nn.functional.linear(x, self.b)

    module = Two()
    gm = fx.GraphModule(module, _OwnForwardTracer().trace(module))
    facts = build_op_graph(module, fx.symbolic_trace(module).graph)
    ctx = PassContext(SparsityConfig(), "", module, facts, True)
    result = run_passes(gm, [find_weight_ops, detect_nm_weights], ctx)
    assert not result.modified
    assert {c.param: c.facts["nm"] for c in ctx.candidates} == {"a": NMPattern(2, 4), "b": None}


def dynamo_like_graph(weight: torch.Tensor):
    """A graph as Dynamo hands it over: the parameter is a placeholder input."""
    g = fx.Graph()
    w = g.placeholder("w")
    x = g.placeholder("x")
    y = g.call_function(torch._C._nn.linear, (x, w, None))
    g.output(y)
    return fx.GraphModule(nn.Module(), g), [
        nn.Parameter(weight, requires_grad=False),
        torch.randn(3, weight.shape[1]),
    ]


BIG = (1024, 512)


def test_lower_nm_linear_rewrites_nm_weight_and_matches_dense(tol):
    w = nm(BIG)
    gm, inputs = dynamo_like_graph(w)
    ctx = BackendContext(inputs)
    result = lower_nm_linear(gm, ctx)
    targets = [n.target for n in result.graph_module.graph.nodes if n.op == "call_function"]
    assert targets == [torch.ops.nmfx.nm_linear.default]
    assert [d.verdict for d in ctx.decisions] == ["sparse"]
    # The kernel sums in another order than the dense GEMM (which order depends on the path
    # this host runs: on the AVX2 one, 1.1e-5 off at one of 3072 outputs).
    out = result.graph_module(*inputs)
    torch.testing.assert_close(out, inputs[1] @ w.t(), **tol("lowered_layer", torch.float32))


def test_lower_nm_linear_keeps_dense_weight_and_activation_weights():
    gm, inputs = dynamo_like_graph(torch.randn(16, 32))
    ctx = BackendContext(inputs)
    assert not lower_nm_linear(gm, ctx).modified
    assert ctx.decisions[0].reason == "weight is not N:M along in_features"
    inputs[0] = torch.randn(16, 32)  # not a Parameter: an activation
    ctx = BackendContext(inputs)
    assert not lower_nm_linear(gm, ctx).modified
    assert "activations" in ctx.decisions[0].reason


def test_lower_nm_linear_does_not_freeze_trainable_weights_with_grad_on():
    gm, inputs = dynamo_like_graph(nm(BIG))
    inputs[0].requires_grad_(True)
    ctx = BackendContext(inputs)
    assert not lower_nm_linear(gm, ctx).modified
    assert "grad mode is on" in ctx.decisions[0].reason
    with torch.no_grad():
        ctx = BackendContext(inputs)
        assert lower_nm_linear(gm, ctx).modified


def test_sparsified_model_masker_is_folded():
    model = nmfx.sparsify(nn.Sequential(nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 4)))
    model.eval()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="nmfx", options={"inner": "eager"})
    with torch.no_grad():
        out = compiled(torch.randn(2, 512))
    assert out.shape == (2, 4)
    decisions = nmfx.lowering_decisions(compiled)
    assert [(d.name, d.verdict) for d in decisions] == [("0", "sparse"), ("2", "dense")]


def test_lower_nm_linear_has_no_size_floor_like_nmfx_lower():
    """One CPU rule for nmfx.lower and the backend: no size floor; a small N:M weight is packed
    in both (and runs sparse or dense per rows of x, as tuned)."""
    gm, inputs = dynamo_like_graph(nm((16, 32)))
    ctx = BackendContext(inputs)
    assert lower_nm_linear(gm, ctx).modified
    from nmfx.lowering.cpu import cpu_reason

    assert cpu_reason(inputs[0], NMPattern(2, 4)) is None
    assert ctx.decisions[0].verdict == "sparse"


def test_lower_nm_linear_checks_a_given_pattern():
    gm, inputs = dynamo_like_graph(nm(BIG, "2:4"))
    ctx = BackendContext(inputs, pattern=NMPattern(1, 4))  # 2:4 is not 1:4
    assert not lower_nm_linear(gm, ctx).modified
    assert ctx.decisions[0].reason == "weight is not N:M along in_features"


@pytest.mark.parametrize(
    "shape,dtype,pattern,expect",
    [
        ((64, 64), torch.float16, "2:4", "need CUDA"),  # eligible; only the device is missing here
        ((64, 64), torch.float16, "1:4", "need CUDA"),  # 1:4 is also 2:4
        ((64, 64), torch.float16, "4:8", "needs 2:4"),
        ((64, 64), torch.float32, "2:4", "fp16"),  # fp32 2:4 is not a GPU sparse format
        ((48, 48), torch.float16, "2:4", "48"),  # CUTLASS needs multiples of (32, 64)
    ],
    ids=["fp16-2:4", "fp16-1:4", "fp16-4:8", "fp32", "odd-shape"],
)
def test_lower_nm_linear_cuda_decisions_on_cpu(shape, dtype, pattern, expect):
    gm, inputs = dynamo_like_graph(nm(shape, pattern).to(dtype))
    ctx = BackendContext(inputs, target="cuda")
    assert not lower_nm_linear(gm, ctx).modified
    assert ctx.decisions[0].verdict == "dense"
    assert expect in ctx.decisions[0].reason, ctx.decisions[0].reason


def test_lower_nm_linear_cuda_rewrites_to_linear_on_semi_structured_weight(monkeypatch):
    """The rewrite itself, with the CUDA-only conversion stood in for by a marker tensor."""
    from nmfx.lowering import cuda
    from nmfx.plan import LayerDecision

    marker = torch.zeros(1)

    def fake_cuda(name, param, op, weight, pattern, backend):  # nmfx.lower's CUDA conversion
        decision = LayerDecision(name, param, op, "cuda", "sparse", "semi-structured 2:4 (cutlass)")
        return decision, marker

    monkeypatch.setattr(cuda, "cuda_weight_decision", fake_cuda)
    gm, inputs = dynamo_like_graph(nm((64, 64)).half())
    ctx = BackendContext(inputs, target="cuda")
    result = lower_nm_linear(gm, ctx)
    linear = next(n for n in result.graph_module.graph.nodes if n.op == "call_function")
    assert linear.target is torch._C._nn.linear and linear.args[1].op == "get_attr"
    assert getattr(result.graph_module, linear.args[1].target) is marker
    assert ctx.decisions[0].verdict == "sparse"
