"""finalize -> lower(cpu) -> export, and backend='nmfx', end to end on the zoo."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from tolerances import tol
from torch import nn

import model_zoo
import nmfx
from nmfx.lowering.cpu import NMLinear


def trained(name: str, steps: int = 2, **overrides) -> tuple[nn.Module, torch.Tensor]:
    model = nmfx.sparsify(model_zoo.build(name, **overrides))
    x = model_zoo.example_input(name, model=model)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        model(x).float().pow(2).mean().backward()
        opt.step()
    return model.eval(), x


@pytest.mark.parametrize("name", list(model_zoo.MODELS))
def test_zoo_sparsify_train_finalize_lower_cpu(name):
    model, x = trained(name)
    with torch.no_grad():
        ref = model(x)
    classes = {n: type(m) for n, m in model.named_modules() if "_nmfx" not in n}
    keys = list(model.state_dict())
    nmfx.finalize(model)
    assert {n: type(m) for n, m in model.named_modules()} == classes  # original module types
    assert list(model.state_dict()) == keys
    record = nmfx.nm_weights(model)
    assert record and all(
        nmfx.is_nm(model.get_parameter(p), r.pattern, r.reduce_dim) for p, r in record.items()
    )
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref)
        fast = nmfx.lower(model, "cpu")
        torch.testing.assert_close(fast(x), ref, **tol("lowered_model"))
    decisions = nmfx.lowering_decisions(fast)
    assert {d.param for d in decisions} == set(record)
    packed = [m for m in fast.modules() if isinstance(m, NMLinear)]
    assert len(packed) == sum(d.verdict == "sparse" for d in decisions)
    for d in decisions:
        if d.verdict == "dense":
            assert d.reason


def test_finalize_detects_checkpoint_weights_nmfx_did_not_train():
    model, _ = trained("mlp")
    nmfx.finalize(model)
    fresh = model_zoo.build("mlp")
    fresh.load_state_dict(model.state_dict())
    nmfx.finalize(fresh)
    assert nmfx.nm_weights(fresh).keys() == nmfx.nm_weights(model).keys()


def test_finalize_errors_and_lower_guards():
    dense = model_zoo.build("mlp")
    with pytest.raises(ValueError, match="no N:M weights found"):
        nmfx.finalize(dense)
    with pytest.raises(ValueError, match="no N:M weights to lower"):
        nmfx.lower(dense, "cpu")
    sparse = nmfx.sparsify(model_zoo.build("mlp"))
    with pytest.raises(ValueError, match=r"nmfx\.finalize"):
        nmfx.lower(sparse, "cpu")
    with pytest.raises(ValueError, match="did you mean 'cuda'"):
        nmfx.lower(nmfx.finalize(sparse), "cdua")


def test_lowered_model_exports_saves_loads_and_runs(tmp_path):
    # 512-wide layers: above the size below which CPU lowering keeps nn.Linear
    model, x = trained("llama", dim=512, n_heads=8, hidden_dim=1376)
    nmfx.finalize(model)
    fast = nmfx.lower(model, "cpu")
    with torch.no_grad():
        ref = fast(x)
    exported = torch.export.export(fast, (x,))
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert "nmfx.nm_linear.default" in targets
    path = tmp_path / "llama.pt2"
    torch.export.save(exported, path)
    loaded = torch.export.load(path)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module()(x), ref)
    torch.save((x, ref), tmp_path / "io.pt")
    code = textwrap.dedent(  # issue 13 item 20: a fresh process, `import nmfx` only
        """
        import sys, torch, nmfx
        assert not any(m.startswith("nmfx.kernels") for m in sys.modules)  # nothing built
        loaded = torch.export.load(sys.argv[1])
        x, ref = torch.load(sys.argv[2])
        with torch.no_grad():
            torch.testing.assert_close(loaded.module()(x), ref)
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", code, str(path), str(tmp_path / "io.pt")],
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "ok"


