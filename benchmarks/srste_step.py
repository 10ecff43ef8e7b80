"""What SR-STE training costs per step: ``nmfx.sparsify``'d model vs the same dense model.

One step is zero_grad + forward + cross-entropy + backward + ``SGD(lr=0.01).step()`` (the
SR-STE decay runs in the optimizer step pre-hook). Eager rows also time the SR-STE model with
its forward's GEMM on the masked copy (``F.linear``, "sparse masked-copy fwd") instead of the
packed N:M weight (the eager default since session 10; compiled, the
``nmfx::srste_packed_linear`` op since session 11). Dense and sparse copies of one model run
interleaved in the same process, so load from other jobs hits both; the target is
sparse / dense <= 1.10. The baseline is dense eager *and* dense compiled: a compiled sparse
model is compared with a compiled dense one. For the MLP the overhead is broken down into
the mask alone (``nm_mask`` of every sparse weight), the masker forward (the masked weight)
and the SR-STE term of the optimizer hook (the mask recomputed in registers); the rest is
autograd, dispatch and the cache misses of a larger working set.

    PYTHONPATH=. python benchmarks/srste_step.py [--quick] [--compile none|mlp|all] [--contend N]
        [--models mlp,resnet18] [--malloc default|no-trim]

``--contend N`` runs N busy-looping processes beside the measurement (the issue's contended
target: sparse / dense <= 1.3 with one). ``--malloc no-trim`` stops glibc from returning
freed heap memory to the OS, for both models alike (``benchmarks/_heap.py`` says why: with
trimming, one of the two interleaved models re-faults its gradients' pages every step);
each variant's minor page faults per step are printed and saved either way.

Rounds: the MLP's eager ratio drifts with the machine from round to round; over windows of
21 consecutive rounds its ratio of medians spread 1.07-1.135 (10th-90th percentile, 200
quiet rounds of ``benchmarks/srste_phases.py``), over 81 rounds 1.083-1.11. Hence 61 eager
and 31 compiled MLP rounds (a round is ~0.15 s); ResNet-18 rounds cost ~2 s and stay few.
"""

from __future__ import annotations

import copy
import gc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from _heap import MALLOC_MODES, counting_faults, set_malloc
from _timing import (
    Contention,
    LoadMonitor,
    Rounds,
    add_contend_arg,
    base_parser,
    describe,
    interleaved,
    machine_info,
    median,
    ms,
    paired_ratios,
    setup_threads,
    spread,
    time_once,
    write_json,
)
from tabulate import tabulate
from torch import nn

import model_zoo
import nmfx
from nmfx.modules import NMMasker

TARGET = 1.10
LAMBDA = 2e-4


@dataclass(frozen=True)
class Case:
    """One model to benchmark: zoo name, config overrides, batch, rounds, compile or not."""

    name: str
    overrides: dict[str, Any]
    batch: int
    repeats: int
    warmup: int
    compile: bool
    compiled_repeats: int
    budget_s: float  # per timed section: rounds stop after this, once 3 are done
    plain_ste: bool = True  # also time the lambda_W=0 copy (eager)


def make_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    """One SGD training step of ``model`` (possibly a compiled wrapper) on (x, y)."""
    params = model._orig_mod.parameters() if hasattr(model, "_orig_mod") else model.parameters()
    opt = torch.optim.SGD(params, lr=0.01)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def build_variants(
    case: Case, plain_ste: bool
) -> tuple[dict[str, nn.Module], torch.Tensor, torch.Tensor]:
    """Dense model, its SR-STE copy and (``plain_ste``) its lambda_W=0 copy, same weights."""
    torch.manual_seed(0)
    dense = model_zoo.build(case.name, **case.overrides)
    x = model_zoo.example_input(case.name, case.batch, model=dense)
    y = torch.randint(0, 10, (case.batch,))
    models = {
        "dense": dense,
        "sparse": nmfx.sparsify(copy.deepcopy(dense), pattern="2:4", srste_lambda=LAMBDA),
    }
    if plain_ste:
        models["sparse lambda=0"] = nmfx.sparsify(
            copy.deepcopy(dense), pattern="2:4", srste_lambda=0.0
        )
    if plain_ste and case.name == "mlp":  # (ResNet-18's convs have no packed forward)
        # the eager forward before the packed GEMM: F.linear on the masked copy
        copied = nmfx.sparsify(copy.deepcopy(dense), pattern="2:4", srste_lambda=LAMBDA)
        for masker in copied.modules():
            if isinstance(masker, NMMasker):
                masker.sparse_gemm = False
        models["sparse masked-copy fwd"] = copied
    return models, x, y


