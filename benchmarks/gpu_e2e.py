"""End to end on one NVIDIA GPU: a Llama of TinyLlama's sizes, dense fp16 vs ``nmfx.lower(m, "cuda")``.

The model (hidden 2048, MLP 5632, 32 heads, 4 KV heads, vocab 32000, ``--layers`` decoder
layers) comes from ``transformers.LlamaConfig`` with random init (no download), or from
``model_zoo.llama`` (no grouped KV heads, no KV cache) when transformers is absent. Every
decoder Linear is masked 2:4 (the LM head stays dense), then the model is lowered with
``nmfx.lower(model, "cuda", example_inputs=...)`` (per-rows-bucket dispatch). Measured, dense
and lowered interleaved, CUDA events, medians: prefill tokens/s at each ``--prefill`` length,
greedy decode tokens/s (batch 1, KV cache), and the greedy tokens of both models compared.

``--dry-run`` (no GPU): builds a small Llama on CPU, checks that every decoder Linear of the
full-size config meets the semi-structured shape rules, that ``nmfx.lower(..., dry_run=True)``
finds and accepts every masked Linear of the small one, and runs the prefill and greedy-decode
code once, fp32 on CPU, writing the same JSON without timings.

    PYTHONPATH=. python benchmarks/gpu_e2e.py --out DIR [--dry-run] [--layers 8]
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from torch import nn

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._gpu import Budget, check_out_dir, cuda_medians, environment, table, write

TINYLLAMA = {"vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632,
             "num_attention_heads": 32, "num_key_value_heads": 4}  # fmt: skip
SMALL = {"vocab_size": 512, "hidden_size": 256, "intermediate_size": 704,
         "num_attention_heads": 8, "num_key_value_heads": 2}  # fmt: skip
# The timed run's device and sizes. Only tests change them (to run the timed path's logic on
# CPU, small, with the kernels and the timer faked).
DEVICE = "cuda"
GPU_SIZES = TINYLLAMA


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="directory for the JSON and text")
    p.add_argument("--dry-run", action="store_true", help="CPU checks only (no GPU needed)")
    p.add_argument("--layers", type=int, default=8, help="decoder layers (default 8)")
    p.add_argument("--prefill", type=int, nargs="+", default=[512, 2048], help="prompt lengths")
    p.add_argument("--decode-tokens", type=int, default=32, help="greedy tokens generated")
    p.add_argument("--backend", choices=["auto", "cutlass", "cusparselt"], default="auto",
                   help="semi-structured kernels (auto: cuSPARSELt where torch has it)")  # fmt: skip
    p.add_argument("--model", choices=["auto", "hf", "zoo"], default="auto",
                   help="transformers Llama (auto: if transformers imports) or model_zoo's")  # fmt: skip
    p.add_argument("--budget-s", type=float, default=150.0, help="skip timings after this long")
    args = p.parse_args(argv)
    for name in ("layers", "decode_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1")
    if min(args.prefill) < 1:
        p.error(f"--prefill {args.prefill}: every length must be >= 1")
    return args


# ---- the model ----------------------------------------------------------------------------


def build(kind: str, sizes: dict[str, int], layers: int, max_len: int) -> tuple[nn.Module, str]:
    """A random-init Llama and which implementation it is ("hf" or "zoo")."""
    if kind in ("auto", "hf"):
        try:
            from transformers import LlamaConfig, LlamaForCausalLM

            cfg = LlamaConfig(**sizes, num_hidden_layers=layers, max_position_embeddings=max_len)
            return LlamaForCausalLM(cfg).eval(), "hf"
        except ImportError:
            if kind == "hf":
                raise
    import model_zoo
    from model_zoo.llama import Llama, LlamaConfig

    del model_zoo  # imported for its package path only
    cfg = LlamaConfig(vocab_size=sizes["vocab_size"], dim=sizes["hidden_size"], n_layers=layers,
                      n_heads=sizes["num_attention_heads"], hidden_dim=sizes["intermediate_size"],
                      max_seq_len=max_len)  # fmt: skip
    return Llama(cfg).eval(), "zoo"


def decoder_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear except the LM head (kept dense, as nmfx's policy keeps output layers)."""
    return {
        name: mod
        for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear) and not name.endswith(("lm_head", "output"))
    }


