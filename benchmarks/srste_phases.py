"""Where an SR-STE training step spends its extra time: per phase, dense vs sparse, same run.

``benchmarks/srste_step.py`` times whole steps; this splits each eager SGD step of the MLP
(4 x 1024, batch 256) into zero_grad, forward (+ loss), backward, the SR-STE step pre-hook
and the optimizer's own update, with timestamps taken by optimizer step hooks registered
after nmfx's (so the hook's share is the time between nmfx's hook and the update). Dense and
sparse steps run interleaved; medians per phase and the sparse - dense difference are printed.
Only rounds in which other processes took <= 10% of the CPU are used (when >= 5 are).

It also answers "how many rounds until the step ratio is stable": over every window of n
consecutive clean rounds, the ratio of medians (sparse / dense step) is computed, and the
10th-90th percentile range of those windows is printed per n.

Minor page faults per phase are counted too (``--malloc no-trim``: see ``benchmarks/_heap.py``).
``--masked-copy`` adds a third model, interleaved with the other two: the same SR-STE model
with the forward's GEMM on the masked copy (``F.linear``) instead of the packed N:M weight
(``NMMasker.sparse_gemm = False``), so both forwards are compared in one run.
``--contend N`` runs N busy-looping processes beside the rounds (every round is then used) and
prints, per model, what nmfx's contention guard counted during its steps (parallel calls,
stalls, calls kept on one thread): whether the extra time is nmfx's kernels waiting on a
descheduled thread or torch's own ops.

    PYTHONPATH=. python benchmarks/srste_phases.py [--rounds N] [--optimizer sgd|adamw]
        [--malloc default|no-trim] [--masked-copy] [--contend N]
"""

from __future__ import annotations

import argparse
import copy
import itertools
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from _guard import COUNTED
from _guard import stats as guard_stats
from _heap import MALLOC_MODES, minor_faults, set_malloc
from _timing import (
    Contention,
    LoadMonitor,
    _others_share,
    add_contend_arg,
    machine_info,
    median,
    ms,
    setup_threads,
    spread,
)
from tabulate import tabulate
from torch import nn
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

import model_zoo
import nmfx
from nmfx.modules import NMMasker

PHASES = ("zero_grad", "forward", "backward", "srste hook", "optimizer", "step")

_marks: dict[str, tuple[float, int]] = {}


def _now() -> tuple[float, int]:
    """(time, minor page faults so far): a fresh multi-MB buffer faults its pages in."""
    return time.perf_counter(), minor_faults()


def _pre(*_: object) -> None:  # registered after nmfx's hook: runs right after it
    _marks["hooked"] = _now()


def _post(*_: object) -> None:
    _marks["stepped"] = _now()


