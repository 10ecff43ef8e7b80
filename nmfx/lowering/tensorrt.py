"""Lowering to TensorRT: dense fp16 weights whose zeros already follow 2:4, ``sparse_weights=True``.

TensorRT looks at the *values* of constant weights: a convolution or matrix multiply whose
weights hold at least two zeros in every four consecutive input channels (at each kernel
position, for convolutions: the channels-last K layout) is *eligible* for sparse tactics, and
the builder then picks a sparse kernel only where it times faster. nmfx therefore checks the
layout up front — the common silent failure is a conv masked along the flattened
``(in, kh, kw)`` dim, as in the SR-STE paper's first code, which TensorRT does not see as 2:4 —
and reports every layer as eligible or dense with the reason. "Eligible" is not "ran sparse":
TensorRT's builder log ("Layers eligible for sparse math", "picked sparse implementation")
says which tactics won.

Facts about Torch-TensorRT this module relies on (checked against torch_tensorrt 2.13.0):
``torch_tensorrt.compile(module, ir="dynamo", inputs=..., **kwargs)`` forwards ``kwargs`` to
``torch_tensorrt.dynamo.compile``, whose ``sparse_weights`` sets TensorRT's
``BuilderFlag.SPARSE_WEIGHTS`` and which accepts and *silently ignores* unknown keyword
arguments. Since 2.13 (TensorRT 11) the dynamo path builds strongly typed networks:
``enabled_precisions`` is accepted by ``torch_tensorrt.compile`` but not used on
``ir="dynamo"`` — precision follows the model's dtypes. So the model and its floating-point
example inputs are cast to fp16 here; ``enabled_precisions`` is still passed for older releases.
``torch_tensorrt`` is optional and imported only inside :func:`lower_tensorrt`.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import torch
from torch import nn

from nmfx.config import close_match_hint
from nmfx.lowering.cuda import _get_param, implies_2_4
from nmfx.masks import is_nm
from nmfx.plan import DENSE, SPARSE, LayerDecision, NMWeight

__all__ = ["check_tensorrt_layout", "lower_tensorrt"]

log = logging.getLogger("nmfx.lowering")

TARGET = "tensorrt"
_INSTALL_HINT = (
    "torch_tensorrt is not installed: pip install 'nmfx[tensorrt]' "
    "(needs an NVIDIA GPU and TensorRT)"
)
_ELIGIBLE = (
    "eligible for TensorRT 2:4 sparse tactics ({what}); TensorRT uses a sparse kernel only where "
    "it times faster, so this is eligibility, not proof: check the builder log for "
    "'picked sparse implementation'"
)
# Set by lower_tensorrt itself; passing them in trt_options is an error, not an override.
_RESERVED = {
    "ir": "lower_tensorrt always compiles with ir='dynamo'",
    "inputs": "pass the inputs as example_inputs",
    "arg_inputs": "pass the inputs as example_inputs",
    "sparse_weights": "lower_tensorrt always sets sparse_weights=True",
}
# Options that torch_tensorrt reads from **kwargs rather than naming in dynamo.compile's signature
# (torch_tensorrt.dynamo.trace reads "strict"; the rest are deprecated spellings it translates).
_KWARGS_OPTIONS = {"strict", "debug", "truncate_long_and_double", "refit", "make_refittable"}


def check_tensorrt_layout(model: nn.Module, nm_weights: dict[str, NMWeight]) -> list[LayerDecision]:
    """One decision per N:M weight: eligible for TensorRT's sparse tactics ("sparse") or not
    ("dense"), and why. Checks the values, not only the declared pattern."""
    owners = _owners(model)
    decisions = []
    for fqn, nmw in nm_weights.items():
        weight = _get_param(model, fqn).detach()
        module = owners.get(fqn)
        decision = LayerDecision(nmw.name, fqn, nmw.op, TARGET, DENSE, "")
        if weight.dtype != torch.float16:
            decision.facts["cast"] = f"{str(weight.dtype).removeprefix('torch.')} -> float16"
        reason, what = _layout_reason(nmw, weight, module)
        if reason is None:
            decision.verdict = SPARSE
            decision.reason = _ELIGIBLE.format(what=what)
            if "cast" in decision.facts:
                decision.reason += f"; weights cast {decision.facts['cast']} by lower_tensorrt"
            decision.facts.update(eligible=True, proven_sparse=False)
        else:
            decision.reason = reason
        decisions.append(decision)
    return decisions


def lower_tensorrt(
    model: nn.Module,
    nm_weights: dict[str, NMWeight],
    example_inputs: tuple,
    *,
    enabled_precisions: frozenset[torch.dtype] | set[torch.dtype] = frozenset({torch.half}),
    **trt_options: Any,
) -> tuple[nn.Module, list[LayerDecision]]:
    """Compile ``model`` with Torch-TensorRT (``ir="dynamo"``, ``sparse_weights=True``).

    Casts the model (in place) and the floating-point ``example_inputs`` to fp16, then calls
    ``torch_tensorrt.compile``. ``trt_options`` are passed through; names the installed
    ``torch_tensorrt.dynamo.compile`` does not know raise ``TypeError`` (torch_tensorrt itself
    would ignore them). Returns the compiled module and the layout decisions.
    """
    for key, why in _RESERVED.items():
        if key in trt_options:
            raise TypeError(f"trt_options may not set {key!r}: {why}")
    precisions = set(enabled_precisions)
    if torch.half not in precisions:
        raise ValueError(
            f"enabled_precisions={precisions} lacks torch.half: the 2:4 weights are compiled in "
            "fp16; add torch.half"
        )
    try:
        import torch_tensorrt
    except ImportError as err:
        raise ImportError(_INSTALL_HINT) from err
    honours_precisions = _check_options(torch_tensorrt, trt_options)

    decisions = check_tensorrt_layout(model, nm_weights)
    model.half()
    inputs = [_half(x) for x in example_inputs]
    version = getattr(torch_tensorrt, "__version__", "unknown")
    if not honours_precisions:
        log.info(
            "torch_tensorrt %s builds strongly typed networks: precision follows the model's "
            "dtypes (cast to fp16 here); enabled_precisions is ignored on ir='dynamo'",
            version,
        )
    for decision in decisions:
        decision.facts["torch_tensorrt"] = version
    eligible = sum(d.verdict == SPARSE for d in decisions)
    log.info(
        "nmfx.lower_tensorrt: %d of %d N:M weights eligible for sparse tactics",
        eligible,
        len(decisions),
    )
    compiled = torch_tensorrt.compile(
        model,
        ir="dynamo",
        inputs=inputs,
        enabled_precisions=precisions,
        sparse_weights=True,
        **trt_options,
    )
    return compiled, decisions


# ---- layout rules -------------------------------------------------------------------------


def _owners(model: nn.Module) -> dict[str, nn.Module]:
    """Parameter FQN -> the module that registers it (first registration wins)."""
    out: dict[str, nn.Module] = {}
    for name, mod in model.named_modules():
        for pname, _ in mod.named_parameters(recurse=False):
            out.setdefault(f"{name}.{pname}" if name else pname, mod)
    return out


def _layout_reason(
    nmw: NMWeight, weight: torch.Tensor, module: nn.Module | None
) -> tuple[str | None, str]:
    """(why the weight is not eligible or None, what kind of eligible layer it is)."""
    if not weight.is_floating_point():
        return f"dtype {weight.dtype}: nmfx compiles 2:4 weights for TensorRT in fp16", ""
    if not implies_2_4(nmw.pattern):
        return (
            f"pattern {nmw.pattern} does not imply 2:4 (4 consecutive input channels can hold "
            "more than 2 non-zeros): TensorRT's sparse tactics need 2:4; retrain with '2:4'",
            "",
        )
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return (
            "transposed convolution: TensorRT's 2:4 sparse tactics cover convolution and matrix "
            "multiply with constant weights",
            "",
        )
    if isinstance(module, nn.modules.conv._ConvNd):
        return _conv_reason(weight, module), "convolution, 2:4 along input channels"
    if weight.dim() != 2 or nmw.reduce_dim not in (0, 1, -1, -2):
        return (
            f"op {nmw.op!r} with weight shape {tuple(weight.shape)}: TensorRT's sparse tactics "
            "cover convolution and matrix multiply with a constant 2-D weight",
            "",
        )
    dim = nmw.reduce_dim % 2
    k = weight.shape[dim]
    if k % 4:
        return (
            f"K={k} (weight dim {dim}) is not a multiple of 4: TensorRT needs whole groups of 4 "
            "along K; pad it or keep it dense",
            "",
        )
    if not is_nm(weight, "2:4", dim):
        return (
            f"declared {nmw.pattern} but the values are not 2:4 along K (weight dim {dim}): "
            "run nmfx.finalize first",
            "",
        )
    what = (
        "fully connected, 2:4 along in_features"
        if isinstance(module, nn.Linear)
        else (f"matrix multiply with a constant weight, 2:4 along K (weight dim {dim})")
    )
    return None, what


def _conv_reason(weight: torch.Tensor, conv: nn.modules.conv._ConvNd) -> str | None:
    """TensorRT's conv rule: for each output channel and kernel position, every 4 consecutive
    input channels hold at most 2 non-zeros (groups=1 convolutions)."""
    if conv.groups != 1:
        kind = "depthwise" if conv.groups == conv.in_channels else "grouped"
        return (
            f"{kind} convolution (groups={conv.groups}): TensorRT's 2:4 sparse tactics need "
            "groups=1"
        )
    if conv.in_channels % 4:
        return (
            f"in_channels={conv.in_channels} is not a multiple of 4: TensorRT groups 4 input "
            "channels at each kernel position; keep it dense"
        )
    if is_nm(weight, "2:4", 1):
        return None
    flat = weight.reshape(weight.shape[0], -1)
    if flat.shape[1] % 4 == 0 and is_nm(flat, "2:4", 1):
        return (
            "2:4 along the flattened (in*kh*kw) dim, not along input channels: TensorRT reads "
            "groups of 4 input channels at each kernel position (channels-last K); re-mask with "
            "nm_mask(weight, '2:4', dim=1) and fine-tune"
        )
    return "values are not 2:4 along input channels: run nmfx.finalize first"


# ---- torch_tensorrt call ------------------------------------------------------------------


def _check_options(torch_tensorrt: Any, trt_options: dict[str, Any]) -> bool:
    """Raise ``TypeError`` on option names the installed torch_tensorrt would silently drop;
    return whether its dynamo path takes ``enabled_precisions``."""
    params = inspect.signature(torch_tensorrt.dynamo.compile).parameters
    known = {
        name
        for name, p in params.items()
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and name != "exported_program"
    } | _KWARGS_OPTIONS
    unknown = sorted(set(trt_options) - known)
    if unknown:
        hint = close_match_hint(unknown[0], known)
        version = getattr(torch_tensorrt, "__version__", "unknown")
        raise TypeError(
            f"unknown TensorRT option(s) {unknown}: torch_tensorrt {version} would ignore "
            f"them silently{hint}"
        )
    return "enabled_precisions" in params


def _half(x: Any) -> Any:
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.half()
    return x
