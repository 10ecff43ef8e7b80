"""nmfx.prune: every method gives N:M weights, calibrated methods reconstruct better than
magnitude on correlated inputs, calibration is sequential, and the summary says so."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import model_zoo
import nmfx
from nmfx.prune import prune, prune_summary
from nmfx.prune.sparsegpt import inverse_hessian_factor, sparsegpt_prune


class MLP(nn.Module):
    def __init__(self, d: int = 32, h: int = 64, out: int = 8) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, h)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(h, d)
        self.head = nn.Linear(d, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc2(self.act(self.fc1(x))))


def correlated(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """Inputs with correlated features and very unequal column norms."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d // 4, generator=g)
    mix = torch.randn(d // 4, d, generator=g)
    scale = torch.exp(1.5 * torch.randn(d, generator=g))
    return (z @ mix + 0.1 * torch.randn(n, d, generator=g)) * scale


def batches(x: torch.Tensor, size: int = 32) -> list[torch.Tensor]:
    return list(x.split(size))


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["2:4", "1:4", "4:8"])
def test_methods_give_nm_weights(method: str, pattern: str) -> None:
    model = MLP()
    prune(model, pattern, method, calibration=batches(correlated(64, 32)), progress=False)
    assert nmfx.is_nm(model.fc1.weight, pattern, 1)
    assert nmfx.is_nm(model.fc2.weight, pattern, 1)
    assert not nmfx.is_nm(model.head.weight, pattern, 1)  # the output layer stays dense
    p = nmfx.parse_pattern(pattern)
    assert int((model.fc1.weight != 0).sum()) == model.fc1.weight.numel() * p.n // p.m
    rows = {r.name: r for r in prune_summary(model).layers}
    assert rows["fc1"].method == method and rows["head"].verdict == "dense"
    assert "output" in rows["head"].reason


def _output_error(layer: nn.Linear, w_before: torch.Tensor, x: torch.Tensor) -> float:
    ref = x @ w_before.t()
    got = x @ layer.weight.detach().t()
    return float(((got - ref) ** 2).sum() / (ref**2).sum())


def test_calibrated_methods_beat_magnitude_on_correlated_inputs() -> None:
    x = correlated(512, 64)
    errors = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 64, bias=False))
        w0 = model[0].weight.detach().clone()
        prune(model, "2:4", method, calibration=batches(x, 128), keep_output_dense=False,
              progress=False, nsamples=512)  # fmt: skip
        errors[method] = _output_error(model[0], w0, x)
        reported = prune_summary(model).layers[0].rel_error
        assert reported == pytest.approx(errors[method], rel=1e-3)
    assert errors["wanda"] < 0.8 * errors["magnitude"]
    assert errors["sparsegpt"] < 0.8 * errors["wanda"]


def test_wanda_matches_the_reference_formula() -> None:
    """locuslab/wanda: score |W_ij| * ||X_j||_2 over all calibration tokens, the N best of
    every M consecutive input columns of each output row kept, kept weights unchanged."""
    model = nn.Sequential(nn.Linear(32, 16, bias=False))
    x = correlated(3 * 40, 32, seed=5).reshape(3, 40, 32)  # 3 batches of 40 "tokens"
    w = model[0].weight.detach().clone()
    prune(model, "2:4", "wanda", calibration=list(x), keep_output_dense=False, progress=False)
    score = w.abs() * x.reshape(-1, 32).norm(dim=0).reshape(1, -1)
    drop = score.reshape(16, 8, 4).topk(2, dim=-1, largest=False).indices
    mask = torch.ones(16, 8, 4, dtype=torch.bool).scatter_(-1, drop, False).reshape(16, 32)
    assert torch.equal(model[0].weight, torch.where(mask, w, 0))


def test_calibration_is_sequential() -> None:
    """fc2's reported error is measured on inputs from the already-pruned fc1."""
    model = MLP()
    x = correlated(96, 32)
    w2 = model.fc2.weight.detach().clone()
    prune(model, "2:4", "sparsegpt", calibration=batches(x), progress=False)
    with torch.no_grad():
        h = model.act(model.fc1(x))  # fc1 is pruned now
        expected = float(((h @ (w2 - model.fc2.weight).t()) ** 2).sum() / ((h @ w2.t()) ** 2).sum())
    assert prune_summary(model).layers[1].rel_error == pytest.approx(expected, rel=1e-3)


