"""CUDA lowering on CPU: shape/dtype constraints against torch's own table and validator,
per-layer decisions (dry run), the conversion/measurement logic with the GPU calls faked,
and the CUTLASS metadata layout round trip (torch's reference conversion runs on CPU)."""

from __future__ import annotations

import inspect
import itertools
import re
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import model_zoo
import nmfx
from nmfx.lowering import cuda, cuda_dispatch
from nmfx.lowering.cuda import (
    FALLBACK_SHAPE_CONSTRAINTS,
    cutlass_layout_roundtrip,
    implies_2_4,
    lower_cuda,
    semi_structured_constraint,
    shape_constraints,
)
from nmfx.lowering.cuda_dispatch import ROW_BUCKETS, row_bucket
from nmfx.masks import is_nm, nm_mask
from nmfx.pattern import parse_pattern
from nmfx.plan import NMWeight

HALF, BF16, INT8, FP32 = torch.float16, torch.bfloat16, torch.int8, torch.float32
SUBCLASS = {
    "cutlass": torch.sparse.SparseSemiStructuredTensorCUTLASS,
    "cusparselt": torch.sparse.SparseSemiStructuredTensorCUSPARSELT,
}


def masked(layer: nn.Module, pattern: str = "2:4", dim: int = 1) -> nn.Module:
    with torch.no_grad():
        layer.weight.mul_(nm_mask(layer.weight, pattern, dim))
    return layer


def record(fqn: str, pattern: str = "2:4", op: str = "linear", dim: int = 1) -> NMWeight:
    return NMWeight(fqn, fqn.rpartition(".")[0], op, parse_pattern(pattern), dim)


# ---- constraints --------------------------------------------------------------------------

CONSTRAINT_CASES = [
    pytest.param("cutlass", HALF, (32, 64), None, id="cutlass-fp16-min"),
    pytest.param("cutlass", BF16, (4096, 11008), None, id="cutlass-bf16-llama-mlp"),
    pytest.param("cutlass", HALF, (16, 64), "out_features=16 fails", id="cutlass-fp16-rows<32"),
    pytest.param("cutlass", HALF, (32, 96), "in_features=96 fails", id="cutlass-fp16-cols%64"),
    pytest.param("cutlass", HALF, (48, 48), "backend='cusparselt' accepts", id="cutlass-48-hint"),
    pytest.param("cutlass", INT8, (16, 128), None, id="cutlass-int8-min"),
    pytest.param("cutlass", INT8, (16, 64), r"\(16, 128\)", id="cutlass-int8-cols"),
    pytest.param("cusparselt", HALF, (16, 16), None, id="cusparselt-fp16-min"),
    pytest.param("cusparselt", BF16, (8, 16), "out_features=8 fails", id="cusparselt-bf16-rows"),
    pytest.param("cusparselt", INT8, (32, 32), None, id="cusparselt-int8-min"),
    pytest.param(
        "cusparselt",
        INT8,
        (16, 48),
        "out_features=16 and in_features=48 fail",
        id="cusparselt-int8-both",
    ),
    pytest.param("cutlass", FP32, (64, 64), r"cast_dtype=torch\.float16", id="cutlass-fp32"),
    pytest.param("cusparselt", FP32, (64, 64), "needs fp16/bf16", id="cusparselt-fp32"),
    pytest.param("cutlass", torch.float64, (64, 64), "no 2:4 CUTLASS kernel", id="fp64"),
    pytest.param("cutlass", HALF, (16, 8, 3, 3), "2-D", id="conv-weight-4d"),
]


@pytest.mark.parametrize("backend,dtype,shape,expected", CONSTRAINT_CASES)
def test_semi_structured_constraint(backend, dtype, shape, expected):
    reason = semi_structured_constraint(shape, dtype, backend)
    if expected is None:
        assert reason is None
    else:
        assert reason is not None and re.search(expected, reason), reason


def test_unknown_backend_names_the_close_match():
    with pytest.raises(ValueError, match="did you mean 'cutlass'"):
        semi_structured_constraint((64, 64), HALF, "cutlas")


