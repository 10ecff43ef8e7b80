"""Dense vs semi-structured 2:4 ``F.linear`` on one NVIDIA GPU, and what ``lower("cuda")`` picks.

For LLaMA-7B's linear shapes ([out, in] = 4096x4096, 11008x4096, 4096x11008), fp16, bf16 and
int8, decode (1-16 rows of x) and prefill (256-4096 rows), with cuSPARSELt and CUTLASS: CUDA
events, warm-up, medians of interleaved samples. Then, for fp16 and bf16, each shape lowered by
``nmfx.lowering.cuda.lower_cuda`` (per-rows-bucket dispatch) is timed against the dense layer at
every benchmarked row count: the dispatcher's choice and whether it is ever slower than dense.

Without a GPU, ``--dry-run`` checks what the CPU can: the plan, every shape against nmfx's and
torch's constraint tables, the CUTLASS metadata layout of each shape (rows 0-127) through
``torch.sparse._semi_structured_conversions``, the row buckets, and the JSON output.

    PYTHONPATH=. python benchmarks/gpu_linear.py --out DIR [--dry-run] [--quick] [--budget-s S]

Writes ``DIR/gpu_linear.json`` and ``DIR/gpu_linear.txt``. The raw timings need only torch; the
nmfx parts (constraints, dispatcher) are skipped with the import error if nmfx cannot import.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._gpu import Budget, check_out_dir, cuda_medians, environment, table, write

SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008))  # [out_features, in_features]
DECODE_ROWS = (1, 2, 4, 8, 16)
PREFILL_ROWS = (256, 512, 1024, 2048, 4096)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "int8": torch.int8}
BACKENDS = ("cusparselt", "cutlass")
# torch._int_mm (the dense int8 baseline) needs more than 16 rows: smaller x is padded to this.
INT_MM_MIN_ROWS = 32
# Rows of each weight the layout check converts (CUTLASS's metadata interleave spans 32 rows);
# the pure-PyTorch conversion takes seconds per full weight on a CPU.
LAYOUT_CHECK_ROWS = {"cpu": 32, "cuda": 64}
# Where the timed tensors live. Only tests change it (to run this file's logic on CPU with the
# kernels and the timer faked).
DEVICE = "cuda"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="directory for the JSON and text")
    p.add_argument("--dry-run", action="store_true", help="CPU checks only (no GPU needed)")
    p.add_argument("--quick", action="store_true", help="one shape, rows 1, 16, 1024, 4096")
    p.add_argument("--budget-s", type=float, default=150.0, help="stop timing after this long")
    args = p.parse_args(argv)
    if args.budget_s <= 0:
        p.error(f"--budget-s {args.budget_s}: must be > 0 seconds")
    return args


def plan(quick: bool) -> dict[str, Any]:
    """What is timed: shapes, rows, dtypes, backends (fp16 first: it carries the targets)."""
    if quick:
        return {"shapes": [(11008, 4096)], "rows": [1, 16, 1024, 4096],
                "dtypes": ["fp16"], "backends": list(BACKENDS)}  # fmt: skip
    return {"shapes": list(SHAPES), "rows": [*DECODE_ROWS, *PREFILL_ROWS],
            "dtypes": list(DTYPES), "backends": list(BACKENDS)}  # fmt: skip


def nmfx_or_error() -> tuple[Any, str | None]:
    """``nmfx.lowering.cuda`` or the reason it cannot be imported here."""
    try:
        from nmfx.lowering import cuda

        return cuda, None
    except Exception as exc:  # any import failure: report it, keep the torch-only parts
        return None, f"{type(exc).__name__}: {exc}"


def constraint_check(p: dict[str, Any], cuda: Any) -> list[dict[str, Any]]:
    """Every (shape, dtype, backend) against nmfx's rule and torch's own table."""
    rows = []
    for (out, inp) in p["shapes"]:
        for dname in p["dtypes"]:
            for backend in p["backends"]:
                dtype = DTYPES[dname]
                cls = getattr(torch.sparse, f"SparseSemiStructuredTensor{_CLS[backend]}")
                entry = cls._DTYPE_SHAPE_CONSTRAINTS.get(dtype)
                torch_ok = entry is not None and all(
                    s >= m and s % m == 0
                    for s, m in ((out, entry.sparse_min_rows), (inp, entry.sparse_min_cols))
                )
                reason = cuda.semi_structured_constraint((out, inp), dtype, backend)
                rows.append({"shape": f"{out}x{inp}", "dtype": dname, "backend": backend,
                             "nmfx": reason or "ok", "torch": "ok" if torch_ok else "refused",
                             "agree": (reason is None) == torch_ok})  # fmt: skip
    return rows


_CLS = {"cusparselt": "CUSPARSELT", "cutlass": "CUTLASS"}


def masked_weight(out: int, inp: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    """A random 2:4 weight (the largest 2 of every 4 along in_features kept)."""
    w = torch.randn(out, inp, device=device)
    if dtype == torch.int8:  # integers in [-127, 127] without zeros, so the 2 kept are non-zero
        w = (w * 16).round().clamp(-126, 126)
        w = torch.where(w >= 0, w + 1, w - 1)
    idx = w.abs().view(out, inp // 4, 4).topk(2, dim=-1).indices
    keep = torch.zeros(out, inp // 4, 4, dtype=torch.bool, device=device).scatter_(-1, idx, True)
    return (w * keep.view(out, inp)).to(dtype)


def layout_check(p: dict[str, Any], device: str) -> list[dict[str, Any]]:
    """CUTLASS values/metadata of rows 0-127 of each shape through torch's reference conversion:
    the round trip is exact, values are the kept weights in order, metadata has CUTLASS's shape
    and dtype; on a GPU also that the GPU conversion equals the CPU reference bit for bit.
    The layout depends on in_features, not out_features: one check per in_features."""
    from torch.sparse._semi_structured_conversions import (
        sparse_semi_structured_from_dense_cutlass as from_dense,
    )
    from torch.sparse._semi_structured_conversions import (
        sparse_semi_structured_to_dense_cutlass as to_dense,
    )

    rows = []
    n = LAYOUT_CHECK_ROWS[device]
    for inp in sorted({inp for _, inp in p["shapes"]}):
        for dname in p["dtypes"]:
            dtype = DTYPES[dname]
            w = masked_weight(n, inp, dtype, "cpu")
            values, meta = from_dense(w)
            bits = 32 if dtype == torch.int8 else 16
            kept = w[w != 0].view(n, inp // 2)  # exactly 2 non-zeros in every group of 4
            row = {
                "shape": f"{n}x{inp}", "dtype": dname,
                "roundtrip_exact": bool(torch.equal(to_dense(values, meta), w)),
                "values_in_order": bool(torch.equal(values, kept)),
                "meta": f"{str(meta.dtype).removeprefix('torch.')}{list(meta.shape)}",
                "meta_ok": meta.dtype == getattr(torch, f"int{bits}")
                and tuple(meta.shape) == (n, inp // bits),
            }  # fmt: skip
            if device == "cuda":
                gv, gm = from_dense(w.cuda())
                row["gpu_equals_cpu"] = bool(torch.equal(gv.cpu(), values) and torch.equal(gm.cpu(), meta))
            rows.append(row)
    return rows


def _dense_int8(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    if x.shape[0] < INT_MM_MIN_ROWS:
        x = F.pad(x, (0, 0, 0, INT_MM_MIN_ROWS - x.shape[0]))
    return torch._int_mm(x, w.t())


def raw_cells(p: dict[str, Any], budget: Budget) -> list[dict[str, Any]]:
    """Dense vs semi-structured F.linear per (dtype, backend, shape, rows)."""
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    cells = []
    for dname in p["dtypes"]:
        dtype = DTYPES[dname]
        for backend in p["backends"]:
            for out, inp in p["shapes"]:
                base = {"dtype": dname, "backend": backend, "shape": f"{out}x{inp}"}
                if budget.over():
                    cells.append({**base, "error": "skipped: time budget spent"})
                    continue
                w = masked_weight(out, inp, dtype, DEVICE)
                old = SparseSemiStructuredTensor._FORCE_CUTLASS
                SparseSemiStructuredTensor._FORCE_CUTLASS = backend == "cutlass"
                try:
                    ws = to_sparse_semi_structured(w)
                except Exception as exc:
                    cells.append({**base, "error": f"conversion: {type(exc).__name__}: {exc}"[:300]})
                    continue
                finally:
                    SparseSemiStructuredTensor._FORCE_CUTLASS = old
                for rows in p["rows"]:
                    cells.append({**base, "rows": rows, **_time_cell(w, ws, rows, dtype, budget)})
                del w, ws
    return cells


def _time_cell(
    w: torch.Tensor, ws: torch.Tensor, rows: int, dtype: torch.dtype, budget: Budget
) -> dict[str, Any]:
    if budget.over():
        return {"error": "skipped: time budget spent"}
    if dtype == torch.int8:
        x = torch.randint(-8, 8, (rows, w.shape[1]), device=DEVICE, dtype=torch.int8)
        dense = lambda: _dense_int8(x, w)  # noqa: E731
    else:
        x = torch.randn(rows, w.shape[1], device=DEVICE, dtype=dtype)
        dense = lambda: F.linear(x, w)  # noqa: E731
    try:
        sparse_out = F.linear(x, ws)
        if dtype != torch.int8:
            ref = F.linear(x, w).float()
            err = float((sparse_out.float() - ref).norm() / ref.norm().clamp_min(1e-12))
        else:
            ref = _dense_int8(x, w)[: x.shape[0]]
            err = float((sparse_out.float() - ref.float()).abs().max())
        t = cuda_medians({"dense": dense, "sparse": lambda: F.linear(x, ws)})
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"[:300]}
    return {"dense_ms": t["dense"], "sparse_ms": t["sparse"], "speedup": t["dense"] / t["sparse"],
            "err": err, "err_kind": "max_abs" if dtype == torch.int8 else "rel_norm"}  # fmt: skip


def dispatcher_cells(p: dict[str, Any], cuda: Any, budget: Budget) -> list[dict[str, Any]]:
    """Each fp16/bf16 shape lowered by lower_cuda (measured per rows bucket), then the lowered
    layer timed against the dense one at every benchmarked row count."""
    from torch import nn

    from nmfx.pattern import parse_pattern
    from nmfx.plan import NMWeight

    record = {"0.weight": NMWeight("0.weight", "0", "linear", parse_pattern("2:4"), 1)}
    cells = []
    for dname in [d for d in p["dtypes"] if d != "int8"]:
        dtype = DTYPES[dname]
        for backend in p["backends"]:
            for out, inp in p["shapes"]:
                base = {"dtype": dname, "backend": backend, "shape": f"{out}x{inp}"}
                if budget.over():
                    cells.append({**base, "error": "skipped: time budget spent"})
                    continue
                dense = nn.Sequential(nn.Linear(inp, out, bias=False)).to(DEVICE, dtype)
                with torch.no_grad():
                    dense[0].weight.copy_(masked_weight(out, inp, dtype, DEVICE))
                lowered = copy.deepcopy(dense)
                try:
                    _, (decision,) = cuda.lower_cuda(lowered, record, backend=backend)
                except Exception as exc:
                    cells.append({**base, "error": f"lower_cuda: {type(exc).__name__}: {exc}"[:300]})
                    continue
                for rows in p["rows"]:
                    cells.append({**base, "rows": rows,
                                  **_lowered_cell(dense, lowered, decision, rows, dtype)})  # fmt: skip
    return cells


def _lowered_cell(
    dense: Any, lowered: Any, decision: Any, rows: int, dtype: torch.dtype
) -> dict[str, Any]:
    from nmfx.lowering.cuda_dispatch import row_bucket

    sparse_rows = decision.facts.get("sparse_rows", [])
    bucket = row_bucket(rows, sorted(decision.facts.get("rows", {})) or (rows,))
    choice = "sparse" if decision.verdict == "sparse" and bucket in sparse_rows else "dense"
    x = torch.randn(rows, dense[0].in_features, device=DEVICE, dtype=dtype)
    try:
        with torch.no_grad():
            t = cuda_medians({"dense": lambda: dense(x), "lowered": lambda: lowered(x)})
    except Exception as exc:
        return {"choice": choice, "error": f"{type(exc).__name__}: {exc}"[:300]}
    return {"choice": choice, "bucket": bucket, "verdict": decision.verdict,
            "dense_ms": t["dense"], "lowered_ms": t["lowered"],
            "lowered_vs_dense": t["dense"] / t["lowered"]}  # fmt: skip


def headline(raw: list[dict[str, Any]], disp: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's targets, read from the cells."""
    prefill = [c["speedup"] for c in raw if c.get("speedup") and c["dtype"] == "fp16"
               and c["shape"] == "11008x4096" and c["rows"] >= 1024]  # fmt: skip
    ratios = [c["lowered_vs_dense"] for c in disp if "lowered_vs_dense" in c]
    return {
        "fp16_11008x4096_prefill_ge1024_best_speedup": max(prefill, default=None),
        "target_prefill_1_3x_met": bool(prefill) and max(prefill) >= 1.3,
        "lowered_vs_dense_min": min(ratios, default=None),
        "lowered_never_slower_than_0_95x": bool(ratios) and min(ratios) >= 0.95,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    p = plan(args.quick)
    payload: dict[str, Any] = {"env": environment(), "plan": p, "dry_run": args.dry_run,
                               "skipped": [], "errors": []}  # fmt: skip
    cuda, why = nmfx_or_error()
    if cuda is None:
        payload["skipped"].append(f"constraint check and dispatcher: nmfx does not import ({why})")
    else:
        from nmfx.lowering.cuda_dispatch import ROW_BUCKETS, row_bucket

        payload["constraints"] = constraint_check(p, cuda)
        payload["row_buckets"] = {r: row_bucket(r) for r in p["rows"]}
        payload["row_bucket_defaults"] = list(ROW_BUCKETS)
        if not all(c["agree"] for c in payload["constraints"]):
            payload["errors"].append("nmfx's shape rule disagrees with torch's table")
    payload["layout"] = layout_check(p, "cpu" if args.dry_run else DEVICE)
    if not all(r["roundtrip_exact"] and r["meta_ok"] and r["values_in_order"]
               and r.get("gpu_equals_cpu", True) for r in payload["layout"]):  # fmt: skip
        payload["errors"].append("CUTLASS layout check failed")
    if args.dry_run:
        payload["skipped"].append("timings (dense vs sparse, lowered vs dense): --dry-run, no GPU")
        return payload
    budget = Budget(args.budget_s)
    payload["raw"] = raw_cells(p, budget)
    _partial(args, payload)
    payload["dispatcher"] = dispatcher_cells(p, cuda, budget) if cuda is not None else []
    payload["headline"] = headline(payload["raw"], payload["dispatcher"])
    return payload


def _partial(args: argparse.Namespace, payload: dict[str, Any]) -> None:
    """Save what is measured so far: a step killed by its time limit still leaves figures."""
    out = getattr(args, "out", None)
    if out is not None and out.is_dir():
        (out / "gpu_linear.partial.json").write_text(json.dumps(payload, default=str) + "\n")


def render(payload: dict[str, Any]) -> str:
    env = payload["env"]
    parts = [f"gpu_linear: {env.get('device', 'no GPU')}, torch {env['torch']}, CUDA "
             f"{env['cuda']}, cuSPARSELt {env['cusparselt']}, {env['date_utc']} UTC"]  # fmt: skip
    if payload.get("constraints"):
        bad = [c for c in payload["constraints"] if not c["agree"] or c["nmfx"] != "ok"]
        parts.append(f"constraints: {len(payload['constraints'])} (shape, dtype, backend) checked, "
                     f"{len(bad)} refused or disagreeing")  # fmt: skip
        if bad:
            parts.append(table(bad, ["shape", "dtype", "backend", "nmfx", "torch"]))
    parts.append("CUTLASS layout (torch.sparse._semi_structured_conversions):")
    parts.append(table(payload["layout"], ["shape", "dtype", "roundtrip_exact", "meta", "meta_ok",
                                           "values_in_order", "gpu_equals_cpu"]))  # fmt: skip
    if payload.get("raw"):
        parts.append("dense vs semi-structured F.linear (median ms, CUDA events):")
        parts.append(table(payload["raw"], ["dtype", "backend", "shape", "rows", "dense_ms",
                                            "sparse_ms", "speedup", "err", "error"]))  # fmt: skip
    if payload.get("dispatcher"):
        parts.append("lower('cuda') per rows bucket, the lowered layer vs dense:")
        parts.append(table(payload["dispatcher"], ["dtype", "backend", "shape", "rows", "choice",
                                                   "dense_ms", "lowered_ms", "lowered_vs_dense",
                                                   "error"]))  # fmt: skip
    if payload.get("headline"):
        parts.append("targets: " + ", ".join(f"{k}={v}" for k, v in payload["headline"].items()))
    for s in payload["skipped"]:
        parts.append(f"SKIPPED: {s}")
    for e in payload["errors"]:
        parts.append(f"ERROR: {e}")
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = check_out_dir(args.out)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_linear: no CUDA device here; use --dry-run for the CPU checks", file=sys.stderr)
        return 2
    try:
        payload = run(args)
    except Exception:
        payload = {"env": environment(), "dry_run": args.dry_run, "skipped": [],
                   "errors": [traceback.format_exc()], "layout": []}  # fmt: skip
    write(out, "gpu_linear", payload, render(payload))
    return 1 if payload["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
