"""GPU tier for target 'tensorrt': compile 2:4 models with Torch-TensorRT (sparse_weights=True),
compare with the dense masked fp16 reference, and time sparse-allowed vs dense engines.

Needs an NVIDIA GPU and torch_tensorrt; skipped with a reason otherwise.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import model_zoo
from nmfx.lowering.tensorrt import lower_tensorrt
from nmfx.masks import nm_mask
from nmfx.pattern import parse_pattern
from nmfx.plan import NMWeight

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.tensorrt,
    pytest.mark.skipif(
        not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0),
        reason="needs an NVIDIA GPU (sm80+)",
    ),
]

# TensorRT fp16 engines fuse and reorder: compare whole outputs by relative error.
MAX_REL_ERR = 2e-2


def masked_model(name: str, **overrides: object) -> tuple[nn.Module, dict[str, NMWeight]]:
    """A zoo model with every groups=1 conv / Linear whose K is a multiple of 4 masked 2:4
    along input channels, and its N:M record."""
    model = model_zoo.build(name, **overrides)
    record = {}
    for fqn, mod in model.named_modules():
        if isinstance(mod, nn.Linear | nn.Conv2d) and mod.weight.shape[1] % 4 == 0:
            if getattr(mod, "groups", 1) != 1:
                continue
            with torch.no_grad():
                mod.weight.mul_(nm_mask(mod.weight, "2:4", 1))
            op = "linear" if isinstance(mod, nn.Linear) else "conv2d"
            record[f"{fqn}.weight"] = NMWeight(f"{fqn}.weight", fqn, op, parse_pattern("2:4"), 1)
    return model.cuda().eval(), record


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def time_ms(fn, warmup: int = 10, iters: int = 50) -> float:
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


@pytest.mark.parametrize(
    "name,overrides,batch",
    [("mlp", {"hidden": 2048}, 512), ("resnet18", {"width": 64}, 32)],
    ids=["mlp", "resnet18"],
)
def test_tensorrt_engine_matches_dense_masked_reference(name, overrides, batch, record_property):
    torch_tensorrt = pytest.importorskip("torch_tensorrt")
    model, record = masked_model(name, **overrides)
    reference = copy.deepcopy(model).half()
    x = model_zoo.example_input(name, batch=batch, model=model).half()

    engine, decisions = lower_tensorrt(model, record, (x,), min_block_size=1)

    assert all(d.facts.get("torch_tensorrt") == torch_tensorrt.__version__ for d in decisions)
    assert any(d.verdict == "sparse" for d in decisions)
    with torch.no_grad():
        expected = reference(x)
        assert rel_err(engine(x), expected) < MAX_REL_ERR
        dense_engine = torch_tensorrt.compile(
            reference, ir="dynamo", inputs=[x], sparse_weights=False, min_block_size=1
        )
        sparse_ms = time_ms(lambda: engine(x))
        dense_ms = time_ms(lambda: dense_engine(x))
    record_property("sparse_weights_ms", round(sparse_ms, 4))
    record_property("dense_ms", round(dense_ms, 4))
    record_property("speedup", round(dense_ms / sparse_ms, 3))