@pytest.mark.parametrize("backend", ["cutlass", "cusparselt"])
def test_design_numbers_agree_with_torch_table(backend):
    """The fallback (rows, cols) are what torch's own _DTYPE_SHAPE_CONSTRAINTS says."""
    table = SUBCLASS[backend]._DTYPE_SHAPE_CONSTRAINTS
    for dtype, expected in FALLBACK_SHAPE_CONSTRAINTS[backend].items():
        assert dtype in table, f"torch's {backend} table lost {dtype}"
        assert (table[dtype].sparse_min_rows, table[dtype].sparse_min_cols) == expected
    assert shape_constraints(backend) == FALLBACK_SHAPE_CONSTRAINTS[backend]


def test_torch_lists_fp32_only_for_cutlass_as_1_2():
    """torch's CUTLASS table has a float32 entry (the 1:2 TF32 path); nmfx still refuses fp32
    because a 2:4 weight is not 1:2."""
    assert FP32 in SUBCLASS["cutlass"]._DTYPE_SHAPE_CONSTRAINTS
    assert FP32 not in SUBCLASS["cusparselt"]._DTYPE_SHAPE_CONSTRAINTS
    assert "1:2" in semi_structured_constraint((64, 64), FP32, "cutlass")


def _torch_accepts(backend: str, shape: tuple[int, int], dtype: torch.dtype) -> bool:
    """Run torch's own validator on a stand-in that passes its device/contiguity checks."""
    fake = SimpleNamespace(
        is_cuda=True,
        device="cuda",
        dtype=dtype,
        shape=torch.Size(shape),
        dim=lambda: len(shape),
        is_contiguous=lambda: True,
    )
    try:
        SUBCLASS[backend]._validate_device_dim_dtype_shape(fake)
    except RuntimeError:
        return False
    return True


@pytest.mark.parametrize("backend", ["cutlass", "cusparselt"])
@pytest.mark.parametrize("dtype", [HALF, BF16, INT8], ids=str)
def test_constraint_matches_torch_validator_on_a_grid(backend, dtype):
    sizes = [8, 16, 24, 32, 48, 64, 96, 128, 192, 256]
    for shape in itertools.product(sizes, sizes):
        ours = semi_structured_constraint(shape, dtype, backend) is None
        assert ours == _torch_accepts(backend, shape, dtype), (backend, dtype, shape)


@pytest.mark.parametrize(
    "pattern,expected",
    [
        ("2:4", True),
        ("1:4", True),
        ("1:2", True),
        ("2:8", True),
        ("1:8", True),
        ("2:16", True),
        ("4:8", False),
        ("3:4", False),
        ("3:8", False),
        ("1:3", False),
    ],
    ids=str,
)
def test_implies_2_4(pattern, expected):
    assert implies_2_4(parse_pattern(pattern)) is expected


@pytest.mark.parametrize("pattern", ["2:4", "1:4", "1:2", "2:8", "1:8"])
def test_implies_2_4_holds_on_masked_weights(pattern):
    w = torch.randn(32, 64)
    assert is_nm(w * nm_mask(w, pattern, 1), "2:4", 1)


# ---- dry-run decisions --------------------------------------------------------------------


