"""Save mid-training (model + optimizer), resume in a fresh process: bit-identical on CPU."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import torch

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
