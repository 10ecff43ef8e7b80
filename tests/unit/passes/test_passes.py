"""Each pass on small hand-built graphs: what it rewrites and what it must not."""

from __future__ import annotations

import torch
from torch import fx, nn

from nmfx import SparsityConfig
from nmfx.capture import _OwnForwardTracer
from nmfx.modules import NMMasker
from nmfx.opgraph import build_op_graph
from nmfx.passes import (
    PassContext,
    decide_eligibility,
    find_weight_ops,
    insert_srste_masks,
    run_passes,
)


class Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w_lin = nn.Parameter(torch.randn(8, 16))  # F.linear: reduce dim 1
        self.w_mm = nn.Parameter(torch.randn(8, 8))  # x @ W: reduce dim 0
        self.w_t = nn.Parameter(torch.randn(8, 8))  # x @ W.t(): reduce dim 1
        self.w_add = nn.Parameter(torch.randn(8, 8))  # addmm(b, x, W): reduce dim 0
        self.w_ein = nn.Parameter(torch.randn(8, 8))  # einsum "bi,oi->bo": reduce dim 1
        self.scale = nn.Parameter(torch.ones(8, 8))  # elementwise: not a weight op
        self.bias = nn.Parameter(torch.zeros(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.linear(x, self.w_lin)
        h = h @ self.w_mm
        h = torch.matmul(h, self.w_t.t())
        h = torch.addmm(self.bias, h, self.w_add)
        h = torch.einsum("bi,oi->bo", h, self.w_ein)
        return h * self.scale.sum(0)


def ctx_for(module: nn.Module, **options) -> tuple[fx.GraphModule, PassContext]:
    graph = _OwnForwardTracer().trace(module)
    whole = fx.symbolic_trace(module).graph
    facts = build_op_graph(module, whole)
    options.setdefault("keep_output_dense", False)
    ctx = PassContext(SparsityConfig(**options), "", module, facts, True)
    return fx.GraphModule(module, graph), ctx


def test_find_weight_ops_finds_each_functional_form_with_its_reduce_dim():
    gm, ctx = ctx_for(Functional())
    find_weight_ops(gm, ctx)
    found = {c.param: (c.op, c.reduce_dim) for c in ctx.candidates}
    assert found == {
        "w_lin": ("linear", 1),
        "w_mm": ("matmul", 0),
        "w_t": ("matmul", 1),
        "w_add": ("addmm", 0),
        "w_ein": ("einsum", 1),
    }  # ``scale`` (elementwise) and ``bias`` (1-D) are not weight ops


def test_find_weight_ops_does_not_modify_graph():
    gm, ctx = ctx_for(Functional())
    before = gm.code
    assert not find_weight_ops(gm, ctx).modified
    assert gm.code == before


def test_decide_eligibility_reasons():
    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ok = nn.Parameter(torch.randn(8, 16))
            self.odd = nn.Parameter(torch.randn(8, 30))
            self.twice = nn.Parameter(torch.randn(16, 16))
            self.conv_dw = nn.Parameter(torch.randn(8, 1, 3, 3))

        def forward(self, x: torch.Tensor, img: torch.Tensor) -> tuple:
            a = torch.nn.functional.linear(x, self.ok)
            b = torch.nn.functional.linear(torch.cat([x, x[:, :14]], 1), self.odd)
            c = x @ self.twice @ self.twice
            d = torch.nn.functional.conv2d(img, self.conv_dw, groups=8)
            return a, b, c, d

    gm, ctx = ctx_for(Mixed())
    run_passes(gm, [find_weight_ops, decide_eligibility], ctx)
    verdicts = {c.param: (c.verdict, c.reason) for c in ctx.candidates}
    assert verdicts["ok"][0] == "sparse"
    assert verdicts["odd"] == (
        "dense",
        "in_features=30 is not a multiple of M=4; exclude it or pad it",
    )
    assert verdicts["twice"][0] == "dense" and "shared" in verdicts["twice"][1]
    assert verdicts["conv_dw"][0] == "dense" and "groups=8" in verdicts["conv_dw"][1]


def test_decide_eligibility_exclude_and_floor():
    gm, ctx = ctx_for(Functional(), exclude=["w_m*"], min_weight_numel=100)
    run_passes(gm, [find_weight_ops, decide_eligibility], ctx)
    reasons = {c.param: c.reason for c in ctx.candidates}
    assert "excluded by the user" in reasons["w_mm"]
    assert "min_weight_numel=100" in reasons["w_t"]  # 64 weights
    assert ctx.candidates[0].param == "w_lin" and ctx.candidates[0].sparse  # 128 weights


def test_insert_srste_masks_feeds_masked_weight_only_to_sparse_ops():
    gm, ctx = ctx_for(Functional(), exclude=["w_add"])
    result = run_passes(gm, [find_weight_ops, decide_eligibility, insert_srste_masks], ctx)
    graph = result.graph_module.graph
    maskers = [n for n in graph.nodes if n.op == "call_module"]
    assert sorted(n.target for n in maskers) == [
        "_nmfx_w_ein", "_nmfx_w_lin", "_nmfx_w_mm", "_nmfx_w_t",
    ]  # fmt: skip
    for node in maskers:
        assert node.args[0].op == "get_attr"
        assert isinstance(result.graph_module.get_submodule(node.target), NMMasker)
    addmm = next(n for n in graph.nodes if n.target is torch.addmm)
    assert addmm.args[2].op == "get_attr"  # excluded: still the raw weight
    transpose = next(n for n in graph.nodes if n.op == "call_method" and n.target == "t")
    assert transpose.args[0].target == "_nmfx_w_t"  # masks the weight, then transposes
    scale_users = next(n for n in graph.nodes if n.op == "get_attr" and n.target == "scale").users
    assert all(u.op != "call_module" for u in scale_users)


def test_insert_srste_masks_output_matches_masked_reference():
    module = Functional()
    gm, ctx = ctx_for(module)
    result = run_passes(gm, [find_weight_ops, decide_eligibility, insert_srste_masks], ctx)
    x = torch.randn(3, 16)
    from nmfx import nm_mask

    ref = Functional()
    ref.load_state_dict(module.state_dict())
    with torch.no_grad():
        for name, dim in [("w_lin", 1), ("w_mm", 0), ("w_t", 1), ("w_add", 0), ("w_ein", 1)]:
            p = getattr(ref, name)
            p.mul_(nm_mask(p, "2:4", dim))
    torch.testing.assert_close(result.graph_module(x), ref(x))


def test_run_passes_names_the_failing_pass():
    gm, ctx = ctx_for(Functional())

    def broken(gm, ctx):
        raise ValueError("boom")

    broken.__name__ = "broken_pass"
    try:
        run_passes(gm, [find_weight_ops, broken], ctx)
    except RuntimeError as exc:
        assert "broken_pass (after find_weight_ops)" in str(exc)
    else:
        raise AssertionError("run_passes swallowed the error")


def test_op_graph_output_layer_and_tied_weights():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(32, 16)
            self.body = nn.Linear(16, 16)
            self.head = nn.Linear(16, 32, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, idx):
            return self.head(torch.relu(self.body(self.emb(idx))))

    model = Tied()
    facts = build_op_graph(model, fx.symbolic_trace(model).graph)
    assert facts.output_weights == {"emb.weight"}  # head.weight is emb.weight
    assert facts.consumers("head.weight") == ["emb", "head"]
    assert facts.consumers("body.weight") == ["body"]
