"""Channel permutation: the permuted dense model computes the same outputs, kept magnitude
goes up, and unsafe groups are skipped with their reason."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import model_zoo
import nmfx
from nmfx.prune import permute_channels, prune, prune_summary
from nmfx.prune.permute_search import kept_magnitude, search_permutation


class ResCNN(nn.Module):
    """Conv -> BN -> ReLU blocks with a residual add: channel groups across both sides."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c1, self.bn1 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c2, self.bn2 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c3 = nn.Conv2d(16, 32, 3, padding=1)
        self.pool, self.head = nn.AdaptiveAvgPool2d(1), nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn0(self.stem(x)))
        y = F.relu(self.bn1(self.c1(x)))
        x = F.relu(x + self.bn2(self.c2(y)))
        return self.head(self.pool(F.relu(self.c3(x))).flatten(1))


def _randomise_bn(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.normal_()
            m.bias.data.normal_()


def _llama() -> nn.Module:
    return model_zoo.build("llama", vocab_size=64, dim=32, n_layers=2, n_heads=2,
                           hidden_dim=64, max_seq_len=16)  # fmt: skip


@pytest.mark.parametrize("name", ["llama", "rescnn", "small_cnn"])
def test_permuted_dense_model_computes_the_same_outputs(name: str) -> None:
    if name == "llama":
        model, x = _llama(), torch.randint(0, 64, (4, 16))
    elif name == "rescnn":
        model, x = ResCNN(), torch.randn(4, 3, 8, 8)
        _randomise_bn(model)
    else:
        model = model_zoo.build("small_cnn", in_channels=1, image_size=8)
        x = torch.rand(4, 1, 8, 8)
    model.eval()
    before = copy.deepcopy(model.state_dict())
    ref = model(x)
    groups = permute_channels(model, "2:4", example=x, permute_time_s=5.0)
    applied = [g for g in groups if g.applied]
    assert applied, [g.reason for g in groups]
    assert all(g.kept_after > g.kept_before for g in applied)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed  # the weights really moved
    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)


def test_llama_groups_and_skip_reasons() -> None:
    model = _llama().eval()
    groups = permute_channels(model, "2:4", example=torch.randint(0, 64, (2, 16)))
    by_layer = {c: g for g in groups for c in g.consumers}
    residual = by_layer["layers.0.attention.q_proj"]
    assert residual.applied and "tok_embeddings" in residual.producers
    assert set(by_layer["layers.1.feed_forward.up_proj"].consumers) == set(residual.consumers)
    mlp = by_layer["layers.0.feed_forward.down_proj"]
    assert mlp.applied and sorted(mlp.producers) == [
        "layers.0.feed_forward.gate_proj", "layers.0.feed_forward.up_proj"
    ]  # fmt: skip
    heads = by_layer["layers.0.attention.o_proj"]
    assert not heads.applied and "flatten" in heads.reason  # merged heads: not per-channel


def test_rescnn_group_spans_the_residual_add() -> None:
    model = ResCNN().eval()
    groups = permute_channels(model, "2:4", example=torch.randn(2, 3, 8, 8))
    group = next(g for g in groups if "c1" in g.consumers)
    assert set(group.consumers) == {"c1", "c3"} and set(group.producers) == {"stem", "c2"}


class TiedMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(64, 32)
        self.fc = nn.Linear(32, 32)
        self.out = nn.Linear(32, 64, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.out(F.relu(self.fc(self.emb(idx))))


def test_tied_weight_group_is_skipped_with_the_reason() -> None:
    model = TiedMLP().eval()
    before = copy.deepcopy(model.state_dict())
    groups = permute_channels(model, "2:4", example=torch.randint(0, 64, (2, 8)))
    fc = next(g for g in groups if "fc" in g.consumers)
    assert not fc.applied and "tied" in fc.reason
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent: not traceable by torch.fx
            x = -x
        return self.fc2(self.fc1(x))


def test_untraceable_model_skips_every_group_and_still_prunes() -> None:
    model = Branchy()
    x = torch.randn(8, 16)
    prune(model, "2:4", "magnitude", calibration=[x], permute=True, progress=False)
    row = prune_summary(model).layers[0]
    assert row.permuted.startswith("no: the model is not traceable by torch.fx")
    assert nmfx.is_nm(model.fc1.weight, "2:4", 1)


def test_prune_with_permute_reports_permuted_layers() -> None:
    model = _llama()
    data = [torch.randint(0, 64, (4, 16))]
    prune(model, "2:4", "magnitude", calibration=data, permute=True, progress=False)
    rows = {r.name: r for r in prune_summary(model).layers}
    assert rows["layers.0.feed_forward.down_proj"].permuted == "yes"
    assert rows["layers.0.attention.o_proj"].permuted.startswith("no: ")
    assert "channel group" in str(prune_summary(model))


def test_search_finds_the_obvious_swap() -> None:
    a = torch.cat([torch.full((5, 4), 10.0), torch.ones(5, 4)], dim=1)  # big columns grouped
    perm = search_permutation(a, 2, 4)
    assert sorted(perm.tolist()) == list(range(8))
    assert kept_magnitude(a, 2, 4) == 5 * 22
    assert kept_magnitude(a, 2, 4, perm) == 5 * 40


def test_search_never_lowers_kept_magnitude() -> None:
    a = torch.randn(64, 64).abs()
    perm = search_permutation(a, 2, 4, rounds=20)
    assert kept_magnitude(a, 2, 4, perm) >= kept_magnitude(a, 2, 4)


def test_escapes_keep_at_least_the_greedy_optimum_and_are_seeded() -> None:
    a = torch.randn(48, 32, generator=torch.Generator().manual_seed(0)).abs() ** 3
    greedy = search_permutation(a, 2, 4, escapes=0)
    escaped = search_permutation(a, 2, 4, escapes=10)
    assert sorted(escaped.tolist()) == list(range(32))
    # on this matrix the swap search's local optimum is left for a better one (2653 vs 2647)
    assert kept_magnitude(a, 2, 4, escaped) > kept_magnitude(a, 2, 4, greedy)
    assert torch.equal(escaped, search_permutation(a, 2, 4, escapes=10))


def test_search_stops_at_its_round_budget() -> None:
    a = torch.randn(16, 64).abs()
    assert torch.equal(search_permutation(a, 2, 4, rounds=0), torch.arange(64))
