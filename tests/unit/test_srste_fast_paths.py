"""The SR-STE step's fast paths give the update of the equations (nmfx/modules.py, nmfx/ops.py).

- Eager CPU: the masked weight and mask are written into buffers each masker reuses across
  steps; a buffer still held (a retained graph, a second call in one forward, a caller) is
  never overwritten.
- Compiled: the masked weight is one ``nmfx::srste_masked`` op; the optimizer hook then adds
  the term with the mask recomputed in cache (``srste_decay_nm_``); the result equals eager.
"""

from __future__ import annotations

import copy
import gc
import warnings
import weakref

import pytest
import torch
import torch.nn.functional as F
from tolerances import tol
from torch import nn

import nmfx
import nmfx.kernels as K
from nmfx import nm_mask

LAM, LR = 0.2, 0.1  # a large lambda_W makes the term visible in every check

pytestmark = pytest.mark.skipif(
    not K.kernels_available(), reason="the fused mask kernels did not build here"
)


def mlp() -> nn.Sequential:  # 256 x 128 weights: above the fused kernel's 4096-element floor
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(),
                         nn.Linear(128, 4))  # fmt: skip


def masker_of(layer: nn.Module) -> nmfx.modules.NMMasker:
    return layer._nmfx_weight


def test_masked_weight_memory_is_reused_once_released_and_never_while_held():
    model = nmfx.sparsify(mlp(), srste_lambda=LAM)
    masker, w = masker_of(model[0]), model[0].weight
    first = masker(w)
    ptr, expected = first.data_ptr(), first.detach().clone()
    held = masker(w)  # `first` is still held: a new buffer
    assert held.data_ptr() != ptr
    with torch.no_grad():
        w.mul_(-1)  # another mask and masked weight
    again = masker(w)
    again_ptr = again.data_ptr()
    assert again_ptr not in (ptr, held.data_ptr())  # both are held
    assert torch.equal(first, expected)  # never overwritten while held
    del first, held, again
    for _ in range(2):  # released: the same memory, call after call
        out = masker(w)
        assert out.data_ptr() == again_ptr
        torch.testing.assert_close(out, w * nm_mask(w, "2:4"), **tol("exact"))
        del out


def reference_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, calls: int) -> dict:
    """Layer 0's SGD step from the equations, applied ``calls`` times (weight sharing)."""
    ref = copy.deepcopy(model)
    w0, w2 = ref[0].weight.detach().clone(), ref[2].weight.detach()
    e = nm_mask(w0, "2:4")
    w_tilde = (w0 * e).requires_grad_()
    h = x
    for _ in range(calls):
        h = torch.relu(F.linear(h, w_tilde, ref[0].bias))
    h = torch.relu(F.linear(h, w2 * nm_mask(w2, "2:4"), ref[2].bias))
    F.mse_loss(ref[4](h), y).backward()
    return {"grad": w_tilde.grad, "weight": w0 - LR * (w_tilde.grad + LAM * (~e) * w0)}


class Twice(nn.Module):
    """Calls its first layer twice in one forward: two masked weights alive at once."""

    def __init__(self, seq: nn.Sequential) -> None:
        super().__init__()
        self.seq = seq

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = self.seq[0]
        h = torch.relu(first(torch.relu(first(x))))
        return self.seq[4](torch.relu(self.seq[2](h)))


def test_layer_called_twice_in_one_forward_gets_the_exact_srste_update():
    seq = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                        nn.Linear(128, 4))  # fmt: skip
    x, y = torch.randn(6, 128), torch.randn(6, 4)
    expected = reference_step(seq, x, y, calls=2)
    model = nmfx.sparsify(Twice(seq), srste_lambda=LAM)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for _ in range(2):  # the second step runs on reused buffers
        trial = copy.deepcopy(model)
        opt_t = torch.optim.SGD(trial.parameters(), lr=LR)
        F.mse_loss(trial(x), y).backward()
        torch.testing.assert_close(trial.seq[0].weight.grad, expected["grad"], **tol("step"))
        opt_t.step()
        torch.testing.assert_close(trial.seq[0].weight.detach(), expected["weight"], **tol("step"))
        F.mse_loss(model(x), y).backward()
        opt.zero_grad()
    del opt


def test_retained_graph_backward_sees_its_own_masked_weight():
    model = nmfx.sparsify(mlp(), srste_lambda=LAM)
    x, y = torch.randn(6, 128), torch.randn(6, 4)
    expected = reference_step(model, x, y, calls=1)["grad"]
    loss = F.mse_loss(model(x), y)
    loss.backward(retain_graph=True)
    with torch.no_grad():  # layer 0's gradient depends on layer 2's masked weight
        model[2].weight.mul_(-1)  # changed, and a new forward before the second backward
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "changed after a backward without the term": meant
        F.mse_loss(model(x), y).backward()
    model[0].weight.grad = None
    loss.backward()  # the first graph: its masked weight must be the one it was built with
    torch.testing.assert_close(model[0].weight.grad, expected, **tol("step"))


