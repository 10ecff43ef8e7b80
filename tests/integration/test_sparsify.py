"""sparsify end to end: every zoo model, state preservation, fallback, compile, bad input."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from tolerances import tol
from torch import nn

import model_zoo
import nmfx
from nmfx import nm_mask

ZOO = list(model_zoo.MODELS)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", ZOO)
def test_every_zoo_model_sparsifies_and_trains(name):
    model = model_zoo.build(name)
    keys = list(model.state_dict())
    x = model_zoo.example_input(name, model=model)
    nmfx.sparsify(model)
    plan = nmfx.summary(model).plan
    assert plan.whole_model_traced and plan.sparse
    assert any(not c.sparse for c in plan.candidates)  # each zoo model keeps a layer dense
    assert list(model.state_dict()) == keys
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(2):
        loss = model(x).float().pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
    # every sparse layer's effective weight is N:M
    for cand in plan.sparse:
        w = model.get_parameter(cand.param)
        assert nmfx.is_nm(
            torch.where(nm_mask(w, "2:4", cand.reduce_dim), w, 0), "2:4", cand.reduce_dim
        )


def test_zoo_verdicts_follow_the_paper():
    gpt = nmfx.sparsify(model_zoo.build("gpt2"))
    reasons = {c.name: c.reason for c in nmfx.summary(gpt).candidates}
    assert "tied" in reasons["lm_head"]
    assert any(c.op == "addmm" and c.sparse for c in nmfx.summary(gpt).candidates)  # Conv1D
    resnet = nmfx.sparsify(model_zoo.build("resnet18"))
    reasons = {c.name: c.reason for c in nmfx.summary(resnet).candidates}
    assert "in_channels=3 is not a multiple of M=4" in reasons["conv1"]
    assert "produces the model output" in reasons["fc"]
    vit = nmfx.sparsify(model_zoo.build("vit_tiny"))
    ops = {c.op for c in nmfx.summary(vit).plan.sparse}
    assert {"mha.in_proj", "mha.out_proj"} <= ops


def test_keep_output_dense_false_and_exclude_glob():
    model = nmfx.sparsify(model_zoo.build("mlp"), keep_output_dense=False, exclude=["layers.*"])
    verdicts = {c.name: c.verdict for c in nmfx.summary(model).candidates}
    assert verdicts.pop("head") == "sparse"
    assert set(verdicts.values()) == {"dense"}


def test_state_dict_round_trips_both_ways():
    dense = model_zoo.build("llama")
    sparse = nmfx.sparsify(model_zoo.build("llama"))
    sparse.load_state_dict(dense.state_dict())  # an existing checkpoint loads
    for p in sparse.parameters():
        p.data.add_(1.0)
    fresh = model_zoo.build("llama")
    fresh.load_state_dict(sparse.state_dict())  # trained weights load back
    for (k, a), b in zip(fresh.state_dict().items(), sparse.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_deepcopy_pickle_save_dtype_and_modes():
    model = nmfx.sparsify(model_zoo.build("gpt2"))
    x = model_zoo.example_input("gpt2", model=model)
    model.eval()
    ref = model(x)
    for clone in (
        copy.deepcopy(model),
        pickle.loads(pickle.dumps(model)),
        torch.load(_saved(model), weights_only=False),
    ):
        torch.testing.assert_close(clone(x), ref)
        assert clone.lm_head.weight is clone.wte.weight
        # the clone trains on its own weights: the SR-STE hook finds its maskers
        opt = torch.optim.SGD(clone.parameters(), lr=1.0)
        clone.train()
        clone(x).float().pow(2).mean().backward()
        opt.step()
    torch.testing.assert_close(model(x), ref)  # original untouched by the clones' training
    half = copy.deepcopy(model).to(torch.bfloat16)
    assert half(x).dtype == torch.bfloat16


def _saved(model: nn.Module) -> io.BytesIO:
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return buf


class Gate(nn.Module):
    """Data-dependent control flow: not traceable by torch.fx."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(32, 32)
        self.own = nn.Parameter(torch.randn(32, 32))

    def forward(self, x):
        if x.sum() > 0:
            return self.proj(x)
        return x @ self.own


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(16, 32)
        self.gate = Gate()
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        return self.head(self.gate(self.inp(x)))


def test_untraceable_model_falls_back_per_module():
    model = nmfx.sparsify(Untraceable())
    s = nmfx.summary(model)
    assert not s.plan.whole_model_traced
    verdicts = {c.name: (c.verdict, c.reason) for c in s.candidates}
    assert verdicts["inp"][0] == "sparse" and verdicts["gate.proj"][0] == "sparse"
    assert "not traceable" in verdicts["gate.own"][1]
    assert "registration order" in verdicts["head"][1]
    text = str(s)
    assert "not traceable as a whole" in text and "untraceable: gate" in text
    model(torch.randn(3, 16)).sum().backward()