@torch.no_grad()
def mask_2_4(model: nn.Module) -> int:
    """Keep the 2 largest of every 4 weights along in_features of each decoder Linear."""
    from nmfx.masks import nm_mask

    layers = decoder_linears(model)
    for layer in layers.values():
        layer.weight.mul_(nm_mask(layer.weight, "2:4", 1))
    return len(layers)


def logits(model: nn.Module, ids: torch.Tensor, kind: str) -> torch.Tensor:
    out = model(input_ids=ids, use_cache=False) if kind == "hf" else model(ids)
    return out.logits if kind == "hf" else out


@torch.inference_mode()
def greedy(model: nn.Module, prompt: torch.Tensor, n: int, kind: str) -> tuple[list[int], float]:
    """``n`` greedy tokens after ``prompt`` and the seconds the decode steps took (the prefill
    that fills the KV cache excluded). The zoo model has no KV cache: each step reruns all."""
    sync = torch.cuda.synchronize if prompt.is_cuda else (lambda: None)
    if kind == "hf":
        out = model(input_ids=prompt, use_cache=True)
        cache, tok = _cache_of(out), out.logits[:, -1:].argmax(-1)
        cache_kw = _cache_kw(model)
    else:
        seq = prompt
        tok = model(seq)[:, -1:].argmax(-1)
    tokens = [int(tok)]
    sync()
    t0 = time.perf_counter()
    for _ in range(n - 1):
        if kind == "hf":
            out = model(input_ids=tok, use_cache=True, **{cache_kw: cache})
            cache, tok = _cache_of(out), out.logits[:, -1:].argmax(-1)
        else:
            seq = torch.cat([seq, tok], dim=1)
            tok = model(seq)[:, -1:].argmax(-1)
        tokens.append(int(tok))
    sync()
    return tokens, time.perf_counter() - t0


