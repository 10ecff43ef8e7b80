"""The SR-STE training forward on the packed weight (nmfx/modules.py ``_PackedLinear``).

A sparsified ``nn.Linear`` (graph ``linear(x, masker(W), b)``) runs its training forward's
GEMM on the packed N:M form of the masked weight, written by the same pass that writes the
masked copy (``nm_mask_pack_out``). What must hold: the packed form is ``nmfx.packed.pack``'s
bit for bit on every ISA; losses, gradients and weights match the masked-copy forward
(``F.linear``) up to summation-order rounding, over steps, with gradient accumulation,
``GradScaler``, a ``p.data`` write between backward and step, double backward, and under
``torch.compile``; everything else (eval, hooks, autocast, small or non-fp32 weights, a
``dense`` dispatch) keeps the masked-copy forward.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nmfx
import nmfx.kernels as K
from nmfx import modules
from nmfx.kernels import _build
from nmfx.masks import MaskOutputs
from nmfx.modules import NMMasker
from nmfx.packed import _mask_bits_to_bytes

pytestmark = pytest.mark.skipif(
    not K.kernels_available(), reason="the fused mask kernels did not build here"
)

LAM, LR = 0.2, 0.1
ISA_CODES = {"portable": 1, "avx2": 2, "avx512": 3}


@pytest.fixture(autouse=True)
def small_layers_pack(monkeypatch, kernel_defaults):
    """The test weights (256 x 128) take the packed path; the kernels' default choices."""
    monkeypatch.setattr(modules, "SPARSE_GEMM_MIN_NUMEL", 0)


def mlp() -> nn.Sequential:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(),
                         nn.Linear(128, 4))  # fmt: skip


def pair(**kwargs) -> tuple[nn.Module, nn.Module]:
    """(masked-copy forward, packed forward) SR-STE copies of one model."""
    base = mlp()
    old = nmfx.sparsify(copy.deepcopy(base), srste_lambda=LAM, **kwargs)
    new = nmfx.sparsify(copy.deepcopy(base), srste_lambda=LAM, **kwargs)
    for masker in old.modules():
        if isinstance(masker, NMMasker):
            masker.sparse_gemm = False
    return old, new


def graph_nodes(loss: torch.Tensor) -> set:
    """Every autograd node that ``loss.backward()`` would run."""
    seen, todo = set(), [loss.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        todo += [nxt for nxt, _ in fn.next_functions]
    return seen


def packed_nodes(loss: torch.Tensor) -> int:
    return sum("PackedLinear" in type(fn).__name__ for fn in graph_nodes(loss))


def host_isas() -> list[str]:
    return [isa for isa in ("portable", "avx2", "avx512") if isa in _build.supported_isas()]


@pytest.mark.parametrize("isa", host_isas())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("nm", [(2, 4), (1, 4), (3, 4), (4, 8), (8, 16)], ids=str)
def test_pack_pass_equals_mask_and_pack_bit_for_bit(isa, dtype, nm):
    n, m = nm
    bits_of = torch.int32 if dtype == torch.float32 else torch.int16
    prev = torch.ops.nmfx_cpu.set_mask_isa(ISA_CODES[isa])
    try:
        for rows, cols in ((3, 16), (5, 48), (7, 4112), (3, 8208)):  # vector bodies and tails
            w = torch.randn(rows, cols).to(dtype)
            w[0, :8] = 0.0  # ties among zeros
            w[1, 4:8] = 1.0  # ties among equals
            w[2, 0], w[2, 5] = float("nan"), float("inf")
            masked, values, bits = MaskOutputs().fill_packed(w, n, m)
            keep = nmfx.nm_mask(w, nm, dim=1)
            assert torch.equal(masked.view(bits_of), torch.where(keep, w, 0).view(bits_of))
            assert torch.equal(values.view(bits_of), w[keep].view(rows, -1).view(bits_of))
            assert torch.equal(bits, _mask_bits_to_bytes(keep))
    finally:
        torch.ops.nmfx_cpu.set_mask_isa(prev)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: (torch.randn(4, 4, 4), 2, 4), "must be 2-D"),
        (lambda: (torch.randn(4, 12), 2, 3), "packed pattern's M"),
        (lambda: (torch.randn(4, 10), 2, 4), "not a multiple of M=4"),
    ],
    ids=["3d", "m3", "cols"],
)
def test_pack_pass_rejects_bad_input_by_name(make, match):
    w, n, m = make()
    with pytest.raises(RuntimeError, match=match):
        torch.ops.nmfx_cpu.nm_mask_pack_out(
            w, n, m, torch.empty_like(w), torch.empty(w.numel()),
            torch.empty(w.shape[0], 8, dtype=torch.uint8),
        )  # fmt: skip


