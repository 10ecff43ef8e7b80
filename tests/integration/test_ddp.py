"""SR-STE under DistributedDataParallel (gloo, 2 CPU processes): same update as one process.

DDP averages gradients before ``optimizer.step``; nmfx adds lambda_W * (1 - E) * W in the
step pre-hook, after that average, so lambda_W means the same with 1 or 2 ranks (the public
SR-STE script's multi-GPU path scales it by the world size).
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import nmfx

LAM, LR, STEPS, WORLD = 0.05, 0.1, 3, 2


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)
    )


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 32, generator=g), torch.randn(8, 8, generator=g)) for _ in range(STEPS)]


def train_single(lam: float = LAM) -> dict[str, torch.Tensor]:
    model = nmfx.sparsify(make_model(), srste_lambda=lam)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for x, y in batches():
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return model.state_dict()


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        model = nmfx.sparsify(make_model(), srste_lambda=LAM)
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=LR)
        for x, y in batches():  # each rank takes its half of the same global batch
            opt.zero_grad()
            nn.functional.mse_loss(ddp(x.chunk(WORLD)[rank]), y.chunk(WORLD)[rank]).backward()
            opt.step()
        torch.save(model.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_ddp_two_ranks_matches_single_process_and_ranks_agree():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(os.path.join(tmp, "init"), tmp), nprocs=WORLD, join=True)
        states = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(WORLD)]
    single = train_single()
    for key, value in single.items():
        # ranks are bit-identical (same averaged grads, same masks, no mask communication)
        assert torch.equal(states[0][key], states[1][key]), key
        torch.testing.assert_close(states[0][key], value, rtol=1e-5, atol=1e-6, msg=key)
    # the check can see a world-size-scaled lambda_W: 2 x lambda gives visibly other weights
    doubled = train_single(2 * LAM)["0.weight"]
    assert not torch.allclose(states[0]["0.weight"], doubled, rtol=1e-5, atol=1e-6)
