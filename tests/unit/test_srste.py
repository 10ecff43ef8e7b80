"""SR-STE against a reference written from its equations (nmfx/srste.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from tolerances import tol
from torch import nn

import nmfx
from nmfx import nm_mask


def mlp(width: int = 16) -> nn.Module:
    return nn.Sequential(
        nn.Linear(width, 32 * width // 16), nn.ReLU(), nn.Linear(32 * width // 16, 8)
    )


def test_forward_uses_masked_weight_in_train_and_eval():
    model = mlp()
    w, b = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    nmfx.sparsify(model)
    x = torch.randn(5, 16)
    expected = torch.nn.functional.linear(x, w * nm_mask(w, "2:4"), b)
    for mode in (True, False):
        model.train(mode)
        torch.testing.assert_close(model[0](x), expected)


@pytest.mark.parametrize("width", [16, 256], ids=["tensor-ops", "fused-kernel"])
def test_one_sgd_step_is_exactly_the_srste_update(width):
    lam, lr = 2e-4 * 1000, 0.1  # a large lambda makes the term visible in the check
    torch.manual_seed(1)
    model = mlp(width)
    ref = copy.deepcopy(model)
    nmfx.sparsify(model, srste_lambda=lam)
    x, y = torch.randn(7, width), torch.randn(7, 8)

    # Reference from the equations: W~ = E*W; W <- W - lr*(dL/dW~ + lam*(1-E)*W).
    w0 = ref[0].weight.detach().clone()
    e = nm_mask(w0, "2:4")
    w_tilde = (w0 * e).requires_grad_()
    h = torch.relu(torch.nn.functional.linear(x, w_tilde, ref[0].bias))
    loss = torch.nn.functional.mse_loss(ref[2](h), y)
    loss.backward()
    expected = w0 - lr * (w_tilde.grad + lam * (~e) * w0)

    opt = torch.optim.SGD(model.parameters(), lr=lr)
    torch.nn.functional.mse_loss(model(x), y).backward()
    grad_ste = model[0].weight.grad.clone()
    torch.testing.assert_close(grad_ste, w_tilde.grad)  # STE: reaches pruned weights too
    assert (grad_ste[~e] != 0).any()
    opt.step()
    torch.testing.assert_close(model[0].weight.detach(), expected, **tol("step"))
    # the output layer stays dense and gets a plain SGD step
    torch.testing.assert_close(
        model[2].weight.detach(), ref[2].weight.detach() - lr * ref[2].weight.grad
    )


def test_lambda_zero_is_plain_ste():
    model = mlp()
    nmfx.sparsify(model, srste_lambda=0.0)
    w0 = model[0].weight.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(3, 16)).sum().backward()
    g = model[0].weight.grad.clone()
    opt.step()
    torch.testing.assert_close(model[0].weight.detach(), w0 - 0.1 * g)


def test_srste_term_is_applied_once_per_step_not_per_backward():
    lam = 0.5
    models = [mlp() for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    for m in models:
        nmfx.sparsify(m, srste_lambda=lam)
    x = torch.randn(8, 16)
    # one backward on the whole batch vs two accumulated half batches (loss halved)
    opt0 = torch.optim.SGD(models[0].parameters(), lr=0.1)
    models[0](x).pow(2).mean().backward()
    opt0.step()
    opt1 = torch.optim.SGD(models[1].parameters(), lr=0.1)
    for half in x.split(4):
        (models[1](half).pow(2).mean() / 2).backward()
    opt1.step()
    torch.testing.assert_close(models[0][0].weight, models[1][0].weight)


def test_decay_only_touches_pruned_weights():
    model = mlp()
    nmfx.sparsify(model, srste_lambda=1.0)
    w0 = model[0].weight.detach().clone()
    e = nm_mask(w0, "2:4")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model[0].weight.grad = torch.zeros_like(w0)
    opt.step()
    w1 = model[0].weight.detach()
    torch.testing.assert_close(w1[e], w0[e])
    torch.testing.assert_close(w1[~e], 0.9 * w0[~e])


def test_fixed_mask_mode_keeps_pruned_weights_zero_under_adamw():
    model = mlp()
    e = nm_mask(model[0].weight, "2:4")
    nmfx.sparsify(model, mask_mode="fixed")
    assert (model[0].weight[~e] == 0).all()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 16)).pow(2).sum().backward()
        assert (model[0].weight.grad[~e] == 0).all()
        opt.step()
    assert (model[0].weight[~e] == 0).all()
    assert (model[0].weight[e] != 0).all()


def test_mask_interval_refreshes_every_k_training_forwards():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    nmfx.sparsify(model, mask_interval=3)
    masker = model[0]._nmfx_weight
    x = torch.randn(2, 8)
    model(x)  # forward 0 refreshes
    with torch.no_grad():
        model[0].weight.mul_(-1).add_(torch.randn(8, 8))
    stale = masker.mask.clone()
    model(x)
    model(x)
    assert torch.equal(masker.mask, stale)  # forwards 1, 2: unchanged
    model(x)  # forward 3 refreshes
    assert torch.equal(masker.mask, nm_mask(model[0].weight, "2:4"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_weights_train(dtype):
    model = mlp().to(dtype)
    nmfx.sparsify(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(4, 16, dtype=dtype)).float().pow(2).mean().backward()
    opt.step()
    w = model[0].weight
    assert w.dtype == dtype
    assert nmfx.is_nm(torch.where(nm_mask(w, "2:4"), w, 0), "2:4")


def test_mask_stats_and_sad():
    model = mlp()
    nmfx.sparsify(model, srste_lambda=0.0)
    x = torch.randn(4, 16)
    model(x)
    before = nmfx.mask_snapshot(model)
    stats = nmfx.mask_stats(model, since=before)
    assert stats.flips == 0 and stats.density == pytest.approx(0.5)
    assert [s.param for s in stats.layers] == ["0.weight"]
    with torch.no_grad():  # swap kept/pruned in the first group of row 0
        w = model[0].weight
        e = before["0.weight"][0, :4]
        w[0, :4] = torch.where(e, 1e-3, 10.0)
    model(x)
    stats = nmfx.mask_stats(model, since=before)
    assert stats.flips == 4
    assert stats.layers[0].flip_fraction == pytest.approx(4 / w.numel())
    assert stats.layers[0].weight_density <= 0.5


def test_grad_scaler_does_not_rescale_the_srste_term():
    """GradScaler.step unscales before optimizer.step, where nmfx adds lambda_W * (1-E) * W."""
    models = [mlp(64) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    for m in models:
        nmfx.sparsify(m, srste_lambda=0.5)
    x = torch.randn(8, 64)
    opt0 = torch.optim.SGD(models[0].parameters(), lr=0.1)
    models[0](x).pow(2).mean().backward()
    opt0.step()
    opt1 = torch.optim.SGD(models[1].parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(models[1](x).pow(2).mean()).backward()
    scaler.step(opt1)
    scaler.update()
    torch.testing.assert_close(models[1][0].weight, models[0][0].weight)


def test_fixed_mask_follows_a_loaded_checkpoint():
    trained = mlp()
    nmfx.sparsify(trained, mask_mode="fixed")
    fresh = mlp()  # another init: its own fixed mask would differ
    nmfx.sparsify(fresh, mask_mode="fixed")
    assert not torch.equal(fresh[0]._nmfx_weight.mask, trained[0]._nmfx_weight.mask)
    fresh.load_state_dict(trained.state_dict())
    assert torch.equal(fresh[0]._nmfx_weight.mask, trained[0]._nmfx_weight.mask)
    x = torch.randn(3, 16)
    torch.testing.assert_close(fresh(x), trained(x))


def test_two_optimizers_over_one_weight_add_the_term_once():
    """Issue 12: the term goes in once per gradient, however many optimizers step the weight."""
    lam = 0.5
    model = mlp()
    nmfx.sparsify(model, srste_lambda=lam)
    w = model[0].weight
    w0 = w.detach().clone()
    e = nm_mask(w0, "2:4")
    model(torch.randn(4, 16)).pow(2).sum().backward()
    grad_ste = w.grad.clone()
    first = torch.optim.SGD([w], lr=0.0)  # lr 0: the weight (and so the term) stays w0
    second = torch.optim.SGD([w, model[0].bias], lr=0.0)
    first.step()
    second.step()
    torch.testing.assert_close(w.grad, grad_ste + lam * (~e) * w0)
    model(torch.randn(4, 16)).pow(2).sum().backward()  # a new gradient gets the term again
    before = w.grad.clone()
    second.step()
    torch.testing.assert_close(w.grad, before + lam * (~e) * w0)


def test_weight_stepped_without_the_term_warns_once(monkeypatch):
    import warnings

    from nmfx import modules

    monkeypatch.setattr(modules, "_WARNED_NO_TERM", False)
    model = mlp()
    nmfx.sparsify(model, srste_lambda=0.5)
    x = torch.randn(4, 16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a torch.optim optimizer: no warning
        for _ in range(2):
            opt.zero_grad()
            model(x).sum().backward()
            opt.step()
        model(x)
    model(x).sum().backward()
    with torch.no_grad():  # a hand-written optimizer: nmfx's step hook never runs
        for p in model.parameters():
            p -= 0.1 * p.grad
    with pytest.warns(UserWarning, match=r"Linear\.weight changed after a backward pass without"):
        model(x)
    model(x).sum().backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.1 * p.grad
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process
        model(x)
