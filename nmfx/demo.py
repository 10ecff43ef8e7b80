"""``nmfx demo``, the README's main job, end to end on CPU in a couple of minutes.

1. scikit-learn's bundled digits (1,797 8x8 images; no download), fixed 80/20 split;
2. the zoo MLP (4 x 1024 wide) trained dense and, from the same init, 2:4 SR-STE with
   ``nmfx.sparsify`` and one shared hyper-parameter setting; accuracies and SAD printed;
3. the SR-STE model finalized (masks baked, N:M verified) and lowered to the CPU target;
4. the measured per-layer report at batch 1, saved as JSON and PNG.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
from torch import nn

import model_zoo
import nmfx


def load_digits(seed: int = 0) -> tuple[torch.Tensor, ...]:
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as exc:  # the demo extra brings scikit-learn
        raise ImportError("the demo needs scikit-learn: pip install 'nmfx[demo]'") from exc
    data = sk_load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    split = int(0.8 * len(y))
    return x[perm[:split]], y[perm[:split]], x[perm[split:]], y[perm[split:]]


def train(
    model: nn.Module, data: tuple[torch.Tensor, ...], epochs: int, seed: int, max_steps: int | None
) -> list[float]:
    """Plain loop, SGD with momentum; returns the SAD fraction per epoch (empty if dense)."""
    xtr, ytr, _, _ = data
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    sparse = nmfx.is_sparsified(model)
    sad, steps = [], 0
    for _ in range(epochs):
        before = nmfx.mask_snapshot(model) if sparse else None
        model.train()
        for idx in torch.randperm(len(ytr), generator=gen).split(64):
            loss = nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
            if max_steps is not None and steps >= max_steps:
                break
        if sparse:
            sad.append(nmfx.mask_stats(model, since=before).flip_fraction)
        if max_steps is not None and steps >= max_steps:
            break
    return sad


@torch.no_grad()
def accuracy(model: nn.Module, data: tuple[torch.Tensor, ...]) -> float:
    _, _, xte, yte = data
    model.eval()
    return (model(xte).argmax(-1) == yte).float().mean().item()


def _load_kernels() -> None:
    """Build (first run after install or an update: tens of seconds) and load the C++ kernels
    before anything is timed, so the training times below measure training, not the build."""
    from nmfx import kernels

    t0 = time.perf_counter()
    if kernels.kernels_available():
        print(f"CPU kernels ready in {time.perf_counter() - t0:.1f} s (built once, then cached)\n")
    else:
        print(f"CPU kernels unavailable ({kernels.build_error()}): nmfx runs dense F.linear\n")


def _warm_up(models: list[nn.Module], data: tuple[torch.Tensor, ...]) -> None:
    """One training step of a throwaway copy of each model before anything is timed. An SR-STE
    model's first training forward tunes nmfx's kernels for its weight shapes on this machine
    (about a second per shape, then cached on disk); printed here, so that the training times
    below are training."""
    xtr, ytr, _, _ = data
    t0 = time.perf_counter()
    for model in models:
        warm = copy.deepcopy(model).train()
        nn.functional.cross_entropy(warm(xtr[:64]), ytr[:64]).backward()
    print(f"first training step of each model (kernel tuning, cached): {time.perf_counter() - t0:.1f} s\n")


def run_demo(args: argparse.Namespace) -> int:
    from nmfx.reporting import report

    torch.manual_seed(args.seed)
    data = load_digits(args.seed)
    dense = model_zoo.build("mlp")
    sparse = nmfx.sparsify(copy.deepcopy(dense), pattern=args.pattern)
    print(nmfx.summary(sparse), end="\n\n")
    _load_kernels()
    _warm_up([dense, sparse], data)
    results = {}
    for name, model in (("dense", dense), (f"SR-STE {args.pattern}", sparse)):
        t0 = time.perf_counter()
        sad = train(model, data, args.epochs, args.seed, args.steps)
        results[name] = (accuracy(model, data), time.perf_counter() - t0, sad)
    for name, (acc, seconds, sad) in results.items():
        extra = f"; SAD per epoch {', '.join(f'{s:.3f}' for s in sad)}" if sad else ""
        print(f"{name:>12}: digits test accuracy {acc:.3f}, trained in {seconds:.1f} s{extra}")
    nmfx.finalize(sparse)
    print(f"finalized: {len(nmfx.nm_weights(sparse))} N:M weights verified\n")
    rep = report(sparse, data[2][:1], "cpu", pattern=args.pattern, repeats=args.repeats)
    print(rep)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(rep.to_json())
    written = [str(out / "report.json")]
    try:
        written.append(rep.plot(str(out / "speedup.png")))
    except ImportError as exc:
        print(f"no plot: {exc}")
    print("wrote " + ", ".join(written))
    return 0


if __name__ == "__main__":
    from nmfx.cli import main

    raise SystemExit(main(["demo"]))
