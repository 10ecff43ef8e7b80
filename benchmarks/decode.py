"""LLM decoding with Hugging Face ``generate``: tokens/s of dense vs nmfx, same weights.

A ``LlamaForCausalLM`` with TinyLlama-1.1B's layer sizes (hidden 2048, MLP 5632, 32 heads,
4 KV heads, vocab 32000; 4 layers by default, ``--layers 22`` for the full depth), random
init, every Linear pruned 2:4 by magnitude (``sparsify`` + ``finalize``), then run by:

- ``dense``: the pruned model as it is (eager, dense kernels: the baseline);
- ``nmfx``: ``nmfx.lower(model, "cpu")`` (eager, packed 2:4 kernels);
- ``nmfx-compile``: ``model.forward = torch.compile(model.forward, backend="nmfx")`` with
  HF's static KV cache (``cache_implementation="static"``: one compiled decode step);
- ``inductor``: the same with the default backend on the dense model (the best dense);
- ``nmfx-fast``: ``nmfx.lower(model, "cpu")``, then ``nmfx.hf.fast_generate`` (the prompt eager
  into a static KV cache, then one ``torch.compile``'d step per token: no ``generate`` loop);
- ``inductor-fast``: ``fast_generate`` on the dense model (the same loop, dense weights);
- ``nmfx-compile-unfused`` (not run by default): ``nmfx-compile`` with
  ``options={"fuse_linears": False}``: every linear its own packed call (q/k/v and gate/up
  are otherwise one call each);
- ``nmfx-lower-compile`` (not run by default): ``nmfx.lower(model, "cpu")``, then
  ``torch.compile(model.forward)`` (inductor) with the static cache: the compiled graph calls the
  lowered modules' packed buffers, so the model holds no dense weights (``nmfx-compile`` freezes
  packed copies into its graph beside the model's own dense parameters).
- ``nmfx-load``, ``dense-load`` (``--rss-only``, not run by default): the ``nmfx`` and ``dense``
  models saved with ``torch.save`` by one child, then loaded with ``torch.load`` in a fresh
  process (``_rss.py``) that generates: the deployment path, with no capture, build or tuning
  in the measured process (``dense-load`` imports no nmfx). ``nmfx-mmap``, ``dense-mmap``: the
  same loaded with ``torch.load(mmap=True)``: a weight's pages become resident when read (the
  embedding's, only for the rows of the tokens seen), as llama.cpp's mmap'd weights do.

Where ``llama-cpp-python`` is installed and a llama.cpp source tree is given (``--llama-cpp-dir``;
see ``_llamacpp.py``), the same pruned weights converted by llama.cpp's converter run beside
them at batch 1 as ``llama.cpp-F32``, ``-F16``, ``-BF16``, ``-Q8_0`` (``--gguf``), same token
ids, same threads, with the F32 logits checked against HF's; otherwise the script says why not.

Per dtype (fp32, bf16), lm_head (sparse: pruned too; dense: kept dense), batch and prompt
length, the contenders run interleaved (A B, B A, ...) on one prompt; tokens/s counts the
new tokens of the whole ``generate`` (prefill included). Greedy tokens are compared with
``dense`` of the same dtype. Peak RSS is taken per contender in a child process that holds
only that contender, with what the build freed handed back (``malloc_trim``) and the
high-water mark reset (``/proc/self/clear_refs``) right before ``generate``. ``--profile`` measures where one decode token of each contender goes (``_decode_profile``).

    PYTHONPATH=. python benchmarks/decode.py --dtypes fp32 bf16 --batch 1 --prompt 32 \\
        --new 32 --contenders dense nmfx          # a subset; JSON to out/decode.json
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _decode_profile
import _llamacpp
import _rss
import _timing

import nmfx
from nmfx.lowering.memory import release_freed_memory

CONTENDERS = (
    "dense", "nmfx", "nmfx-compile", "inductor", "nmfx-fast", "inductor-fast",
    "nmfx-compile-unfused", "nmfx-lower-compile", "nmfx-load", "dense-load", "nmfx-mmap",
    "dense-mmap",
)  # fmt: skip
# RSS-only contenders: the model of the value, saved by one child, loaded by a fresh process
# (``-mmap``: ``torch.load(mmap=True)``, the weights' pages resident only once touched)
LOADED = {"nmfx-load": "nmfx", "dense-load": "dense", "nmfx-mmap": "nmfx", "dense-mmap": "dense"}
DEFAULT_CONTENDERS = CONTENDERS[:6]
NMFX = [c for c in CONTENDERS if c.startswith("nmfx")]  # paired against llama.cpp's too
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DEFAULT_OUT = Path("out/decode.json")  # untracked (/out/ is git-ignored)


def build_pruned(args: Any, lm_head: str, stage: Any = None) -> torch.nn.Module:
    """The benchmark model, every Linear 2:4 by magnitude (lm_head too when ``sparse``);
    ``stage(name)`` (an RSS child's ``_rss.Stages``) is called after each step."""
    stage = stage or (lambda name: None)
    import transformers as tf

    cfg = tf.LlamaConfig(
        hidden_size=args.hidden, intermediate_size=args.mlp, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        vocab_size=args.vocab, max_position_embeddings=max(args.prompt) + args.new + 8,
    )  # fmt: skip
    with torch.device("meta"):
        model = tf.LlamaForCausalLM(cfg)
    model = model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02, generator=gen) if p.dim() > 1 else p.fill_(1.0)
    model.model.rotary_emb = type(model.model.rotary_emb)(cfg)  # to_empty left inv_freq empty
    stage("built")
    nmfx.sparsify(model, keep_output_dense=lm_head == "dense", mask_mode="fixed")
    stage("sparsified")
    nmfx.finalize(model)
    stage("finalized")
    return model.eval()