@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_backend_lowers_with_no_graph_breaks(inner):
    # 512-wide: Conv1D weights above the CPU size floor that nmfx.lower applies too
    model, x = trained("gpt2", n_embd=512, n_head=8, n_layer=1)
    nmfx.finalize(model)

    torch._dynamo.reset()
    with torch.no_grad():
        ref = model(x)
        explain = torch._dynamo.explain(model)(x)
        assert explain.graph_break_count == 0
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="nmfx", options={"inner": inner})
        out = compiled(x)
    torch.testing.assert_close(out, ref, **tol("lowered_model"))
    decisions = nmfx.lowering_decisions(compiled)
    assert any(d.verdict == "sparse" for d in decisions)
    # the backend and nmfx.lower make the same decision for every weight both see
    lowered = {d.param: d for d in nmfx.lowering_decisions(nmfx.lower(model, "cpu"))}
    for d in decisions:
        if d.param in lowered:
            assert (d.verdict, d.reason) == (lowered[d.param].verdict, lowered[d.param].reason)


class TwoWithBreak(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(512, 1024)
        self.b = nn.Linear(1024, 512)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        torch._dynamo.graph_break()
        return self.b(h)


def two_with_break() -> TwoWithBreak:
    """Both linears 2:4 (as a checkpoint nmfx did not train), in eval mode."""
    model = TwoWithBreak().eval()
    with torch.no_grad():
        for linear in (model.a, model.b):
            linear.weight.mul_(nmfx.nm_mask(linear.weight, "2:4"))
    return model


def compiled_eager(model: nn.Module) -> nn.Module:
    torch._dynamo.reset()
    return torch.compile(model, backend="nmfx", options={"inner": "eager"})


def test_backend_decisions_per_model_across_graph_breaks_named_by_module_path():
    compiled = compiled_eager(two_with_break())
    with torch.no_grad():
        compiled(torch.randn(2, 512))
    decisions = nmfx.lowering_decisions(compiled)
    assert [(d.name, d.param, d.verdict) for d in decisions] == [
        ("a", "a.weight", "sparse"),
        ("b", "b.weight", "sparse"),
    ]
    other = torch.compile(nn.Linear(4, 4), backend="nmfx")
    with pytest.raises(ValueError, match=r"backend='nmfx'\) and run once"):
        nmfx.lowering_decisions(other)  # not run yet: no graph, no decisions


def test_backend_lowers_again_when_frozen_weights_change():
    """Issue 13 item 5: a compiled model must not keep running the weights it was compiled with."""
    model = two_with_break()
    compiled = compiled_eager(model)
    x = torch.randn(2, 512)
    with torch.no_grad():
        compiled(x)
        other = two_with_break()
        model.load_state_dict(other.state_dict())
        torch.testing.assert_close(compiled(x), other(x), **tol("lowered_layer"))
        model.a.weight.mul_(2)  # an in-place edit
        torch.testing.assert_close(compiled(x), model(x), **tol("lowered_layer"))


def test_lower_cpu_lowers_gpt2_conv1d_addmm():
    """Issue 13 item 23: GPT-2's Conv1D (addmm, weight [in, out]) lowers with nmfx.lower too."""
    model, x = trained("gpt2", n_embd=512, n_head=8, n_layer=1)
    nmfx.finalize(model)
    with torch.no_grad():
        ref = model(x)
        fast = nmfx.lower(model, "cpu")
        torch.testing.assert_close(fast(x), ref, **tol("lowered_model"))
    by = {d.param: d for d in nmfx.lowering_decisions(fast)}
    fc = by["h.0.mlp.c_fc.weight"]
    assert fc.op == "addmm" and fc.verdict == "sparse", fc.reason
    assert isinstance(fast.get_submodule("h.0.mlp.c_fc"), NMLinear)


def test_backend_rejects_unknown_options():
    torch._dynamo.reset()
    compiled = torch.compile(nn.Linear(4, 4), backend="nmfx", options={"innner": "eager"})
    with pytest.raises(Exception, match="did you mean 'inner'"):
        compiled(torch.randn(1, 4))


def test_backend_entry_point_without_importing_nmfx():
    code = textwrap.dedent(
        """
        import sys, torch
        m = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 4))
        assert "nmfx" not in sys.modules
        x = torch.randn(2, 512)
        compiled = torch.compile(m, backend="nmfx", options={"inner": "eager"})
        with torch.no_grad():
            m[0].weight.mul_(torch.tensor([1.0, 0.0, 1.0, 0.0]).repeat(128))
            torch.testing.assert_close(compiled(x), m(x), **TOL)
        import nmfx
        print([d.verdict for d in nmfx.lowering_decisions(compiled)])
        """
    )
    code = f"TOL = {tol('lowered_layer')!r}\n" + code  # the table's tolerance, in the subprocess
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "['sparse', 'dense']"


def test_import_nmfx_stays_light():
    code = (
        "import sys, torch, nmfx; bad = [m for m in sys.modules if 'tensorrt' in m or m == "
        "'torch.utils.cpp_extension' or m.startswith('nmfx.kernels')]; "
        "torch.ops.nmfx.nm_linear.default; nmfx.report; nmfx.pack; nmfx.load_packed; print(bad)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


class Outer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(512, 1024), nn.ReLU())
        self.head = nn.Linear(1024, 512)
        self.out = nn.Linear(512, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.head(self.inner(x))))