def ratio_row(
    case: Case, mode: str, rounds: Rounds, variant: str, baseline: str, faults: dict[str, float]
) -> list[Any]:
    """A table row: medians of both sides and three estimates of their ratio.

    Only the clean rounds (other processes idle) are used when there are at least 3.
    Ratio of medians (the headline, on which the target is judged), median of per-round
    ratios (both sides of a round saw the same load) and ratio of minima (the least
    disturbed run of each: contention only ever adds time).
    """
    times, used = rounds.pick()
    num, den = times[variant], times[baseline]
    ratio = median(num) / median(den)
    paired = median(paired_ratios(num, den))
    best = min(num) / min(den)
    return [
        case.name, case.batch, mode, variant, used, ms(median(den)), ms(median(num)),
        round(ratio, 3), round(paired, 3), round(best, 3), "yes" if ratio <= TARGET else "no",
        round(spread(den), 2), round(spread(num), 2), faults[baseline], faults[variant],
    ]  # fmt: skip


def bench_eager(
    case: Case,
) -> tuple[list[list[Any]], Rounds, dict[str, float], dict[str, nn.Module]]:
    models, x, y = build_variants(case, case.plain_ste)
    steps, counts = counting_faults({k: make_step(m, x, y) for k, m in models.items()})
    rounds = interleaved(steps, repeats=case.repeats, warmup=case.warmup, budget_s=case.budget_s)
    faults = faults_per_step(rounds, counts)
    rows = [ratio_row(case, "eager", rounds, v, "dense", faults) for v in models if v != "dense"]
    return rows, rounds, faults, models


def faults_per_step(rounds: Rounds, counts: dict[str, list[int]]) -> dict[str, float]:
    """Mean minor page faults per timed step (the warmup steps come first in ``counts``)."""
    out = {}
    for name, seconds in rounds.seconds.items():
        timed = counts[name][len(counts[name]) - len(seconds) :]
        out[name] = round(sum(timed) / max(len(timed), 1), 1)
    return out


def bench_compiled(case: Case) -> tuple[list[list[Any]], dict[str, Any]]:
    """Compiled dense vs compiled sparse; compile time is measured apart (first step)."""
    torch._dynamo.reset()
    # lambda_W=0 compiled is a diagnosis (the hook's eager mask), made on the MLP only.
    models, x, y = build_variants(case, plain_ste=case.name == "mlp")
    steps, counts = counting_faults(
        {k: make_step(torch.compile(m), x, y) for k, m in models.items()}
    )
    compile_s = {k: time_once(step) for k, step in steps.items()}
    rounds = interleaved(steps, repeats=case.compiled_repeats, warmup=1, budget_s=case.budget_s)
    faults = faults_per_step(rounds, counts)
    variants = [v for v in models if v != "dense"]
    rows = [ratio_row(case, "compiled", rounds, v, "dense", faults) for v in variants]
    return rows, {**rounds.as_json(), "compile_s": compile_s, "faults_per_step": faults}


def mlp_breakdown(
    sparse: nn.Module, repeats: int, budget_s: float
) -> tuple[list[list[Any]], dict[str, Any]]:
    """Time the SR-STE pieces of one sparse MLP step apart, summed over its sparse weights.

    Eager and compiled steps run the same hook: the term recomputes the mask from the weight
    (no mask is stored by the forward).
    """
    maskers = [m for m in sparse.modules() if isinstance(m, NMMasker)]
    weights = [m.weight for m in maskers]
    for w in weights:
        if w.grad is None:
            w.grad = torch.zeros_like(w)

    def masks() -> None:
        for mk, w in zip(maskers, weights, strict=True):
            nmfx.nm_mask(w, (mk.n, mk.m), dim=mk.reduce_dim)

    def masked_weights() -> None:  # what each masker does in the forward: the masked weight
        with torch.no_grad():
            for mk, w in zip(maskers, weights, strict=True):
                mk(w)

    def srste_terms() -> None:  # the hook's work: one pass, the mask recomputed in registers
        for mk in maskers:
            mk._term_grad = None  # a new gradient: the term goes in again
            mk.add_srste_term()

    parts = {
        "nm_mask": masks,
        "masker forward (masked weight)": masked_weights,
        "srste term (hook)": srste_terms,
    }
    rounds = interleaved(parts, repeats=repeats, warmup=1, budget_s=budget_s)
    times, used = rounds.pick()
    rows = [
        [k, len(maskers), used, ms(median(v)), ms(min(v)), round(spread(v), 2)]
        for k, v in times.items()
    ]
    return rows, {**rounds.as_json(), "n_weights": len(maskers), "rounds": rounds}


def rest_row(steps: Rounds, parts: Rounds, n_weights: int) -> list[Any]:
    """Overhead not explained by the masker forwards and the SR-STE terms timed apart."""
    times, _ = steps.pick()
    overhead = median(times["sparse"]) - median(times["dense"])
    seconds, _ = parts.pick()
    explained = median(seconds["masker forward (masked weight)"]) + median(
        seconds["srste term (hook)"]
    )
    return ["rest (autograd, dispatch, hook walk)", n_weights, "-",
            ms(overhead - explained), None, None]  # fmt: skip


