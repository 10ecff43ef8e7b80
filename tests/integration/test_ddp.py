"""SR-STE under DistributedDataParallel (gloo, 2 CPU processes): same update as one process.

DDP averages gradients before ``optimizer.step``; nmfx adds lambda_W * (1 - E) * W in the
step pre-hook, after that average, so lambda_W means the same with 1 or 2 ranks (the public
SR-STE script's multi-GPU path scales it by the world size).

Stored masks (``mask_mode="fixed"``, ``mask_interval > 1``) are buffers DDP would broadcast
before every forward; sparsify puts them on DDP's ignore list, and the ranks still agree
because a mask is a function of the weights, which DDP keeps equal.
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
from ranks import WORLD, run_rank, spawn_ranks
from tolerances import tol
from torch import nn

import nmfx

LAM, LR, STEPS = 0.05, 0.1, 3


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)
    )


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 32, generator=g), torch.randn(8, 8, generator=g)) for _ in range(STEPS)]


def train_single(lam: float = LAM, **options) -> dict[str, torch.Tensor]:
    model = nmfx.sparsify(make_model(), srste_lambda=lam, **options)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for x, y in batches():
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return {**model.state_dict(), **stored_masks(model)}


def stored_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: b.clone() for n, b in model.named_buffers() if n.endswith("._nmfx_weight.mask")}


def train_ddp(model: nn.Module, rank: int) -> nn.parallel.DistributedDataParallel:
    """SGD under DDP over ``batches()``, each rank taking its half of the same global batch."""
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=LR)
    for x, y in batches():
        opt.zero_grad()
        nn.functional.mse_loss(ddp(x.chunk(WORLD)[rank]), y.chunk(WORLD)[rank]).backward()
        opt.step()
    return ddp


def _train_rank(rank: int, out_dir: str) -> None:
    model = nmfx.sparsify(make_model(), srste_lambda=LAM)
    train_ddp(model, rank)
    torch.save(model.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    run_rank(_train_rank, rank, init_file, out_dir)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_ddp_two_ranks_matches_single_process_and_ranks_agree():
    with tempfile.TemporaryDirectory() as tmp:
        spawn_ranks(_worker, tmp)
        states = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(WORLD)]
    single = train_single()
    for key, value in single.items():
        # ranks are bit-identical (same averaged grads, same masks, no mask communication)
        assert torch.equal(states[0][key], states[1][key]), key
        torch.testing.assert_close(states[0][key], value, **tol("reorder"), msg=key)
    # the check can see a world-size-scaled lambda_W: 2 x lambda gives visibly other weights
    doubled = train_single(2 * LAM)["0.weight"]
    assert not torch.allclose(states[0]["0.weight"], doubled, **tol("reorder"))


MASK_MODES = {"fixed": {"mask_mode": "fixed"}, "interval": {"mask_interval": 2}}


def _train_mask_modes(rank: int, out_dir: str) -> None:
    """Stored-mask modes under DDP; ``rank-seeded``: every rank starts from other weights
    (DDP broadcasts rank 0's at construction, the masks must follow them)."""
    out = {}
    for mode, options in MASK_MODES.items():
        for init in ("same-seed", "rank-seeded"):
            model = make_model()
            if init == "rank-seeded" and rank:
                for p in model.parameters():
                    torch.nn.init.normal_(p)
            nmfx.sparsify(model, srste_lambda=LAM, **options)
            ddp = train_ddp(model, rank)
            out[mode, init] = {
                "state": {**model.state_dict(), **stored_masks(model)},
                "ignored": sorted(ddp.parameters_to_ignore),
                "synced_buffers": sorted(ddp.named_module_buffers),
                "syncs_buffers": ddp.will_sync_module_buffers(),
            }
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))


def _mask_worker(rank: int, init_file: str, out_dir: str) -> None:
    run_rank(_train_mask_modes, rank, init_file, out_dir)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_ddp_ignores_stored_masks_and_ranks_agree_without_syncing_them():
    with tempfile.TemporaryDirectory() as tmp:
        spawn_ranks(_mask_worker, tmp)
        ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(WORLD)]
    names = ["0._nmfx_weight.mask", "2._nmfx_weight.mask"]  # layer 4 produces the output
    for mode, options in MASK_MODES.items():
        single = train_single(**options)
        assert sorted(k for k in single if k.endswith(".mask")) == names
        for init in ("same-seed", "rank-seeded"):
            res = [r[mode, init] for r in ranks]
            for r in res:
                assert r["ignored"] == names and r["synced_buffers"] == []
                assert not r["syncs_buffers"]  # no buffer broadcast before each forward
            for key, value in single.items():
                label = f"{mode}/{init}: {key}"
                assert torch.equal(res[0]["state"][key], res[1]["state"][key]), label
                torch.testing.assert_close(
                    res[0]["state"][key], value, **tol("reorder"), msg=label
                )


def test_sparsify_lists_only_stored_masks_for_ddp_to_ignore_and_keeps_user_entries():
    dynamic = nmfx.sparsify(make_model())  # masks recomputed every forward: no buffer
    assert not hasattr(dynamic, "_ddp_params_and_buffers_to_ignore")
    model = make_model()
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        model, ["4.bias"]
    )
    nmfx.sparsify(model, mask_mode="fixed")
    expected = ["4.bias", "0._nmfx_weight.mask", "2._nmfx_weight.mask"]
    assert model._ddp_params_and_buffers_to_ignore == expected
    assert all(b._ddp_ignored for n, b in model.named_buffers() if n.endswith(".mask"))