def test_nested_finalize_keeps_every_layer():
    """Issue 13 item 9: finalize(o.inner) then finalize(o): lower(o) still sees inner.0."""
    o = nmfx.sparsify(Outer())
    nmfx.finalize(o.inner)
    nmfx.finalize(o)
    assert set(nmfx.nm_weights(o)) == {"inner.0.weight", "head.weight"}
    fast = nmfx.lower(o, "cpu")
    by = {d.param: d for d in nmfx.lowering_decisions(fast)}
    assert by["inner.0.weight"].verdict == "sparse" and by["inner.0.weight"].name == "inner.0"
    assert isinstance(fast.inner[0], NMLinear) and isinstance(fast.head, NMLinear)


def test_finalize_pattern_is_validated_and_must_match():
    """Issue 13 item 14: pattern='5:4' is an error; a pattern other than the sparsified one too."""
    model = nmfx.sparsify(Outer())
    with pytest.raises(ValueError, match="5:4"):
        nmfx.finalize(model, pattern="5:4")
    with pytest.raises(ValueError, match=r"finalize\(pattern='1:4'\) but inner.0.weight was sparsified with 2:4"):
        nmfx.finalize(model, pattern="1:4")
    assert nmfx.is_sparsified(model)  # nothing was changed
    nmfx.finalize(model, pattern="2:4")
    assert not nmfx.is_sparsified(model)


def test_lower_after_weights_changed_names_the_layer():
    """Issue 13 item 13: the error names the layer and says the weights changed after finalize."""
    model = nmfx.finalize(nmfx.sparsify(Outer()))
    with torch.no_grad():
        model.head.weight.add_(1.0)
    with pytest.raises(ValueError, match=r"head \(head.weight\): .* changed after finalize"):
        nmfx.lower(model, "cpu")


def test_finalize_removes_everything_sparsify_added():
    """Issue 12: after finalize, only the plain-data N:M record is left (model_state says so)."""
    model = Outer()
    before = {n: set(m.__dict__) for n, m in model.named_modules()}
    nmfx.sparsify(model, mask_mode="fixed")  # fixed: stored masks, DDP ignore entries too
    assert hasattr(model, "_ddp_params_and_buffers_to_ignore")
    nmfx.finalize(model)
    after = {n: set(m.__dict__) for n, m in model.named_modules()}
    assert after.keys() == before.keys()  # no masker left
    extra = {n: after[n] - before[n] for n in after if after[n] - before[n]}
    assert extra == {"": {"_nmfx_nm_record"}}
    record = model.__dict__["_nmfx_nm_record"]
    plain = (str, int, float, bool, list, dict, type(None))

    def builtins_only(value) -> bool:
        if isinstance(value, dict):
            return all(builtins_only(k) and builtins_only(v) for k, v in value.items())
        if isinstance(value, list):
            return all(builtins_only(v) for v in value)
        return isinstance(value, plain)

    assert builtins_only(record)
