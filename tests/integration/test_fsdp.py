"""SR-STE under FSDP2 (``fully_shard``, gloo, 2 CPU processes): same update as one process.

FSDP2 shards every parameter along dim 0 as a DTensor and all-gathers it for the forward,
so the masker sees the full logical weight there. The lambda_W step pre-hook runs on the
sharded parameter and its reduce-scattered (averaged) gradient: it computes the mask of
its own shard, which is the slice of the full mask whenever the shard cuts no group of M
(rows of a Linear ``[out, in]``; groups run along ``in``), and refuses, naming the fix,
when a shard boundary falls inside a group. One spawn runs every scenario.
"""

from __future__ import annotations

import os
import tempfile
import traceback
from collections.abc import Callable
from functools import partial

import pytest
import torch
import torch.distributed as dist
from ranks import WORLD, run_rank, spawn_ranks
from tolerances import tol
from torch import nn

import nmfx
from model_zoo.gpt2 import Conv1D
from nmfx import nm_mask

LR, STEPS, BATCH = 0.1, 3, 8


def mlp() -> nn.Module:
    # [128, 36]: 9 groups per row. [76, 128]: a 38-row shard has 4864 weights, enough for the
    # C++ decay kernel on the local shard. [7, 76] (output, sparse here): rows split 4 + 3;
    # a flat shard (FSDP1-style) of its 532 weights would cut a group at element 266.
    return nn.Sequential(
        nn.Linear(36, 128), nn.ReLU(), nn.Linear(128, 76), nn.ReLU(), nn.Linear(76, 7)
    )


def conv1d(nx: int) -> Callable[[], nn.Module]:
    # GPT-2's Conv1D: weight [nx, nf] used as x @ W, so its groups run along dim 0, the dim
    # FSDP2 shards by default.
    return lambda: nn.Sequential(Conv1D(16, nx), nn.ReLU(), nn.Linear(16, 7))


def linear(nin: int) -> Callable[[], nn.Module]:
    return lambda: nn.Sequential(nn.Linear(nin, 16), nn.ReLU(), nn.Linear(16, 7))


def _shard_dim1(p: nn.Parameter):
    from torch.distributed.tensor import Shard

    return Shard(1) if p.dim() == 2 else Shard(0)


OPTS = {"srste_lambda": 0.05, "keep_output_dense": False}
# name: (model builder, input features, sparsify options, shard_placement_fn, micro-batches)
SCENARIOS: dict[str, tuple] = {
    "srste": (mlp, 36, OPTS, None, 1),
    "srste-accumulate": (mlp, 36, OPTS, None, 2),
    "interval": (mlp, 36, {**OPTS, "mask_interval": 2}, None, 1),
    "fixed": (mlp, 36, {**OPTS, "mask_mode": "fixed"}, None, 1),
    "conv1d-aligned": (conv1d(64), 64, OPTS, None, 1),  # 32 rows of dim 0 per rank: whole groups
    "shard-in-aligned": (linear(32), 32, OPTS, _shard_dim1, 1),  # Shard(1): 16 columns per rank
    "conv1d-cut": (conv1d(36), 36, OPTS, None, 1),  # 18 rows of dim 0 per rank: cuts a group
    "shard-in-cut": (linear(36), 36, OPTS, _shard_dim1, 1),  # Shard(1): 18 columns per rank
}
CUT = ("conv1d-cut", "shard-in-cut")


def build(name: str) -> nn.Module:
    make, _, opts, _, _ = SCENARIOS[name]
    torch.manual_seed(0)
    return nmfx.sparsify(make(), **opts)


def batches(features: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(BATCH, features, generator=g), torch.randn(BATCH, 7, generator=g))
        for _ in range(STEPS)
    ]


def train(model: nn.Module, name: str, rank: int | None = None) -> None:
    """``STEPS`` SGD steps; with ``rank``, on that rank's half of every micro-batch."""
    _, features, _, _, micro = SCENARIOS[name]
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for x, y in batches(features):
        opt.zero_grad()
        for xm, ym in zip(x.chunk(micro), y.chunk(micro), strict=True):
            if rank is not None:
                xm, ym = xm.chunk(WORLD)[rank], ym.chunk(WORLD)[rank]
            (nn.functional.mse_loss(model(xm), ym) / micro).backward()
        opt.step()


