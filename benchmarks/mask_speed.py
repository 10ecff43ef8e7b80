"""How fast ``nmfx.nm_mask`` computes an N:M mask, against the sort-based masks it replaces.

SR-STE recomputes every mask on every training forward, so mask time is training overhead.
The public SR-STE code sorts each group of M (``argsort`` then ``scatter``); nmfx ranks the
elements of a group by comparisons within the group: in one fused C++ pass on eager CPU
(``nm_mask``), or as tensor ops elsewhere (``tensor ops``: other devices, and what
``torch.compile`` fuses; ``compiled``, compile time reported apart). The table compares
them with ``argsort`` and with ``topk``, the best sort-based alternative, on one 4096x4096
weight (groups along in_features, dim 1).

    PYTHONPATH=. python benchmarks/mask_speed.py [--quick] [--contend N]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
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
    setup_threads,
    spread,
    time_once,
    write_json,
)
from tabulate import tabulate

import nmfx
from nmfx.masks import reference_nm_mask
from nmfx.pattern import parse_pattern

PATTERNS = ("2:4", "1:4", "4:8", "1:8", "2:16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def argsort_mask(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """The public SR-STE mask: sort each group of M by magnitude, zero the M - N smallest."""
    groups = weight.detach().abs().reshape(-1, m)
    index = torch.argsort(groups, dim=1)[:, : m - n]
    mask = torch.ones(groups.shape, dtype=torch.bool, device=weight.device)
    return mask.scatter_(1, index, False).reshape(weight.shape)


def topk_mask(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """The best sort-based variant: ``topk`` of N per group, scattered into a zero mask."""
    groups = weight.detach().abs().reshape(-1, m)
    index = torch.topk(groups, n, dim=1, sorted=False).indices
    mask = torch.zeros(groups.shape, dtype=torch.bool, device=weight.device)
    return mask.scatter_(1, index, True).reshape(weight.shape)


def check_nm(mask: torch.Tensor, n: int, m: int, name: str) -> None:
    """Every group of M along dim 1 keeps exactly N (raises AssertionError naming ``name``)."""
    per_group = mask.reshape(-1, m).sum(1)
    bad = int((per_group != n).sum())
    assert bad == 0, f"{name}: {bad} groups do not keep exactly {n} of {m}"


def compiled_nm_mask(pattern: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """``nm_mask`` for one pattern under ``torch.compile`` (static shapes)."""
    # A fresh dynamo cache per case: ten (pattern, dtype) variants of one function would
    # pass the recompile limit and silently fall back to eager.
    torch._dynamo.reset()
    return torch.compile(lambda w: nmfx.nm_mask(w, pattern, dim=1), dynamic=False)


def bench_case(
    weight: torch.Tensor, pattern: str, repeats: int, compile_mask: bool
) -> tuple[Rounds, dict[str, Any]]:
    """Raw seconds per method for one (weight, pattern), compile time, mask agreement."""
    n, m = (int(x) for x in pattern.split(":"))
    methods: dict[str, Callable[[], torch.Tensor]] = {
        "nm_mask": lambda: nmfx.nm_mask(weight, pattern, dim=1),
        "argsort": lambda: argsort_mask(weight, n, m),
        "topk": lambda: topk_mask(weight, n, m),
        "tensor ops": lambda: reference_nm_mask(weight, parse_pattern(pattern), 1),
    }
    compile_s = None
    if compile_mask:
        compiled = compiled_nm_mask(pattern)
        compile_s = time_once(lambda: compiled(weight))
        methods["nm_mask compiled"] = lambda: compiled(weight)
    masks = {name: fn() for name, fn in methods.items()}  # also the warm-up round
    for name, mask in masks.items():
        check_nm(mask, n, m, f"{name} {pattern} {weight.dtype}")
    assert torch.equal(masks["tensor ops"], masks["nm_mask"]), "tensor-op path != kernel"
    if compile_mask:
        assert torch.equal(masks["nm_mask compiled"], masks["nm_mask"]), "compiled != eager"
    # Masks may differ only where magnitudes tie (bf16 has many ties); report agreement.
    agree = float((masks["nm_mask"] == masks["argsort"]).float().mean())
    # Slow cases (M = 16 eager) stop after 3 rounds: the whole run must stay under 5 minutes.
    rounds = interleaved(methods, repeats=repeats, warmup=0, budget_s=10.0)
    return rounds, {"compile_s": compile_s, "nm_mask_equals_argsort": agree}


def case_row(dtype_name: str, pattern: str, rounds: Rounds, agree: float) -> list[Any]:
    """One table row from the clean rounds (all rounds when fewer than 3 were clean)."""
    times, used = rounds.pick()
    med = {k: median(v) for k, v in times.items()}
    comp = med.get("nm_mask compiled")
    return [
        dtype_name, pattern, used, ms(med["nm_mask"]), ms(med["argsort"]), ms(med["topk"]),
        round(med["argsort"] / med["nm_mask"], 2), round(med["topk"] / med["nm_mask"], 2),
        ms(med["tensor ops"]), round(med["argsort"] / med["tensor ops"], 2),
        ms(comp) if comp else "-", round(med["argsort"] / comp, 2) if comp else "-",
        round(spread(times["nm_mask"]), 2), f"{agree:.4%}",
    ]  # fmt: skip


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096, help="weight is size x size")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile'd nm_mask")
    add_contend_arg(parser)
    args = parser.parse_args()
    setup_threads(args.threads)
    patterns = ("2:4",) if args.quick else PATTERNS
    repeats = 3 if args.quick else 5

    torch.manual_seed(0)
    base = torch.randn(args.size, args.size)
    info = machine_info()
    rows, raw = [], []
    with Contention(args.contend), LoadMonitor() as load:
        for dtype_name, dtype in DTYPES.items():
            weight = base.to(dtype)
            for pattern in patterns:
                rounds, extra = bench_case(weight, pattern, repeats, not args.no_compile)
                rows.append(case_row(dtype_name, pattern, rounds, extra["nm_mask_equals_argsort"]))
                raw.append({
                    "dtype": dtype_name, "pattern": pattern, "shape": list(weight.shape),
                    **rounds.as_json(), **extra,
                })  # fmt: skip
    headers = [
        "dtype", "pattern", "rounds", "nm_mask ms", "argsort ms", "topk ms",
        "speedup vs argsort", "speedup vs topk", "tensor ops ms", "tensor ops vs argsort",
        "compiled ms", "compiled vs argsort",
        "nm_mask IQR/med", "same mask as argsort",
    ]  # fmt: skip
    print(f"N:M mask of a {args.size}x{args.size} weight, groups along dim 1, "
          f"median of 3-{repeats} interleaved runs (raw timings in the JSON)"
          + (f", {args.contend} busy-looping processes beside it" if args.contend else ""))  # fmt: skip
    print(tabulate(rows, headers=headers, tablefmt="github"))
    print(describe(info, load.result))
    path = write_json(
        "mask_speed",
        {"machine": info, "load": load.result, "quick": args.quick, "contend": args.contend,
         "repeats": repeats,
         "headers": headers, "rows": rows, "raw": raw},
        args.out,
    )  # fmt: skip
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