def prepare(name: str, pruned: torch.nn.Module, dtype: torch.dtype, inplace: bool = False):
    """(model, generate kwargs) for contender ``name`` from the pruned model."""
    model = pruned.to(dtype) if inplace else copy.deepcopy(pruned).to(dtype)
    extra: dict[str, Any] = {}
    if name in ("nmfx", "nmfx-lower-compile", "nmfx-fast"):
        model = nmfx.lower(model, "cpu", inplace=True)
    if name in ("nmfx-fast", "inductor-fast"):  # compiled (inductor) step, static cache
        extra[_decode_profile.FAST] = True
    elif name == "nmfx-lower-compile":  # the lowered model compiled: its packed buffers only
        model.forward = torch.compile(model.forward)
        extra["cache_implementation"] = "static"
    elif name in ("nmfx-compile", "inductor", "nmfx-compile-unfused"):
        backend = "inductor" if name == "inductor" else "nmfx"
        options = {"fuse_linears": False} if name == "nmfx-compile-unfused" else None
        model.forward = torch.compile(model.forward, backend=backend, options=options)
        extra["cache_implementation"] = "static"
    return model.eval(), extra


generate = _decode_profile.generate_tokens


def child_rss(args: Any) -> None:
    """Build, keep only one contender, reset the RSS high-water mark, generate once (or, with
    ``--save``, save the contender's model for a fresh process to load)."""
    dtype_name, lm_head, name = args.child
    stage = _rss.Stages()
    stage("imported")
    pruned = build_pruned(args, lm_head, stage)
    model, extra = prepare(name, pruned, DTYPES[dtype_name], inplace=True)
    stage("prepared")
    del pruned
    gc.collect()
    if args.save:
        torch.save(model, args.save)
        return
    ids = torch.randint(0, args.vocab, (args.batch[0], args.prompt[0]))
    # What building and pruning freed (the fp32 model before a cast, masks) stays resident
    # in glibc's heap until trimmed (nmfx.lower trims too); trimmed for every contender alike.
    release_freed_memory()
    stage("trimmed")
    build_peak = _rss.vm_hwm_mb()  # of the build, sparsify, finalize, lowering (reset next)
    out = _rss.measure_generate(model, ids, args.new, extra)
    print(json.dumps({**out, "stages_mb": stage, "build_peak_rss_mb": build_peak}))


def _rss_cells(args: Any, dtype_name: str, lm_head: str) -> dict[str, dict]:
    saved: dict[str, Path] = {}  # a model saved once for its -load and -mmap contenders
    try:
        rss = {n: peak_rss(args, dtype_name, lm_head, n, saved) for n in args.contenders}
    finally:
        for path in saved.values():
            path.unlink(missing_ok=True)  # GBs at 22 layers
    rss = {n: v for n, v in rss.items() if v}
    base = rss.get("dense", {}).get("peak_rss_mb")
    print(f"  peak RSS during generate (MB; weights MB), batch {args.batch[0]}, prompt "
          f"{args.prompt[0]}: " + ", ".join(
              f"{n} {v['peak_rss_mb']:.0f} ({v['weights_mb']:.0f})"
              + (f" {v['peak_rss_mb'] / base:.2f}x dense" if base and n != "dense" else "")
              for n, v in rss.items()))  # fmt: skip
    for n, v in rss.items():  # where each child held what before generate (RSS, MB)
        print(f"    {n}: " + ", ".join(f"{k} {mb:.0f}" for k, mb in v.get("stages_mb", {}).items()))
    return rss


