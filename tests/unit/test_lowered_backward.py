"""Backward through a lowered model: gradients reach the input, compiled or not;
packed weights are frozen, and asking for their gradient is a clear error.

``torch.compile(lowered, backend="aot_eager")`` traces the op's backward with fake tensors; its
unpack step once read a module-level tensor, which that tracing refuses as a constant.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import nmfx
from nmfx.packed import unpack_buffers


def _lowered() -> nn.Module:
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 64, bias=False))
    nmfx.finalize(nmfx.sparsify(model, mask_mode="fixed"))
    low = nmfx.lower(model, "cpu")
    assert type(low[0]).__name__ == "NMLinear"  # else the test would not test the op
    return low


def _grad_x(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = x.detach().clone().requires_grad_()
    model(x).square().sum().backward()
    return x.grad


def _dense_twin(low: nn.Module) -> nn.Module:
    """The lowered model's weights dense, in plain ``nn.Linear`` layers (autograd's reference)."""
    layers = []
    for layer in low:
        if type(layer).__name__ == "NMLinear":
            shape = (layer.out_features, layer.in_features)
            twin = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
            with torch.no_grad():
                twin.weight.copy_(unpack_buffers(layer.values, layer.mask, shape))
                if layer.bias is not None:
                    twin.bias.copy_(layer.bias)
            layer = twin
        layers.append(layer)
    return nn.Sequential(*layers)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_backward_reaches_the_input(backend: str) -> None:
    low = _lowered()
    x = torch.randn(5, 256)
    run = low if backend == "eager" else torch.compile(low, backend=backend, fullgraph=True)
    torch.testing.assert_close(_grad_x(run, x), _grad_x(_dense_twin(low), x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_grad_for_packed_values_is_a_clear_error(backend: str) -> None:
    low = _lowered()
    low[0].values.requires_grad_(True)
    run = low if backend == "eager" else torch.compile(low, backend=backend)
    x = torch.randn(3, 256, requires_grad=True)
    with pytest.raises(Exception, match=r"packed weights are frozen.*requires_grad_\(False\)"):
        run(x).sum().backward()
    assert low[0].values.grad is None
