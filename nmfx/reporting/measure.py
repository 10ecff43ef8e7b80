"""``nmfx.report``: measured, per-layer dense vs sparse time, memory and why.

Every number in a report is measured in this process: each N:M layer's dense module and
its lowered form run on the layer's real input (captured from ``example_inputs``),
interleaved, medians over repeats after warm-up; the whole model likewise, end to end
(not summed). Layers that stay dense are listed with their reason. The rows are the
dataclasses of ``nmfx.reporting.schema``; rendering lives in ``nmfx.reporting.render``.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from nmfx import model_state
from nmfx.api import sparsify
from nmfx.finalize import detect_nm, finalize, nm_weights
from nmfx.lowering import lower, lowering_decisions
from nmfx.plan import DENSE, SPARSE, Candidate, LayerDecision
from nmfx.reporting.schema import Report, ReportRow, ReportTotals
from nmfx.reporting.timing import LoadMonitor, Timing, machine_info, time_interleaved

__all__ = ["report"]

log = logging.getLogger("nmfx.report")


def _prepare(
    model: nn.Module, pattern: str, notes: list[str]
) -> tuple[nn.Module, list[Candidate] | None]:
    """A finalized copy of ``model`` (the dense masked reference) and its sparsify plan."""
    model = copy.deepcopy(model)
    if any(type(m).__name__ == "NMLinear" for m in model.modules()):
        raise ValueError(
            "report() needs the model before lowering (dense, sparsified or finalized): it "
            "lowers a copy itself so that dense and sparse run side by side"
        )
    if model_state.is_sparsified(model):
        finalize(model)
    elif model_state.nm_record(model) is not None:  # finalized: its record is kept
        pass
    elif record := detect_nm(model):
        model_state.set_nm_record(model, record)  # detected once, here; lower() reuses it
    else:
        sparsify(model, pattern=pattern)
        finalize(model)
        notes.append(
            f"the model had no N:M weights: a copy was pruned one-shot to {pattern} by magnitude "
            f"for timing (outputs are not those of a trained sparse model)"
        )
    return model, model_state.finalized_layers(model)


def _capture_inputs(
    model: nn.Module, names: Sequence[str], inputs: tuple
) -> dict[str, torch.Tensor]:
    """The input each named module receives when the model runs on ``inputs``."""
    seen: dict[str, torch.Tensor] = {}
    hooks = []
    for name in names:
        module = model.get_submodule(name)

        def hook(mod: nn.Module, args: tuple, name: str = name) -> None:
            if name not in seen and args and isinstance(args[0], torch.Tensor):
                seen[name] = args[0].detach()

        hooks.append(module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _owner(param: str) -> str:
    return param.rpartition(".")[0]


def report(
    model: nn.Module,
    example_inputs: Any,
    target: str = "cpu",
    *,
    pattern: str = "2:4",
    warmup: int = 5,
    repeats: int = 20,
    compile_dense: bool = False,
    progress: Callable[[str], None] | None = None,
) -> Report:
    """Measure dense vs sparse per layer and end to end on ``target``.

    ``model`` may be dense (a copy is pruned to ``pattern`` for timing), sparsified or
    finalized; ``example_inputs`` is a tensor, or a tuple or list of the forward's positional
    arguments (batch as you will run; a dict of keyword inputs is refused).
    With ``compile_dense``, the dense baseline is the faster of eager and
    ``torch.compile`` (inductor).
    """
    if target not in ("cpu", "cuda"):
        raise ValueError(f"report(target={target!r}): per-layer reports support 'cpu' and 'cuda'")
    if target == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("report(target='cuda') needs an NVIDIA GPU; none is available here")
    inputs = _positional_inputs(example_inputs, warmup, repeats)
    say = progress or (lambda msg: log.info(msg))
    notes: list[str] = []
    dense, plan = _prepare(model, pattern, notes)
    dense.eval()
    say("lowering a copy")
    sparse = lower(dense, target).eval()
    decisions = {d.param: d for d in lowering_decisions(sparse)}
    record = nm_weights(dense)
    rows = _plan_rows(dense, plan, record, decisions)
    dev = "cuda" if target == "cuda" else "cpu"

    with LoadMonitor() as load:
        totals = _measure(
            dense, sparse, rows, inputs, warmup, repeats, dev, compile_dense, notes, say
        )
    machine = machine_info(dev)
    machine["load"] = load.result
    if load.contended:
        note = _contention_note(load)
        notes.append(note)
        log.warning("nmfx.report: %s", note)
    settings = {"pattern": pattern, "warmup": warmup, "repeats": repeats, "compile_dense": compile_dense,
                "input_shapes": [list(t.shape) for t in inputs if isinstance(t, torch.Tensor)]}  # fmt: skip
    if target == "cpu":
        from nmfx.kernels import available_isas, current_isa, kernels_available

        isa = "unavailable (dense fallback)"
        if kernels_available():
            isa = current_isa()
            best = [i for i in available_isas() if i != "avx512bf16"][-1]  # what "auto" picks
            isa = best if isa == "auto" else isa
        machine["nmfx_isa"] = isa
    return Report(rows, totals, target, machine, settings, notes)


def _contention_note(load: LoadMonitor) -> str:
    share = load.others_share
    taken = "" if share is None else f"other processes took {share:.0%} of the CPU and "
    res = load.result
    return (
        f"measured under contention: {taken}a small parallel op took "
        f"{res['parallel_op_us_before']} us before and {res['parallel_op_us_after']} us after "
        f"(tens of us when idle); times and ratios are unreliable: rerun on a quiet machine"
    )


def _measure(
    dense: nn.Module, sparse: nn.Module, rows: list[ReportRow], inputs: tuple, warmup: int,
    repeats: int, dev: str, compile_dense: bool, notes: list[str], say: Callable[[str], None],
) -> ReportTotals:  # fmt: skip
    """Time every reached layer, then the whole model; fills ``rows`` in place."""
    module_rows = [r for r in rows if r.verdict == SPARSE or _is_module_layer(dense, r)]
    owners = {r.name: _owner(r.param) for r in module_rows}
    captured = _capture_inputs(dense, list(set(owners.values())), inputs)
    for i, row in enumerate(module_rows, 1):
        owner = owners[row.name]
        x = captured.get(owner)
        if x is None:
            row.reason += " (not reached by the example inputs; not measured)"
            continue
        say(f"[{i}/{len(module_rows)}] {row.name}")
        _measure_row(
            row, dense.get_submodule(owner), sparse.get_submodule(owner), x, warmup, repeats, dev
        )

    say("end to end")
    return _measure_model(dense, sparse, inputs, rows, warmup, repeats, dev, compile_dense, notes)


def _positional_inputs(example_inputs: Any, warmup: int, repeats: int) -> tuple:
    """``model(*inputs)``: a tuple or list holds positional args, anything else is one arg."""
    for name, value, low in (("warmup", warmup, 0), ("repeats", repeats, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"report({name}={value!r}): {name} must be an int >= {low}")
    if isinstance(example_inputs, dict):
        raise TypeError(
            "report(example_inputs=dict): keyword inputs are not supported; pass the positional "
            "inputs as a tuple (x,) or a list [x], or wrap the model so forward takes them in order"
        )
    if isinstance(example_inputs, tuple | list):
        return tuple(example_inputs)
    return (example_inputs,)


def _is_module_layer(model: nn.Module, row: ReportRow) -> bool:
    try:
        module = model.get_submodule(_owner(row.param))
    except AttributeError:
        return False
    return isinstance(module, nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d)


def _plan_rows(
    dense: nn.Module,
    plan: list[Candidate] | None,
    record: dict[str, Any],
    decisions: dict[str, LayerDecision],
) -> list[ReportRow]:
    """One row per weight-consuming layer: its verdict and the first reason that applies."""
    if plan is None:  # finalized or checkpoint model: the N:M record is all that is known
        plan = [
            Candidate(
                r.name,
                r.param,
                _owner(r.param),
                r.param.rpartition(".")[2],
                r.op,
                tuple(dense.get_parameter(r.param).shape),
                dense.get_parameter(r.param).dtype,
                r.reduce_dim,
                SPARSE,
                "N:M weight",
            )
            for r in record.values()
        ]
    rows = []
    for cand in plan:
        nm = record.get(cand.param)
        decision = decisions.get(cand.param)
        if decision is not None:
            verdict, reason = decision.verdict, decision.reason
        else:
            verdict, reason = DENSE, cand.reason if not cand.sparse else "not N:M after finalize"
        row = ReportRow(
            cand.name, cand.param, cand.op, list(cand.shape), str(cand.dtype).replace("torch.", ""),
            str(nm.pattern) if nm is not None else None, verdict, reason,
        )  # fmt: skip
        if decision is not None and "packed_bytes" in decision.facts:
            row.dense_bytes = decision.facts["dense_bytes"]
            row.sparse_bytes = decision.facts["packed_bytes"]
        else:
            w = dense.get_parameter(cand.param)
            row.dense_bytes = row.sparse_bytes = w.numel() * w.element_size()
        rows.append(row)
    return rows


def _measure_row(
    row: ReportRow,
    dense_mod: nn.Module,
    sparse_mod: nn.Module,
    x: torch.Tensor,
    warmup: int,
    repeats: int,
    dev: str,
) -> None:
    row.input_shape = list(x.shape)
    if isinstance(dense_mod, nn.Linear):
        row.flops = 2 * x.numel() // x.shape[-1] * dense_mod.in_features * dense_mod.out_features
    fns = {"dense": lambda: dense_mod(x)}
    if row.verdict == SPARSE:
        fns["sparse"] = lambda: sparse_mod(x)
    t = time_interleaved(fns, warmup=warmup, repeats=repeats, min_seconds=0.05, device=dev)
    row.dense_ms, row.dense_iqr_ms = _ms(t["dense"])
    if row.verdict == SPARSE:
        row.sparse_ms, row.sparse_iqr_ms = _ms(t["sparse"])
        row.speedup = row.dense_ms / row.sparse_ms
        if hasattr(sparse_mod, "dispatch"):  # which kernel path (or dense) ran at these rows
            from nmfx.kernels import path_for

            rows_x = x.numel() // x.shape[-1]
            row.reason += f"; ran {path_for(sparse_mod, rows_x)} at {rows_x} rows of x"
        with torch.no_grad():
            row.max_abs_diff = float((sparse_mod(x).float() - dense_mod(x).float()).abs().max())


def _ms(t: Timing) -> tuple[float, float]:
    return t.median * 1e3, t.iqr * 1e3


def _measure_model(
    dense: nn.Module, sparse: nn.Module, inputs: tuple, rows: list[ReportRow],
    warmup: int, repeats: int, dev: str, compile_dense: bool, notes: list[str],
) -> ReportTotals:  # fmt: skip
    fns = {"dense": lambda: dense(*inputs), "sparse": lambda: sparse(*inputs)}
    if compile_dense:
        compiled = torch.compile(dense)
        fns["dense_compiled"] = lambda: compiled(*inputs)
    t = time_interleaved(fns, warmup=warmup, repeats=repeats, min_seconds=0.2, device=dev)
    # Amdahl: the share of the eager dense time spent in the layers that went sparse
    in_sparse = sum(r.dense_ms or 0.0 for r in rows if r.verdict == SPARSE)
    share = min(in_sparse / (t["dense"].median * 1e3), 1.0)
    baseline = "eager"
    if compile_dense and t["dense_compiled"].median < t["dense"].median:
        baseline = "compiled"
        t["dense"] = t["dense_compiled"]
    dense_ms, dense_iqr = _ms(t["dense"])
    sparse_ms, sparse_iqr = _ms(t["sparse"])
    if baseline == "compiled":
        notes.append("dense baseline: torch.compile'd dense model (faster than eager here)")
    return ReportTotals(
        dense_ms, dense_iqr, sparse_ms, sparse_iqr, dense_ms / sparse_ms, baseline, share,
        sum(r.dense_bytes or 0 for r in rows), sum(r.sparse_bytes or 0 for r in rows),
    )  # fmt: skip
