"""A bounded greedy channel-swap search for the permutation that maximises the magnitude an
N:M mask keeps (the objective of NVIDIA apex ASP's ``permutation_lib``, Pool & Yu 2021).

``A`` is ``|W|`` of every sparse consumer of a channel group, stacked as ``[rows, C]``.
Columns are cut into G groups of M; a swap exchanges one column of group g with one of
group h. Removing column a from a group leaves M-1 values whose top-N sum ``S`` and N-th
largest value ``t`` give the kept magnitude after any column v comes in:
``S + relu(v - t)``. So all M*M swaps of a pair of groups are scored from ``S``, ``t`` and
the columns alone. Each round scores all pairs (small C) or a random pairing of the groups
(large C), then applies the best improving swaps on disjoint groups, until a round finds
nothing; then it escapes the local optimum a bounded number of times (random swaps, search
again, keep the better), all within the round / time bound.
"""

from __future__ import annotations

import time

import torch

__all__ = ["kept_magnitude", "search_permutation"]

_PAIR_BUDGET = 1 << 24  # scored elements per chunk (pairs x rows x M x M)
_KICK_SWAPS = 2  # random swaps per escape from a local optimum


def kept_magnitude(a: torch.Tensor, n: int, m: int, perm: torch.Tensor | None = None) -> float:
    """Sum over rows of the N largest of every M consecutive columns of ``a[:, perm]``."""
    x = a if perm is None else a[:, perm]
    return float(x.reshape(x.shape[0], -1, m).topk(n, dim=-1).values.sum())


def _rests(groups: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``S[r, g, a]`` and ``t[r, g, a]`` of each group without its column a."""
    m = groups.shape[-1]
    idx = torch.tensor([[j for j in range(m) if j != a] for a in range(m)])
    rest = groups[..., idx]  # [R, G, m, m-1]
    top = rest.topk(n, dim=-1).values
    return top.sum(-1), top[..., -1]


def _score_pairs(groups, s_sum, t, kept_g, pairs):  # type: ignore[no-untyped-def]
    """Gain of every swap (a in g, b in h) for each pair: ``[P, M, M]``."""
    g, h = pairs[:, 0], pairs[:, 1]
    rows, _, m = groups.shape
    step = max(1, _PAIR_BUDGET // max(rows * m * m, 1))
    out = []
    for i in range(0, len(pairs), step):
        gi, hi = g[i : i + step], h[i : i + step]
        vg, vh = groups[:, gi], groups[:, hi]  # [R, P, m]
        tg, th = t[:, gi], t[:, hi]
        into_g = (vh[:, :, None, :] - tg[:, :, :, None]).clamp_min(0).sum(0)  # [P, a, b]
        into_h = (vg[:, :, :, None] - th[:, :, None, :]).clamp_min(0).sum(0)  # [P, a, b]
        base = s_sum[gi][:, :, None] + s_sum[hi][:, None, :]
        out.append(into_g + into_h + base - (kept_g[gi] + kept_g[hi])[:, None, None])
    return torch.cat(out)


def _pairs(n_groups: int, rows: int, m: int, gen: torch.Generator) -> torch.Tensor:
    if n_groups * (n_groups - 1) // 2 * rows * m * m <= 8 * _PAIR_BUDGET:
        return torch.combinations(torch.arange(n_groups), 2)
    order = torch.randperm(n_groups, generator=gen)
    return order[: n_groups // 2 * 2].reshape(-1, 2)


def search_permutation(
    a: torch.Tensor, n: int, m: int, rounds: int = 200, time_s: float = 30.0, seed: int = 0,
    escapes: int = 20,
) -> torch.Tensor:  # fmt: skip
    """A permutation ``perm`` of the columns of ``a`` (``a[:, perm]`` keeps more magnitude
    under N:M than ``a``, or ``perm`` is the identity).

    The greedy swap search stops in a local optimum; then up to ``escapes`` times (ASP's
    escape from local minima) the best permutation so far is kicked by two random swaps
    between groups and searched again from there, kept when it keeps more. ``rounds`` and
    ``time_s`` bound the whole search."""
    cols = a.shape[1]
    perm = torch.arange(cols)
    if cols // m < 2:
        return perm
    gen = torch.Generator().manual_seed(seed)
    deadline = time.perf_counter() + time_s
    budget = [rounds]
    best = _greedy(a, n, m, perm, gen, deadline, budget)
    best_kept = kept_magnitude(a, n, m, best)
    for _ in range(escapes):
        if budget[0] <= 0 or time.perf_counter() > deadline:
            break
        cand = best.clone()
        for _ in range(_KICK_SWAPS):
            x, y = _random_cross_pair(cols, m, gen)
            cand[[x, y]] = cand[[y, x]]
        cand = _greedy(a, n, m, cand, gen, deadline, budget)
        kept = kept_magnitude(a, n, m, cand)
        if kept > best_kept:
            best, best_kept = cand, kept
    return best


def _random_cross_pair(cols: int, m: int, gen: torch.Generator) -> tuple[int, int]:
    """Two columns in different groups of M."""
    x = int(torch.randint(0, cols, (1,), generator=gen))
    y = int(torch.randint(0, cols - m, (1,), generator=gen))
    if y >= x // m * m:
        y += m  # skip x's own group
    return x, y


def _greedy(a: torch.Tensor, n: int, m: int, perm: torch.Tensor, gen: torch.Generator,
            deadline: float, budget: list[int]) -> torch.Tensor:  # fmt: skip
    """Best-improvement swap rounds from ``perm`` (changed in place) until none improves,
    or the deadline / round budget (``budget[0]``, decremented) runs out."""
    rows, cols = a.shape
    n_groups = cols // m
    stale = 0
    while budget[0] > 0 and time.perf_counter() <= deadline:
        budget[0] -= 1
        groups = a[:, perm].reshape(rows, n_groups, m)
        s_rest, t_rest = _rests(groups, n)
        s_sum = s_rest.sum(0)  # [G, m]
        kept_g = groups.topk(n, dim=-1).values.sum(-1).sum(0)  # [G]
        pairs = _pairs(n_groups, rows, m, gen)
        gains = _score_pairs(groups, s_sum, t_rest, kept_g, pairs)
        best, where = gains.reshape(len(pairs), -1).max(dim=1)
        used: set[int] = set()
        applied = 0
        tol = 1e-6 * float(kept_g.sum())
        for p in torch.argsort(best, descending=True).tolist():
            if float(best[p]) <= tol:
                break
            gi, hi = (int(v) for v in pairs[p])
            if gi in used or hi in used:
                continue
            used.update((gi, hi))
            ai, bi = divmod(int(where[p]), m)
            x, y = gi * m + ai, hi * m + bi
            perm[[x, y]] = perm[[y, x]]
            applied += 1
        full = len(pairs) == n_groups * (n_groups - 1) // 2
        stale = 0 if applied else stale + 1
        if stale >= (1 if full else 10):
            break
    return perm
