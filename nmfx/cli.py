"""The ``nmfx`` command line: ``demo``, ``report``, ``inspect``, ``bench``.

Models are given by zoo name (``mlp``, ``resnet50``, ``llama``, ...), as
``package.module:callable`` returning an ``nn.Module`` (importable: ``PYTHONPATH=.`` from
its folder, or installed), or (``report``, ``inspect``) as a Hugging Face model: ``--hf DIR``
(from ``save_pretrained``) or ``--hf-config config.json`` (random init). Exit codes: 0 success, 1 a
failure while running, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nmfx.cli_checks import UsageError, check_args, parse_shape

__all__ = ["UsageError", "main"]


def _parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"--set {item!r} must be KEY=VALUE, e.g. --set n_layers=4")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def load_model(spec: str, overrides: dict[str, Any]) -> tuple[nn.Module, str | None]:
    """A zoo name or ``module:callable``; returns the model and its zoo name (if any)."""
    import model_zoo

    if ":" in spec:
        mod_name, _, attr = spec.partition(":")
        try:
            factory = getattr(importlib.import_module(mod_name), attr)
        except (ImportError, AttributeError) as exc:
            raise UsageError(f"cannot load {spec!r}: {exc}") from exc
        model = factory(**overrides)
        if not isinstance(model, nn.Module):
            raise UsageError(f"{spec} returned {type(model).__name__}, not an nn.Module")
        return model, None
    if spec not in model_zoo.MODELS:
        from nmfx.config import close_match_hint

        hint = close_match_hint(spec, list(model_zoo.MODELS))
        raise UsageError(
            f"unknown model {spec!r}{hint}; zoo models: {', '.join(model_zoo.MODELS)} or module:callable"
        )
    try:
        return model_zoo.build(spec, **overrides), spec
    except (TypeError, ValueError) as exc:
        raise UsageError(str(exc)) from exc


INPUT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                "int64": torch.int64, "int32": torch.int32}  # fmt: skip


def _explicit_input(model: nn.Module, shape: list[int], dtype: str) -> torch.Tensor:
    """Random floats, or token ids valid for every embedding of the model (int dtypes)."""
    if INPUT_DTYPES[dtype].is_floating_point:
        return torch.randn(shape, dtype=INPUT_DTYPES[dtype])
    sizes = [m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding)]
    return torch.randint(0, min(sizes, default=2), shape, dtype=INPUT_DTYPES[dtype])


def load_model_args(args: argparse.Namespace) -> tuple[nn.Module, str | None]:
    """The model a command names: exactly one of MODEL, ``--hf`` and ``--hf-config``."""
    given = [s for s in (args.model, args.hf, args.hf_config) if s]
    if len(given) != 1:
        raise UsageError(
            "give one model: a zoo name or module:callable, --hf DIR (a save_pretrained "
            f"folder) or --hf-config config.json; got {len(given)}"
        )
    if args.model:
        return load_model(args.model, _parse_overrides(args.set))
    from nmfx.hf import HFInputError, load_hf_config, load_hf_dir

    try:
        return (load_hf_dir(args.hf) if args.hf else load_hf_config(args.hf_config)), None
    except HFInputError as exc:
        raise UsageError(str(exc)) from exc


def example_inputs(
    model: nn.Module,
    zoo_name: str | None,
    batch: int,
    seq: int | None,
    input_shape: str | None,
    input_dtype: str = "float32",
) -> tuple:
    import model_zoo

    if input_shape:
        shape = parse_shape(input_shape, "--input-shape", "1x3x32x32")
        return (_explicit_input(model, shape, input_dtype),)
    if zoo_name is None:
        from nmfx.hf import HFInputError, token_inputs

        try:
            tokens = token_inputs(model, batch, seq)
        except HFInputError as exc:
            raise UsageError(str(exc)) from exc
        if tokens is not None:
            return tokens
        raise UsageError("a module:callable model needs --input-shape, e.g. --input-shape 1x1024")
    x = model_zoo.example_input(zoo_name, batch=batch, model=model)
    config = getattr(model, "config", None)
    for key in ("max_seq_len", "n_positions"):
        limit = getattr(config, key, None)
        if seq is not None and isinstance(limit, int) and seq > limit:
            raise UsageError(
                f"--seq {seq} is longer than {zoo_name}'s {key}={limit}; pass --seq {limit} or "
                f"less, or --set {key}={seq}"
            )
    if seq is not None and x.dtype == torch.long:
        x = x[:, :1].repeat(1, seq) if seq > x.shape[1] else x[:, :seq]
    return (x,)


def _progress(enabled: bool) -> Callable[[str], None]:
    from tqdm import tqdm

    bar = tqdm(
        total=None,
        disable=not enabled,
        file=sys.stderr,
        bar_format="{desc} [{elapsed}]",
        leave=False,
    )

    def say(msg: str) -> None:
        bar.set_description_str(msg)
        bar.update()

    return say


def _write_outputs(rep: Any, args: argparse.Namespace) -> None:
    for path, render in (
        (args.json, rep.to_json),
        (args.markdown, rep.to_markdown),
        (args.csv, rep.to_csv),
    ):
        if path:
            Path(path).write_text(render())
            print(f"wrote {path}")
    if args.plot:
        rep.plot(args.plot)
        print(f"wrote {args.plot}")


def cmd_report(args: argparse.Namespace) -> int:
    from nmfx.reporting import report

    model, zoo = load_model_args(args)
    inputs = example_inputs(model, zoo, args.batch, args.seq, args.input_shape, args.input_dtype)
    rep = report(model, inputs, args.target, pattern=args.pattern, warmup=args.warmup,
                 repeats=args.repeats, compile_dense=args.compile_dense,
                 progress=_progress(not args.no_progress))  # fmt: skip
    print(rep)
    _write_outputs(rep, args)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    import nmfx

    model, _ = load_model_args(args)
    options: dict[str, Any] = {
        "pattern": args.pattern,
        "keep_output_dense": not args.sparsify_output,
    }
    if args.exclude:
        options["exclude"] = args.exclude
    try:
        sparse = nmfx.sparsify(copy.deepcopy(model), **options)
    except ValueError as exc:
        if "nothing was changed" not in str(exc):  # a bad option: a usage error
            raise UsageError(str(exc)) from exc
        print(str(exc))  # a valid answer: no layer can be N:M; the reasons per layer
        return 1
    print("training plan (what nmfx.sparsify makes N:M; which layers the CPU lowering packs, "
          "and how fast, is in `nmfx report`):")  # fmt: skip
    print(nmfx.summary(sparse))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from nmfx.kernels import dispatch_table, nm_linear
    from nmfx.masks import nm_mask
    from nmfx.packed import pack
    from nmfx.reporting.timing import time_interleaved

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if args.dtype not in dtypes:
        raise UsageError(f"--dtype {args.dtype!r} is not one of {list(dtypes)}")
    rows, cols = parse_shape(args.shape, "--shape", "4096x4096")
    dtype = dtypes[args.dtype]
    w = torch.randn(rows, cols).to(dtype)
    w = torch.where(nm_mask(w, args.pattern), w, 0)
    p = pack(w, args.pattern)
    if args.verbose:  # the dispatcher's per-shape choices: for kernel work, not a first look
        table = dispatch_table()
        print(f"dispatch table: {json.dumps(table.get('entries', table), default=str)[:400]}")
    for batch in args.batch:
        x = torch.randn(batch, cols).to(dtype)
        fns = {
            "dense": lambda x=x: torch.nn.functional.linear(x, w),
            "nmfx": lambda x=x: nm_linear(x, p),
        }
        t = time_interleaved(fns, warmup=5, repeats=args.repeats, min_seconds=0.2)
        d, s = t["dense"].median * 1e3, t["nmfx"].median * 1e3
        gbs = p.nbytes / (s / 1e3) / 1e9
        print(f"{rows}x{cols} {args.pattern} {args.dtype} batch {batch}: dense F.linear {d:.3f} ms, "
              f"nmfx {s:.3f} ms, {d / s:.2f}x, packed weight read at {gbs:.1f} GB/s")  # fmt: skip
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from nmfx.demo import run_demo

    return run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nmfx", description="N:M structured sparsity for PyTorch."
    )
    from nmfx import __version__

    parser.add_argument("--version", action="version", version=f"nmfx {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what nmfx does (INFO)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def model_args(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "model",
            nargs="?",
            help="zoo name (mlp, resnet18, resnet50, vit_tiny, gpt2, llama, ...) or "
            "module:callable returning an nn.Module (the module must be importable: run with "
            "PYTHONPATH=. from its folder, or install it)",
        )
        p.add_argument("--hf", metavar="DIR",
                       help="a Hugging Face model folder written by save_pretrained (instead of MODEL)")  # fmt: skip
        p.add_argument("--hf-config", metavar="CONFIG",
                       help="a transformers config.json: the model, randomly initialised")  # fmt: skip
        p.add_argument(
            "--pattern", default="2:4", help="N:M pattern, keep N of every M (default 2:4)"
        )
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a zoo config field (or a factory kwarg), e.g. --set n_layers=4")  # fmt: skip

    demo = sub.add_parser(
        "demo", help="the README's main job: train SR-STE on digits, lower, report"
    )
    demo.add_argument("--epochs", type=int, default=6, help="training epochs per model (default 6)")
    demo.add_argument(
        "--steps",
        type=int,
        default=None,
        help="stop each training after this many steps (quick runs)",
    )
    demo.add_argument("--pattern", default="2:4", help="N:M pattern (default 2:4)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.add_argument(
        "--repeats", type=int, default=30, help="timing repeats for the report (default 30)"
    )
    demo.add_argument(
        "--out", default="nmfx-demo", help="directory for report.json and speedup.png"
    )
    demo.set_defaults(func=cmd_demo)

    rep = sub.add_parser("report", help="measure dense vs sparse per layer and end to end")
    model_args(rep)
    rep.add_argument(
        "--target", default="cpu", choices=["cpu", "cuda"], help="where to run (default cpu)"
    )
    rep.add_argument(
        "--batch", type=int, default=1, help="batch size of the example input (default 1)"
    )
    rep.add_argument("--seq", type=int, default=None, help="sequence length for decoder models")
    rep.add_argument(
        "--input-shape",
        default=None,
        help="explicit input shape, e.g. 1x1024 (needed for module:callable); token models "
        "need an integer --input-dtype",
    )
    rep.add_argument(
        "--input-dtype",
        default="float32",
        choices=list(INPUT_DTYPES),
        help="dtype of the --input-shape input (default float32); int64/int32 give random "
        "token ids below the model's smallest nn.Embedding size",
    )
    rep.add_argument(
        "--repeats", type=int, default=20, help="timed repeats per contender (default 20)"
    )
    rep.add_argument("--warmup", type=int, default=5, help="warm-up runs per contender (default 5)")
    rep.add_argument(
        "--compile-dense",
        action="store_true",
        help="dense baseline = best of eager and torch.compile",
    )
    rep.add_argument("--json", help="write the report as JSON to this path")
    rep.add_argument("--markdown", help="write the report as Markdown to this path")
    rep.add_argument("--csv", help="write the per-layer rows as CSV to this path")
    rep.add_argument("--plot", help="write a per-layer speedup PNG to this path (needs matplotlib)")
    rep.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    rep.set_defaults(func=cmd_report)

    ins = sub.add_parser(
        "inspect",
        help="the training plan: what nmfx.sparsify would make N:M, what stays dense and why "
        "(which layers the CPU lowering packs is in `nmfx report`)",
    )
    model_args(ins)
    ins.add_argument(
        "--exclude", action="append", default=[], help="glob of layers to keep dense (repeatable)"
    )
    ins.add_argument(
        "--sparsify-output", action="store_true", help="also sparsify the output layer"
    )
    ins.set_defaults(func=cmd_inspect)

    bench = sub.add_parser(
        "bench",
        help="time the packed CPU kernel against F.linear for one shape (-v: the dispatch table)",
    )
    bench.add_argument(
        "--shape", default="4096x4096", help="weight shape OUTxIN (default 4096x4096)"
    )
    bench.add_argument(
        "--batch", type=int, nargs="+", default=[1, 8, 64], help="rows of x (default 1 8 64)"
    )
    bench.add_argument("--pattern", default="2:4", help="N:M pattern (default 2:4)")
    bench.add_argument("--dtype", default="fp32", help="fp32, bf16 or fp16 (default fp32)")
    bench.add_argument("--repeats", type=int, default=20, help="timed repeats (default 20)")
    bench.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                       help="also print the dispatcher's table (same as nmfx -v bench)")  # fmt: skip
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s"
    )
    try:
        check_args(args)
        return args.func(args)
    except UsageError as exc:
        parser.exit(2, f"nmfx: error: {exc}\n")
    except (ValueError, TypeError, RuntimeError, ImportError) as exc:
        parser.exit(1, f"nmfx: error: {exc}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