class Net(nn.Module):
    """One layer per decision rule."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = masked(nn.Linear(64, 128))
        self.fc2 = masked(nn.Linear(128, 64))
        self.one4 = masked(nn.Linear(64, 64), "1:4")
        self.odd = masked(nn.Linear(64, 30))
        self.narrow = masked(nn.Linear(48, 64))
        self.four8 = masked(nn.Linear(64, 64), "4:8")
        self.unmasked = nn.Linear(64, 64)
        self.conv = masked(nn.Conv2d(8, 16, 3))
        self.attn = nn.MultiheadAttention(64, 4)
        masked(self.attn.out_proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc2(torch.relu(self.fc1(x)))
        return self.odd(self.one4(h))


NET_RECORD = {
    "fc1.weight": record("fc1.weight"),
    "fc2.weight": record("fc2.weight"),
    "one4.weight": record("one4.weight", "1:4"),
    "odd.weight": record("odd.weight"),
    "narrow.weight": record("narrow.weight"),
    "four8.weight": record("four8.weight", "4:8"),
    "unmasked.weight": record("unmasked.weight"),
    "conv.weight": record("conv.weight", op="conv2d"),
    "attn.out_proj.weight": record("attn.out_proj.weight"),
}


def decide(model: nn.Module, **kw) -> dict[str, object]:
    _, decisions = lower_cuda(model, NET_RECORD, dry_run=True, **kw)
    assert [d.param for d in decisions] == list(NET_RECORD)
    assert all(d.target == "cuda" for d in decisions)
    return {d.param.removesuffix(".weight"): d for d in decisions}


def test_dry_run_fp32_without_cast_keeps_every_linear_dense():
    by = decide(Net())
    assert not [n for n, d in by.items() if d.verdict == "sparse"]
    for name in ("fc1", "fc2", "one4"):
        assert "cast_dtype=torch.float16" in by[name].reason


@pytest.mark.parametrize("cast", [HALF, BF16], ids=str)
def test_dry_run_with_cast_decides_each_rule(cast):
    model = Net()
    before = {n: p for n, p in model.named_parameters()}
    by = decide(model, cast_dtype=cast)
    assert sorted(n for n, d in by.items() if d.verdict == "sparse") == ["fc1", "fc2", "one4"]
    assert by["fc1"].facts == {"cast": f"float32 -> {str(cast)[6:]}", "dry_run": True}
    assert "dry run" in by["fc1"].reason
    assert "out_features=30 fails" in by["odd"].reason
    assert "in_features=48 fails" in by["narrow"].reason
    assert "4:8 does not imply 2:4" in by["four8"].reason
    assert "values are not 2:4" in by["unmasked"].reason
    assert "only nn.Linear lowers to semi-structured sparse" in by["conv"].reason
    assert "MultiheadAttention" in by["attn.out_proj"].reason
    # a dry run changes nothing
    after = dict(model.named_parameters())
    assert all(after[n] is p and p.dtype == FP32 for n, p in before.items())


def test_dry_run_cusparselt_accepts_narrower_shapes():
    by = decide(Net(), cast_dtype=HALF, backend="cusparselt")
    assert by["narrow"].verdict == "sparse"  # 48 = 3 * 16
    assert by["odd"].verdict == "dense"  # 30 rows: not a multiple of 16 either
    assert "cuSPARSELt" in by["narrow"].reason


def test_tied_weight_stays_dense():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = masked(nn.Linear(64, 64)).half()
            self.b = nn.Linear(64, 64).half()
            self.b.weight = self.a.weight

    _, (d,) = lower_cuda(Tied(), {"a.weight": record("a.weight")}, dry_run=True)
    assert d.verdict == "dense" and "shared with b" in d.reason


def test_zoo_mlp_head_stays_dense_by_shape():
    model = model_zoo.build("mlp", hidden=128, depth=2)
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    for layer in layers:
        masked(layer)
    names = [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    _, decisions = lower_cuda(model, {n: record(n) for n in names}, cast_dtype=HALF, dry_run=True)
    verdicts = {d.param: d.verdict for d in decisions}
    assert verdicts == {
        "layers.0.weight": "sparse",  # [128, 64]
        "layers.2.weight": "sparse",  # [128, 128]
        "head.weight": "dense",  # [10, 128]: 10 rows
    }


def test_errors_name_the_value_and_the_fix():
    model = Net()
    with pytest.raises(ValueError, match=r"did you mean 'fc1\.weight'"):
        lower_cuda(model, {"fc1.wieght": record("fc1.wieght")}, dry_run=True)
    with pytest.raises(ValueError, match=r"cast_dtype=torch\.int8"):
        lower_cuda(model, NET_RECORD, cast_dtype=INT8, dry_run=True)
    with pytest.raises(ValueError, match="min_speedup=0"):
        lower_cuda(model, NET_RECORD, min_speedup=0, dry_run=True)
    with pytest.raises(ValueError, match="did you mean 'cusparselt'"):
        lower_cuda(model, NET_RECORD, backend="cusparse", dry_run=True)
    with pytest.raises(ValueError, match=r"rows=\(0, 4\) must be .*positive ints"):
        lower_cuda(model, NET_RECORD, rows=(0, 4), dry_run=True)
    with pytest.raises(TypeError, match="keep_dense='yes' must be True or False"):
        lower_cuda(model, NET_RECORD, keep_dense="yes", dry_run=True)


def test_unknown_option_lists_the_cuda_options():
    """Issue 13 item 17: a raw TypeError from the signature before; now the option list."""
    model = nn.Sequential(masked(nn.Linear(64, 64)))
    with pytest.raises(TypeError, match=r"no option 'bogus'; its options are backend, cast_dtype"):
        nmfx.lower(model, "cuda", bogus=1)
    with pytest.raises(TypeError, match=r"did you mean 'cast_dtype'"):
        nmfx.lower(model, "cuda", cast_dtyp=HALF)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
@pytest.mark.parametrize("cast", [None, HALF], ids=["fp32", "fp16"])
def test_no_cuda_device_is_the_error_not_a_dtype_reason(cast):
    """Issue 13 item 17: without CUDA, every layer came back dense with an fp32 reason."""
    model = nn.Sequential(masked(nn.Linear(64, 64)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kw = {} if cast is None else {"cast_dtype": cast}
    with pytest.raises(RuntimeError, match=r"no CUDA device .*dry_run=True"):
        nmfx.lower(model, "cuda", inplace=True, **kw)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) and after[k].dtype == FP32 for k in before)


def test_weights_on_cpu_with_cuda_present_say_move_the_model(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(RuntimeError, match=r"on cpu: .*model\.cuda\(\).*dry_run=True"):
        lower_cuda(Net(), NET_RECORD, cast_dtype=HALF)


def test_all_fp32_points_to_cast_dtype(fake_gpu, caplog):
    net, rec = small_net()
    _, decisions = lower_cuda(net, rec)
    assert all(d.verdict == "dense" and "cast_dtype=torch.float16" in d.reason for d in decisions)
    assert "pass cast_dtype=torch.float16" in caplog.text


# ---- conversion and measurement logic, GPU calls faked ------------------------------------


@pytest.fixture
def fake_gpu(monkeypatch):
    """Pretend conversion and timing work on CPU: conversion returns a copy of the dense weight
    and records _FORCE_CUTLASS; the timer returns ``state.times[(kind, rows)]`` (kind "dense"
    or "sparse"), else ``state.default[kind]``, and counts calls in ``state.timed``."""
    state = SimpleNamespace(
        times={}, default={"dense": 1.0, "sparse": 2.0}, forced=[], fail=set(), timed=[]
    )

    def fake_convert(w):
        state.forced.append(torch.sparse.SparseSemiStructuredTensor._FORCE_CUTLASS)
        if w.shape in state.fail:
            raise RuntimeError("CUDA error: misaligned address")
        return FakeSparse(w)

    def fake_timer(fn):
        out = fn()
        kind = "sparse" if out.sparse else "dense"
        state.timed.append((kind, out.rows, out.shape[-1]))
        return state.times.get((kind, out.rows), state.default[kind])

    monkeypatch.setattr(torch.sparse, "to_sparse_semi_structured", fake_convert)
    monkeypatch.setattr(cuda, "_check_device", lambda weights, backend: None)
    monkeypatch.setattr(cuda, "_time_ms", fake_timer)
    monkeypatch.setattr(cuda_dispatch.F, "linear", tagged_linear)
    return state


class FakeSparse(torch.Tensor):
    """A dense tensor tagged as the 'semi-structured' weight, so tests see which one ran."""

    @staticmethod
    def __new__(cls, w: torch.Tensor) -> FakeSparse:
        return torch.Tensor._make_subclass(cls, w.detach().clone())


_REAL_LINEAR = torch.nn.functional.linear


def tagged_linear(x, w, b=None):
    """F.linear that tags its output with the weight kind and the rows of x."""
    out = _REAL_LINEAR(x.as_subclass(torch.Tensor), w.as_subclass(torch.Tensor), b)
    out.sparse = isinstance(w, FakeSparse)
    out.rows = x.numel() // x.shape[-1]
    return out


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = masked(nn.Linear(64, 128))
        self.fc2 = masked(nn.Linear(128, 64))
        self.unused = masked(nn.Linear(64, 64))  # registered, never called by forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def small_net() -> tuple[Small, dict[str, NMWeight]]:
    return Small(), {n: record(n) for n in ("fc1.weight", "fc2.weight")}


def one_layer(out: int = 128, inp: int = 64) -> tuple[nn.Module, dict[str, NMWeight]]:
    return nn.Sequential(masked(nn.Linear(inp, out))), {"0.weight": record("0.weight")}


def test_sparse_at_every_bucket_converts_the_weight(fake_gpu):
    fake_gpu.default = {"dense": 2.0, "sparse": 1.0}
    net, rec = one_layer()
    _, (d,) = lower_cuda(net, rec, cast_dtype=BF16, rows=(1, 16, 256))
    assert d.verdict == "sparse" and "measured sparse at rows 1-256 (2.00x)" in d.reason
    assert type(net[0]) is nn.Linear and isinstance(net[0].weight, FakeSparse)
    assert not net[0].weight.requires_grad
    assert d.facts["sparse_rows"] == [1, 16, 256]
    assert d.facts["rows"][16] == {"dense_ms": 2.0, "sparse_ms": 1.0, "speedup": 2.0}
    assert d.facts["cast"] == "float32 -> bfloat16"


def test_slower_at_every_bucket_stays_dense(fake_gpu):
    net, rec = one_layer()
    old = net[0].weight
    _, (d,) = lower_cuda(net, rec, cast_dtype=BF16, rows=(1, 4096), min_speedup=1.1)
    assert d.verdict == "dense"
    assert "slower sparse at every rows bucket: dense at rows 1-4096 (sparse 0.50x)" in d.reason
    assert "min_speedup=1.1" in d.reason
    assert net[0].weight is old and old.dtype == BF16 and type(net[0]) is nn.Linear


def test_mixed_buckets_dispatch_per_call(fake_gpu):
    """Decode loses, prefill wins: both weights kept, each call runs its bucket's winner."""
    fake_gpu.times = {("sparse", 256): 0.5, ("sparse", 4096): 0.5}  # dense 1.0 everywhere
    net, rec = one_layer()
    x = torch.randn(2, 3, 64)
    _, (d,) = lower_cuda(net, rec, cast_dtype=BF16, example_inputs=(x,), rows=(1, 16, 256, 4096))
    layer = net[0]
    assert isinstance(layer, cuda_dispatch.RowDispatchLinear) and isinstance(layer, nn.Linear)
    assert d.verdict == "sparse"
    assert "per call: sparse at rows 256-4096 (2.00x), dense at rows 1-16 (sparse 0.50x)" in (
        d.reason
    )
    assert "the example input (6 rows) runs dense" in d.reason
    assert d.facts["example_rows_path"] == "dense" and d.facts["input_shape"] == (2, 3, 64)
    assert type(layer.weight) is nn.Parameter and isinstance(layer.weight_sparse, FakeSparse)
    for rows, sparse in [(1, False), (16, False), (17, True), (300, True), (10_000, True)]:
        out = layer(torch.randn(rows, 64, dtype=BF16))
        assert out.sparse is sparse, rows
    assert "sparse_rows_buckets=[256, 4096]" in repr(layer)


