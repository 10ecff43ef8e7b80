"""The bad-input matrix of docs/bad_input.md: one test (or parametrized case) per row.

Every row ends in a clear error naming the value, the constraint and the fix, pinned here
with ``pytest.raises(..., match=...)``, or in a documented skip whose reason is recorded
in ``nmfx.summary`` (pinned by making that layer the model's only candidate, which turns
the skip into the "nothing was changed" error, and by reading the summary of a mixed
model). After an error the user's model is exactly as before: state_dict and every
buffer, module types, instance ``forward`` attributes, attribute names, training flags,
outputs, and no SR-STE masker left to touch its weights.
"""

from __future__ import annotations

import copy
import json
import struct
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tolerances import tol
from torch import nn

import nmfx
from nmfx.modules import live_maskers
from nmfx.packed import FORMAT_VERSION, load_packed, pack, save_packed

EQUAL = {**tol("exact"), "equal_nan": True}


def mlp(first: int = 16) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(first, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)
    )


def fingerprint(model: nn.Module, x: torch.Tensor) -> dict:
    """Everything sparsify could change on ``model``."""
    with torch.no_grad():
        out = model(x)
    modules = dict(model.named_modules())
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "buffers": {k: v.clone() for k, v in model.named_buffers()},
        "types": {n: type(m) for n, m in modules.items()},
        "forwards": {n: m.__dict__.get("forward") for n, m in modules.items()},
        "attrs": {n: sorted(m.__dict__) for n, m in modules.items()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "training": {n: m.training for n, m in modules.items()},
        "maskers": {id(m) for m in live_maskers() if any(m.owner is o for o in modules.values())},
        "output": out,
    }


def assert_unchanged(model: nn.Module, before: dict, x: torch.Tensor) -> None:
    after = fingerprint(model, x)
    for key in ("types", "forwards", "attrs", "requires_grad", "training", "maskers"):
        assert after[key] == before[key], key
    for key in ("state", "buffers"):
        assert after[key].keys() == before[key].keys(), key
        for name, value in before[key].items():
            torch.testing.assert_close(after[key][name], value, **EQUAL, msg=name)
    torch.testing.assert_close(after["output"], before["output"], **EQUAL)


def raises_unchanged(model: nn.Module, x: torch.Tensor, exc: type, match: str, **options):
    """sparsify(model, **options) raises ``exc`` matching ``match`` and changes nothing."""
    before = fingerprint(model, x)
    with pytest.raises(exc, match=match) as info:
        nmfx.sparsify(model, **options)
    assert_unchanged(model, before, x)  # while the traceback (and what it holds) is alive
    return info


def reason(model: nn.Module, layer: str) -> str:
    return next(c.reason for c in nmfx.summary(model).candidates if c.name == layer)


# ---- patterns ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "exc", "match"),
    [
        ("5:4", ValueError, r"pattern 5:4 is invalid: need 0 < N < M .*e\.g\. '2:4'"),
        ("0:4", ValueError, r"pattern 0:4 is invalid: need 0 < N < M"),
        ("4:4", ValueError, r"pattern 4:4 is invalid: need 0 < N < M"),
        ("abc", ValueError, r"pattern 'abc' is not of the form 'N:M' .*write e\.g\. '2:4'"),
        (
            (2, 4.0),
            TypeError,
            r"pattern M must be an int, got 4\.0; write e\.g\. '2:4' or \(2, 4\)",
        ),
        (2.5, TypeError, r"pattern must be a string 'N:M', a tuple \(N, M\) or an NMPattern"),
    ],
    ids=["5:4", "0:4", "4:4", "abc", "float-M", "float"],
)
def test_invalid_pattern(pattern, exc, match):
    model, x = mlp(), torch.randn(3, 16)
    raises_unchanged(model, x, exc, match, pattern=pattern)


