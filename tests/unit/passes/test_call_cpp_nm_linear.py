"""call_cpp_nm_linear: packed calls that need no gradient run the C++ op, others stay."""

from __future__ import annotations

import pytest
import torch
from torch import fx, nn

from nmfx import nm_mask
from nmfx.kernels import _build
from nmfx.passes import BACKEND_PASSES, call_cpp_nm_linear, run_passes
from nmfx.passes.lower_nm_linear import BackendContext

assert _build.extension_available()  # loads the C++ op (builds on first use)
PY_OP = torch.ops.nmfx.nm_linear.default
CPP_OP = torch.ops.nmfx_cpu.nm_linear.default


def _graph(x_requires_grad: bool) -> tuple[fx.GraphModule, list[torch.Tensor], torch.Tensor]:
    w = torch.randn(16, 32)
    w = torch.where(nm_mask(w, "2:4", -1), w, 0)
    g = fx.Graph()
    wn, xn = g.placeholder("w"), g.placeholder("x")
    xn.meta["example_value"] = torch.empty(3, 32, requires_grad=x_requires_grad)
    g.output(g.call_function(torch._C._nn.linear, (xn, wn, None)))
    x = torch.randn(3, 32)
    return fx.GraphModule(nn.Module(), g), [nn.Parameter(w, requires_grad=False), x], x @ w.t()


def _targets(gm: fx.GraphModule) -> list:
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize(
    ("grad_mode", "x_requires_grad", "expected"),
    [(False, True, CPP_OP), (True, False, CPP_OP), (True, True, PY_OP)],
    ids=["no_grad", "x-needs-no-grad", "x-needs-grad"],
)
def test_packed_call_runs_cpp_op_unless_a_gradient_flows(grad_mode, x_requires_grad, expected):
    gm, inputs, want = _graph(x_requires_grad)
    with torch.set_grad_enabled(grad_mode):
        out = run_passes(gm, BACKEND_PASSES, BackendContext(inputs, "cpu")).graph_module
        got = out(*inputs)
    assert expected in _targets(out) and ({PY_OP, CPP_OP} - {expected}).isdisjoint(_targets(out))
    torch.testing.assert_close(got, want)


def test_untuned_and_cuda_calls_are_left_alone():
    g = fx.Graph()
    x, v, mk = g.placeholder("x"), g.placeholder("v"), g.placeholder("mk")
    g.output(g.call_function(PY_OP, (x, v, mk, None, 16, 32, 2, 4)))  # no dispatch: untuned
    gm = fx.GraphModule(nn.Module(), g)
    with torch.no_grad():
        assert not call_cpp_nm_linear(gm, BackendContext([], "cpu")).modified
        assert not call_cpp_nm_linear(gm, BackendContext([], "cuda")).modified
    assert _targets(gm) == [PY_OP]