def test_conv_weight_grouped_along_input_channels_gets_the_exact_update():
    torch.manual_seed(4)
    conv = nn.Sequential(nn.Conv2d(64, 32, 3), nn.ReLU(), nn.Flatten(), nn.Linear(32 * 16, 3))
    ref = copy.deepcopy(conv)
    model = nmfx.sparsify(conv, srste_lambda=LAM)
    x, y = torch.randn(2, 64, 6, 6), torch.randn(2, 3)
    w0 = ref[0].weight.detach().clone()
    e = nm_mask(w0, "2:4", dim=1)  # groups of 4 input channels at each kernel position
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for step in range(2):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        if step == 0:
            w_tilde = (w0 * e).requires_grad_()
            out = F.conv2d(x, w_tilde, ref[0].bias)
            F.mse_loss(ref[3](torch.relu(out).flatten(1)), y).backward()
            torch.testing.assert_close(model[0].weight.grad, w_tilde.grad, **tol("step"))
            opt.step()
            expected = w0 - LR * (w_tilde.grad + LAM * (~e) * w0)
            torch.testing.assert_close(model[0].weight.detach(), expected, **tol("step"))
        else:
            opt.step()  # a second step through the reused buffers stays finite and masked
    assert torch.isfinite(model[0].weight).all()


def test_deepcopy_gets_its_own_buffers():
    model = nmfx.sparsify(mlp(), srste_lambda=LAM)
    F.mse_loss(model(torch.randn(2, 128)), torch.randn(2, 4)).backward()
    twin = copy.deepcopy(model)
    a = masker_of(model[0])(model[0].weight)
    b = masker_of(twin[0])(twin[0].weight)
    assert a.data_ptr() != b.data_ptr() and torch.equal(a, b)