def peak_rss(
    args: Any, dtype_name: str, lm_head: str, name: str, saved: dict[str, Path]
) -> dict | None:
    run = ["--batch", str(args.batch[0]), "--prompt", str(args.prompt[0])]
    run += ["--threads", str(args.threads)] if args.threads else []
    if name not in LOADED:
        cmd = [sys.executable, __file__, "--child", dtype_name, lm_head, name, *_shape_flags(args)]
        return _child_json(name, cmd + run)
    base = LOADED[name]
    if base not in saved:
        path = Path(args.out).parent / f"rss-{base}-{args.layers}L-{dtype_name}-{lm_head}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        saved[base] = path
        save = [sys.executable, __file__, "--child", dtype_name, lm_head, base,
                *_shape_flags(args), *run, "--save", str(path)]  # fmt: skip
        if _child_json(f"{name} (save)", save, saved=path) is None:
            return None
    if not saved[base].exists():
        return None  # its save child failed (reported then)
    new, vocab = ["--new", str(args.new)], ["--vocab", str(args.vocab)]
    mmap = ["--mmap"] if name.endswith("-mmap") else []
    return _child_json(name, [sys.executable, _rss.__file__, str(saved[base]), *new, *vocab,
                              *run, *mmap])  # fmt: skip


def _child_json(name: str, cmd: list[str], saved: Path | None = None) -> dict | None:
    """The child's last JSON line (``{}`` for a save child that wrote ``saved``), or None."""
    done = subprocess.run(cmd, capture_output=True, text=True)
    if saved is not None and done.returncode == 0 and saved.exists():
        return {}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    print(f"  rss child for {name} failed: {done.stderr.strip().splitlines()[-1:]}")
    return None


def _shape_flags(args: Any) -> list[str]:
    return [
        "--layers", str(args.layers), "--hidden", str(args.hidden), "--mlp", str(args.mlp),
        "--heads", str(args.heads), "--kv-heads", str(args.kv_heads), "--vocab",
        str(args.vocab), "--new", str(args.new),
    ]  # fmt: skip