def test_mixed_buckets_with_keep_dense_false_stay_dense(fake_gpu):
    fake_gpu.times = {("sparse", 4096): 0.5}
    net, rec = one_layer()
    _, (d,) = lower_cuda(net, rec, cast_dtype=HALF, keep_dense=False, rows=(1, 4096))
    assert d.verdict == "dense" and "keep_dense=False keeps such layers dense" in d.reason
    assert type(net[0]) is nn.Linear and type(net[0].weight) is nn.Parameter


def test_layers_of_one_shape_share_their_timings(fake_gpu):
    net = nn.Sequential(*(masked(nn.Linear(64, 64)) for _ in range(3)), masked(nn.Linear(64, 128)))
    rec = {f"{i}.weight": record(f"{i}.weight") for i in range(4)}
    lower_cuda(net, rec, cast_dtype=HALF, rows=(1, 64))
    # 2 shapes (out 64, out 128) x 2 buckets x (dense, sparse), not 4 layers' worth
    assert sorted(fake_gpu.timed) == sorted(
        (k, r, out) for k in ("dense", "sparse") for r in (1, 64) for out in (64, 128)
    )


def test_default_buckets_cover_decode_and_prefill(fake_gpu):
    net, rec = one_layer()
    _, (d,) = lower_cuda(net, rec, cast_dtype=HALF)
    assert sorted(d.facts["rows"]) == list(ROW_BUCKETS)
    assert {1, 16} <= set(ROW_BUCKETS) and {256, 4096} <= set(ROW_BUCKETS)