def test_pattern_2_3_trains_but_no_kernel_takes_m_3():
    """0 < N < M is the only rule for training; M=3 then fits no layer whose reduction dim is
    not a multiple of 3, and the CPU lowering keeps M=3 layers dense with the reason."""
    model, x = mlp(), torch.randn(3, 16)
    raises_unchanged(
        model, x, ValueError, r"in_features=16 is not a multiple of M=3", pattern="2:3"
    )
    model = nn.Sequential(nn.Linear(12, 1200), nn.ReLU(), nn.Linear(1200, 120), nn.Linear(120, 4))
    nmfx.finalize(nmfx.sparsify(model, pattern="2:3"))
    decisions = nmfx.lowering_decisions(nmfx.lower(model, "cpu"))
    assert {d.verdict for d in decisions} == {"dense"}
    assert decisions[0].reason == "pattern 2:3 has M=3; the CPU kernel supports M in (4, 8, 16)"


# ---- shapes and dtypes: kept dense with the reason, or an error when nothing is left -------


def test_non_divisible_reduction_dim_is_kept_dense():
    model = nn.Sequential(nn.Linear(30, 32), nn.Linear(32, 32), nn.Linear(32, 4))
    nmfx.sparsify(model)
    assert reason(model, "0") == "in_features=30 is not a multiple of M=4; exclude it or pad it"
    only = nn.Sequential(nn.Linear(30, 32), nn.Linear(32, 4))
    raises_unchanged(
        only, torch.randn(2, 30), ValueError, r"(?s)nothing was changed.*in_features=30 is not a "
        r"multiple of M=4; exclude it or pad it",
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"size 30, which is not a multiple of M=4; exclude"):
        nmfx.nm_mask(torch.randn(4, 30), "2:4")


class IntWeight(nn.Module):
    def __init__(self, dtype: torch.dtype, with_linear: bool) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(16, 16, dtype=dtype), requires_grad=False)
        self.lin = nn.Linear(16, 16) if with_linear else None
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = (x.to(self.w.dtype) @ self.w).real.float()
        return self.head(self.lin(y) if self.lin is not None else y)


@pytest.mark.parametrize("dtype", [torch.int32, torch.complex64], ids=["int32", "complex64"])
def test_integer_and_complex_weights_are_kept_dense(dtype):
    model = nmfx.sparsify(IntWeight(dtype, with_linear=True))
    assert reason(model, "w").startswith(f"dtype {dtype} is not a floating-point weight")
    assert reason(model, "lin") == "2:4 along in_features"
    only = IntWeight(dtype, with_linear=False)
    raises_unchanged(
        only, torch.randn(2, 16), ValueError,
        rf"(?s)nothing was changed.*dtype {dtype} is not a floating-point weight; N:M needs",
    )  # fmt: skip
    with pytest.raises(TypeError, match=r"N:M masks need a floating-point weight, got dtype"):
        nmfx.nm_mask(torch.ones(4, 8, dtype=dtype), "2:4")


@pytest.mark.parametrize("mode", ["srste", "fixed"])
def test_meta_weights_sparsify_and_masks_follow_the_materialized_weights(mode):
    """Deferred init: the analysis needs shapes only; masks come from the real weights."""
    with torch.device("meta"):
        model = mlp()
    nmfx.sparsify(model, mask_mode=mode)
    assert model(torch.randn(2, 16, device="meta")).device.type == "meta"
    model.to_empty(device="cpu")
    real = mlp()
    model.load_state_dict(real.state_dict())
    x = torch.randn(3, 16)
    w0, w2 = real[0].weight.detach(), real[2].weight.detach()
    h = F.relu(F.linear(x, w0 * nmfx.nm_mask(w0, "2:4"), real[0].bias))
    h = F.relu(F.linear(h, w2 * nmfx.nm_mask(w2, "2:4"), real[2].bias))
    torch.testing.assert_close(model(x), real[4](h))


def test_empty_weight_is_kept_dense():
    with pytest.warns(UserWarning, match="zero-element"):  # torch's init of the empty weights
        model = nn.Sequential(
            nn.Linear(16, 0), nn.Linear(0, 32), nn.Linear(32, 32), nn.Linear(32, 4)
        )
        only = nn.Sequential(nn.Linear(16, 0), nn.Linear(0, 4))
    nmfx.sparsify(model)
    assert reason(model, "0") == "empty weight (shape (0, 16))"
    assert reason(model, "1") == "empty weight (shape (32, 0))"
    raises_unchanged(
        only, torch.randn(2, 16), ValueError, r"(?s)nothing was changed.*empty weight \(shape"
    )


