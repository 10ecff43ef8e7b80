"""Which weights ``nmfx.prune`` makes N:M, and how each one's inputs are captured.

Eligibility is ``sparsify``'s, from the same analysis (``nmfx.analysis.analyse`` with the
analysis passes only). Each sparse candidate becomes a ``PruneTarget``: the module whose
forward consumes it (its *owner*), the 2-D view the methods work on, and where its input
comes from: the owner's first argument for ``nn.Linear`` / ``nn.ConvNd``, otherwise the
op's activation operand, read by running the owner's own FX graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import fx, nn

from nmfx.capture import trace_own_forward
from nmfx.plan import Candidate
from nmfx.prune.views import ConvGeometry
from nmfx.weight_ops import find_weight_uses

__all__ = ["PruneTarget", "build_targets"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_MATMULS = ("matmul", "mm", "addmm")


@dataclass
class PruneTarget:
    """One sparse candidate and how to calibrate it."""

    cand: Candidate
    owner: nn.Module
    kind: str  # "linear" | "conv" | "transposed"
    cols: int
    contract_last: bool = True
    geometry: ConvGeometry | None = None
    node: str | None = None  # FX node of the op in the owner's own graph (None: owner input)
    act_pos: int = 0  # position of the activation operand among the node's args
    fallback: str = ""  # why calibration cannot reach it: pruned by magnitude instead
    facts: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.cand.name

    @property
    def weight(self) -> nn.Parameter:
        return self.owner.get_parameter(self.cand.local_param)

    def stats_key(self, input_key: object) -> tuple:
        geo = self.geometry.key() if self.geometry is not None else None
        return (input_key, self.kind, self.cols, self.contract_last, geo)


def _cols(cand: Candidate, kind: str) -> int:
    shape = cand.shape
    if kind == "conv":
        out = 1
        for s in shape[1:]:
            out *= s
        return out
    return shape[cand.reduce_dim]  # type: ignore[index]


def _module_target(cand: Candidate, owner: nn.Module) -> PruneTarget | None:
    if isinstance(owner, nn.Linear) and cand.local_param == "weight":
        return PruneTarget(cand, owner, "linear", owner.in_features)
    if isinstance(owner, _CONVS) and cand.local_param == "weight" and owner.groups == 1:
        geo = ConvGeometry(owner.kernel_size, owner.stride, owner.padding, owner.dilation,
                           owner.padding_mode)  # fmt: skip
        return PruneTarget(cand, owner, "conv", _cols(cand, "conv"), geometry=geo)
    return None


def _graph_target(cand: Candidate, owner: nn.Module, gm: fx.GraphModule) -> PruneTarget:
    uses = [u for u in find_weight_uses(gm) if u.target == cand.local_param]
    if len(uses) != 1 or cand.op not in ("linear", "conv1d", "conv2d", "conv3d", *_MATMULS):
        return _fallback(cand, owner, f"calibration inputs of a {cand.op} op are not captured")
    use = uses[0]
    w_pos = next((i for i, a in enumerate(use.node.args) if a is use.operand), None)
    if w_pos is None or (len(cand.shape) != 2 and not cand.op.startswith("conv")):
        return _fallback(cand, owner, f"{cand.op} with a {len(cand.shape)}-D weight operand")
    if cand.op.startswith("conv"):
        args = list(use.node.args) + [None] * 7
        kw = use.node.kwargs
        geo = ConvGeometry(cand.shape[2:], args[3] or kw.get("stride", 1),
                           args[4] or kw.get("padding", 0), args[5] or kw.get("dilation", 1))  # fmt: skip
        return PruneTarget(cand, owner, "conv", _cols(cand, "conv"), geometry=geo,
                           node=use.node.name, act_pos=0)  # fmt: skip
    if cand.op == "linear":
        act = 0
    elif cand.op == "addmm":
        act = 1 if w_pos == 2 else 2
    else:
        act = 1 - w_pos
    kind = "linear" if cand.reduce_dim == 1 else "transposed"
    return PruneTarget(cand, owner, kind, _cols(cand, kind), contract_last=act < w_pos,
                       node=use.node.name, act_pos=act)  # fmt: skip


def _fallback(cand: Candidate, owner: nn.Module, why: str) -> PruneTarget:
    kind = "linear" if cand.reduce_dim in (1, -1) else "transposed"
    if cand.op.startswith("conv"):
        kind = "conv"
    cols = _cols(cand, kind) if len(cand.shape) == 2 or kind == "conv" else 0
    return PruneTarget(cand, owner, kind, cols, fallback=why)


def build_targets(model: nn.Module, candidates: list[Candidate]) -> list[PruneTarget]:
    """A ``PruneTarget`` per sparse candidate, in registration order."""
    graphs: dict[int, fx.GraphModule | None] = {}
    out = []
    for cand in candidates:
        if not cand.sparse:
            continue
        owner = model.get_submodule(cand.owner) if cand.owner else model
        if cand.op.startswith("mha"):
            out.append(
                _fallback(cand, owner, "inputs inside nn.MultiheadAttention are not captured")
            )
            continue
        target = _module_target(cand, owner)
        if target is None:
            if id(owner) not in graphs:
                try:
                    graphs[id(owner)] = fx.GraphModule(owner, trace_own_forward(owner))
                except Exception:  # analysis traced it; a failure here only costs calibration
                    graphs[id(owner)] = None
            gm = graphs[id(owner)]
            if gm is None:
                target = _fallback(
                    cand, owner, f"{type(owner).__name__}.forward could not be re-traced"
                )
            else:
                target = _graph_target(cand, owner, gm)
                target.facts["graph"] = gm
        out.append(target)
    return out