@pytest.mark.parametrize(
    "rows,bucket", [(0, 1), (1, 1), (2, 4), (16, 16), (17, 64), (4096, 4096), (10**6, 4096)]
)
def test_row_bucket(rows, bucket):
    assert row_bucket(rows) == bucket


@pytest.mark.parametrize("backend,forced", [("cutlass", True), ("cusparselt", False)])
def test_backend_sets_force_cutlass_only_during_conversion(fake_gpu, backend, forced):
    net, rec = small_net()
    before = torch.sparse.SparseSemiStructuredTensor._FORCE_CUTLASS
    lower_cuda(net, rec, backend=backend, cast_dtype=HALF, measure=False)
    assert fake_gpu.forced == [forced, forced]
    assert before == torch.sparse.SparseSemiStructuredTensor._FORCE_CUTLASS


def test_unmeasured_conversion_says_so(fake_gpu):
    net, rec = small_net()
    _, decisions = lower_cuda(net, rec, cast_dtype=BF16, measure=False)
    assert all(d.verdict == "sparse" and "not measured" in d.reason for d in decisions)
    assert not fake_gpu.timed


def test_failed_conversion_keeps_layer_dense(fake_gpu):
    net, rec = small_net()
    fake_gpu.fail = {torch.Size([64, 128])}
    _, (d0, d2) = lower_cuda(net, rec, cast_dtype=BF16, measure=False)
    assert d0.verdict == "sparse"
    assert d2.verdict == "dense" and "misaligned address" in d2.reason