def train_single(name: str) -> dict[str, torch.Tensor]:
    model = build(name)
    train(model, name)
    return model.state_dict()


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _probe_masks(model: nn.Module) -> list[dict]:
    """Per sparse weight: the shard's own mask vs the slice of the full weight's mask, and
    which ops the lambda_W term ran (a custom op on a DTensor would mean the C++ kernel saw
    a sharded tensor)."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.calls: list[tuple[str, bool]] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            flat = [*args, *(kwargs or {}).values()]
            self.calls.append((str(func), any(isinstance(a, DTensor) for a in flat)))
            return func(*args, **(kwargs or {}))

    out = []
    for fqn, masker in sorted(model.named_modules()):  # same order on every rank (collectives)
        if not isinstance(masker, nmfx.modules.NMMasker):
            continue
        w = masker.weight.detach()
        full = w.full_tensor()
        # a stored (fixed/interval) mask is what it was at its last refresh, on every rank
        full_mask = (
            masker.mask
            if masker.stores_mask
            else nm_mask(full, (masker.n, masker.m), masker.reduce_dim)
        )
        shape, offset = compute_local_shape_and_global_offset(w.shape, w.device_mesh, w.placements)
        index = tuple(slice(o, o + s) for o, s in zip(offset, shape, strict=True))
        masker.weight.grad = torch.zeros_like(masker.weight)
        with Record() as rec:
            masker.add_srste_term()
        out.append({
            "fqn": fqn,
            "placements": str(w.placements),
            "local_shape": tuple(shape),
            "shard_mask_is_full_slice": torch.equal(masker._shard_mask(w, w), full_mask[index]),
            "custom_ops": [(f, d) for f, d in rec.calls if "nmfx" in f],
            "dtensor_ops": [f for f, d in rec.calls if d],
        })  # fmt: skip
        masker.weight.grad = None
    return out


def _record_input(seen: list, _module: nn.Module, args: tuple) -> None:
    seen.append((type(args[0]).__name__, tuple(args[0].shape)))


def _run_scenarios(rank: int, out_dir: str) -> None:
    from torch.distributed.fsdp import fully_shard

    results: dict[str, dict] = {}
    try:
        for name, (_, _, _, placement, _) in SCENARIOS.items():
            model = build(name)
            seen: list[tuple[str, tuple[int, ...]]] = []
            for module in model.modules():
                if isinstance(module, nmfx.modules.NMMasker):
                    module.register_forward_pre_hook(partial(_record_input, seen))
            for layer in model:
                if any(p.requires_grad for p in layer.parameters()):
                    fully_shard(layer, shard_placement_fn=placement)
            fully_shard(model, shard_placement_fn=placement)
            res: dict = {"masker_inputs": seen}
            try:
                train(model, name, rank)
            except RuntimeError as exc:
                res["error"] = str(exc)
            else:
                res["state"] = {k: _full(v).clone() for k, v in model.state_dict().items()}
                res["probe"] = _probe_masks(model)
            results[name] = res
    except Exception:
        results["crash"] = {"error": traceback.format_exc()}
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    run_rank(_run_scenarios, rank, init_file, out_dir)


@pytest.fixture(scope="module")
def ranks() -> list[dict[str, dict]]:
    with tempfile.TemporaryDirectory() as tmp:
        spawn_ranks(_worker, tmp)
        out = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(WORLD)]
    for r in out:
        assert "crash" not in r, r["crash"]["error"]
    return out


pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed+gloo"
)


@pytest.mark.parametrize("name", [n for n in SCENARIOS if n not in CUT])
def test_fsdp2_two_ranks_match_single_process(ranks, name):
    states = [r[name]["state"] for r in ranks]
    single = train_single(name)
    assert single.keys() == states[0].keys()
    for key, value in single.items():
        assert torch.equal(states[0][key], states[1][key]), key  # full weights agree
        torch.testing.assert_close(states[0][key], value, **tol("reorder"), msg=key)


@pytest.mark.parametrize("name", [n for n in SCENARIOS if n not in CUT])
def test_fsdp2_masker_sees_the_full_weight_in_forward(ranks, name):
    model = build(name)
    full_shapes = {
        tuple(m.weight.shape) for m in model.modules() if isinstance(m, nmfx.modules.NMMasker)
    }
    for r in ranks:
        seen = r[name]["masker_inputs"]
        assert seen and {cls for cls, _ in seen} <= {"Tensor", "Parameter"}  # not a DTensor
        assert {shape for _, shape in seen} == full_shapes


@pytest.mark.parametrize("name", [n for n in SCENARIOS if n not in CUT])
def test_fsdp2_shard_mask_is_the_full_mask_slice(ranks, name):
    for rank, r in enumerate(ranks):
        probe = r[name]["probe"]
        assert probe, name
        for p in probe:
            assert p["shard_mask_is_full_slice"], (rank, p)
            # on the DTensor only the metadata op detach(); the arithmetic runs on local shards
            assert set(p["dtensor_ops"]) <= {"aten.detach.default"}, (rank, p)
            assert all(not on_dtensor for _, on_dtensor in p["custom_ops"]), (rank, p)
    if name == "srste":  # the [76, 128] layer's shard is large enough for the C++ decay kernel
        big = next(p for p in ranks[0][name]["probe"] if p["local_shape"] == (38, 128))
        assert any("srste_decay_" in f for f, _ in big["custom_ops"])
        # the [7, 76] output layer: rows split 4 + 3 (uneven shards)
        assert {r[name]["probe"][-1]["local_shape"] for r in ranks} == {(4, 76), (3, 76)}


@pytest.mark.parametrize("name", CUT)
def test_fsdp2_shard_cutting_a_group_is_a_clear_error(ranks, name):
    for r in ranks:
        assert "state" not in r[name]
        assert "error" in r[name], r[name]
    msg = ranks[0][name]["error"]
    dim, shape = (0, "(36, 16)") if name == "conv1d-cut" else (1, "(16, 36)")
    assert f".weight {shape} is sharded along its reduction dim {dim}" in msg
    assert "this rank holds 0..17" in msg and "cuts groups of M=4" in msg
    assert "shard_placement_fn" in msg and "ceil(36 / world) is a multiple of 4" in msg
