"""The compiled SR-STE training forward on the packed weight (``nmfx::srste_packed_linear``).

Under ``torch.compile`` a sparsified ``nn.Linear`` (graph ``linear(x, masker(W), b)``) is one
custom-op node where the eager packed forward's static conditions hold: it writes the masked
weight and its packed form in one pass and runs the GEMM on the packed form (or ``F.linear``
on the masked copy where the tuner picks dense), and returns the masked weight for the
backward. What must hold: no graph break, no recompile across steps, gradients and weights
equal to the eager packed forward's over steps (gradient accumulation, ``GradScaler``, a
``p.data`` write between backward and step), the masked buffer reused step after step, and
eval / ``no_grad`` / autocast / double backward as before (the masked-copy graph).
"""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nmfx
import nmfx.kernels as K
from nmfx import modules, ops
from nmfx.kernels import _build
from nmfx.modules import NMMasker

pytestmark = pytest.mark.skipif(
    not K.kernels_available(), reason="the fused mask kernels did not build here"
)

LAM, LR = 0.2, 0.1
OP = "nmfx.srste_packed_linear.default"


@pytest.fixture(autouse=True)
def small_layers_pack(monkeypatch, kernel_defaults):
    """The test weights (256 x 128) take the packed path; the kernels' default choices; a
    fresh Dynamo cache per test."""
    monkeypatch.setattr(modules, "SPARSE_GEMM_MIN_NUMEL", 0)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def mlp() -> nn.Sequential:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 128, bias=False),
                         nn.ReLU(), nn.Linear(128, 4))  # fmt: skip


def pair(masked_copy: bool = False) -> tuple[nn.Module, nn.Module]:
    """(eager, to-compile) SR-STE copies of one model; ``masked_copy``: the second runs the
    masked-copy forward (``sparse_gemm = False``)."""
    base = mlp()
    eager = nmfx.sparsify(copy.deepcopy(base), srste_lambda=LAM)
    other = nmfx.sparsify(copy.deepcopy(base), srste_lambda=LAM)
    if masked_copy:
        for masker in other.modules():
            if isinstance(masker, NMMasker):
                masker.sparse_gemm = False
    return eager, other


def targets(model: nn.Module, *args: torch.Tensor) -> list[str]:
    explained = torch._dynamo.explain(model)(*args)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    return [str(n.target) for g in explained.graphs for n in g.graph.nodes
            if n.op == "call_function"]  # fmt: skip


