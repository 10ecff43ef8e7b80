"""nmfx.prune's calibration schedule and statistics: a stage's forward ends once its inputs
are captured (unless a layer runs more than once), and the Hessian accumulated on the upper
block-triangle of wide inputs equals ``X^T X / rows``."""

from __future__ import annotations

import torch
from torch import nn

from nmfx.prune import prune, prune_summary
from nmfx.prune.capture import GramStats


class Counted(nn.Module):
    """fc1 -> ReLU -> fc2 -> head, counting how often the head runs."""

    def __init__(self, shared: bool = False) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 16)
        self.fc2 = self.fc1 if shared else nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)
        self.head_calls = 0
        self.head.register_forward_pre_hook(self._count)

    def _count(self, *_: object) -> None:
        self.head_calls += 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc2(torch.relu(self.fc1(x))))


def test_stage_forwards_end_once_their_inputs_are_captured() -> None:
    model = Counted()
    data = [torch.randn(8, 16) for _ in range(3)]
    prune(model, "2:4", "sparsegpt", calibration=data, progress=False)
    # the dense check runs each batch once through the whole model; the two stages (fc1,
    # fc2) each end at their layer's input, so the head (after the last stage) runs only there
    assert model.head_calls == 3
    assert len(prune_summary(model).sparse) == 2


def test_a_layer_running_twice_is_calibrated_on_both_calls() -> None:
    """fc1 is used twice per forward: its Hessian holds both inputs (no early end)."""
    model = Counted(shared=True)
    x = torch.randn(64, 16)
    w = model.fc1.weight.detach().clone()
    prune(model, "2:4", "magnitude", calibration=[x], progress=False)
    with torch.no_grad():
        first = x
        second = torch.relu(nn.functional.linear(x, w, model.fc1.bias))  # dense: magnitude
        rows = torch.cat([first, second])
        delta = w - model.fc1.weight
        expected = float(((rows @ delta.t()) ** 2).sum() / ((rows @ w.t()) ** 2).sum())
    row = next(r for r in prune_summary(model).sparse if r.param == "fc1.weight")
    assert row.rel_error is not None
    assert abs(row.rel_error - expected) < 1e-3 * expected


def test_wide_gram_matrix_equals_the_full_product() -> None:
    cols = 1100  # above the width where only the upper block-triangle is accumulated
    stats = GramStats(cols, torch.device("cpu"))
    xs = [torch.randn(40, cols) for _ in range(2)]
    for x in xs:
        stats.add(x)
    x = torch.cat(xs)
    h = stats.hessian()
    torch.testing.assert_close(h, x.t() @ x / 80, rtol=1e-5, atol=1e-5)
    assert torch.equal(h, h.t())


class InPlace(nn.Module):
    """b reads the buffer a read, rewritten in place: same address, a different activation."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(32, 32)
        self.b = nn.Linear(32, 32)
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x * 2
        h = self.a(t)
        t.copy_(torch.tanh(h) * torch.linspace(0.1, 3.0, 32))
        return self.head(self.b(t))


def test_an_activation_rewritten_in_place_is_a_new_input() -> None:
    torch.manual_seed(0)
    model = InPlace()
    x = torch.randn(64, 32)
    w_b = model.b.weight.detach().clone()
    prune(model, "2:4", "wanda", calibration=[x], progress=False)
    with torch.no_grad():
        rows = torch.tanh(model.a(x * 2)) * torch.linspace(0.1, 3.0, 32)  # a is pruned now
        delta = w_b - model.b.weight
        expected = float(((rows @ delta.t()) ** 2).sum() / ((rows @ w_b.t()) ** 2).sum())
    row = next(r for r in prune_summary(model).sparse if r.param == "b.weight")
    assert row.rel_error is not None
    assert abs(row.rel_error - expected) < 1e-3 * expected