def run_case(
    args: Any, dtype_name: str, lm_head: str, pruned: torch.nn.Module, gguf: dict[str, Any]
) -> list[dict]:
    """One dtype and lm_head: every batch and prompt, the contenders interleaved (llama.cpp's,
    ``gguf``, at batch 1 only: llama-cpp-python decodes one sequence)."""
    dtype = DTYPES[dtype_name]
    # dense fp32 is the pruned model itself (not changed by generate), and nmfx-fast decodes
    # nmfx's lowered model: copies fewer of the weights (the 22-layer model is 4.4 GB per copy)
    models = {}
    for name in args.contenders:
        if name == "dense" and pruned.dtype == dtype:
            models[name] = (pruned.eval(), {})
        elif name == "nmfx-fast" and "nmfx" in models:  # the same lowered model, decoded by
            models[name] = (models["nmfx"][0], {_decode_profile.FAST: True})  # fast_generate
        else:
            models[name] = prepare(name, pruned, dtype)
    results = []
    for batch in args.batch:
        for prompt in args.prompt:
            ids = torch.randint(
                0, args.vocab, (batch, prompt), generator=torch.Generator().manual_seed(1)
            )
            tokens = {n: generate(m, ids, args.new, x) for n, (m, x) in models.items()}  # + compile
            fns = {
                n: (lambda m=m, x=x, ids=ids: generate(m, ids, args.new, x))
                for n, (m, x) in models.items()
            }
            for name, runner in gguf.items() if batch == 1 else ():
                new = torch.tensor([runner.generate(ids[0].tolist(), args.new)])
                tokens[name] = torch.cat([ids, new], dim=1)
                fns[name] = lambda r=runner, ids=ids: r.generate(ids[0].tolist(), args.new)
            if args.split:  # a 1-token run of each: the prompt's forward (see _split)
                for name in list(fns):
                    fns[name + PREFILL] = _one_token(name, models, gguf, ids)
            with _timing.LoadMonitor() as load:
                rounds = _timing.interleaved(fns, repeats=args.repeats, warmup=0)
            split = _split(rounds.seconds, args.new)
            base = tokens.get("dense")
            row = {"dtype": dtype_name, "lm_head": lm_head, "batch": batch, "prompt": prompt,
                   "new_tokens": args.new, "load": load.result, "rounds": rounds.as_json()}  # fmt: skip
            for name, secs in rounds.seconds.items():
                if name.endswith(PREFILL):
                    continue
                tps = batch * args.new / statistics.median(secs)
                same = None if base is None else bool(torch.equal(tokens[name], base))
                row[name] = {"tokens_per_s": round(tps, 2), "greedy_tokens_match_dense": same,
                             **split.get(name, {})}  # fmt: skip
            if "dense" in row:
                for name in rounds.seconds:
                    if name.endswith(PREFILL):
                        continue
                    ratios = _timing.paired_ratios(rounds.seconds["dense"], rounds.seconds[name])
                    row[name]["vs_dense"] = round(statistics.median(ratios), 3)
            pairs = [("nmfx-compile", "inductor"), ("nmfx-fast", "inductor-fast")]  # compiled
            pairs += [(ours, theirs) for theirs in gguf for ours in NMFX if batch == 1]
            for ours, theirs in pairs:
                if ours in row and theirs in row:
                    r = _timing.paired_ratios(rounds.seconds[theirs], rounds.seconds[ours])
                    row[ours][f"vs_{theirs}"] = round(statistics.median(r), 3)
            if batch == 1 and "llama.cpp-F32" in gguf and dtype == torch.float32:
                row["llama.cpp-F32"]["logits_vs_hf_fp32"] = _llamacpp.logits_check(
                    models.get("dense", (pruned,))[0], gguf["llama.cpp-F32"], ids
                )
            _print_row(row, [n for n in rounds.seconds if not n.endswith(PREFILL)])
            results.append(row)
    if args.profile:
        ids = torch.randint(0, args.vocab, (1, args.prompt[0]))
        print(f"\nwhere one decode token goes, {dtype_name}, lm_head {lm_head}, batch 1, "
              f"prompt {args.prompt[0]}, {torch.get_num_threads()} thread(s):")  # fmt: skip
        same_linears = {"nmfx-compile": "nmfx", "nmfx-compile-unfused": "nmfx", "inductor": "dense",
                        "nmfx-lower-compile": "nmfx", "inductor-fast": "dense"}  # fmt: skip
        results[0]["profile"] = {
            name: _decode_profile.profile(
                name, m, x, dtype, ids, models.get(same_linears.get(name, name), (None,))[0]
            )
            for name, (m, x) in models.items()
        }
    return results


PREFILL = "/prefill"  # the 1-token run of a contender (--split)


def _one_token(name: str, models: dict, gguf: dict, ids: torch.Tensor) -> Any:
    """The contender ``name``'s ``generate`` of 1 new token: the prompt's forward and argmax."""
    if name in gguf:
        return lambda r=gguf[name]: r.generate(ids[0].tolist(), 1)
    model, extra = models[name]
    return lambda: generate(model, ids, 1, extra)


def _split(seconds: dict[str, list[float]], new: int) -> dict[str, dict[str, float]]:
    """Per contender timed with ``--split``: ``prefill_ms`` (median of its 1-token runs) and
    ``per_token_ms``, the median over rounds of ``(t(new) - t(1)) / (new - 1)``, both runs of a
    pair in the same round; and ``prefill_share``, the prefill's share of a whole run."""
    out = {}
    for name, ones in seconds.items():
        if name.endswith(PREFILL) or name + PREFILL not in seconds or new < 2:
            continue
        whole = seconds[name]
        ones = seconds[name + PREFILL]
        steps = [(w - o) / (new - 1) for w, o in zip(whole, ones, strict=True)]
        out[name] = {
            "prefill_ms": round(statistics.median(ones) * 1e3, 2),
            "per_token_ms": round(statistics.median(steps) * 1e3, 3),
            "prefill_share": round(statistics.median(ones) / statistics.median(whole), 3),
        }
    return out