def test_nsamples_limits_the_batches_used() -> None:
    model = MLP()
    prune(model, "2:4", "wanda", calibration=batches(correlated(128, 32), 16), nsamples=40,
          progress=False)  # fmt: skip
    assert prune_summary(model).calibration_samples == 48  # three batches of 16 cover 40


def test_block_stack_is_replayed_and_matches_whole_model_calibration() -> None:
    """LLaMA: the blocks' inputs are cached and replayed; the result is N:M everywhere."""
    model = model_zoo.build("llama", vocab_size=64, dim=32, n_layers=2, n_heads=2,
                            hidden_dim=64, max_seq_len=16)  # fmt: skip
    data = [torch.randint(0, 64, (4, 16)) for _ in range(2)]
    prune(model, "2:4", "sparsegpt", calibration=data, progress=False)
    s = prune_summary(model)
    assert "over 2 blocks" in s.schedule
    assert len(s.sparse) == 14
    for row in s.sparse:
        assert nmfx.is_nm(model.get_parameter(row.param), "2:4", 1)
        assert 0 <= row.rel_error < 1
    assert "sparsegpt" in str(nmfx.summary(model))


def test_conv_im2col_groups_run_along_input_channels() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2),
                          nn.ReLU(), nn.Flatten(), nn.Linear(16 * 9, 4))  # fmt: skip
    x = [torch.randn(8, 3, 8, 8) for _ in range(2)]
    conv = model[2]
    w0 = conv.weight.detach().clone()
    prune(model, "2:4", "sparsegpt", calibration=x, progress=False)
    assert nmfx.is_nm(conv.weight, "2:4", 1)
    with torch.no_grad():
        h = model[1](model[0](torch.cat(x)))
        ref = nn.functional.conv2d(h, w0, conv.bias, stride=2)
        got = conv(h)
        expected = float(
            ((got - ref) ** 2).sum() / ((ref - conv.bias.view(1, -1, 1, 1)) ** 2).sum()
        )
    assert prune_summary(model).layers[1].rel_error == pytest.approx(expected, rel=1e-3)


def test_gpt2_conv1d_is_pruned_on_its_transposed_view() -> None:
    model = model_zoo.build("gpt2", vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=16)
    data = [torch.randint(0, 64, (4, 16))]
    prune(model, "2:4", "wanda", calibration=data, progress=False)
    w = model.h[0].mlp.c_fc.weight  # [in, out]: groups along dim 0
    assert nmfx.is_nm(w, "2:4", 0)
    assert all(r.rel_error is not None for r in prune_summary(model).sparse)


def test_magnitude_without_calibration_matches_nm_mask() -> None:
    model = MLP()
    w = model.fc1.weight.detach().clone()
    prune(model, "2:4", progress=False)
    assert torch.equal(model.fc1.weight, torch.where(nmfx.nm_mask(w, "2:4", 1), w, 0))
    assert prune_summary(model).layers[0].rel_error is None


def test_sparsegpt_on_dead_inputs_warns_and_stays_finite() -> None:
    model = nn.Sequential(nn.Linear(16, 16))
    x = torch.randn(64, 16)
    x[:, :4] = 0  # four inputs never fire: a singular Hessian
    with pytest.warns(RuntimeWarning, match=r"0: 4 of 16 input columns are zero"):
        prune(model, "2:4", "sparsegpt", calibration=[x], keep_output_dense=False, progress=False)
    assert torch.isfinite(model[0].weight).all()
    assert nmfx.is_nm(model[0].weight, "2:4", 1)


def test_singular_hessian_is_dampened_more_with_a_warning() -> None:
    h = torch.diag(torch.tensor([1.0] + [-1.0] * 7))  # not PSD: 1% dampening is not enough
    with pytest.warns(RuntimeWarning, match="layerX.*singular"):
        upper, _ = inverse_hessian_factor(h, 0.01, "layerX")
    assert torch.isfinite(upper).all()


def test_sparsegpt_reference_equivalence_on_one_block() -> None:
    """With H = I the OBS update does nothing beyond masking: SparseGPT == magnitude."""
    w = torch.randn(8, 16)
    upper, _ = inverse_hessian_factor(torch.eye(16), 1e-9, "eye")
    got, keep = sparsegpt_prune(w.clone(), upper, nmfx.parse_pattern("2:4"), blocksize=8)
    expected = nmfx.nm_mask(w, "2:4", 1)
    assert torch.equal(keep, expected)
    torch.testing.assert_close(got, torch.where(expected, w, 0))