@pytest.mark.parametrize("mode", ["srste", "fixed"])
def test_nan_and_inf_weights_stay_visible(mode):
    """Not an error: NaN and +/-Inf rank as the largest magnitudes, so a diverged weight is
    kept and the output shows it; fixed mode zeroes the pruned ones (NaN * 0 would not)."""
    model = mlp()
    with torch.no_grad():
        model[2].weight[0, :4] = torch.tensor([float("nan"), float("inf"), float("inf"), 1.0])
        model[2].weight[1, :4] = torch.tensor([-float("inf"), 0.5, float("nan"), float("nan")])
    nmfx.sparsify(model, mask_mode=mode)
    mask = model[2]._nmfx_weight.current_mask()
    assert mask[0, :4].tolist() == [True, True, False, False]
    assert mask[1, :4].tolist() == [True, False, True, False]
    if mode == "fixed":
        assert model[2].weight[0, 2:4].tolist() == [0.0, 0.0]
        assert model[2].weight[1, 3].item() == 0.0
    assert model(torch.randn(2, 16)).isnan().all()
    nmfx.finalize(model)
    assert nmfx.is_nm(model[2].weight, "2:4")
    torch.testing.assert_close(
        nmfx.packed.unpack(pack(model[2].weight.detach(), "2:4")), model[2].weight.detach(), **EQUAL
    )


class Tied(nn.Module):
    def __init__(self, with_mid: bool) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 16)
        self.mid = nn.Linear(16, 16) if with_mid else nn.Identity()
        self.out = nn.Linear(16, 10, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.mid(self.emb(x)))


def test_tied_weights_are_kept_dense():
    model = nmfx.sparsify(Tied(with_mid=True), keep_output_dense=False)
    assert reason(model, "out") == (
        "weight shared with emb.weight (tied); N:M would also prune the other use"
    )
    assert reason(model, "mid") == "2:4 along in_features"
    raises_unchanged(
        Tied(with_mid=False), torch.tensor([[1, 2, 3]]), ValueError,
        r"(?s)nothing was changed.*weight shared with emb\.weight \(tied\)",
        keep_output_dense=False,
    )  # fmt: skip


# ---- models -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "model",
    [nn.Sequential(nn.ReLU()), nn.Sequential(nn.Linear(16, 4))],
    ids=["no-weights", "only-the-output-layer"],
)
def test_model_with_no_eligible_layer(model):
    raises_unchanged(
        model, torch.randn(2, 16), ValueError,
        r"no layer of the model can be made N:M sparse with these options; nothing was changed",
    )  # fmt: skip


class Gate(nn.Module):
    """Data-dependent control flow: not traceable by torch.fx."""

    def __init__(self, with_linear: bool) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(16, 16))
        self.proj = nn.Linear(16, 16) if with_linear else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            x = x @ self.w
        return self.proj(x) if self.proj is not None else x


def test_untraceable_model_falls_back_per_module():
    model = nn.Sequential(Gate(with_linear=True), nn.Linear(16, 4))
    nmfx.sparsify(model)
    assert "Gate.forward is not traceable by torch.fx" in reason(model, "0.w")
    assert reason(model, "0.proj") == "2:4 along in_features"
    assert "not traceable as a whole" in str(nmfx.summary(model))
    raises_unchanged(
        Gate(with_linear=False), torch.randn(2, 16), ValueError,
        r"(?s)nothing was changed.*Gate\.forward is not traceable by torch\.fx \(TraceError",
    )  # fmt: skip