def batches(steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(7)
    return [(torch.randn(16, 128), torch.randint(0, 4, (16,))) for _ in range(steps)]


def train(model: nn.Module, run: nn.Module, steps: int, accumulate: int = 1, scaler=None):
    """SGD steps of ``model`` through ``run`` (the model or its compiled wrapper); yields after
    each backward so callers can compare gradients step by step."""
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for x, y in batches(steps):
        opt.zero_grad()
        for part in range(accumulate):
            rows = slice(part * 16 // accumulate, (part + 1) * 16 // accumulate)
            loss = F.cross_entropy(run(x[rows]), y[rows]) / accumulate
            (scaler.scale(loss) if scaler else loss).backward()
        yield
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()


def assert_same(a: nn.Module, b: nn.Module, attr: str | None = None) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        x, y = (p, q) if attr is None else (getattr(p, attr), getattr(q, attr))
        torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-5, msg=name)


def test_compiled_training_forward_is_one_packed_node_per_layer():
    _, model = pair()
    x = torch.randn(16, 128)
    found = targets(model, x)
    assert found.count(OP) == 2  # both hidden layers; the 4 x 128 head is below the kernels'
    assert "nmfx.srste_masked.default" not in found
    _, old = pair(masked_copy=True)
    assert targets(old, x).count(OP) == 0  # sparse_gemm = False keeps the masked copy


@pytest.mark.parametrize(
    ("dispatch", "backend"),
    [("sparse", "inductor"), ("dense", "aot_eager"), ("auto", "aot_eager")],
)
def test_compiled_gradients_and_weights_equal_eager_step_by_step(dispatch, backend, monkeypatch):
    eager, model = pair()
    compiled = torch.compile(model, backend=backend)
    with K.force_dispatch(dispatch):
        runs = zip(train(eager, eager, 4), train(model, compiled, 4), strict=True)
        for step, _ in enumerate(runs):
            assert_same(eager, model, "grad")
            if step == 0:  # compiled once: later steps must not recompile
                monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    assert_same(eager, model)


def consume(steps) -> None:
    for _ in steps:
        pass


def test_compiled_gradient_accumulation_adds_the_term_once():
    eager, model = pair()
    with K.force_dispatch("sparse"):
        consume(train(eager, eager, 3, accumulate=2))
        consume(train(model, torch.compile(model, backend="aot_eager"), 3, accumulate=2))
    assert_same(eager, model)


def test_compiled_grad_scaler_steps_on_the_unscaled_term():
    eager, model = pair()
    with K.force_dispatch("sparse"):
        consume(train(eager, eager, 3))
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        consume(train(model, torch.compile(model, backend="aot_eager"), 3, scaler=scaler))
    assert_same(eager, model)


def test_compiled_data_write_between_backward_and_step_gets_the_new_weights_term():
    _, model = pair()
    w = model[0].weight
    x, y = batches(1)[0]
    with K.force_dispatch("sparse"):
        F.cross_entropy(torch.compile(model, backend="aot_eager")(x), y).backward()
    g = w.grad.clone()
    w.data.copy_(torch.randn_like(w))  # a new mask, no version bump
    torch.optim.SGD(model.parameters(), lr=0.0).step()
    keep = nmfx.nm_mask(w.detach(), "2:4", dim=1)
    torch.testing.assert_close(w.grad, g + LAM * (~keep) * w.detach())


def test_compiled_steps_reuse_the_masked_and_packed_buffers():
    """Each step writes the same memory per weight (autograd released the last one after its
    backward: a fresh multi-MB buffer would be page-faulted in every step)."""
    _, model = pair()
    compiled = torch.compile(model, backend="aot_eager")
    seen: list[tuple[int, int]] = []
    with K.force_dispatch("sparse"):
        for _ in train(model, compiled, 3):
            for layer in (model[0], model[2]):
                outputs = ops._PACKED_OUTPUTS[layer.weight]
                seen.append((outputs.masked._tensor.data_ptr(), outputs.values._tensor.data_ptr()))
    assert seen[:2] == seen[2:4] == seen[4:] and len(set(seen)) == 2
    buffers = weakref.ref(ops._PACKED_OUTPUTS[model[0].weight])
    del model, compiled, seen
    torch._dynamo.reset()
    gc.collect()
    assert buffers() is None  # the buffers went with their weight


def no_grad_call(model, x):
    with torch.no_grad():
        return model(x)


def autocast_call(model, x):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return model(x)


@pytest.mark.parametrize(
    "run",
    [lambda model, x: model.eval()(x), no_grad_call, autocast_call],
    ids=["eval", "no_grad", "autocast"],
)
def test_other_compiled_forwards_keep_the_masked_copy_graph(run):
    new, old = pair(masked_copy=True)
    x = torch.randn(4, 128)
    with K.force_dispatch("sparse"):
        graphs = []
        for model in (new, old):
            torch._dynamo.reset()
            explained = torch._dynamo.explain(lambda x, model=model: run(model, x))(x)
            graphs.append([str(n.target) for g in explained.graphs for n in g.graph.nodes])
            out = run(torch.compile(model, backend="aot_eager"), x)
            graphs[-1].append(out)
    assert OP not in graphs[0] and graphs[0][:-1] == graphs[1][:-1]
    assert torch.equal(graphs[0][-1], graphs[1][-1])


def test_compiled_double_backward_is_refused_as_before():
    for masked_copy in (False, True):
        _, model = pair(masked_copy)
        x = torch.randn(8, 128, requires_grad=True)
        with K.force_dispatch("sparse"):
            out = torch.compile(model, backend="aot_eager")(x).pow(2).sum()
            with pytest.raises(RuntimeError, match="double backward"):
                (gx,) = torch.autograd.grad(out, x, create_graph=True)
                gx.pow(2).sum().backward()
        torch._dynamo.reset()


def host_isas() -> list[str]:
    return [isa for isa in ("portable", "avx2", "avx512") if isa in _build.supported_isas()]


@pytest.mark.parametrize("isa", host_isas())
def test_op_equals_the_masked_copy_with_double_backward(isa):
    """Called eagerly, the op's outputs, gradients and double backward are the masked-copy
    ``F.linear``'s (straight-through to every weight) on every ISA this host runs."""
    torch.manual_seed(1)
    w = nn.Parameter(torch.randn(64, 128))
    b = nn.Parameter(torch.randn(64))
    x = torch.randn(2, 3, 128, requires_grad=True)
    grads = []
    with K.force_dispatch("sparse"), K.use_isa(isa):
        for packed in (True, False):
            if packed:
                y, masked = torch.ops.nmfx.srste_packed_linear(x, w, b, 2, 4)
                assert not masked.requires_grad
            else:
                y = F.linear(x, torch.ops.nmfx.srste_masked(w, 2, 4, 1), b)
            (gx,) = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
            gx.pow(2).sum().backward()
            grads.append((y.detach(), gx.detach(), w.grad, b.grad, x.grad))
            w.grad = b.grad = x.grad = None
    for got, want in zip(*grads, strict=True):  # summation order: relative to the scale
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())


def test_op_passes_torch_library_opcheck():
    w = nn.Parameter(torch.randn(64, 128))
    b = nn.Parameter(torch.randn(64))
    x = torch.randn(6, 128, requires_grad=True)
    with K.force_dispatch("sparse"):
        for bias in (b, None):
            result = torch.library.opcheck(torch.ops.nmfx.srste_packed_linear, (x, w, bias, 2, 4))
            assert set(result.values()) == {"SUCCESS"}
