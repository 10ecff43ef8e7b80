"""Every registered model builds, runs, traces whole with torch.fx and matches eager output."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.fx
from tolerances import tol
from torch import nn

import model_zoo
from model_zoo.gpt2 import Conv1D

NAMES = list(model_zoo.MODELS)
DECODERS = {"gpt2", "llama"}
# Layers whose reduction dim is not a multiple of 32 by design: 1- or 3-channel stems.
DENSE_STEMS = {
    "mlp": set(),
    "small_cnn": {"stem.0"},
    "resnet18": {"conv1"},
    "resnet50": {"conv1"},
    "vit_tiny": {"patch_embed"},
    "vit_small": {"patch_embed"},
    "gpt2": set(),
    "llama": set(),
}


@functools.cache
def _built(name: str) -> nn.Module:
    """The default model, built once per session from seed 0; tests must not mutate it."""
    torch.manual_seed(0)
    return model_zoo.build(name).eval()


def _expected_shape(name: str, model: nn.Module, batch: int) -> tuple[int, ...]:
    cfg = model.config
    if name in DECODERS:
        return (batch, model_zoo.SEQ_LEN, cfg.vocab_size)
    return (batch, cfg.num_classes)


def _reduction_dims(model: nn.Module) -> dict[str, int]:
    """fqn -> the dim an N:M mask groups over, for every weight-bearing matmul/conv."""
    dims = {}
    for fqn, m in model.named_modules():
        if isinstance(m, nn.Linear):
            dims[fqn] = m.in_features
        elif isinstance(m, nn.Conv2d):
            kh, kw = m.kernel_size
            dims[fqn] = m.in_channels // m.groups * kh * kw
        elif isinstance(m, Conv1D):
            dims[fqn] = m.weight.shape[0]
        elif isinstance(m, nn.MultiheadAttention):
            dims[f"{fqn}.in_proj"] = m.in_proj_weight.shape[1]
    return dims


def test_registry_names() -> None:
    assert NAMES == [
        "mlp", "small_cnn", "resnet18", "resnet50", "vit_tiny", "vit_small", "gpt2", "llama",
    ]  # fmt: skip


@pytest.mark.parametrize("name", NAMES, ids=NAMES)
def test_forward_shape_and_finite(name: str) -> None:
    model = _built(name)
    x = model_zoo.example_input(name, batch=3, model=model)
    with torch.no_grad():
        y = model(x)
    assert y.shape == _expected_shape(name, model, 3)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("name", NAMES, ids=NAMES)
def test_symbolic_trace_matches_eager(name: str) -> None:
    model = _built(name)
    gm = torch.fx.symbolic_trace(model)
    x = model_zoo.example_input(name, model=model)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))


@pytest.mark.parametrize(
    ("name", "overrides"),
    [
        ("vit_tiny", {"attention": "sdpa", "depth": 2}),
        ("resnet18", {"small_input": False}),
        ("resnet50", {"width": 32, "num_classes": 7}),
        ("small_cnn", {"channels": (32,)}),
    ],
    ids=["vit-sdpa", "resnet18-imagenet-stem", "resnet50-narrow", "small_cnn-one-conv"],
)
def test_variants_trace_and_match(name: str, overrides: dict[str, object]) -> None:
    torch.manual_seed(0)
    model = model_zoo.build(name, **overrides).eval()
    x = model_zoo.example_input(name, model=model)
    with torch.no_grad():
        y = model(x)
        torch.testing.assert_close(torch.fx.symbolic_trace(model)(x), y)
    assert y.shape == _expected_shape(name, model, 2)


@pytest.mark.parametrize("name", sorted(DECODERS))
def test_traced_decoder_accepts_other_lengths(name: str) -> None:
    model = _built(name)
    gm = torch.fx.symbolic_trace(model)
    x = torch.randint(0, model.config.vocab_size, (1, 40))
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))


@pytest.mark.parametrize("name", NAMES, ids=NAMES)
def test_init_is_deterministic(name: str) -> None:
    a = _built(name).state_dict()
    torch.manual_seed(0)
    b = model_zoo.build(name).state_dict()
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], **tol("exact"), msg=key)


@pytest.mark.parametrize("name", NAMES, ids=NAMES)
def test_reduction_dims_are_multiples_of_32_except_stems(name: str) -> None:
    dims = _reduction_dims(_built(name))
    odd = {fqn for fqn, k in dims.items() if k % 32}
    assert odd == DENSE_STEMS[name], dims


def test_vit_default_uses_multihead_attention() -> None:
    model = model_zoo.build("vit_tiny", depth=1)
    assert any(isinstance(m, nn.MultiheadAttention) for m in model.modules())
    assert model.patch_embed.in_channels == 3


def test_gpt2_lm_head_is_tied_to_wte() -> None:
    model = model_zoo.build("gpt2")
    assert isinstance(model.lm_head, nn.Linear) and model.lm_head.bias is None
    assert model.lm_head.weight is model.wte.weight
    gm = torch.fx.symbolic_trace(model)
    assert gm.lm_head.weight is gm.wte.weight


def test_gpt2_conv1d_matches_linear() -> None:
    conv = Conv1D(nf=64, nx=32)
    linear = nn.Linear(32, 64)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.t())
        linear.bias.copy_(conv.bias)
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(conv(x), linear(x))


def test_example_input_follows_model_config() -> None:
    gpt = model_zoo.build("gpt2", vocab_size=64, n_positions=8)
    ids = model_zoo.example_input("gpt2", batch=4, model=gpt)
    assert ids.dtype == torch.long and ids.shape == (4, 8) and int(ids.max()) < 64
    assert model_zoo.example_input("mlp").shape == (2, 64)
    assert model_zoo.example_input("small_cnn").shape == (2, 1, 8, 8)
    assert model_zoo.example_input("resnet50", batch=1).shape == (1, 3, 32, 32)
    assert model_zoo.example_input("llama").shape == (2, model_zoo.SEQ_LEN)


def test_unknown_model_name_suggests_close_match() -> None:
    with pytest.raises(ValueError, match=r"unknown model 'resnet_18'.*did you mean 'resnet18'"):
        model_zoo.build("resnet_18")
    with pytest.raises(ValueError, match="known models: mlp, small_cnn"):
        model_zoo.example_input("transformer")


def test_unknown_override_suggests_close_match() -> None:
    with pytest.raises(TypeError, match=r"no option 'num_class'.*did you mean 'num_classes'"):
        model_zoo.build("resnet18", num_class=100)


@pytest.mark.parametrize(
    ("name", "overrides", "match"),
    [
        ("resnet18", {"depth": 34}, r"depth=34 is not supported; choose one of \[18, 50\]"),
        ("vit_tiny", {"dim": 100}, "dim=100 is not a multiple of heads=3"),
        ("vit_tiny", {"attention": "flash"}, "attention='flash' is not one of"),
        ("mlp", {"depth": 0}, "depth=0 must be a positive int"),
        ("small_cnn", {"channels": (24,)}, "24 is not a multiple of 16"),
        ("llama", {"dim": 96, "n_heads": 32}, "head_dim=dim/n_heads=3 must be even"),
    ],
    ids=["resnet-depth", "vit-heads", "vit-attention", "mlp-depth", "cnn-channels", "rope-odd"],
)
def test_bad_config_raises(name: str, overrides: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        model_zoo.build(name, **overrides)
