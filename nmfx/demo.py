"""The README's main job: sparsify a zoo model, train it with SR-STE on real data, report.

Data: scikit-learn's bundled digits (1,797 8x8 images, no download). The same small CNN
is trained dense and 2:4 SR-STE with one hyper-parameter setting; the script prints both
accuracies, what was made sparse and why, and the mask statistics (density, SAD).
"""

from __future__ import annotations

import argparse
import copy
import logging
import time

import torch
from torch import nn

import model_zoo
import nmfx

log = logging.getLogger("nmfx.demo")


def load_digits(seed: int = 0) -> tuple[torch.Tensor, ...]:
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as exc:  # the demo extra brings scikit-learn
        raise SystemExit("the demo needs scikit-learn: pip install 'nmfx[demo]'") from exc
    data = sk_load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    split = int(0.8 * len(y))
    return x[perm[:split]], y[perm[:split]], x[perm[split:]], y[perm[split:]]


def train(model: nn.Module, data: tuple[torch.Tensor, ...], epochs: int, seed: int) -> list[float]:
    """Plain loop, SGD with momentum; returns the SAD fraction per epoch (empty if dense)."""
    xtr, ytr, _, _ = data
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    sparse = nmfx.is_sparsified(model)
    sad = []
    for _ in range(epochs):
        before = nmfx.mask_snapshot(model) if sparse else None
        model.train()
        for idx in torch.randperm(len(ytr), generator=gen).split(64):
            loss = nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        if sparse:
            sad.append(nmfx.mask_stats(model, since=before).flip_fraction)
    return sad


@torch.no_grad()
def accuracy(model: nn.Module, data: tuple[torch.Tensor, ...]) -> float:
    _, _, xte, yte = data
    model.eval()
    return (model(xte).argmax(-1) == yte).float().mean().item()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8, help="training epochs (default 8)")
    parser.add_argument("--pattern", default="2:4", help="N:M pattern (default 2:4)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(args.seed)
    data = load_digits(args.seed)
    dense = model_zoo.build("small_cnn")
    sparse = nmfx.sparsify(copy.deepcopy(dense), pattern=args.pattern)
    print(nmfx.summary(sparse), end="\n\n")
    results = {}
    for name, model in (("dense", dense), (f"SR-STE {args.pattern}", sparse)):
        t0 = time.perf_counter()
        sad = train(model, data, args.epochs, args.seed)
        results[name] = (accuracy(model, data), time.perf_counter() - t0, sad)
    for name, (acc, seconds, sad) in results.items():
        extra = f", SAD per epoch {', '.join(f'{s:.3f}' for s in sad)}" if sad else ""
        print(f"{name:>12}: test accuracy {acc:.3f} ({seconds:.1f} s){extra}")
    stats = nmfx.mask_stats(sparse)
    print(f"mask density {stats.density:.3f} over {stats.numel:,} weights in N:M layers")
    print("lowering and the per-layer speedup report are not built yet (issues 4 and 5)")


if __name__ == "__main__":
    main()