def test_module_branching_on_training_keeps_both_paths():
    class Noisy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(8, 8))

        def forward(self, x):
            y = x @ self.w
            if self.training:
                y = y * 2
            return y

    model = nn.Sequential(Noisy(), nn.Linear(8, 2))
    nmfx.sparsify(model)
    x = torch.randn(2, 8)
    w = model[0].w.detach()
    masked = w * nm_mask(w, "2:4", 0)
    torch.testing.assert_close(model.train()[0](x), 2 * x @ masked)
    torch.testing.assert_close(model.eval()[0](x), x @ masked)


def test_compiled_training_has_no_graph_breaks():
    model = nmfx.sparsify(model_zoo.build("gpt2"))
    x = model_zoo.example_input("gpt2", model=model)

    def step(x):
        return model(x).float().pow(2).mean()

    explain = torch._dynamo.explain(step)(x)
    assert explain.graph_break_count == 0 and explain.graph_count == 1
    torch._dynamo.reset()
    compiled = torch.compile(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    eager = copy.deepcopy(model)
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.1)
    for _ in range(2):
        for m, o in ((compiled, opt), (eager, opt_e)):
            o.zero_grad()
            m(x).float().pow(2).mean().backward()
            o.step()
    for a, b in zip(model.parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(a, b, **tol("lowered_layer"))


# ---- bad input: a clear error, and the model untouched ---------------------------------


@pytest.mark.parametrize(
    "options,error,match",
    [
        ({"pattern": "3:2"}, ValueError, "0 < N < M"),
        ({"pattern": "2:3x"}, ValueError, "N:M"),
        ({"srste_lambda": -1.0}, ValueError, "srste_lambda"),
        ({"mask_mode": "fixd"}, ValueError, "did you mean 'fixed'"),
        ({"patern": "2:4"}, TypeError, "did you mean 'pattern'"),
        ({"mask_interval": 0}, ValueError, "mask_interval"),
    ],
    ids=["pattern-order", "pattern-syntax", "lambda", "mode-typo", "unknown-option", "interval"],
)
def test_bad_options(options, error, match):
    model = model_zoo.build("mlp")
    before = snapshot(model)
    with pytest.raises(error, match=match):
        nmfx.sparsify(model, **options)
    assert not nmfx.is_sparsified(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_no_eligible_layer_is_an_error_listing_reasons():
    model = nn.Sequential(nn.Linear(30, 30), nn.ReLU(), nn.Linear(30, 3))
    before = snapshot(model)
    with pytest.raises(
        ValueError, match=r"(?s)nothing was changed.*in_features=30 is not a multiple of M=4"
    ):
        nmfx.sparsify(model)
    assert not nmfx.is_sparsified(model) and "forward" not in model[0].__dict__
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_sparsify_twice_and_compiled_model_are_errors():
    model = nmfx.sparsify(model_zoo.build("mlp"))
    with pytest.raises(ValueError, match="already sparsified"):
        nmfx.sparsify(model)
    with pytest.raises(TypeError, match=r"torch\.compile"):
        nmfx.sparsify(torch.compile(model_zoo.build("mlp")))


def test_summary_of_unsparsified_model_is_an_error():
    with pytest.raises(ValueError, match="not sparsified"):
        nmfx.summary(model_zoo.build("mlp"))


def test_shared_weight_stays_dense_with_reason():
    lin = nn.Linear(16, 16)
    model = nn.Sequential(lin, nn.ReLU(), lin, nn.Linear(16, 16), nn.Linear(16, 2))
    nmfx.sparsify(model)
    verdicts = {c.name: c.verdict for c in nmfx.summary(model).candidates}
    # a module called twice is the same op: it may be sparse
    assert verdicts["0"] == "sparse" and verdicts["3"] == "sparse"


class ListAndFlat(nn.Module):
    """``ws.0`` (a ParameterList entry) and ``ws_0`` would share the masker name ``_nmfx_ws_0``."""

    def __init__(self) -> None:
        super().__init__()
        self.ws = nn.ParameterList([nn.Parameter(torch.randn(16, 16))])
        self.ws_0 = nn.Parameter(torch.randn(16, 16))
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.linear(x, self.ws[0]) + torch.nn.functional.linear(x, self.ws_0)
        return self.head(h)


def test_masker_names_do_not_collide():
    """Issue 13 item 3: both weights get their own masker; finalize bakes both; no jump."""
    model = nmfx.sparsify(ListAndFlat())
    maskers = {m.param_name for m in model.modules() if isinstance(m, nmfx.modules.NMMasker)}
    assert maskers == {"ws.0", "ws_0"}
    x = torch.randn(3, 16)
    with torch.no_grad():
        before = model(x)
        nmfx.finalize(model)
        torch.testing.assert_close(model(x), before)
    assert nmfx.is_nm(model.ws[0], "2:4") and nmfx.is_nm(model.ws_0, "2:4")


def test_exclude_rule_matching_nothing_warns():
    """Issue 13 item 14: a misspelt exclude glob is not silently ignored."""
    model = model_zoo.build("mlp")
    with pytest.warns(UserWarning, match=r"exclude rule 'lyaer\.\*' matches no layer"):
        nmfx.sparsify(model, exclude=["lyaer.*"])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nmfx.sparsify(model_zoo.build("mlp"), exclude=[lambda name: False])  # callables may match nothing
