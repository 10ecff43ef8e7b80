"""``torch.compile(model, backend="nmfx")``: lower N:M weights, then an inner backend.

Registered through the ``torch_dynamo_backends`` entry point, so it works without
``import nmfx``. Options (``torch.compile(..., options={...})``):

- ``target``: ``"cpu"`` or ``"cuda"`` (default: the device of the example inputs);
  cuda lowers 2:4 linears to ``torch.sparse.to_sparse_semi_structured`` weights
  (``cuda_backend="cutlass"`` or ``"cusparselt"``);
- ``inner``: the backend the rewritten graph goes to: ``"inductor"`` (default),
  ``"eager"``, ``"aot_eager"`` or ``"tensorrt"``;
- ``pattern``: check one N:M pattern instead of detecting;
- ``fuse_linears`` (default True): on CPU, packed linears that read the same input (q/k/v,
  gate/up) run as one packed call (``nmfx.passes.fuse_shared_input_linears``).

The graph's N:M linears (finalized weights, or the SR-STE masked weights of a
sparsified model in eval under ``no_grad``) are frozen into packed ``nmfx::nm_linear``
calls, by the same per-target conversion as ``nmfx.lower``. With grad mode on, weights that
require grad are left alone (a recorded reason). A frozen weight that changes later
(``load_state_dict``, an optimizer step, an in-place edit) makes the graph lower again on
its next call. ``nmfx.lowering_decisions(compiled_model)`` returns the decisions about the
model's weights, named by module path, across graph breaks and recompiles.
"""

from __future__ import annotations

import copy
import logging
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import fx, nn

from nmfx.config import close_match_hint
from nmfx.passes.infra import run_passes
from nmfx.pattern import parse_pattern
from nmfx.plan import LayerDecision

__all__ = ["BACKEND_OPTIONS", "compiled_decisions", "nmfx_backend"]

log = logging.getLogger("nmfx.backend")

BACKEND_OPTIONS = ("target", "inner", "pattern", "cuda_backend", "fuse_linears")
INNER = ("inductor", "eager", "aot_eager", "tensorrt")


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
    if not isinstance(options.get("fuse_linears", True), bool):
        raise TypeError(f"fuse_linears={options['fuse_linears']!r} must be True or False")
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
    options = _check(dict(options or {}))
    devices = {t.device.type for t in example_inputs if isinstance(t, torch.Tensor)}
    target = options.get("target") or ("cpu" if devices <= {"cpu"} else "cuda")
    return _Lowered(gm, list(example_inputs), options, target, kwargs)


class _Lowered:
    """One compiled graph: lowered with the weights' values at compile time, and lowered
    again whenever one of the weights frozen into it changes (``load_state_dict``, training
    steps, in-place edits), so a compiled model never runs stale weights."""

    def __init__(
        self, gm: fx.GraphModule, example_inputs: list[Any], options: dict[str, Any],
        target: str, kwargs: dict[str, Any],
    ) -> None:  # fmt: skip
        from nmfx.passes.lower_nm_linear import source_fqns

        self._pristine: fx.GraphModule | None = gm
        self._sources = source_fqns(gm)  # Dynamo strips the sources once the backend returns
        self._options, self._target, self._kwargs = options, target, kwargs
        self._compile(example_inputs)
        if not self._frozen:
            self._pristine = None  # nothing frozen: nothing to lower again, keep no copy

    def _compile(self, example_inputs: list[Any]) -> None:
        from nmfx.passes import BACKEND_PASSES
        from nmfx.passes.lower_nm_linear import BackendContext

        options = self._options
        ctx = BackendContext(
            example_inputs, self._target, cuda_backend=options.get("cuda_backend", "cutlass"),
            sources=self._sources, fuse_linears=options.get("fuse_linears", True),
        )  # fmt: skip
        if "pattern" in options:
            ctx.pattern = parse_pattern(options["pattern"])
        if self._pristine is None:  # dropped only when no weight is frozen: never here
            raise RuntimeError("backend='nmfx': no graph kept to lower again")
        gm = copy.deepcopy(self._pristine)  # the passes rewrite their input
        gm = run_passes(gm, BACKEND_PASSES, ctx).graph_module
        log.info("backend='nmfx' (%s): %d of %d linears sparse", self._target,
                 sum(d.verdict == "sparse" for d in ctx.decisions), len(ctx.decisions))  # fmt: skip
        _remember(ctx)
        self._frozen = [(i, p, v) for i, p, v in ctx.frozen]
        inner = options.get("inner", "inductor")
        if inner == "tensorrt":
            try:
                import torch_tensorrt  # noqa: F401  (registers the "tensorrt" backend)
            except ImportError as exc:
                raise ImportError(
                    "inner='tensorrt' needs torch_tensorrt: pip install 'nmfx[tensorrt]'"
                ) from exc
        self._fn = torch._dynamo.lookup_backend(inner)(gm, example_inputs, **self._kwargs)

    def __call__(self, *args: Any) -> Any:
        boxed = len(args) == 1 and isinstance(args[0], list)  # boxed calling convention
        inputs = args[0] if boxed else args
        for index, param, version in self._frozen:
            now = inputs[index]
            if now is not param or now._version != version:
                log.info("backend='nmfx': a frozen weight changed since compile; lowering again")
                self._compile(list(inputs))
                break
        return self._fn(*args)


# The decisions of every compiled graph, per parameter: a model's decisions are those about
# its own parameters, whichever graph (graph breaks) or recompile produced them.
_BY_PARAM: dict[int, tuple[weakref.ref, LayerDecision]] = {}


def _remember(ctx: Any) -> None:
    for key in [k for k, (ref, _) in _BY_PARAM.items() if ref() is None]:
        del _BY_PARAM[key]
    for i, decision in enumerate(ctx.decisions):
        param = ctx.params.get(i)
        if param is not None:
            _BY_PARAM[id(param)] = (weakref.ref(param), decision)


def compiled_decisions(model: nn.Module) -> list[LayerDecision] | None:
    """The backend's decisions about ``model``'s weights (a ``torch.compile``'d module or
    the module itself), named by module path in ``model``; None if it has none yet."""
    root = getattr(model, "_orig_mod", model)
    out = []
    for fqn, param in root.named_parameters():
        entry = _BY_PARAM.get(id(param))
        if entry is None or entry[0]() is not param:
            continue
        decision = copy.copy(entry[1])
        decision.param = fqn
        decision.name = fqn[: -len(".weight")] if fqn.endswith(".weight") else fqn
        out.append(decision)
    return out or None
