"""``torch.compile(model, backend="nmfx")``: lower N:M weights, then an inner backend.

Registered through the ``torch_dynamo_backends`` entry point, so it works without
``import nmfx``. Options (``torch.compile(..., options={...})``):

- ``target``: ``"cpu"`` or ``"cuda"`` (default: the device of the example inputs);
  cuda lowers 2:4 linears to ``torch.sparse.to_sparse_semi_structured`` weights
  (``cuda_backend="cutlass"`` or ``"cusparselt"``);
- ``inner``: the backend the rewritten graph goes to: ``"inductor"`` (default),
  ``"eager"``, ``"aot_eager"`` or ``"tensorrt"``;
- ``pattern``: check one N:M pattern instead of detecting.

The graph's N:M linears (finalized weights, or the SR-STE masked weights of a
sparsified model in eval under ``no_grad``) are frozen into packed ``nmfx::nm_linear``
calls. With grad mode on, weights that require grad are left alone (a recorded reason).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import fx

from nmfx.config import close_match_hint
from nmfx.passes.infra import run_passes
from nmfx.pattern import parse_pattern
from nmfx.plan import LayerDecision

__all__ = ["BACKEND_OPTIONS", "last_decisions", "nmfx_backend"]

log = logging.getLogger("nmfx.backend")

BACKEND_OPTIONS = ("target", "inner", "pattern", "cuda_backend")
INNER = ("inductor", "eager", "aot_eager", "tensorrt")
_last: list[LayerDecision] = []


def _check(options: dict[str, Any]) -> dict[str, Any]:
    for key in options:
        if key not in BACKEND_OPTIONS:
            hint = close_match_hint(key, BACKEND_OPTIONS)
            raise ValueError(
                f"backend='nmfx' has no option {key!r}{hint}; options: {BACKEND_OPTIONS}"
            )
    inner = options.get("inner", "inductor")
    if inner not in INNER:
        hint = close_match_hint(inner, INNER)
        raise ValueError(f"inner={inner!r} is not one of {INNER}{hint}")
    target = options.get("target")
    if target not in (None, "cpu", "cuda"):
        raise ValueError(
            f"target={target!r} is not 'cpu' or 'cuda'{close_match_hint(target, ('cpu', 'cuda'))}; "
            f"for TensorRT use inner='tensorrt' or nmfx.lower(model, target='tensorrt')"
        )
    if options.get("cuda_backend", "cutlass") not in ("cutlass", "cusparselt"):
        raise ValueError(
            f"cuda_backend={options['cuda_backend']!r} is not 'cutlass' or 'cusparselt'"
        )
    return options


def nmfx_backend(
    gm: fx.GraphModule,
    example_inputs: list[Any],
    options: dict[str, Any] | None = None,
    **kwargs: Any,
) -> Callable[..., Any]:
    """The Dynamo backend: lower N:M linears for the target, hand over to the inner backend."""
    from nmfx.passes import BACKEND_PASSES
    from nmfx.passes.lower_nm_linear import BackendContext

    options = _check(dict(options or {}))
    devices = {t.device.type for t in example_inputs if isinstance(t, torch.Tensor)}
    target = options.get("target") or ("cpu" if devices <= {"cpu"} else "cuda")
    ctx = BackendContext(
        list(example_inputs), target, cuda_backend=options.get("cuda_backend", "cutlass")
    )
    if "pattern" in options:
        ctx.pattern = parse_pattern(options["pattern"])
    gm = run_passes(gm, BACKEND_PASSES, ctx).graph_module
    log.info("backend='nmfx' (%s): %d of %d linears sparse", target,
             sum(d.verdict == "sparse" for d in ctx.decisions), len(ctx.decisions))  # fmt: skip
    _last[:] = ctx.decisions
    inner = options.get("inner", "inductor")
    if inner == "tensorrt":
        try:
            import torch_tensorrt  # noqa: F401  (registers the "tensorrt" backend)
        except ImportError as exc:
            raise ImportError(
                "inner='tensorrt' needs torch_tensorrt: pip install 'nmfx[tensorrt]'"
            ) from exc
    return torch._dynamo.lookup_backend(inner)(gm, example_inputs, **kwargs)


def last_decisions() -> list[LayerDecision]:
    """The per-linear decisions of the most recent graph compiled with backend='nmfx'."""
    return list(_last)
