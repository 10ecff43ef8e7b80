"""One-row GEMV of a decoding LLM's linears: every sparse kernel path vs dense ``F.linear``.

Decoding one token runs every linear of the model once on one row of x, so its time is the
weights' read time: what counts is each kernel's weight bandwidth. This times, interleaved, the
linears of a Llama with TinyLlama-1.1B's sizes (per layer q 2048x2048, k and v 256x2048, o
2048x2048, gate and up 5632x2048, down 2048x5632; ``--layers`` layers plus lm_head 32000x2048),
each layer's weights its own tensors, called in the model's order:

* ``decode set``: every linear once per round; the set (hundreds of MB) far exceeds the last-level
  cache, so the weights stream from DRAM, as in decoding;
* per shape: one weight called 8 times per round, so it is read from the cache when it fits
  (labelled by its dense size against the L3).

Contenders: dense ``F.linear`` on the dense weight, each one-row sparse path this host runs
(forced: ``avx2-expand``, ``avx2-select``, ``avx512-expand``, ``avx512bf16-gemv``, ...) and
``nm_linear`` as shipped (autotuned; tuned on its first call, cached on disk). GB/s counts the
bytes each reads: the dense weight for ``F.linear``, the packed values and mask for the rest.

    python benchmarks/decode_linears.py --threads 1 --dtypes bfloat16,float32

``--rows N`` times the same linears at N rows of x instead: a prompt's forward (prefill) of N
tokens, where the batched paths (``avx2-panels``, ``avx512-panels``, ...) join the contenders
and the one-row selecting GEMVs leave. The set then holds the layers' linears only:
``nmfx.hf.fast_generate`` runs lm_head on the prompt's last row alone (``logits_to_keep=1``).

    python benchmarks/decode_linears.py --threads 2 --dtypes float32 --rows 32
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _timing import (
    Contention,
    LoadMonitor,
    add_contend_arg,
    base_parser,
    describe,
    interleaved,
    machine_info,
    median,
    ms,
    setup_threads,
    write_json,
)

import nmfx.kernels as K
from nmfx.kernels import _autotune, _build
from nmfx.packed import PackedNM, pack

LAYER = [(2048, 2048), (256, 2048), (256, 2048), (2048, 2048), (5632, 2048), (5632, 2048),
         (2048, 5632)]  # fmt: skip
LM_HEAD = (32000, 2048)
L3_BYTES = 32 * 2**20  # the AMD host's; the label only


def random_nm(rows: int, cols: int, n: int, m: int, dtype: torch.dtype) -> torch.Tensor:
    w = torch.randn(rows, cols // m, m)
    idx = w.abs().topk(n, dim=-1).indices
    return torch.zeros_like(w).scatter_(-1, idx, w.gather(-1, idx)).reshape(rows, cols).to(dtype)


def packed_bytes(p: PackedNM) -> int:
    return p.values.numel() * p.values.element_size() + p.mask.numel()


def sparse_paths(n: int, m: int, dtype: str, rows: int = 1) -> list[str]:
    """The sparse paths of this host (forced) at ``rows`` rows of x; at one row without the
    batched ones."""
    return [c for c in _autotune.host_choices(n, m, rows, dtype)
            if c not in ("dense", "portable") and (rows > 1 or not c.endswith("-panels"))]  # fmt: skip


def contenders(
    ws: list[torch.Tensor], ps: list[PackedNM], n: int, m: int, dtype: torch.dtype, rows: int = 1
) -> dict[str, Callable[[], object]]:
    xs = {w.shape[1]: torch.randn(rows, w.shape[1]).to(dtype) for w in ws}
    op = torch.ops.nmfx_cpu.nm_gemm.default

    def dense() -> None:
        for w in ws:
            F.linear(xs[w.shape[1]], w)

    def path(code: int) -> Callable[[], None]:
        def run() -> None:
            for p in ps:
                r, c = p.shape
                op(xs[c], p.values, p.mask, None, r, c, n, m, code)

        return run

    def shipped() -> None:
        for p in ps:
            K.nm_linear(xs[p.shape[1]], p)

    fns: dict[str, Callable[[], object]] = {"F.linear": dense}
    for choice in sparse_paths(n, m, str(dtype).removeprefix("torch."), rows):
        fns[choice] = path(_autotune.path_code(choice))
    fns["nm_linear"] = shipped
    return fns


def measure(
    shapes: list[tuple[int, int]],
    pattern: str,
    dtype: torch.dtype,
    repeats: int,
    label: str,
    calls: int = 1,
    rows: int = 1,
) -> dict[str, Any]:
    """Each weight of ``shapes`` (its own tensor) called ``calls`` times in a row, per round, on
    ``rows`` rows of x."""
    n, m = (int(v) for v in pattern.split(":"))
    ws = [w for r, c in shapes for w in [random_nm(r, c, n, m, dtype)] * calls]
    ps = [p for w in ws[::calls] for p in [pack(w, pattern)] * calls]
    dense_b = sum(w.numel() * w.element_size() for w in ws)
    sparse_b = sum(packed_bytes(p) for p in ps)
    fns = contenders(ws, ps, n, m, dtype, rows)
    with torch.inference_mode():
        fns["nm_linear"]()  # tunes the shapes (or reads the cache) before timing
        rounds = interleaved(fns, repeats, warmup=1)
    secs, used = rounds.pick()
    out = {"set": label, "dtype": str(dtype).removeprefix("torch."), "pattern": pattern,
           "rows_of_x": rows, "dense_bytes": dense_b, "packed_bytes": sparse_b, "rounds": used,
           "raw": rounds.as_json(), "ms": {}, "GBps": {}}  # fmt: skip
    for name, s in secs.items():
        t = median(s)
        out["ms"][name] = ms(t)
        out["GBps"][name] = round((dense_b if name == "F.linear" else sparse_b) / t / 1e9, 2)
    del ws, ps, fns
    gc.collect()
    return out


def table_rows(results: list[dict[str, Any]]) -> list[list[Any]]:
    rows = []
    for res in results:
        dense_ms = res["ms"]["F.linear"]
        for name, t in res["ms"].items():
            rows.append([res["set"], res["dtype"], name, t, res["GBps"][name],
                         round(dense_ms / t, 2)])  # fmt: skip
    return rows


def main() -> None:
    parser = base_parser(__doc__.split("\n")[0])
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--pattern", default="2:4")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=15, help="rounds per set")
    parser.add_argument("--rows", type=int, default=1,
                        help="rows of x (default 1: decoding; e.g. 32: a 32-token prefill)")  # fmt: skip
    add_contend_arg(parser)
    args = parser.parse_args()
    setup_threads(args.threads)
    if not K.kernels_available():
        raise SystemExit(f"nmfx kernels unavailable: {K.build_error()}")
    torch.manual_seed(0)
    if args.rows < 1:
        parser.error(f"--rows {args.rows}: give at least 1 row of x")
    layers = 1 if args.quick else args.layers
    model = LAYER * layers + ([LM_HEAD] if args.rows == 1 else [])
    what = "decode set" if args.rows == 1 else f"prefill set, {args.rows} rows of x"
    head = " + lm_head" if args.rows == 1 else ", no lm_head"
    info = machine_info()
    results = []
    with Contention(args.contend), LoadMonitor() as load:
        for name in args.dtypes.split(","):
            dtype = getattr(torch, name)
            results.append(measure(model, args.pattern, dtype, args.repeats,
                                   f"{what} ({layers} layers{head})", rows=args.rows))  # fmt: skip
            for shape in sorted(set(LAYER)):
                nbytes = shape[0] * shape[1] * dtype.itemsize
                where = "fits" if nbytes * 0.6 < L3_BYTES else "exceeds"
                label = f"{shape[0]}x{shape[1]} ({where} L3)"
                results.append(
                    measure([shape], args.pattern, dtype, args.repeats, label, 8, args.rows)
                )
    headers = ["set", "dtype", "path", "ms", "GB/s read", "x F.linear"]
    print(f"{args.rows} row(s) of x, pattern {args.pattern}, ISAs {_build.supported_isas()}")
    print(tabulate(table_rows(results), headers=headers, tablefmt="github"))
    print("\n" + describe(info, load.result))
    payload = {"machine": info, "load": load.result, "contend": args.contend, "layers": layers,
               "rows_of_x": args.rows,
               "pattern": args.pattern, "headers": headers, "rows": table_rows(results),
               "results": results}  # fmt: skip
    path = write_json("decode_linears", payload, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
