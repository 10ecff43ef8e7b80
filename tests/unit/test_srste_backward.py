"""The SR-STE backward does the dense backward's work plus one pass-through node per weight.

The straight-through estimator passes the masked weight's gradient on unchanged, so the
sparse backward must not copy it, hold it (``AccumulateGrad`` then clones it instead of
taking it as ``.grad``) or add autograd nodes beyond one per masked weight. The README's
account of the backward's extra time (page faults, not autograd work) rests on this.
"""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from test_srste_fast_paths import mlp  # the same 4 MLP weights above the fused kernel floor

import nmfx
import nmfx.kernels as K

pytestmark = pytest.mark.skipif(
    not K.kernels_available(), reason="the fused mask kernels did not build here"
)


def graph_nodes(loss: torch.Tensor) -> list:
    seen: dict = {}
    todo = [loss.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen[fn] = None
        todo += [nxt for nxt, _ in fn.next_functions]
    return list(seen)


def is_ste(fn: object) -> bool:
    return "StraightThrough" in type(fn).__name__


# eager fused kernel path; stored mask refreshed every 2nd forward (the tensor-op path)
CONFIGS = [{}, {"mask_interval": 2}]


@pytest.mark.parametrize("kwargs", CONFIGS, ids=["fused", "stored-mask"])
def test_sparse_graph_is_the_dense_graph_plus_one_ste_node_per_weight(kwargs):
    dense = mlp()
    sparse = nmfx.sparsify(copy.deepcopy(dense), pattern="2:4", srste_lambda=0.1, **kwargs)
    x, y = torch.randn(8, 128), torch.randint(0, 4, (8,))
    kinds = {}
    for name, model in (("dense", dense), ("sparse", sparse)):
        nodes = graph_nodes(F.cross_entropy(model(x), y))
        kinds[name] = Counter(type(fn).__name__ for fn in nodes if not is_ste(fn))
        kinds[name + " ste"] = sum(map(is_ste, nodes))
    assert kinds["sparse"] == kinds["dense"]
    assert kinds["sparse ste"] == 2  # the two hidden weights; the head stays dense
    assert kinds["dense ste"] == 0


@pytest.mark.parametrize("kwargs", CONFIGS, ids=["fused", "stored-mask"])
def test_ste_gradient_becomes_grad_without_a_copy(kwargs):
    """The buffer the STE node receives is the one stored as ``.grad``, step after step."""
    sparse = nmfx.sparsify(mlp(), pattern="2:4", srste_lambda=0.1, **kwargs)
    opt = torch.optim.SGD(sparse.parameters(), lr=0.01)
    x, y = torch.randn(8, 128), torch.randint(0, 4, (8,))
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(sparse(x), y)
        received: dict[int, int] = {}
        for fn in filter(is_ste, graph_nodes(loss)):
            weight = fn.next_functions[0][0].variable  # the STE node feeds AccumulateGrad

            def note(grads: tuple, weight: torch.Tensor = weight, into: dict = received) -> None:
                into[id(weight)] = grads[0].data_ptr()

            fn.register_prehook(note)
        loss.backward()
        weights = [layer.weight for layer in (sparse[0], sparse[2])]
        assert sorted(received) == sorted(map(id, weights))
        for w in weights:
            assert w.grad.data_ptr() == received[id(w)]
            assert w.grad.is_contiguous()
        opt.step()