def _reference_sparsegpt(w: torch.Tensor, hinv: torch.Tensor, n: int, m: int, bs: int):
    """IST-DASLab/sparsegpt ``fasterprune``'s N:M loop, column by column, on ``[out, cols]``."""
    w = w.clone()
    pruned = torch.zeros_like(w, dtype=torch.bool)
    for i1 in range(0, w.shape[1], bs):
        i2 = min(i1 + bs, w.shape[1])
        w1, h1 = w[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        q1, err1 = torch.zeros_like(w1), torch.zeros_like(w1)
        mask1 = torch.zeros_like(w1, dtype=torch.bool)
        for i in range(i2 - i1):
            d = h1[i, i]
            if i % m == 0:
                score = w1[:, i : i + m] ** 2 / torch.diagonal(h1)[i : i + m].reshape(1, -1) ** 2
                mask1.scatter_(1, i + torch.topk(score, m - n, dim=1, largest=False)[1], True)
            q = w1[:, i].clone()
            q[mask1[:, i]] = 0
            q1[:, i] = q
            err = (w1[:, i] - q) / d
            w1[:, i:] -= err.unsqueeze(1) @ h1[i, i:].unsqueeze(0)
            err1[:, i] = err
        w[:, i1:i2], pruned[:, i1:i2] = q1, mask1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return w, ~pruned


@pytest.mark.parametrize("pattern,blocksize", [("2:4", 16), ("4:8", 24), ("1:4", 128)])
def test_sparsegpt_matches_the_reference_loop(pattern: str, blocksize: int) -> None:
    x = correlated(96, 64, seed=3)
    w = torch.randn(24, 64)
    upper, _ = inverse_hessian_factor(x.t() @ x / 96, 0.01, "ref")
    p = nmfx.parse_pattern(pattern)
    expected, expected_keep = _reference_sparsegpt(w, upper, p.n, p.m, blocksize)
    got, keep = sparsegpt_prune(w.clone(), upper, p, blocksize)
    assert torch.equal(keep, expected_keep)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_sparsegpt_restores_the_thread_count() -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        upper, _ = inverse_hessian_factor(torch.eye(16), 0.01, "eye")
        sparsegpt_prune(torch.randn(8, 16), upper, nmfx.parse_pattern("2:4"), 8)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_inverse_factor_on_a_layer_larger_than_one_leaf() -> None:
    """The recursive triangular inverse (layers wider than 256 columns) against the reference."""
    x = torch.randn(400, 300, dtype=torch.float64)
    h = x.t() @ x
    upper, _ = inverse_hessian_factor(h, 0.01, "big")
    damped = h + 0.01 * torch.diagonal(h).mean() * torch.eye(300, dtype=torch.float64)
    reference = torch.linalg.cholesky(torch.linalg.inv(damped), upper=True)
    torch.testing.assert_close(upper, reference)


def test_sparsify_init_starts_srste_from_the_pruned_weights() -> None:
    model = MLP()
    x = batches(correlated(64, 32))
    reference = copy.deepcopy(model)
    prune(reference, "2:4", "sparsegpt", calibration=x, progress=False)
    nmfx.sparsify(model, init="sparsegpt", calibration=x, prune_options={"progress": False})
    assert nmfx.is_sparsified(model)
    torch.testing.assert_close(model.fc1.weight, reference.fc1.weight)
    masks = nmfx.mask_snapshot(model)
    assert torch.equal(masks["fc1.weight"], reference.fc1.weight != 0)


def test_inverse_factor_matches_the_reference_formula() -> None:
    x = torch.randn(64, 24, dtype=torch.float64)
    h = x.t() @ x
    upper, dead = inverse_hessian_factor(h, 0.01, "ref")
    damped = h + 0.01 * torch.diagonal(h).mean() * torch.eye(24, dtype=torch.float64)
    chol = torch.linalg.cholesky(damped)
    reference = torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True)
    torch.testing.assert_close(upper, reference)
    assert not dead.any()


def test_hugging_face_llama_is_pruned_block_by_block() -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(cfg).eval()
    data = [torch.randint(0, 64, (2, 16)) for _ in range(2)]
    prune(model, "2:4", "sparsegpt", calibration=data, progress=False)
    s = prune_summary(model)
    assert "over 2 blocks" in s.schedule and len(s.sparse) == 14
    assert all(nmfx.is_nm(model.get_parameter(r.param), "2:4", 1) for r in s.sparse)
    assert model.config.use_cache is True  # switched off while calibrating only
