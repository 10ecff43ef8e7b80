"""TensorRT lowering on CPU: the 2:4 layout TensorRT needs (Linear, Conv, matmul weights),
the clear ImportError without torch_tensorrt, and the exact torch_tensorrt.compile call
(checked against a stand-in module with torch_tensorrt 2.13's dynamo.compile signature)."""

from __future__ import annotations

import logging
import re
import sys
import types
from typing import Any

import pytest
import torch
from torch import nn

import model_zoo
from nmfx.lowering.tensorrt import check_tensorrt_layout, lower_tensorrt
from nmfx.masks import is_nm, nm_mask
from nmfx.pattern import parse_pattern
from nmfx.plan import NMWeight


def masked(layer: nn.Module, pattern: str = "2:4", dim: int = 1) -> nn.Module:
    with torch.no_grad():
        layer.weight.mul_(nm_mask(layer.weight, pattern, dim))
    return layer


def record(fqn: str, op: str, pattern: str = "2:4", dim: int = 1) -> NMWeight:
    return NMWeight(fqn, fqn.rpartition(".")[0], op, parse_pattern(pattern), dim)


def decide(model: nn.Module, records: list[NMWeight]) -> dict[str, Any]:
    decisions = check_tensorrt_layout(model, {r.param: r for r in records})
    assert all(d.target == "tensorrt" for d in decisions)
    return {d.name: d for d in decisions}


