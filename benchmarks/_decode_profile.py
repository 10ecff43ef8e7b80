"""Where one decode token's time goes, without the torch profiler (which costs more per op
than many of the ops it times and so inflates "Python between ops").

Three measurements, all of the steady state after a prefilled cache:

- ``per_token_ms``: the cost of one more new token in ``generate`` or ``fast_generate`` (and
  ``prefill_ms``, a 1-token run: the prompt's forward):
  ``(t(new=1 + k) - t(new=1)) / k``, HF's generate loop, logits processing and cache included;
- ``linears_alone_ms``: the model's linear layers (dense ``nn.Linear`` or nmfx's packed ones)
  called back to back on one-row inputs, in model order, nothing else: the floor a decode step
  cannot go under without faster (or fewer bytes of) linears;
- ``breakdown_ms`` (eager models only): exclusive time per module kind of one ``generate``
  token, measured by wrapping each module's ``forward`` with a timer that subtracts its
  children's time; "generate loop" is what runs outside the model's forward.

``per_token_ms - linears_alone_ms`` is the per-token overhead: what the rest of the step adds.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

_KINDS = (  # module class-name fragment -> kind (first match wins)
    ("Linear", "linears"),
    ("RMSNorm", "norms"),
    ("LayerNorm", "norms"),
    ("Rotary", "rotary"),
    ("Attention", "attention (without its linears)"),
    ("MLP", "mlp activation"),
    ("SiLU", "mlp activation"),
    ("Activation", "mlp activation"),
    ("DecoderLayer", "decoder layer residuals"),
    ("Embedding", "embedding"),
)


def _kind(module: nn.Module) -> str:
    name = type(module).__name__
    return next((k for frag, k in _KINDS if frag in name), "model glue (mask, cache, head)")


class _ExclusiveTimers:
    """Wraps module forwards; accumulates each kind's exclusive (children-excluded) time."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self._child_time: list[float] = []
        self._undo: list[tuple[nn.Module, Any]] = []

    def wrap(self, module: nn.Module) -> None:
        kind, inner = _kind(module), module.forward

        def timed(*args: Any, **kwargs: Any) -> Any:
            self._child_time.append(0.0)
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                spent = time.perf_counter() - start
                children = self._child_time.pop()
                self.totals[kind] += spent - children
                if self._child_time:
                    self._child_time[-1] += spent

        had = "forward" in module.__dict__
        self._undo.append((module, module.__dict__["forward"] if had else None))
        module.forward = timed

    def restore(self) -> None:
        for module, old in reversed(self._undo):
            if old is None:
                del module.__dict__["forward"]
            else:
                module.forward = old
        self._undo.clear()


FAST = "fast_generate"  # an extra of contenders decoded by nmfx.hf.fast_generate, not generate


def generate_tokens(model: nn.Module, ids: torch.Tensor, new: int, extra: dict) -> torch.Tensor:
    """``ids`` and ``new`` greedy tokens: HF ``generate`` with ``extra``, or
    ``nmfx.hf.fast_generate`` (its compiled step, ``extra[FAST]`` True)."""
    if extra.get(FAST):
        from nmfx.hf import fast_generate

        return fast_generate(model, ids, new)
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                              pad_token_id=0, **extra)  # fmt: skip


_gen = generate_tokens


def _best_s(fn: Callable[[], Any], repeats: int) -> float:
    """The fastest of ``repeats`` runs: other processes on the host only ever add time."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def per_token_ms(
    model: nn.Module, ids: torch.Tensor, extra: dict, new: int, repeats: int
) -> tuple[float, float]:
    """``(one more new token's cost in generate, a 1-token generate: the prefill)``, in ms."""
    _gen(model, ids, new + 1, extra)  # warm (compiles, autotunes)
    t1 = _best_s(lambda: _gen(model, ids, 1, extra), repeats)
    tn = _best_s(lambda: _gen(model, ids, new + 1, extra), repeats)
    return (tn - t1) / new * 1e3, t1 * 1e3


def _linears(model: nn.Module) -> list[nn.Module]:
    return [
        m for m in model.modules() if "Linear" in type(m).__name__ and hasattr(m, "in_features")
    ]


def linears_alone_ms(model: nn.Module, dtype: torch.dtype, repeats: int) -> float:
    """The model's linears back to back on one-row inputs (what one decode step must stream)."""
    mods = _linears(getattr(model, "_orig_mod", model))
    xs = [torch.randn(1, 1, m.in_features, dtype=dtype) for m in mods]

    def run() -> None:
        for m, x in zip(mods, xs, strict=True):
            m(x)

    with torch.no_grad():
        run()
        return _best_s(run, repeats) * 1e3


def breakdown_ms(model: nn.Module, ids: torch.Tensor, new: int) -> dict[str, float]:
    """Exclusive ms per module kind for one decode token of an eager model (from the
    difference of a ``1 + new``-token and a 1-token ``generate``, both timed)."""
    timers = _ExclusiveTimers()
    seen: set[int] = set()
    for module in model.modules():
        if id(module) not in seen:
            seen.add(id(module))
            timers.wrap(module)
    try:
        runs = {}
        for n in (1, new + 1):
            _gen(model, ids, n, {})  # warm with the timers in place
            timers.totals.clear()
            start = time.perf_counter()
            _gen(model, ids, n, {})
            runs[n] = (time.perf_counter() - start, dict(timers.totals))
    finally:
        timers.restore()
    (w1, k1), (wn, kn) = runs[1], runs[new + 1]
    out = {k: (kn.get(k, 0.0) - k1.get(k, 0.0)) / new * 1e3 for k in kn}
    out["generate loop (outside forward)"] = (wn - w1) / new * 1e3 - sum(out.values())
    out["total (timers on)"] = (wn - w1) / new * 1e3
    return {k: round(v, 3) for k, v in sorted(out.items(), key=lambda kv: -kv[1])}


def profile(
    name: str, model: nn.Module, extra: dict, dtype: torch.dtype, ids: torch.Tensor,
    linears_from: nn.Module | None = None, new: int = 16, repeats: int = 3,
) -> dict[str, Any]:  # fmt: skip
    """Every measurement above for one contender; prints one summary line. ``linears_from``:
    the model whose linears a compiled contender's graph calls (the lowered one for
    ``backend="nmfx"``: its own modules still hold the dense weights)."""
    token, prefill = per_token_ms(model, ids, extra, new, repeats)
    out: dict[str, Any] = {
        "per_token_ms": round(token, 3),
        "prefill_ms": round(prefill, 3),  # the prompt's forward and its one new token
        "linears_alone_ms": round(linears_alone_ms(linears_from or model, dtype, repeats * 3), 3),
    }
    out["overhead_ms"] = round(out["per_token_ms"] - out["linears_alone_ms"], 3)
    if not extra:  # eager: where the overhead goes
        out["breakdown_ms"] = breakdown_ms(model, ids, new)
    print(f"  {name}: prefill {prefill:.1f} ms, per token {out['per_token_ms']:.2f} ms, linears alone "
          f"{out['linears_alone_ms']:.2f} ms, overhead {out['overhead_ms']:.2f} ms")  # fmt: skip
    if "breakdown_ms" in out:
        print("    " + ", ".join(f"{k} {v:.2f}" for k, v in out["breakdown_ms"].items()))
    return out