def _print_row(row: dict, contenders: list[str]) -> None:
    parts = []
    for name in contenders:
        r = row[name]
        vs = f" ({r['vs_dense']:.2f}x dense)" if "vs_dense" in r and name != "dense" else ""
        same = "" if r["greedy_tokens_match_dense"] in (None, True) else " TOKENS DIFFER"
        cut = (f" [prefill {r['prefill_ms']:.0f} ms, {r['per_token_ms']:.1f} ms/token]"
               if "prefill_ms" in r else "")  # fmt: skip
        parts.append(f"{name} {r['tokens_per_s']:.1f} tok/s{vs}{same}{cut}")
    share = row["load"].get("others_cpu_share")
    print(f"{row['dtype']} lm_head {row['lm_head']} batch {row['batch']} prompt {row['prompt']}: "
          + ", ".join(parts) + (f"  [others' CPU share {share:.0%}]" if share is not None else ""))  # fmt: skip


def parse(argv: list[str] | None = None) -> Any:
    p = _timing.base_parser(__doc__.splitlines()[0])
    p.set_defaults(out=DEFAULT_OUT)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--mlp", type=int, default=5632)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--lm-head", nargs="+", default=["sparse", "dense"], choices=["sparse", "dense"])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    p.add_argument("--prompt", type=int, nargs="+", default=[32, 256])
    p.add_argument("--new", type=int, default=32, help="new tokens per generate (default 32)")
    p.add_argument("--contenders", nargs="+", default=list(DEFAULT_CONTENDERS), choices=CONTENDERS)
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds (default 5)")
    p.add_argument("--no-rss", action="store_true", help="skip the per-contender RSS children")
    p.add_argument("--rss-only", action="store_true", help="only the per-contender RSS children")
    p.add_argument(
        "--profile", action="store_true", help="where one decode token goes, per contender"
    )
    p.add_argument("--split", action="store_true", help="also time a 1-token run of every "
                   "contender in the same rounds: prefill vs per-token time")  # fmt: skip
    p.add_argument("--gguf", nargs="*", default=list(_llamacpp.FORMATS),
                   choices=_llamacpp.FORMATS, help="llama.cpp formats beside (batch 1; none: "
                   "skip llama.cpp)")  # fmt: skip
    p.add_argument("--llama-cpp-dir", help="llama.cpp source tree (convert_hf_to_gguf.py), "
                   f"default ${_llamacpp.DIR_ENV}")  # fmt: skip
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    p.add_argument("--save", help=argparse.SUPPRESS)  # a child saves its model for a -load one
    args = p.parse_args(argv)
    loaded = [n for n in args.contenders if n in LOADED]
    if loaded and not args.rss_only:
        p.error(f"--contenders {' '.join(loaded)}: these load a saved model to measure its peak "
                "RSS only; add --rss-only, or drop them from a timed run")  # fmt: skip
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    _timing.setup_threads(args.threads)
    if args.child:
        child_rss(args)
        return
    llama_dir = _llamacpp.converter_dir(args.llama_cpp_dir)
    wanted = args.gguf and 1 in args.batch and not args.rss_only
    skip = _llamacpp.unavailable(llama_dir) if wanted else None
    if skip:
        print(f"llama.cpp contenders skipped: {skip}")
    results = []
    for lm_head in args.lm_head:
        pruned = None if args.rss_only else build_pruned(args, lm_head)  # children build theirs
        gguf = {}
        if wanted and not skip:
            workdir = Path("out") / (
                f"decode-gguf-{args.layers}L-{args.hidden}-{args.mlp}-"
                f"{args.vocab}-lm_head-{lm_head}"
            )  # untracked, reused
            n_ctx = max(args.prompt) + args.new + 8
            gguf = _llamacpp.contenders(pruned, workdir, llama_dir, args.gguf,
                                        torch.get_num_threads(), n_ctx)  # fmt: skip
        for dtype_name in args.dtypes:
            rows = [] if args.rss_only else run_case(args, dtype_name, lm_head, pruned, gguf)
            if not args.no_rss:
                rss = _rss_cells(args, dtype_name, lm_head)
                rows = rows or [{"dtype": dtype_name, "lm_head": lm_head}]
                rows[0]["peak_rss"] = rss
            results += rows
        del pruned, gguf
        gc.collect()
    payload = {"machine": _timing.machine_info(), "settings": {k: v for k, v in vars(args).items() if k != "out"}, "results": results}  # fmt: skip
    print(f"wrote {_timing.write_json('decode', payload, args.out)}")


if __name__ == "__main__":
    main()