class XW(nn.Module):
    """``x @ W`` with ``W [in, out]`` (GPT-2's Conv1D): K runs along weight dim 0."""

    def __init__(self, k: int, n: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(k, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight


def flattened_2_4(conv: nn.Conv2d) -> nn.Conv2d:
    """Mask 2:4 along the flattened (in*kh*kw) dim, as the SR-STE paper's first code did."""
    with torch.no_grad():
        flat = conv.weight.reshape(conv.out_channels, -1)
        conv.weight.copy_((flat * nm_mask(flat, "2:4", 1)).view_as(conv.weight))
    return conv


# (layer, op, declared pattern, verdict, reason regex)
LAYOUT_CASES = [
    pytest.param(
        masked(nn.Linear(64, 32)), "linear", "2:4", "sparse", "fully connected", id="linear"
    ),
    pytest.param(
        masked(nn.Linear(64, 32), "1:4"), "linear", "1:4", "sparse", "eligib", id="linear-1:4"
    ),
    pytest.param(
        masked(nn.Linear(64, 32), "4:8"),
        "linear",
        "4:8",
        "dense",
        "4:8 does not imply 2:4",
        id="linear-4:8",
    ),
    pytest.param(
        nn.Linear(64, 32), "linear", "2:4", "dense", "values are not 2:4", id="linear-unmasked"
    ),
    pytest.param(
        masked(nn.Conv2d(16, 32, 3)), "conv2d", "2:4", "sparse", "input channels", id="conv2d"
    ),
    pytest.param(masked(nn.Conv1d(8, 8, 5)), "conv1d", "2:4", "sparse", "convolution", id="conv1d"),
    pytest.param(
        flattened_2_4(nn.Conv2d(16, 32, 3)),
        "conv2d",
        "2:4",
        "dense",
        r"flattened \(in\*kh\*kw\) dim, not along input channels",
        id="conv-flattened",
    ),
    pytest.param(
        nn.Conv2d(6, 8, 1),
        "conv2d",
        "2:4",
        "dense",
        "in_channels=6 is not a multiple of 4",
        id="conv-in6",
    ),
    pytest.param(
        nn.Conv2d(8, 8, 3, groups=2),
        "conv2d",
        "2:4",
        "dense",
        r"grouped convolution \(groups=2",
        id="conv-grouped",
    ),
    pytest.param(
        nn.Conv2d(8, 8, 3, groups=8), "conv2d", "2:4", "dense", "depthwise", id="conv-depthwise"
    ),
    pytest.param(
        masked(nn.ConvTranspose2d(8, 8, 3), dim=0),
        "conv_transpose2d",
        "2:4",
        "dense",
        "transposed convolution",
        id="deconv",
    ),
]


@pytest.mark.parametrize("layer,op,declared,verdict,reason", LAYOUT_CASES)
def test_layout_rules(layer, op, declared, verdict, reason):
    model = nn.Sequential(layer)
    (d,) = check_tensorrt_layout(model, {"0.weight": record("0.weight", op, declared)})
    assert d.verdict == verdict
    assert re.search(reason, d.reason), d.reason


def test_flattened_case_really_is_not_2_4_along_channels():
    conv = flattened_2_4(nn.Conv2d(16, 32, 3))
    assert is_nm(conv.weight.reshape(32, -1), "2:4", 1)
    assert not is_nm(conv.weight, "2:4", 1)


def test_eligible_means_eligible_not_proven_and_notes_the_cast():
    model = nn.Sequential(masked(nn.Linear(64, 32)), masked(nn.Linear(32, 16)).half())
    by = decide(model, [record("0.weight", "linear"), record("1.weight", "linear")])
    fp32, fp16 = by["0"], by["1"]
    assert "eligibility, not proof" in fp32.reason and "picked sparse implementation" in fp32.reason
    assert fp32.facts == {"cast": "float32 -> float16", "eligible": True, "proven_sparse": False}
    assert "cast float32 -> float16" in fp32.reason
    assert "cast" not in fp16.facts


def test_matmul_weight_checks_k_along_dim_0():
    model = nn.Sequential()
    model.add_module("good", masked(XW(64, 48), dim=0))
    model.add_module("wrong_dim", masked(XW(64, 48), dim=1))
    model.add_module("odd_k", XW(30, 48))
    by = decide(
        model,
        [
            record("good.weight", "matmul", dim=0),
            record("wrong_dim.weight", "matmul", dim=0),
            record("odd_k.weight", "matmul", dim=0),
        ],
    )
    assert by["good"].verdict == "sparse" and "K (weight dim 0)" in by["good"].reason
    assert by["wrong_dim"].verdict == "dense" and "not 2:4 along K" in by["wrong_dim"].reason
    assert by["odd_k"].verdict == "dense" and "K=30" in by["odd_k"].reason


def test_zoo_resnet18_stem_stays_dense_body_eligible():
    model = model_zoo.build("resnet18", width=16)
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    for conv in convs.values():
        if conv.in_channels % 4 == 0:
            masked(conv)
    by = decide(model, [record(f"{n}.weight", "conv2d") for n in convs])
    assert by["conv1"].verdict == "dense" and "in_channels=3" in by["conv1"].reason
    assert all(d.verdict == "sparse" for n, d in by.items() if n != "conv1")


def test_unknown_weight_names_the_close_match():
    with pytest.raises(ValueError, match=r"did you mean '0\.weight'"):
        check_tensorrt_layout(nn.Sequential(nn.Linear(8, 8)), {"0.wieght": record("0.w", "x")})


# ---- lower_tensorrt -----------------------------------------------------------------------


def test_missing_torch_tensorrt_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_tensorrt", None)
    model = nn.Sequential(masked(nn.Linear(64, 32)))
    with pytest.raises(ImportError, match=r"pip install 'nmfx\[tensorrt\]'.*NVIDIA GPU"):
        lower_tensorrt(model, {"0.weight": record("0.weight", "linear")}, (torch.randn(2, 64),))


def _dynamo_compile_2_13(
    exported_program: Any,
    inputs: Any = None,
    *,
    arg_inputs: Any = None,
    kwarg_inputs: Any = None,
    device: Any = None,
    sparse_weights: bool = False,
    min_block_size: int = 5,
    optimization_level: int | None = None,
    **kwargs: Any,
) -> None:
    """The shape of torch_tensorrt 2.13's dynamo.compile: no enabled_precisions, **kwargs."""


def _dynamo_compile_old(
    exported_program: Any, inputs: Any = None, *, enabled_precisions: Any = None, **kwargs: Any
) -> None:
    """An older dynamo.compile that still took enabled_precisions."""


@pytest.fixture
def fake_trt(monkeypatch):
    calls: list[dict[str, Any]] = []
    mod = types.ModuleType("torch_tensorrt")
    mod.__version__ = "2.13.0"
    mod.dynamo = types.SimpleNamespace(compile=_dynamo_compile_2_13)

    def compile(module: nn.Module, **kwargs: Any) -> str:
        calls.append({"module": module, **kwargs})
        return "engine"

    mod.compile = compile
    monkeypatch.setitem(sys.modules, "torch_tensorrt", mod)
    return types.SimpleNamespace(module=mod, calls=calls)


class TokensAndFeatures(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 64)
        self.fc = masked(nn.Linear(64, 32))

    def forward(self, ids: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        return self.fc(self.emb(ids) + feats)


def test_compile_call_is_dynamo_sparse_fp16(fake_trt, caplog):
    model = TokensAndFeatures()
    ids, feats = torch.randint(0, 10, (2, 5)), torch.randn(2, 5, 64)
    with caplog.at_level(logging.INFO, logger="nmfx.lowering"):
        out, (d,) = lower_tensorrt(
            model, {"fc.weight": record("fc.weight", "linear")}, (ids, feats), min_block_size=1
        )
    assert out == "engine"
    (call,) = fake_trt.calls
    assert call["module"] is model and call["ir"] == "dynamo" and call["sparse_weights"] is True
    assert call["enabled_precisions"] == {torch.half} and call["min_block_size"] == 1
    sent_ids, sent_feats = call["inputs"]
    assert sent_ids.dtype == torch.int64 and sent_feats.dtype == torch.float16
    assert all(p.dtype == torch.float16 for p in model.parameters())
    assert d.verdict == "sparse" and d.facts["torch_tensorrt"] == "2.13.0"
    assert "strongly typed" in caplog.text  # 2.13 ignores enabled_precisions on ir="dynamo"


def test_older_torch_tensorrt_takes_enabled_precisions(fake_trt, caplog):
    fake_trt.module.dynamo.compile = _dynamo_compile_old
    model = nn.Sequential(masked(nn.Linear(64, 32)))
    with caplog.at_level(logging.INFO, logger="nmfx.lowering"):
        lower_tensorrt(model, {"0.weight": record("0.weight", "linear")}, (torch.randn(2, 64),))
    assert fake_trt.calls[0]["enabled_precisions"] == {torch.half}
    assert "strongly typed" not in caplog.text


@pytest.mark.parametrize(
    "options,error,match",
    [
        ({"min_blok_size": 1}, TypeError, r"min_blok_size.*did you mean 'min_block_size'"),
        ({"sparse_weights": False}, TypeError, "always sets sparse_weights=True"),
        ({"ir": "torchscript"}, TypeError, "ir='dynamo'"),
        ({"inputs": []}, TypeError, "example_inputs"),
        ({"enabled_precisions": {torch.float32}}, ValueError, r"lacks torch\.half"),
    ],
    ids=["typo", "sparse_weights", "ir", "inputs", "fp32-only"],
)
def test_options_are_never_silently_dropped(fake_trt, options, error, match):
    model = nn.Sequential(masked(nn.Linear(64, 32)))
    with pytest.raises(error, match=match):
        lower_tensorrt(
            model, {"0.weight": record("0.weight", "linear")}, (torch.randn(2, 64),), **options
        )
    assert not fake_trt.calls


def test_options_read_from_kwargs_by_torch_tensorrt_pass(fake_trt):
    model = nn.Sequential(masked(nn.Linear(64, 32)))
    lower_tensorrt(
        model,
        {"0.weight": record("0.weight", "linear")},
        (torch.randn(2, 64),),
        strict=True,
        optimization_level=5,
    )
    assert fake_trt.calls[0]["strict"] is True and fake_trt.calls[0]["optimization_level"] == 5