class Switch(nn.Module):
    """Uses one weight in training and another in eval: no single rewrite fits both."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.randn(16, 16))
        self.b = nn.Parameter(torch.randn(16, 16))
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x @ (self.a if self.training else self.b))


def test_train_and_eval_using_other_weights_is_an_error_and_leaves_no_masker():
    model, x = Switch(), torch.randn(2, 16)
    twin = copy.deepcopy(model)
    info = raises_unchanged(
        model, x, ValueError,
        r"<root> \(Switch\): its forward makes N:M weights \['a'\] in training mode but \['b'\] "
        r"in eval mode; nmfx needs the same ones in both\. Exclude them",
        srste_lambda=1.0,
    )  # fmt: skip
    nmfx.sparsify(mlp())  # the SR-STE step hook is registered in this process
    for m in (model, twin):  # the dense model trains exactly like its untouched twin
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        m(x).sum().backward()
        opt.step()
    assert torch.equal(model.a, twin.a) and torch.equal(model.b, twin.b)
    del info


def test_sparsify_twice():
    model, x = nmfx.sparsify(mlp()), torch.randn(2, 16)
    raises_unchanged(
        model, x, ValueError,
        r"model is already sparsified by nmfx .*sparsify the original model once, or call "
        r"nmfx\.finalize first",
    )  # fmt: skip


def test_sparsify_a_compiled_model():
    model, x = mlp(), torch.randn(2, 16)
    compiled = torch.compile(model, backend="eager")
    before = fingerprint(model, x)
    with pytest.raises(TypeError, match=r"torch\.compile'd module; call nmfx\.sparsify on the "
                       r"original module first, then torch\.compile the result"):  # fmt: skip
        nmfx.sparsify(compiled)
    assert_unchanged(model, before, x)


def test_sparsify_something_that_is_not_a_module():
    with pytest.raises(TypeError, match=r"sparsify expects an nn\.Module, got function"):
        nmfx.sparsify(lambda x: x)


def _sparsified(model: nn.Module) -> nn.Module:
    return nmfx.sparsify(model)


@pytest.mark.parametrize(
    ("prepare", "call", "match"),
    [
        (None, lambda m: nmfx.lower(m, "cpu"), r"no N:M weights to lower: sparsify and train"),
        (None, nmfx.finalize, r"no N:M weights found: the model was not sparsified by nmfx"),
        (None, nmfx.summary, r"not sparsified by nmfx\.sparsify; call nmfx\.sparsify"),
        (_sparsified, lambda m: nmfx.lower(m, "cpu"),
         r"still carries SR-STE masks; call nmfx\.finalize\(model\) before nmfx\.lower"),
    ],
    ids=["lower", "finalize", "summary", "lower-before-finalize"],
)  # fmt: skip
def test_lower_or_finalize_a_model_that_was_never_sparsified(prepare, call, match):
    model, x = mlp(), torch.randn(2, 16)
    if prepare is not None:
        model = prepare(model)
    before = fingerprint(model, x)
    with pytest.raises(ValueError, match=match):
        call(model)
    assert_unchanged(model, before, x)


# ---- packed files -----------------------------------------------------------------------


def _saved(tmp_path: Path) -> Path:
    w = torch.randn(16, 64)
    w = torch.where(nmfx.nm_mask(w, "2:4"), w, 0)
    path = tmp_path / "w.safetensors"
    save_packed(path, {"fc": pack(w, "2:4")})
    return path


def _edit_metadata(path: Path, **meta: str) -> None:
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + size])
    header["__metadata__"].update(meta)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + size :])


@pytest.mark.parametrize(
    ("damage", "exc", "match"),
    [
        (lambda p: p.write_bytes(p.read_bytes()[:-100]), ValueError,
         r"not a readable safetensors file .*corrupt or truncated, re-save it"),
        (lambda p: p.write_bytes(p.read_bytes()[:20]), ValueError,
         r"not a readable safetensors file .*corrupt or truncated, re-save it"),
        (lambda p: _edit_metadata(p, version=str(FORMAT_VERSION + 1)), ValueError,
         rf"packed format version {FORMAT_VERSION + 1} is newer than this nmfx supports "
         rf"\(version {FORMAT_VERSION}\); upgrade nmfx"),
        (lambda p: _edit_metadata(p, format="other"), ValueError,
         r"not an nmfx packed file \(metadata format='other'"),
        (lambda p: p.unlink(), FileNotFoundError, r"w\.safetensors"),
    ],
    ids=["truncated-data", "truncated-header", "newer-version", "foreign", "missing"],
)  # fmt: skip
def test_damaged_packed_file(tmp_path, damage, exc, match):
    path = _saved(tmp_path)
    damage(path)
    with pytest.raises(exc, match=match):
        load_packed(path)


# ---- CPUs without AVX-512 ---------------------------------------------------------------


@pytest.fixture
def lowered(monkeypatch, tmp_path):
    monkeypatch.setenv("NMFX_CALIBRATE", "0")  # the built-in dispatch table, no timing
    monkeypatch.setenv("NMFX_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("NMFX_ISA", raising=False)
    from nmfx.kernels import _dispatch, kernels_available

    monkeypatch.setattr(_dispatch, "_table", None)
    if not kernels_available():
        pytest.skip("C++ kernels unavailable here: nm_linear runs dense, no ISA path to pick")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 8))  # 1024x512: packed
    nmfx.finalize(nmfx.sparsify(model))
    return model.eval(), nmfx.lower(model, "cpu")


def test_cpu_without_avx512_runs_the_avx2_or_portable_path(lowered, monkeypatch):
    from nmfx import kernels
    from nmfx.kernels import _build

    model, fast = lowered
    x = torch.randn(2, 512)
    with torch.no_grad():
        ref = model(x)
        for isa in [i for i in kernels.available_isas() if i != "avx512"]:
            with kernels.use_isa(isa), kernels.force_dispatch("sparse"):
                torch.testing.assert_close(fast(x), ref, **tol("lowered_layer"))
    # A CPU without AVX-512 (simulated where the CPU has it): forcing it names what is there.
    without = [i for i in _build.supported_isas() if not i.startswith("avx512")]
    monkeypatch.setattr(_build, "supported_isas", lambda: list(without))
    with pytest.raises(ValueError, match=r"ISA path 'avx512' is not supported on this CPU "
                       r"\(supported: \['portable'.*\]\); use one of those or 'auto'"):  # fmt: skip
        kernels.set_isa("avx512")
    before = fingerprint(fast, x)
    monkeypatch.setenv("NMFX_ISA", "avx512")
    with (
        kernels.force_dispatch("sparse"),
        pytest.raises(ValueError, match=r"ISA path 'avx512' is not supported on this CPU"),
    ):
        fast(x)
    monkeypatch.setenv("NMFX_ISA", "avx9")
    with kernels.force_dispatch("sparse"), pytest.raises(
        ValueError, match=r"NMFX_ISA='avx9' is not one of \['auto', 'portable', 'avx2', "
        r"'avx512', 'avx512bf16'\]; unset it or pick one"
    ):  # fmt: skip
        fast(x)
    monkeypatch.delenv("NMFX_ISA")
    assert_unchanged(fast, before, x)


# ---- rows 28-: models, options and files new users tried --------------------------------


@pytest.mark.parametrize("lam", [float("inf"), 1e308, float("nan"), 1.5])
def test_srste_lambda_must_be_finite_and_at_most_one(lam):
    model, x = mlp(), torch.randn(3, 16)
    raises_unchanged(model, x, ValueError, r"srste_lambda=.* must be a finite float in \[0, 1\]",
                     srste_lambda=lam)  # fmt: skip


def test_sparsify_a_scripted_model_says_sparsify_the_eager_module():
    with pytest.raises(TypeError, match=r"TorchScript module .*sparsify on the eager nn\.Module"):
        nmfx.sparsify(torch.jit.script(mlp()))


def test_sparsify_a_lazy_module_says_run_one_forward_first():
    model = nn.Sequential(nn.LazyLinear(32), nn.ReLU(), nn.Linear(32, 4))
    with pytest.raises(ValueError, match=r"0 \(LazyLinear\): parameter '0\.weight' is not "
                       r"materialized yet .*run one forward pass .* then nmfx\.sparsify"):  # fmt: skip
        nmfx.sparsify(model)
    assert not nmfx.is_sparsified(model) and nn.parameter.is_lazy(model[0].weight)
    model(torch.randn(2, 16))  # materialized: now it works
    assert nmfx.summary(nmfx.sparsify(model)).plan.sparse


@pytest.mark.parametrize("mode", ["fixed", "srste"])
def test_sparsify_under_inference_mode_makes_trainable_masks(mode):
    model = mlp()
    with torch.inference_mode():
        nmfx.sparsify(model, mask_mode=mode, mask_interval=3)
    assert not any(b.is_inference() for b in model.buffers())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):  # the first training forward used to fail (in-place on an inference tensor)
        opt.zero_grad()
        model(torch.randn(4, 16)).sum().backward()
        opt.step()
    assert nmfx.is_nm(model[0].weight.detach() * model[0]._nmfx_weight.mask, "2:4", 1)


def test_inference_tensor_weights_are_an_error_outside_inference_mode():
    with torch.inference_mode():
        model = mlp()
    with pytest.raises(ValueError, match=r"'0\.weight' is an inference tensor .*build or load it "
                       r"outside inference_mode"):  # fmt: skip
        nmfx.sparsify(model)
    assert not nmfx.is_sparsified(model)


class _NoNMOps(nn.Module):
    """Weight ops nmfx has no N:M form for, as modules and as functional calls."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.lstm = nn.LSTM(16, 16, batch_first=True)
        self.gru = nn.GRU(16, 16, batch_first=True)
        self.bil = nn.Bilinear(16, 16, 16)
        self.up = nn.ConvTranspose2d(4, 4, 2)
        self.w3 = nn.Parameter(torch.randn(16, 16, 16) / 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.lstm(self.fc(x))
        h, _ = self.gru(h)
        h = self.bil(h, h) + F.bilinear(h, h, self.w3)
        img = self.up(h.reshape(-1, 4, 2, 2))
        return self.head(h) + img.mean()


def test_every_weight_op_has_a_summary_row_and_counts_in_the_total():
    torch.manual_seed(0)
    model = _NoNMOps()
    nmfx.sparsify(model)
    rows = {c.param: c for c in nmfx.summary(model).candidates}
    expected = {n for n, p in model.named_parameters() if p.dim() >= 2}
    assert set(rows) == expected  # every weight of every op, none left out
    for param, op in [("lstm.weight_ih_l0", "nn.LSTM"), ("lstm.weight_hh_l0", "nn.LSTM"),
                      ("gru.weight_hh_l0", "nn.GRU"), ("bil.weight", "nn.Bilinear"),
                      ("up.weight", "nn.ConvTranspose2d"), ("w3", "bilinear")]:  # fmt: skip
        assert rows[param].verdict == "dense"
        assert rows[param].reason.startswith(f"{op}: no N:M form in nmfx"), param
    total = sum(p.numel() for n, p in model.named_parameters() if p.dim() >= 2)
    assert f"of {total:,} weights in N:M layers" in str(nmfx.summary(model))
    model(torch.randn(2, 3, 16)).sum().backward()  # still runs and trains


def test_only_no_nm_ops_is_the_nothing_changed_error_listing_them():
    model = nn.Sequential(nn.LSTM(16, 16))
    with pytest.raises(ValueError, match=r"(?s)nothing was changed.*nn\.LSTM: no N:M form in nmfx"):
        nmfx.sparsify(model)


def _layout_edit(path: Path, edit) -> None:
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    layout = json.loads(json.loads(raw[8 : 8 + size])["__metadata__"]["layout"])
    _edit_metadata(path, layout=json.dumps(edit(layout)))


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (lambda p: _layout_edit(p, lambda lay: [1, 2]), r"field 'layout' must map names to entries, got \[1, 2\]"),
        (lambda p: _layout_edit(p, lambda lay: None), r"field 'layout' must map names to entries, got None"),
        (lambda p: _layout_edit(p, lambda lay: {"fc": {**lay["fc"], "dtype": "float64"}}),
         r"entry 'fc' is corrupt: field 'dtype'='float64' is not one of \['bfloat16', 'float16', 'float32'\]"),
        (lambda p: _layout_edit(p, lambda lay: {"fc": {"rows": 16}}),
         r"entry 'fc' is corrupt: missing field\(s\) \['cols'"),
    ],
    ids=["layout-list", "layout-null", "dtype-float64", "missing-fields"],
)  # fmt: skip
def test_packed_file_with_a_bad_layout_names_the_field(tmp_path, damage, match):
    path = _saved(tmp_path)
    damage(path)
    with pytest.raises(ValueError, match=match):
        load_packed(path)


def test_load_packed_of_a_directory_says_pass_the_file(tmp_path):
    with pytest.raises(ValueError, match=r"is a directory; pass the path of the file save_packed"):
        load_packed(tmp_path)


@pytest.mark.parametrize("shape", [(0, 16), (8, 0)])
def test_pack_of_an_empty_weight(shape):
    with pytest.raises(ValueError, match=r"pack: the weight is empty \(shape .*keep an empty layer dense"):
        pack(torch.zeros(shape), "2:4")