# ---- CUTLASS layout -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [HALF, BF16, INT8], ids=str)
@pytest.mark.parametrize("pattern", ["2:4", "1:4"])
def test_cutlass_layout_roundtrip_is_exact_on_cpu(dtype, pattern):
    src = torch.randn(64, 256) * 20
    w = (src * nm_mask(src, pattern, 1)).to(dtype)
    values, meta = cutlass_layout_roundtrip(w)
    bits = 32 if dtype == INT8 else 16
    assert values.shape == (64, 128) and values.dtype == dtype
    assert meta.shape == (64, 256 // bits) and meta.dtype == getattr(torch, f"int{bits}")


def test_cutlass_values_are_the_kept_weights_in_order():
    """With exactly two non-zeros per group, values hold them group by group, in index order
    (the metadata's reordering is CUTLASS's; the values are plain row-major)."""
    src = torch.randn(32, 64).half()
    w = torch.where(nm_mask(src, "2:4", 1), src.clamp(min=0.5) + 0.5, 0.0).half()
    values, _ = cutlass_layout_roundtrip(w)
    assert torch.equal(values, w[w != 0].view(32, 32))


def test_cutlass_roundtrip_is_the_code_torch_runs_on_gpu():
    src = inspect.getsource(torch.sparse.SparseSemiStructuredTensorCUTLASS.from_dense)
    assert "sparse_semi_structured_from_dense_cutlass(original_tensor)" in src


@pytest.mark.parametrize(
    "w,match",
    [
        (torch.zeros(64, 64), "1:2"),  # fp32 is CUTLASS's 1:2 (TF32) encoding
        (torch.ones(64, 64).half(), "not 2:4"),
        (torch.zeros(16, 64).half(), "out_features=16"),
        (torch.zeros(2, 64, 64).half(), "2-D"),
    ],
    ids=["fp32", "dense", "rows", "3d"],
)
def test_cutlass_roundtrip_rejects(w, match):
    with pytest.raises(ValueError, match=match):
        cutlass_layout_roundtrip(w)