def _cache_kw(model: nn.Module) -> str:
    """The KV cache argument: ``past_key_values`` up to transformers 5.2x, then ``cache``."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _cache_of(out: Any) -> Any:
    return out["cache"] if "cache" in out else out["past_key_values"]


def first_divergence(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)


# ---- checks and measurements ---------------------------------------------------------------


def shape_check(kind: str, layers: int) -> list[dict[str, Any]]:
    """Every decoder Linear shape of the full-size config against both backends' fp16 rules
    (built on the meta device: no memory, no init)."""
    from nmfx.lowering.cuda import semi_structured_constraint

    with torch.device("meta"):
        model, kind = build(kind, TINYLLAMA, layers, 4096)
    shapes = sorted({tuple(m.weight.shape) for m in decoder_linears(model).values()})
    return [{"shape": f"{o}x{i}", "model": kind, "backend": b,
             "fp16": semi_structured_constraint((o, i), torch.float16, b) or "ok"}
            for (o, i) in shapes for b in ("cutlass", "cusparselt")]  # fmt: skip


def lower(
    model: nn.Module, example: torch.Tensor, backend: str, dry_run: bool
) -> tuple[nn.Module, dict[str, Any]]:
    """``nmfx.lower(model, "cuda")`` and a summary of its decisions. The dry run (fp32 weights
    on CPU) asks for ``cast_dtype=torch.float16`` so that it decides what an fp16 model gets."""
    import nmfx

    t0 = time.perf_counter()
    kw: dict[str, Any] = {"backend": backend, "dry_run": dry_run}
    if dry_run:
        kw["cast_dtype"] = torch.float16
    else:
        kw["example_inputs"] = (example,)
    lowered = nmfx.lower(model, "cuda", **kw)
    decisions = nmfx.lowering_decisions(lowered)
    per_call = [d for d in decisions if "per call" in d.reason]
    info = {
        "seconds": time.perf_counter() - t0,
        "n_weights": len(decisions),
        "sparse": sum(d.verdict == "sparse" for d in decisions) - len(per_call),
        "per_call": len(per_call),
        "dense": sum(d.verdict == "dense" for d in decisions),
        "decisions": [
            {"param": d.param, "verdict": d.verdict, "reason": d.reason,
             "sparse_rows": d.facts.get("sparse_rows")}
            for d in decisions
        ],
    }
    return lowered, info


def pick_backend(choice: str) -> str:
    if choice != "auto":
        return choice
    ok = torch.cuda.is_available() and torch.backends.cusparselt.is_available()
    return "cusparselt" if ok else "cutlass"


@torch.inference_mode()
def accuracy(dense: nn.Module, lowered: nn.Module, ids: torch.Tensor, kind: str) -> dict[str, Any]:
    a, b = logits(dense, ids, kind).float(), logits(lowered, ids, kind).float()
    return {"logits_rel_err": float((a - b).norm() / a.norm()),
            "top1_agreement": float((a.argmax(-1) == b.argmax(-1)).float().mean())}  # fmt: skip


@torch.inference_mode()
def prefill_rows(dense: nn.Module, lowered: nn.Module, lengths: list[int], vocab: int,
                 kind: str, budget: Budget) -> list[dict[str, Any]]:  # fmt: skip
    rows = []
    for n in lengths:
        if budget.over():
            rows.append({"tokens": n, "error": "skipped: time budget spent"})
            continue
        ids = torch.randint(0, vocab, (1, n), device=DEVICE)
        t = cuda_medians({"dense": lambda ids=ids: logits(dense, ids, kind),
                          "lowered": lambda ids=ids: logits(lowered, ids, kind)},
                         warmup=3, repeats=7, iters=3)  # fmt: skip
        rows.append({"tokens": n, "dense_ms": t["dense"], "lowered_ms": t["lowered"],
                     "dense_tok_s": n / t["dense"] * 1e3, "lowered_tok_s": n / t["lowered"] * 1e3,
                     "speedup": t["dense"] / t["lowered"]})  # fmt: skip
    return rows


def decode_row(dense: nn.Module, lowered: nn.Module, prompt: torch.Tensor, n: int, kind: str,
               repeats: int = 3) -> dict[str, Any]:  # fmt: skip
    """Greedy decode of both models, interleaved ``repeats`` times; median seconds."""
    secs: dict[str, list[float]] = {"dense": [], "lowered": []}
    toks: dict[str, list[int]] = {}
    for r in range(repeats):
        order = ("dense", "lowered") if r % 2 == 0 else ("lowered", "dense")
        for name in order:
            toks[name], s = greedy(dense if name == "dense" else lowered, prompt, n, kind)
            secs[name].append(s)
    med = {k: sorted(v)[len(v) // 2] for k, v in secs.items()}
    steps = n - 1
    return {"tokens": n, "dense_tok_s": steps / med["dense"], "lowered_tok_s": steps / med["lowered"],
            "speedup": med["dense"] / med["lowered"], "greedy_identical": toks["dense"] == toks["lowered"],
            "first_divergence": first_divergence(toks["dense"], toks["lowered"]),
            "dense_tokens": toks["dense"], "lowered_tokens": toks["lowered"]}  # fmt: skip


# ---- the two modes ------------------------------------------------------------------------


def dry_run(args: argparse.Namespace, payload: dict[str, Any]) -> None:
    payload["shapes"] = shape_check(args.model, args.layers)
    if any(r["fp16"] != "ok" for r in payload["shapes"]):
        payload["errors"].append("a decoder Linear of the full-size config fails the shape rules")
    torch.manual_seed(0)
    model, kind = build(args.model, SMALL, 2, 128)
    payload["model"] = kind
    n_masked = mask_2_4(model)
    _, info = lower(model, torch.zeros(1, 8, dtype=torch.long), "cutlass", dry_run=True)
    payload["lowering"] = info
    if info["n_weights"] != n_masked or info["sparse"] != n_masked:
        payload["errors"].append(
            f"nmfx.lower found {info['n_weights']} N:M weights and accepted {info['sparse']}; "
            f"{n_masked} decoder Linears were masked 2:4"
        )
    prompt = torch.randint(0, SMALL["vocab_size"], (1, 8))
    tokens, _ = greedy(model, prompt, 4, kind)
    with torch.inference_mode():
        full = logits(model, torch.cat([prompt, torch.tensor([tokens[:-1]])], dim=1), kind)
    # Greedy with a KV cache must pick what a full forward over the same tokens picks.
    recomputed = full[0, prompt.shape[1] - 1 :].argmax(-1).tolist()
    payload["greedy_check"] = {"tokens": tokens, "full_forward": recomputed,
                               "agree": recomputed == tokens}  # fmt: skip
    if recomputed != tokens:
        payload["errors"].append("greedy decode with the KV cache disagrees with a full forward")
    payload["skipped"] += ["lowering with conversion, prefill and decode timings: --dry-run, no GPU",
                           "fp16 (CPU runs fp32 in the dry run)"]  # fmt: skip


def gpu_run(args: argparse.Namespace, payload: dict[str, Any]) -> None:
    budget = Budget(args.budget_s)
    torch.manual_seed(0)
    max_len = max(args.prefill) + args.decode_tokens + 8
    with torch.device(DEVICE):
        model, kind = build(args.model, GPU_SIZES, args.layers, max_len)
    model = model.half().eval()
    payload["model"] = kind
    payload["n_masked"] = mask_2_4(model)
    backend = pick_backend(args.backend)
    example = torch.randint(0, GPU_SIZES["vocab_size"], (1, max(args.prefill)), device=DEVICE)
    lowered, payload["lowering"] = lower(model, example, backend, dry_run=False)
    payload["backend"] = backend
    payload["accuracy"] = accuracy(model, lowered, example[:, :512], kind)
    _partial(args, payload)
    payload["prefill"] = prefill_rows(
        model, lowered, args.prefill, GPU_SIZES["vocab_size"], kind, budget
    )
    _partial(args, payload)
    if budget.over():
        payload["skipped"].append("decode: time budget spent")
    else:
        payload["decode"] = decode_row(model, lowered, example[:, :128], args.decode_tokens, kind)
    pre = [r["speedup"] for r in payload["prefill"] if "speedup" in r]
    dec = payload.get("decode", {})
    payload["headline"] = {
        "prefill_best_speedup": max(pre, default=None),
        "target_prefill_1_15x_met": bool(pre) and max(pre) >= 1.15,
        "greedy_identical": dec.get("greedy_identical"),
        "decode_speedup": dec.get("speedup"),
    }


def _partial(args: argparse.Namespace, payload: dict[str, Any]) -> None:
    """Save what is measured so far: a step killed by its time limit still leaves figures."""
    out = getattr(args, "out", None)
    if out is not None and out.is_dir():
        (out / "gpu_e2e.partial.json").write_text(json.dumps(payload, default=str) + "\n")


def render(payload: dict[str, Any]) -> str:
    env = payload["env"]
    parts = [f"gpu_e2e: {env.get('device', 'no GPU')}, torch {env['torch']}, model "
             f"{payload.get('model')}, {payload.get('layers')} layers, backend "
             f"{payload.get('backend')}, {env['date_utc']} UTC"]  # fmt: skip
    if "shapes" in payload:
        parts.append(table(payload["shapes"], ["shape", "model", "backend", "fp16"]))
    low = payload.get("lowering")
    if low:
        parts.append(f"nmfx.lower: {low['n_weights']} N:M weights: {low['sparse']} sparse, "
                     f"{low['per_call']} per-call dispatch, {low['dense']} dense "
                     f"({low['seconds']:.1f} s)")  # fmt: skip
    if "accuracy" in payload:
        parts.append(f"accuracy: {payload['accuracy']}")
    if payload.get("prefill"):
        parts.append("prefill (batch 1):")
        parts.append(table(payload["prefill"], ["tokens", "dense_tok_s", "lowered_tok_s",
                                                "speedup", "error"]))  # fmt: skip
    if payload.get("decode"):
        d = payload["decode"]
        parts.append(f"decode ({d['tokens']} greedy tokens, batch 1): dense {d['dense_tok_s']:.1f} "
                     f"tok/s, lowered {d['lowered_tok_s']:.1f} tok/s ({d['speedup']:.2f}x); "
                     f"greedy tokens identical: {d['greedy_identical']}"
                     f" (first divergence {d['first_divergence']})")  # fmt: skip
    if "greedy_check" in payload:
        parts.append(f"greedy with KV cache vs full forward: {payload['greedy_check']}")
    if payload.get("headline"):
        parts.append("targets: " + ", ".join(f"{k}={v}" for k, v in payload["headline"].items()))
    parts += [f"SKIPPED: {s}" for s in payload["skipped"]]
    parts += [f"ERROR: {e}" for e in payload["errors"]]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = check_out_dir(args.out)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_e2e: no CUDA device here; use --dry-run for the CPU checks", file=sys.stderr)
        return 2
    payload: dict[str, Any] = {"env": environment(), "dry_run": args.dry_run, "layers": args.layers,
                               "skipped": [], "errors": []}  # fmt: skip
    try:
        (dry_run if args.dry_run else gpu_run)(args, payload)
    except Exception:
        payload["errors"].append(traceback.format_exc())
    write(out, "gpu_e2e", payload, render(payload))
    return 1 if payload["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