def parse_cases() -> tuple[Any, list[Case]]:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--compile",
        choices=("none", "mlp", "all"),
        default=None,
        help="which models to also run under torch.compile (default: all; none with --quick)",
    )
    add_contend_arg(parser)
    parser.add_argument(
        "--models", default="mlp,resnet18",
        help="comma-separated models to run, of mlp,resnet18 (default: both)",
    )  # fmt: skip
    parser.add_argument(
        "--malloc", choices=MALLOC_MODES, default="default",
        help="glibc heap trimming for the whole process: default (on) or no-trim (both models)",
    )  # fmt: skip
    args = parser.parse_args()
    which = args.compile or ("none" if args.quick else "all")
    quick = args.quick
    cases = [
        Case("mlp", {"in_features": 1024}, 256, repeats=5 if quick else 61,
             warmup=1 if quick else 2, compile=which in ("mlp", "all"),
             compiled_repeats=5 if quick else 31, budget_s=10 if quick else 40),
        Case("resnet18", {}, 4 if quick else 32, repeats=3 if quick else 5, warmup=1,
             compile=which == "all", compiled_repeats=3, budget_s=15 if quick else 50,
             plain_ste=not quick),
    ]  # fmt: skip
    wanted = args.models.split(",")
    unknown = sorted(set(wanted) - {c.name for c in cases})
    if unknown:
        parser.error(f"--models {args.models!r}: unknown {unknown}; choose from mlp,resnet18")
    return args, [c for c in cases if c.name in wanted]


def step_rows(steps: Rounds, n_weights: int) -> list[list[Any]]:
    """The first rows of the breakdown table: whole steps and their difference."""
    times, used = steps.pick()
    dense, sparse = times["dense"], times["sparse"]
    return [
        ["dense step", 0, used, ms(median(dense)), ms(min(dense)), None],
        ["sparse step", n_weights, used, ms(median(sparse)), ms(min(sparse)), None],
        ["overhead (sparse - dense)", n_weights, used, ms(median(sparse) - median(dense)),
         ms(min(sparse) - min(dense)), None],
    ]  # fmt: skip


def run(cases: list[Case]) -> tuple[list[list[Any]], list[list[Any]], dict[str, Any]]:
    """All measurements: ratio rows, the MLP breakdown rows and the raw timings."""
    rows: list[list[Any]] = []
    breakdown_rows: list[list[Any]] = []
    raw: dict[str, Any] = {}
    for case in cases:
        eager_rows, eager, faults, models = bench_eager(case)
        rows += eager_rows
        raw[f"{case.name} eager"] = {**eager.as_json(), "faults_per_step": faults}
        if case.name == "mlp":
            # The parts are cheap, so more rounds, on half the section's time budget.
            parts_rows, parts_raw = mlp_breakdown(
                models["sparse"], max(10, 3 * case.repeats), case.budget_s / 2
            )
            n_weights, parts = parts_raw["n_weights"], parts_raw.pop("rounds")
            raw["mlp breakdown"] = parts_raw
            breakdown_rows = [
                *step_rows(eager, n_weights), *parts_rows, rest_row(eager, parts, n_weights),
            ]  # fmt: skip
        del models
        gc.collect()
        if case.compile:
            comp_rows, raw[f"{case.name} compiled"] = bench_compiled(case)
            rows += comp_rows
            gc.collect()
    return rows, breakdown_rows, raw


def main() -> None:
    args, cases = parse_cases()
    malloc = set_malloc(args.malloc)  # before any model exists
    setup_threads(args.threads)
    info = machine_info()
    with Contention(args.contend), LoadMonitor() as load:
        rows, breakdown_rows, raw = run(cases)

    headers = [
        "model", "batch", "mode", "variant", "rounds", "dense ms", "sparse ms", "sparse/dense",
        "paired ratio", "ratio of minima", f"<= {TARGET}", "dense IQR/med", "sparse IQR/med",
        "dense faults/step", "sparse faults/step",
    ]  # fmt: skip
    print(
        "Training step (fwd + bwd + SGD), 2:4 SR-STE vs dense, medians of interleaved runs"
        + (f", {args.contend} busy-looping processes beside it" if args.contend else "")
        + f", malloc {args.malloc}"
    )
    print(tabulate(rows, headers=headers, tablefmt="github"))
    compile_s = {k: v["compile_s"] for k, v in raw.items() if "compile_s" in v}
    if compile_s:
        print("compile time of the first step (s):", {
            k: {v: round(t, 1) for v, t in c.items()} for k, c in compile_s.items()
        })  # fmt: skip
    print("\nMLP SR-STE overhead, eager, summed over the sparse weights")
    b_headers = ["part", "weights", "rounds", "median ms", "min ms", "IQR/med"]
    print(tabulate(breakdown_rows, headers=b_headers, tablefmt="github"))
    print("\n" + describe(info, load.result))
    path = write_json(
        "srste_step",
        {"machine": info, "load": load.result, "quick": args.quick, "contend": args.contend,
         "malloc": malloc, "target": TARGET,
         "srste_lambda": LAMBDA, "cases": [c.__dict__ for c in cases], "headers": headers,
         "rows": rows, "breakdown_headers": b_headers, "breakdown_rows": breakdown_rows,
         "raw": raw},
        args.out,
    )  # fmt: skip
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