def _train(model: nn.Module, step_model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(step_model(x), y).backward()
        opt.step()


def test_compiled_forward_masks_in_one_custom_op_and_trains_like_eager():
    x, y = torch.randn(16, 128), torch.randint(0, 4, (16,))
    eager = nmfx.sparsify(mlp(), srste_lambda=LAM)
    compiled = copy.deepcopy(eager)
    graphs = torch._dynamo.explain(compiled)(x).graphs
    targets = [str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"]
    assert targets.count("nmfx.srste_masked.default") == 2  # the two sparse layers
    assert not any("abs" in t for t in targets)  # no decomposed comparisons
    torch._dynamo.reset()
    _train(eager, eager, x, y)
    with torch.profiler.profile() as prof:
        _train(compiled, torch.compile(compiled, backend="aot_eager"), x, y)
    ops = {e.key for e in prof.key_averages()}
    assert "nmfx_cpu::srste_decay_nm_" in ops  # the hook: no mask cached by a compiled forward
    for a, b in zip(eager.parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(a, b, **tol("reorder"))
    torch._dynamo.reset()


def test_eager_step_equals_the_tensor_op_path(monkeypatch):
    """The fused path (masked weight from the kernel, the term with the mask recomputed in
    registers, nothing stored) against the masks' tensor-op path, on three SGD steps (the
    op path's ``add_(..., alpha=)`` may round the term's multiply-add once: "step")."""
    x, y = torch.randn(16, 128), torch.randint(0, 4, (16,))
    fused = nmfx.sparsify(mlp(), srste_lambda=LAM)
    ops_path = copy.deepcopy(fused)
    _train(fused, fused, x, y)
    assert masker_of(fused[0])._last is None  # the fused forward stores no mask
    monkeypatch.setattr(nmfx.modules, "_use_kernel", lambda w, m: False)
    _train(ops_path, ops_path, x, y)
    for a, b in zip(fused.parameters(), ops_path.parameters(), strict=True):
        torch.testing.assert_close(a, b, **tol("step"))


def test_term_uses_the_mask_of_the_weight_being_stepped():
    """A weight changed in place between backward and step: the term's mask is the changed
    weight's (it is recomputed from the weight the hook reads, never cached from the forward)."""
    model = nmfx.sparsify(mlp(), srste_lambda=LAM)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    F.mse_loss(model(torch.randn(6, 128)), torch.randn(6, 4)).backward()
    w = model[0].weight
    with torch.no_grad():
        w.copy_(torch.randn_like(w) * 0.05)  # another mask than the forward's (init scale)
    w_now, grad = w.detach().clone(), w.grad.clone()
    opt.step()
    expected = w_now - LR * (grad + LAM * (~nm_mask(w_now, "2:4")) * w_now)
    torch.testing.assert_close(w.detach(), expected, **tol("step"))


def test_hook_adds_terms_last_parameter_first(monkeypatch):
    """Cache order: an optimizer steps its first parameters first, so the hook ends on them."""
    model = nmfx.sparsify(mlp(), srste_lambda=LAM)
    F.mse_loss(model(torch.randn(6, 128)), torch.randn(6, 4)).backward()
    seen = []
    original = nmfx.modules.NMMasker.add_srste_term

    def record(self):
        seen.append(self.owner)
        return original(self)

    monkeypatch.setattr(nmfx.modules.NMMasker, "add_srste_term", record)
    assert nmfx.add_srste_terms(model.parameters()) == 2
    assert seen == [model[2], model[0]]


def test_compiled_mask_op_reuses_its_output_once_released_and_never_while_held():
    """``nmfx::srste_masked`` writes into one buffer per weight, step after step (a fresh
    multi-MB output was page-faulted in on every compiled step); a held output is never
    overwritten, and the buffer goes with its weight."""
    w = nn.Parameter(torch.randn(64, 128))
    op = torch.ops.nmfx.srste_masked
    first = op(w, 2, 4, 1)
    ptr, expected = first.data_ptr(), first.detach().clone()
    torch.testing.assert_close(first, w.detach() * nm_mask(w, "2:4"), **tol("exact"))
    held = op(w, 2, 4, 1)  # `first` is still held: another buffer
    assert held.data_ptr() != ptr
    with torch.no_grad():
        w.mul_(-2)
    del held
    again = op(w, 2, 4, 1)
    assert torch.equal(first, expected)  # never overwritten while held
    torch.testing.assert_close(again, w.detach() * nm_mask(w, "2:4"), **tol("exact"))
    del first, again
    ptrs = set()
    for _ in range(2):  # released: the same memory, call after call
        out = op(w, 2, 4, 1)
        ptrs.add(out.data_ptr())
        torch.testing.assert_close(out, w.detach() * nm_mask(w, "2:4"), **tol("exact"))
        del out
    assert len(ptrs) == 1
    strided = op(w.t(), 2, 4, 0)  # a copy made contiguous: its own fresh output
    torch.testing.assert_close(strided, w.detach().t() * nm_mask(w.t(), "2:4", dim=0),
                               **tol("exact"))  # fmt: skip
    del strided  # its autograd graph holds w
    buffer = weakref.ref(nmfx.ops._MASKED_OUTPUTS[w])
    del w
    gc.collect()
    assert buffer() is None  # the buffer went with its weight


def test_compiled_steps_reuse_the_masked_buffers_and_train_like_eager():
    """Three compiled SGD steps: the op hands out the same buffer per weight each step
    (autograd released the previous one after its backward) and the weights equal eager's."""
    x, y = torch.randn(16, 128), torch.randint(0, 4, (16,))
    eager = nmfx.sparsify(mlp(), srste_lambda=LAM)
    compiled = copy.deepcopy(eager)
    torch._dynamo.reset()
    _train(eager, eager, x, y)
    seen: list[int] = []
    real = nmfx.ops._masked_output

    def spy(weight: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        out = real(weight, w)
        seen.append(out.data_ptr())
        return out

    nmfx.ops._masked_output = spy
    try:
        _train(compiled, torch.compile(compiled, backend="aot_eager"), x, y)
    finally:
        nmfx.ops._masked_output = real
    assert len(seen) == 6 and seen[:2] == seen[2:4] == seen[4:]  # 2 sparse layers x 3 steps
    for a, b in zip(eager.parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(a, b, **tol("reorder"))
    torch._dynamo.reset()


@pytest.mark.parametrize("path", ["eager", "compiled op"])
def test_a_buffer_made_under_inference_mode_is_not_handed_to_training(path):
    """An evaluation under ``torch.inference_mode`` leaves an inference tensor in the reused
    buffer; autograd cannot record or save one (the eager weight lost its gradient silently,
    the op's output could not be saved), so training gets a new buffer."""
    model = nmfx.sparsify(mlp(), srste_lambda=LAM)
    w = model[0].weight
    if path == "eager":
        masked = masker_of(model[0])
    else:
        def masked(weight: torch.Tensor) -> torch.Tensor:
            return torch.ops.nmfx.srste_masked(weight, 2, 4, 1)
    with torch.inference_mode():
        assert masked(w).is_inference()
    out = masked(w)
    assert not out.is_inference()
    x = torch.randn(3, 128)
    F.linear(x, out).sum().backward()
    torch.testing.assert_close(w.grad, torch.ones(256, 3) @ x, **tol("reorder"))
