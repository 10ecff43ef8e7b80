"""nmfx.prune on bad input: a clear error naming the value and the fix, the model unchanged."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import nmfx
from nmfx.prune import CalibrationError, prune


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16), nn.Linear(16, 4))


def _unchanged(model: nn.Module, before: dict) -> bool:
    return all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_calibrated_methods_need_calibration(method: str) -> None:
    model = _model()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(
        ValueError, match=f"method='{method}' needs calibration data: pass calibration="
    ):
        prune(model, "2:4", method)
    assert _unchanged(model, before)


def test_a_batch_that_does_not_run_names_its_index_and_changes_nothing() -> None:
    model = _model()
    before = copy.deepcopy(model.state_dict())
    bad = [torch.randn(4, 16), torch.randn(4, 15)]
    with pytest.raises(
        CalibrationError, match=r"calibration batch 1 does not run through the model: RuntimeError"
    ) as info:
        prune(model, "2:4", "sparsegpt", calibration=bad, progress=False)
    assert isinstance(info.value.__cause__, RuntimeError)  # the model's own error
    assert _unchanged(model, before)
    assert nmfx.model_state.get_prune_summary(model) is None


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"method": "wandaa", "calibration": [torch.randn(2, 16)]},
            ValueError,
            "did you mean 'wanda'",
        ),
        ({"blocksz": 64}, TypeError, "unknown prune option 'blocksz'; did you mean 'blocksize'"),
        (
            {"nsamples": 0, "calibration": [torch.randn(2, 16)]},
            ValueError,
            "nsamples=0 must be an int >= 1",
        ),
        ({"pattern": "4:2"}, ValueError, "pattern 4:2 is invalid"),
        (
            {"calibration": torch.randn(2, 16)},
            TypeError,
            r"wrap a single batch in a list: calibration=\[x\]",
        ),
        ({"calibration": [], "method": "wanda"}, ValueError, "calibration is empty"),
        ({"permute": True}, ValueError, "permute=True needs an example input"),
        ({"exclude": ["*"]}, ValueError, "no layer of the model can be made N:M"),
    ],
    ids=["method", "option", "nsamples", "pattern", "tensor", "empty", "permute", "nothing"],
)
def test_bad_options_raise_before_anything_changes(kwargs: dict, error: type, match: str) -> None:
    model = _model()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(error, match=match):
        prune(model, **{"progress": False, **kwargs})
    assert _unchanged(model, before)


def test_sparsified_model_is_refused() -> None:
    model = nmfx.sparsify(_model())
    with pytest.raises(ValueError, match="already sparsified"):
        prune(model, "2:4")


def test_sparsify_init_without_calibration_names_the_method() -> None:
    model = _model()
    with pytest.raises(ValueError, match="method='sparsegpt' needs calibration data"):
        nmfx.sparsify(model, init="sparsegpt")
    assert not nmfx.is_sparsified(model)
