"""Save mid-training (model + optimizer), resume in a fresh process: bit-identical on CPU."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import torch
from tolerances import tol
from torch import nn

SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from torch import nn
    import nmfx

    def model():
        torch.manual_seed(0)
        return nmfx.sparsify(nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64),
                                           nn.ReLU(), nn.Linear(64, 8)), srste_lambda=0.05)

    def data(step):
        g = torch.Generator().manual_seed(100 + step)
        return torch.randn(16, 32, generator=g), torch.randn(16, 8, generator=g)

    def run(m, opt, steps):
        for s in steps:
            x, y = data(s)
            opt.zero_grad()
            nn.functional.mse_loss(m(x), y).backward()
            opt.step()

    mode, path = sys.argv[1], sys.argv[2]
    m = model()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.01)
    if mode == "full":
        run(m, opt, range(6))
    elif mode == "first":
        run(m, opt, range(3))
        torch.save({"model": m.state_dict(), "opt": opt.state_dict()}, path + ".ckpt")
    else:  # resume: a fresh process, a fresh sparsified model, the saved state
        ckpt = torch.load(path + ".ckpt")
        m.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        run(m, opt, range(3, 6))
    torch.save(m.state_dict(), path + "." + mode)
    """
)


def test_resume_in_a_fresh_process_is_bit_identical(tmp_path):
    path = str(tmp_path / "run")
    for mode in ("full", "first", "resume"):
        result = subprocess.run([sys.executable, "-c", SCRIPT, mode, path], capture_output=True,
                                text=True, timeout=300)  # fmt: skip
        assert result.returncode == 0, result.stderr[-2000:]
    full, resumed = torch.load(path + ".full"), torch.load(path + ".resume")
    assert full.keys() == resumed.keys()
    for key in full:
        assert torch.equal(full[key], resumed[key]), key


UNPICKLE = textwrap.dedent(
    """
    import sys, torch
    from torch import nn
    m = torch.load(sys.argv[1], weights_only=False)  # nmfx.sparsify is never called here
    masker = m[0]._nmfx_weight
    lam = masker.srste_lambda
    w0 = m[0].weight.detach().clone()
    e = masker.compute_mask(w0)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    m(torch.randn(4, 32)).pow(2).sum().backward()
    grad = m[0].weight.grad.clone()
    opt.step()
    expected = w0 - 0.1 * (grad + lam * (~e) * w0)
    torch.testing.assert_close(m[0].weight.detach(), expected, **TOL)
    print("srste on")
    """
)


def test_unpickled_sparsified_model_trains_srste_in_a_fresh_process(tmp_path):
    """Issue 13 item 4: torch.load of a sparsified model must not train as plain STE."""
    import nmfx

    torch.manual_seed(0)
    model = nmfx.sparsify(nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8)),
                          srste_lambda=0.5)  # fmt: skip
    path = tmp_path / "sparsified.pt"
    torch.save(model, path)
    script = f"TOL = {tol('step')!r}\n" + UNPICKLE  # the table's tolerance, in the subprocess
    result = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True,
                            text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "srste on"


NO_NMFX = textwrap.dedent(
    """
    import sys, torch
    class Block:  # nmfx is not installed here: any import of it fails
        def find_spec(self, name, path=None, target=None):
            if name == "nmfx" or name.startswith("nmfx."):
                raise ImportError(f"{name} is not installed")
    sys.meta_path.insert(0, Block())
    m = torch.load(sys.argv[1], weights_only=False)
    out = m(torch.ones(2, 32))
    assert not any(k.startswith("nmfx") for k in sys.modules)
    print(type(m[0]).__name__, tuple(out.shape))
    """
)


def test_finalized_model_loads_where_nmfx_is_not_installed(tmp_path):
    """Issue 12: a finalized model is plain PyTorch (torch.save / torch.load without nmfx)."""
    import nmfx

    model = nmfx.sparsify(nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8)),
                          mask_mode="fixed")  # fmt: skip
    model(torch.randn(2, 32)).sum().backward()
    nmfx.finalize(model)
    assert nmfx.nm_weights(model)  # the record survives in the process that finalized it
    path = tmp_path / "finalized.pt"
    torch.save(model, path)
    result = subprocess.run([sys.executable, "-c", NO_NMFX, str(path)], capture_output=True,
                            text=True, timeout=300, cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "Linear (2, 8)"
    loaded = torch.load(path, weights_only=False)  # and in a process with nmfx, still known
    assert nmfx.nm_weights(loaded).keys() == nmfx.nm_weights(model).keys()