def test_pack_pass_rejects_short_buffers():
    w = torch.randn(4, 16)
    with pytest.raises(RuntimeError, match="at least 32 elements"):
        torch.ops.nmfx_cpu.nm_mask_pack_out(
            w, 2, 4, torch.empty_like(w), torch.empty(31), torch.empty(4, 2, dtype=torch.uint8)
        )
    with pytest.raises(RuntimeError, match=r"mask must be contiguous uint8 \[4, 2\]"):
        torch.ops.nmfx_cpu.nm_mask_pack_out(
            w, 2, 4, torch.empty_like(w), torch.empty(32), torch.empty(4, 3, dtype=torch.uint8)
        )


def train(model: nn.Module, steps: int, accumulate: int = 1, scaler=None) -> list[float]:
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    torch.manual_seed(7)
    batches = [(torch.randn(16, 128), torch.randint(0, 4, (16,))) for _ in range(steps)]
    losses = []
    for x, y in batches:
        opt.zero_grad()
        for part in range(accumulate):
            rows = slice(part * 16 // accumulate, (part + 1) * 16 // accumulate)
            loss = F.cross_entropy(model(x[rows]), y[rows]) / accumulate
            (scaler.scale(loss) if scaler else loss).backward()
            losses.append(loss.item())
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
    return losses


def assert_same_training(old: nn.Module, new: nn.Module) -> None:
    for (name, a), b in zip(old.named_parameters(), new.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("dispatch", ["sparse", "auto"])
def test_packed_forward_trains_like_the_masked_copy(dispatch):
    old, new = pair()
    x, y = torch.randn(16, 128), torch.randint(0, 4, (16,))
    with K.force_dispatch(dispatch):
        if dispatch == "sparse":
            assert packed_nodes(F.cross_entropy(new(x), y)) == 2  # both hidden layers
            assert packed_nodes(F.cross_entropy(old(x), y)) == 0
        lo, ln = train(old, 4), train(new, 4)
        torch.testing.assert_close(ln, lo, rtol=1e-4, atol=1e-5)
        assert_same_training(old, new)
        if dispatch == "sparse":  # the reused buffer holds this weight's masked form
            new(x)
            w = new[0].weight.detach()
            keep = nmfx.nm_mask(w, "2:4", dim=1)
            masked = new[0]._nmfx_weight._outputs.masked._tensor
            assert torch.equal(masked, torch.where(keep, w, 0))


def test_packed_forward_gradients_equal_the_masked_copy_step_by_step():
    old, new = pair()
    x, y = torch.randn(16, 128), torch.randint(0, 4, (16,))
    with K.force_dispatch("sparse"):
        for model in (old, new):
            F.cross_entropy(model(x), y).backward()
    for (name, a), b in zip(old.named_parameters(), new.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)
    # the term: once per optimizer step, from the weight's own mask
    w, g = new[0].weight, new[0].weight.grad.clone()
    torch.optim.SGD(new.parameters(), lr=0.0).step()
    keep = nmfx.nm_mask(w.detach(), "2:4", dim=1)
    torch.testing.assert_close(w.grad, g + LAM * (~keep) * w.detach())


def test_gradient_accumulation_adds_the_term_once():
    old, new = pair()
    with K.force_dispatch("sparse"):
        train(old, 3, accumulate=2)
        train(new, 3, accumulate=2)
    assert_same_training(old, new)


def test_grad_scaler_steps_on_the_unscaled_term():
    old, new = pair()
    with K.force_dispatch("sparse"):
        train(old, 3)
        train(new, 3, scaler=torch.amp.GradScaler("cpu", init_scale=1024.0))
    assert_same_training(old, new)


def test_data_write_between_backward_and_step_gets_the_term_of_the_new_weight():
    """``p.data`` writes bump no version counter: nothing from the forward may be reused."""
    _, model = pair()
    w = model[0].weight
    x, y = torch.randn(16, 128), torch.randint(0, 4, (16,))
    with K.force_dispatch("sparse"):
        F.cross_entropy(model(x), y).backward()
    g = w.grad.clone()
    w.data.copy_(torch.randn_like(w))  # a new mask
    torch.optim.SGD(model.parameters(), lr=0.0).step()
    keep = nmfx.nm_mask(w.detach(), "2:4", dim=1)
    torch.testing.assert_close(w.grad, g + LAM * (~keep) * w.detach())


def test_double_backward_matches_the_masked_copy():
    old, new = pair()
    x = torch.randn(8, 128, requires_grad=True)
    grads = []
    with K.force_dispatch("sparse"):
        for model in (old, new):
            (gx,) = torch.autograd.grad(model(x).pow(2).sum(), x, create_graph=True)
            gx.pow(2).sum().backward()
            grads.append(model[0].weight.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-5)


def test_batched_input_of_three_dims():
    old, new = pair()
    x = torch.randn(2, 5, 128)
    with K.force_dispatch("sparse"):
        for model in (old, new):
            model(x).pow(2).sum().backward()
        assert packed_nodes(new(x).sum()) == 2
    torch.testing.assert_close(new[0].weight.grad, old[0].weight.grad, rtol=1e-4, atol=1e-6)


def test_compiled_equals_packed_eager():
    base = mlp()
    eager = nmfx.sparsify(copy.deepcopy(base), srste_lambda=LAM)
    compiled_model = nmfx.sparsify(copy.deepcopy(base), srste_lambda=LAM)
    compiled = torch.compile(compiled_model)
    with K.force_dispatch("sparse"):
        train(eager, 2)
        train(compiled, 2)
    assert_same_training(compiled_model, eager)


def no_grad_call(model, x):
    with torch.no_grad():
        return model(x)


def hooked_call(model, x):
    for layer in (model[0], model[2]):
        layer._nmfx_weight.register_forward_hook(lambda *a: None)
    return model(x)


def autocast_call(model, x):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return model(x)


def dense_dispatch_call(model, x):
    with K.force_dispatch("dense"):
        return model(x)


def masked_copy_cases():
    return {
        "eval": lambda model, x: model.eval()(x),
        "no_grad": no_grad_call,
        "masker hook": hooked_call,
        "autocast": autocast_call,
        "fp64": lambda model, x: model.double()(x.double()),
        "dense dispatch": dense_dispatch_call,
        "one-dim x": lambda model, x: model(x[0]),
    }


@pytest.mark.parametrize("case", list(masked_copy_cases()))
def test_other_forwards_keep_the_masked_copy(case):
    old, new = pair()
    x = torch.randn(4, 128)
    run = masked_copy_cases()[case]
    with K.force_dispatch("sparse"):
        out, ref = run(new, x), run(old, x)
    assert torch.equal(out, ref)  # the same ops: bit for bit
    if out.requires_grad:
        assert packed_nodes(out.sum()) == 0


@pytest.mark.parametrize(("floor", "packed"), [(256 * 128, 2), (256 * 128 + 1, 0)])
def test_small_weights_keep_the_masked_copy(monkeypatch, floor, packed):
    monkeypatch.setattr(modules, "SPARSE_GEMM_MIN_NUMEL", floor)
    _, new = pair()
    with K.force_dispatch("sparse"):
        assert packed_nodes(new(torch.randn(4, 128)).sum()) == packed


def test_pickled_forward_without_the_pattern_field_still_runs():
    _, new = pair()
    for layer in (new[0], new[2]):
        del layer.forward._linear  # a model pickled before the field existed
    x = torch.randn(4, 128)
    with K.force_dispatch("sparse"):
        assert packed_nodes(new(x).sum()) == 0
    loaded = copy.deepcopy(new)
    torch.testing.assert_close(loaded(x), new(x))


def test_weight_gradient_becomes_grad_without_a_copy():
    """The packed node's weight gradient is stored as ``.grad`` itself (no clone)."""
    _, new = pair()
    x, y = torch.randn(16, 128), torch.randint(0, 4, (16,))
    with K.force_dispatch("sparse"):
        for _ in range(2):
            new.zero_grad(set_to_none=True)
            loss = F.cross_entropy(new(x), y)
            received: dict[int, int] = {}
            for fn in graph_nodes(loss):
                if "PackedLinear" in type(fn).__name__:
                    acc = fn.next_functions[1][0]  # the weight's AccumulateGrad

                    def note(grads, weight=acc.variable, into=received):
                        into[id(weight)] = grads[0].data_ptr()

                    acc.register_prehook(note)
            loss.backward()
            weights = [new[0].weight, new[2].weight]
            assert sorted(received) == sorted(map(id, weights))
            for w in weights:
                assert w.grad.data_ptr() == received[id(w)] and w.grad.is_contiguous()


def test_a_module_reading_a_childs_weight_trains_on_the_packed_path():
    """The rewritten forward names the weight ``inner.weight``: the fused path looks it up
    through the child (a plain ``getattr`` raised AttributeError in the training forward)."""

    class Reads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = nn.Linear(1024, 512)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.linear(x, self.inner.weight, self.inner.bias)

    torch.manual_seed(0)
    model = nmfx.sparsify(nn.Sequential(Reads(), nn.ReLU(), nn.Linear(512, 8)))
    model.train()
    x = torch.randn(64, 1024)
    with K.force_dispatch("sparse"):
        loss = model(x).sum()
    assert packed_nodes(loss) == 1
    loss.backward()
    assert model[0].inner.weight.grad is not None
