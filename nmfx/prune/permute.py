"""``permute=True``: permute input channels before pruning so N:M keeps more magnitude.

The permuted dense model computes what the original did: every channel group
(``channel_groups``) is permuted on all of its producers, per-channel parameters and
consumers at once. Groups that cannot be permuted safely are skipped, each with its
reason in the summary; so are all layers when the model cannot be traced as a whole.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from nmfx.capture import trace_whole_model
from nmfx.prune.channel_groups import ChannelGroup, find_channel_group
from nmfx.prune.config import PruneConfig
from nmfx.prune.permute_search import kept_magnitude, search_permutation
from nmfx.prune.summary import PermutationGroup
from nmfx.prune.targets import PruneTarget

__all__ = ["apply_permutations"]

log = logging.getLogger("nmfx.prune")
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _skip_all(targets: list[PruneTarget], why: str) -> list[PermutationGroup]:
    log.warning("nmfx.prune: permute=True: no channel group permuted: %s", why)
    return [PermutationGroup([t.name], [], 0, False, why) for t in targets]


def _shape_graph(model: nn.Module, example: Any) -> tuple[fx.GraphModule | None, str]:
    graph, error = trace_whole_model(model)
    if graph is None:
        return None, f"the model is not traceable by torch.fx as a whole ({error})"
    gm = fx.GraphModule(model, graph)
    names = [n.target for n in graph.nodes if n.op == "placeholder"]
    if isinstance(example, dict):
        args = [example[n] for n in names if n in example]
    else:
        args = list(example) if isinstance(example, tuple | list) else [example]
    try:
        ShapeProp(gm).propagate(*args)
    except Exception as exc:  # tracing worked but the traced graph does not run: skip all
        return None, f"the traced graph does not run on the example ({type(exc).__name__}: {exc})"
    return gm, ""


def _weight_rows(module: nn.Module) -> torch.Tensor:
    """``|W|`` of a consumer as ``[rows, C]`` (C = input channels)."""
    w = module.weight.detach().float().abs()
    return w.movedim(1, -1).reshape(-1, w.shape[1]) if isinstance(module, _CONVS) else w


def _params_of(gm: fx.GraphModule, group: ChannelGroup) -> list[tuple[str, int]]:
    out = set(group.params)
    for name in group.consumers:
        out.add((f"{name}.weight", 1))
    for name in group.producers:
        mod = gm.get_submodule(name)
        if isinstance(mod, nn.Embedding):
            out.add((f"{name}.weight", 1))
        else:
            out.add((f"{name}.weight", 0))
            if getattr(mod, "bias", None) is not None:
                out.add((f"{name}.bias", 0))
    return sorted(out)


def _tensor(model: nn.Module, name: str) -> torch.Tensor:
    mod_name, _, attr = name.rpartition(".")
    return getattr(model.get_submodule(mod_name) if mod_name else model, attr)


def apply_permutations(
    model: nn.Module, found: Any, targets: list[PruneTarget], cfg: PruneConfig, batches: list[Any]
) -> list[PermutationGroup]:
    """Search and apply one permutation per safe channel group feeding a sparse layer."""
    gm, why = _shape_graph(model, batches[0])
    if gm is None:
        return _skip_all(targets, why)
    sparse = {t.cand.owner: t for t in targets if t.cand.local_param == "weight"}
    nodes = {
        str(n.target): n for n in gm.graph.nodes if n.op == "call_module" and n.target in sparse
    }
    out: list[PermutationGroup] = []
    claimed: dict[tuple[str, int], str] = {}
    seen: set[str] = set()
    for t in targets:
        node = nodes.get(t.cand.owner)
        if t.name in seen:
            continue
        if node is None:
            why = (
                f"{t.cand.op} op in {type(t.owner).__name__}: channel groups are followed "
                f"from nn.Linear / nn.ConvNd layers only"
            )
            out.append(PermutationGroup([t.name], [], 0, False, why))
            continue
        group = find_channel_group(gm, node)
        members = [sparse[c].name for c in group.consumers if c in sparse] or [t.name]
        seen.update(members)
        out.append(_apply(model, found, gm, group, members, cfg, claimed))
    return out


def _apply(model: nn.Module, found: Any, gm: fx.GraphModule, group: ChannelGroup,
           members: list[str], cfg: PruneConfig, claimed: dict) -> PermutationGroup:  # fmt: skip
    producers = sorted(group.producers)
    result = PermutationGroup(members, producers, group.channels, False, group.unsafe)
    if group.unsafe:
        return result
    params = _params_of(gm, group)
    for name, dim in params:
        tied = found.facts.tied_with(name)
        if tied:
            result.reason = f"{name} is tied with {', '.join(tied)}"
            return result
        if (name, dim) in claimed:
            result.reason = f"{name} is also permuted by the group of {claimed[(name, dim)]}"
            return result
    p = cfg.pattern
    if group.channels % p.m:
        result.reason = f"{group.channels} channels is not a multiple of M={p.m}"
        return result
    a = torch.cat(
        [
            _weight_rows(model.get_submodule(c))
            for c in group.consumers
            if _name(found, c) in members
        ]
    )
    perm = search_permutation(a, p.n, p.m, cfg.permute_rounds, cfg.permute_time_s)
    result.kept_before = kept_magnitude(a, p.n, p.m)
    result.kept_after = kept_magnitude(a, p.n, p.m, perm)
    if result.kept_after <= result.kept_before:
        result.reason = "no permutation found that keeps more magnitude"
        return result
    for name, dim in params:
        tensor = _tensor(model, name)
        tensor.data = tensor.data.index_select(dim, perm.to(tensor.device))
        claimed[(name, dim)] = members[0]
    result.applied, result.reason = True, ""
    return result


def _name(found: Any, module_fqn: str) -> str:
    for c in found.candidates:
        if c.owner == module_fqn and c.local_param == "weight":
            return c.name
    return module_fqn
