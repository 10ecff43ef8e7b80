"""GPU tier for target 'cuda': real semi-structured conversion on an sm80+ GPU, outputs
against the dense masked reference, and measured dense vs sparse time per layer.

Skipped with a reason where no suitable GPU is present (the CPU tier covers the decisions).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import model_zoo
from nmfx.lowering.cuda import lower_cuda
from nmfx.lowering.cuda_dispatch import RowDispatchLinear
from nmfx.masks import nm_mask
from nmfx.pattern import parse_pattern
from nmfx.plan import NMWeight


def _sm80() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not _sm80(), reason="needs an NVIDIA GPU (sm80+)"),
]

SUBCLASS = {
    "cutlass": torch.sparse.SparseSemiStructuredTensorCUTLASS,
    "cusparselt": torch.sparse.SparseSemiStructuredTensorCUSPARSELT,
}
BACKENDS = [
    "cutlass",
    pytest.param(
        "cusparselt",
        marks=pytest.mark.skipif(
            not torch.backends.cusparselt.is_available(), reason="torch built without cuSPARSELt"
        ),
    ),
]
# Sparse tensor-core GEMMs accumulate in a different order than dense cuBLAS: compare outputs
# by relative error of the whole tensor, not elementwise at the dense fp16 tolerance.
MAX_REL_ERR = {torch.float16: 1e-2, torch.bfloat16: 3e-2}


def sparse_mlp(hidden: int = 1024) -> tuple[nn.Module, dict[str, NMWeight]]:
    """The zoo MLP with every Linear masked 2:4 (the 10-way head then fails on shape)."""
    model = model_zoo.build("mlp", hidden=hidden, depth=2)
    record = {}
    for name, layer in model.named_modules():
        if isinstance(layer, nn.Linear):
            with torch.no_grad():
                layer.weight.mul_(nm_mask(layer.weight, "2:4", 1))
            record[f"{name}.weight"] = NMWeight(
                f"{name}.weight", name, "linear", parse_pattern("2:4"), 1
            )
    return model, record


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_lowered_model_matches_dense_masked_reference(backend, dtype):
    model, record = sparse_mlp()
    model = model.cuda().eval()
    reference = copy.deepcopy(model).to(dtype)
    x = torch.randn(256, 64, device="cuda", dtype=dtype)

    lowered, decisions = lower_cuda(
        model, record, backend=backend, cast_dtype=dtype, measure=False
    )

    verdicts = {d.param: d.verdict for d in decisions}
    assert verdicts == {
        "layers.0.weight": "sparse",
        "layers.2.weight": "sparse",
        "head.weight": "dense",  # 10 rows
    }
    assert isinstance(lowered.layers[0].weight, SUBCLASS[backend])
    assert type(lowered.head.weight) is nn.Parameter
    with torch.no_grad():
        assert rel_err(lowered(x), reference(x)) < MAX_REL_ERR[dtype]


@pytest.mark.parametrize("backend", BACKENDS)
def test_lowered_model_runs_under_torch_compile(backend):
    model, record = sparse_mlp()
    model = model.cuda().eval()
    reference = copy.deepcopy(model).half()
    lowered, _ = lower_cuda(model, record, backend=backend, cast_dtype=torch.half, measure=False)
    x = torch.randn(128, 64, device="cuda", dtype=torch.half)
    with torch.no_grad():
        assert rel_err(torch.compile(lowered)(x), reference(x)) < MAX_REL_ERR[torch.half]


@pytest.mark.parametrize("backend", BACKENDS)
def test_dry_run_on_gpu_predicts_the_real_conversion(backend):
    model, record = sparse_mlp()
    model = model.cuda()
    _, planned = lower_cuda(model, record, backend=backend, cast_dtype=torch.half, dry_run=True)
    _, done = lower_cuda(model, record, backend=backend, cast_dtype=torch.half, measure=False)
    assert [d.verdict for d in planned] == [d.verdict for d in done]


@pytest.mark.parametrize("backend", BACKENDS)
def test_measured_verdicts_follow_the_timings(backend, record_property):
    """Decode-sized inputs are expected to lose (0.11x in a public report) and prefill-sized ones
    may win. Whatever wins here, each rows bucket's choice must follow its measured figures, and
    the lowered layer must compute what the dense one does."""
    layer = nn.Linear(4096, 4096, bias=False)
    with torch.no_grad():
        layer.weight.mul_(nm_mask(layer.weight, "2:4", 1))
    model = nn.Sequential(layer).cuda()
    reference = copy.deepcopy(model).half()
    record = {"0.weight": NMWeight("0.weight", "0", "linear", parse_pattern("2:4"), 1)}
    rows = (1, 16, 4096)

    _, (d,) = lower_cuda(model, record, backend=backend, cast_dtype=torch.half, rows=rows)

    timings = d.facts["rows"]
    assert sorted(timings) == list(rows)
    wins = [r for r in rows if timings[r]["speedup"] >= 1.0]
    assert d.facts["sparse_rows"] == wins, d.reason
    assert (d.verdict == "sparse") == bool(wins), d.reason
    lowered = model[0]
    if wins and len(wins) < len(rows):
        assert isinstance(lowered, RowDispatchLinear)
        assert type(lowered.weight) is nn.Parameter
        assert isinstance(lowered.weight_sparse, SUBCLASS[backend])
    else:
        assert isinstance(lowered.weight, SUBCLASS[backend]) == bool(wins)
    with torch.no_grad():
        for r in rows:
            x = torch.randn(r, 4096, device="cuda", dtype=torch.half)
            assert rel_err(model(x), reference(x)) < MAX_REL_ERR[torch.half], r
    for r in rows:
        record_property(f"speedup_rows{r}", round(timings[r]["speedup"], 3))


@pytest.mark.parametrize("backend", BACKENDS)
def test_nmfx_lower_cuda_end_to_end_on_the_zoo_llama(backend):
    """The public entry point on a traced model: detection, cast, per-bucket measurement."""
    import nmfx

    model = model_zoo.build("llama", dim=256, hidden_dim=704, n_layers=1, n_heads=4).eval()
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, nn.Linear) and name != "output":
                mod.weight.mul_(nm_mask(mod.weight, "2:4", 1))
    model = model.cuda()
    ids = model_zoo.example_input("llama", batch=2, model=model).cuda()
    reference = copy.deepcopy(model).half()
    lowered = nmfx.lower(model, "cuda", cast_dtype=torch.half, backend=backend, example_inputs=(ids,))
    decisions = nmfx.lowering_decisions(lowered)
    assert len(decisions) == 7 and all(d.reason for d in decisions)
    with torch.no_grad():
        assert rel_err(lowered(ids), reference(ids)) < MAX_REL_ERR[torch.half]


@pytest.mark.parametrize("backend", BACKENDS)
def test_row_dispatch_linear_runs_each_bucket_on_its_kernel(backend, monkeypatch):
    """Both weights of a per-call layer compute the dense result; which one runs follows the
    call's rows bucket (sparse only for the 4096 bucket here)."""
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    layer = nn.Linear(1024, 1024).cuda().half()
    with torch.no_grad():
        layer.weight.mul_(nm_mask(layer.weight, "2:4", 1))
    reference = copy.deepcopy(layer)
    monkeypatch.setattr(SparseSemiStructuredTensor, "_FORCE_CUTLASS", backend == "cutlass")
    sparse_w = to_sparse_semi_structured(layer.weight.detach())
    RowDispatchLinear.convert(layer, sparse_w, buckets=(16, 4096), sparse_buckets=[4096])
    with torch.no_grad():
        for rows, sparse in [(1, False), (16, False), (17, True), (1024, True)]:
            assert layer.uses_sparse(rows) is sparse
            x = torch.randn(rows, 1024, device="cuda", dtype=torch.half)
            assert rel_err(layer(x), reference(x)) < MAX_REL_ERR[torch.half], rows
