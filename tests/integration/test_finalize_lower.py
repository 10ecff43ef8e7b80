"""finalize -> lower(cpu) -> export, and backend='nmfx', end to end on the zoo."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
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
        torch.testing.assert_close(fast(x), ref, rtol=1e-4, atol=1e-4)
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


@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_backend_lowers_with_no_graph_breaks(inner):
    model, x = trained("gpt2")
    nmfx.finalize(model)
    from nmfx.backend import last_decisions

    torch._dynamo.reset()
    with torch.no_grad():
        ref = model(x)
        explain = torch._dynamo.explain(model)(x)
        assert explain.graph_break_count == 0
        torch._dynamo.reset()
        out = torch.compile(model, backend="nmfx", options={"inner": inner})(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert any(d.verdict == "sparse" for d in last_decisions())


def test_backend_rejects_unknown_options():
    torch._dynamo.reset()
    compiled = torch.compile(nn.Linear(4, 4), backend="nmfx", options={"innner": "eager"})
    with pytest.raises(Exception, match="did you mean 'inner'"):
        compiled(torch.randn(1, 4))


def test_backend_entry_point_without_importing_nmfx():
    code = textwrap.dedent(
        """
        import sys, torch
        m = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
        assert "nmfx" not in sys.modules
        with torch.no_grad():
            m[0].weight.mul_(torch.tensor([1.0, 0.0, 1.0, 0.0]).repeat(4))
            out = torch.compile(m, backend="nmfx", options={"inner": "eager"})(torch.randn(2, 16))
            torch.testing.assert_close(out, m(torch.randn(2, 16)) * 0 + out)
        from nmfx.backend import last_decisions
        print([d.verdict for d in last_decisions()])
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "['sparse', 'dense']"


def test_import_nmfx_stays_light():
    code = (
        "import sys, nmfx; bad = [m for m in sys.modules if 'tensorrt' in m or m == "
        "'torch.utils.cpp_extension' or m.startswith('nmfx.kernels')]; print(bad)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"