def make_step(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, optimizer: str
) -> Callable[[], dict[str, float]]:
    """One training step that returns its phases' durations (seconds)."""
    if optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step() -> dict[str, tuple[float, int]]:
        t0 = _now()
        opt.zero_grad(set_to_none=True)
        t1 = _now()
        loss = F.cross_entropy(model(x), y)
        t2 = _now()
        loss.backward()
        t3 = _now()
        opt.step()
        t4 = _now()
        marks = (t0, t1, t2, t3, _marks["hooked"], _marks["stepped"], t4)
        spans = dict(zip(PHASES[:-1], itertools.pairwise(marks), strict=False))
        spans["step"] = (t0, t4)
        return {p: (b[0] - a[0], b[1] - a[1]) for p, (a, b) in spans.items()}

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--lam", type=float, default=2e-4)
    parser.add_argument("--malloc", choices=MALLOC_MODES, default="default")
    parser.add_argument("--masked-copy", action="store_true",
                        help="also time the forward with F.linear on the masked copy")
    add_contend_arg(parser)
    args = parser.parse_args()
    set_malloc(args.malloc)  # before any model exists
    setup_threads(args.threads)
    torch.manual_seed(0)
    dense = model_zoo.build("mlp", in_features=1024)
    models = {"dense": dense}
    models["sparse"] = nmfx.sparsify(copy.deepcopy(dense), pattern="2:4", srste_lambda=args.lam)
    if args.masked_copy:
        copied = nmfx.sparsify(copy.deepcopy(dense), pattern="2:4", srste_lambda=args.lam)
        for masker in copied.modules():
            if isinstance(masker, NMMasker):
                masker.sparse_gemm = False
        models[MASKED_COPY] = copied
    register_optimizer_step_pre_hook(_pre)  # after sparsify registered nmfx's hook
    register_optimizer_step_post_hook(_post)
    x = model_zoo.example_input("mlp", 256, model=dense)
    y = torch.randint(0, 10, (256,))
    steps = {k: make_step(m, x, y, args.optimizer) for k, m in models.items()}
    for s in steps.values():
        s(), s()
    times: dict[str, dict[str, list[float]]] = {k: {p: [] for p in PHASES} for k in steps}
    faults: dict[str, dict[str, list[float]]] = {k: {p: [] for p in PHASES} for k in steps}
    shares: list[float | None] = []
    guard = {k: dict.fromkeys(COUNTED, 0) for k in steps}
    with Contention(args.contend), LoadMonitor() as load:
        for r in range(args.rounds):
            _, sample = _others_share(None)
            for k in sorted(steps, reverse=r % 2 == 1):
                before = guard_stats()
                for p, (t, f) in steps[k]().items():
                    times[k][p].append(t)
                    faults[k][p].append(f)
                after = guard_stats()
                for key in COUNTED:
                    guard[k][key] += after[key] - before[key]
            shares.append(_others_share(sample)[0])
    clean = [i for i, s in enumerate(shares) if s is not None and s <= 0.10]
    if len(clean) >= 5 and not args.contend:
        times, faults = ({k: {p: [v[i] for i in clean] for p, v in t.items()} for k, t in x.items()}
                         for x in (times, faults))  # fmt: skip
    for variant in (k for k in steps if k != "dense"):
        report(variant, times, faults, args)
    print(f"clean rounds {len(clean)}/{args.rounds}; others' CPU share "
          f"{load.result['others_cpu_share']:.0%}; {machine_info()['cpu_model']}"
          + (f"; {args.contend} busy-looping processes beside it, every round used"
             if args.contend else ""))  # fmt: skip
    print("nmfx's contention guard over each model's steps (nmfx kernels' parallel calls):")
    print(tabulate([[k, *g.values()] for k, g in guard.items()], headers=["model", *COUNTED],
                   tablefmt="github"))  # fmt: skip
    if MASKED_COPY in steps:
        paired = sorted(a / b for a, b in zip(times["sparse"]["step"], times[MASKED_COPY]["step"],
                                               strict=True))  # fmt: skip
        print(f"sparse step / masked-copy step, paired per round: median "
              f"{median(paired):.3f}, p10 {paired[len(paired) // 10]:.3f}, "
              f"p90 {paired[len(paired) * 9 // 10]:.3f}")  # fmt: skip


MASKED_COPY = "sparse, masked-copy forward"


def report(variant: str, times: dict, faults: dict, args: argparse.Namespace) -> None:
    """Per-phase medians of ``variant`` against dense, and its ratio's window stability."""
    rows = []
    for p in PHASES:
        d, s = times["dense"][p], times[variant][p]
        fd, fs = faults["dense"][p], faults[variant][p]
        rows.append([p, ms(median(d)), ms(median(s)), ms(median(s) - median(d)),
                     round(spread(d), 2), round(spread(s), 2),
                     round(sum(fd) / len(fd)), round(sum(fs) / len(fs))])  # fmt: skip
    ratio = median(times[variant]["step"]) / median(times["dense"]["step"])
    print(f"\n{variant}: MLP 4x1024 batch 256, {args.optimizer}, {args.rounds} interleaved "
          f"rounds, threads {torch.get_num_threads()}, malloc {args.malloc}, "
          f"step ratio {ratio:.3f}")  # fmt: skip
    print(tabulate(rows, headers=["phase", "dense ms", "sparse ms", "diff ms", "d IQR", "s IQR",
                            "d faults", "s faults"],
                   tablefmt="github"))  # fmt: skip
    print(tabulate(stability(times[variant]["step"], times["dense"]["step"]),
                   headers=["rounds n", "windows", "ratio p10", "p50", "p90"], tablefmt="github"))


def stability(sparse: list[float], dense: list[float]) -> list[list[float]]:
    """Ratio of medians over every window of n consecutive rounds: its 10-90% range per n."""
    rows = []
    for n in (5, 11, 21, 41, 81):
        if n > len(dense):
            break
        ratios = sorted(
            median(sparse[i : i + n]) / median(dense[i : i + n]) for i in range(len(dense) - n + 1)
        )
        pick = [ratios[int(q * (len(ratios) - 1))] for q in (0.1, 0.5, 0.9)]
        rows.append([n, len(ratios), *(round(r, 3) for r in pick)])
    return rows


if __name__ == "__main__":
    main()
