"""SparseGPT (Frantar & Alistarh, ICML 2023) for N:M, following the reference
``fasterprune`` of IST-DASLab/sparsegpt.

The layer-wise problem is ``min ||W X^T - W' X^T||`` with ``W'`` N:M. Columns are visited
left to right in blocks of ``blocksize``; at the first column of every group of M the mask
of the group is chosen by the OBS saliency ``w^2 / [H^-1]_jj^2`` and each pruned weight's
error is spread over the columns not yet visited, through the upper Cholesky factor of the
dampened inverse Hessian. Lazy batch updates (the block) keep it to one GEMM per block.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

import torch

from nmfx.pattern import NMPattern

__all__ = ["inverse_hessian_factor", "sparsegpt_prune"]

log = logging.getLogger("nmfx.prune")
_MAX_RETRIES = 6
_LEAF = 256  # below this size the triangular inverse is one triangular solve


def inverse_hessian_factor(
    hessian: torch.Tensor, percdamp: float, layer: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U, dead)``: the upper Cholesky factor of ``(H + damp I)^-1`` and the dead columns.

    Dead inputs (a zero diagonal: the column never fired on the calibration data) make H
    singular: as in the reference, their diagonal is set to 1 and their weights should be
    zeroed by the caller. If the Cholesky still fails, the dampening grows tenfold per try.
    Both cases warn, naming the layer.
    """
    h = hessian.clone()
    diag = torch.diagonal(h)
    dead = diag == 0
    if bool(dead.any()):
        warnings.warn(
            f"nmfx.prune: {layer}: {int(dead.sum())} of {h.shape[0]} input columns are zero on "
            f"all calibration data (dead inputs); their Hessian diagonal is set to 1 and their "
            f"weights are pruned first",
            RuntimeWarning,
            stacklevel=3,
        )
        diag[dead] = 1
    mean = float(diag.mean())
    if not mean > 0 or mean != mean:
        mean = 1.0
    damp = percdamp * mean
    for attempt in range(_MAX_RETRIES):
        try:
            eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
            upper = _upper_factor_of_inverse(h + damp * eye)
            if bool(torch.isfinite(upper).all()):
                return upper, dead
        except torch.linalg.LinAlgError:
            pass
        warnings.warn(
            f"nmfx.prune: {layer}: the calibration Hessian is singular with dampening "
            f"{damp:.3g} ({percdamp * 10**attempt:g} of its mean diagonal); retrying with 10x",
            RuntimeWarning,
            stacklevel=3,
        )
        damp *= 10
    raise torch.linalg.LinAlgError(f"{layer}: the calibration Hessian stays singular")


def _upper_factor_of_inverse(h: torch.Tensor) -> torch.Tensor:
    """Upper ``U`` with ``U^T U = h^-1``, from one Cholesky and one triangular inverse.

    With ``J`` the index reversal and ``J h J = L L^T``: ``U = J L^-1 J`` is upper
    triangular and ``U^T U = J (J h J)^-1 J = h^-1``. The reference computes the same
    factor as ``cholesky(cholesky_inverse(cholesky(h)), upper=True)``: two Cholesky
    factorisations and an inverse where this needs one Cholesky and a triangular inverse.
    """
    chol = torch.linalg.cholesky(h.flip(0, 1))
    return _lower_inverse(chol).flip(0, 1)


def _lower_inverse(low: torch.Tensor) -> torch.Tensor:
    """``low^-1`` of a lower-triangular matrix, recursively on halves so that most of the work
    is two matrix products per level: ``[[A, 0], [B, C]]^-1 = [[A^-1, 0], [-C^-1 B A^-1, C^-1]]``
    (a triangular solve against the identity does about 1.5x the arithmetic, more slowly)."""
    n = low.shape[0]
    if n <= _LEAF:
        eye = torch.eye(n, dtype=low.dtype, device=low.device)
        return torch.linalg.solve_triangular(low, eye, upper=False)
    k = n // 2
    a_inv = _lower_inverse(low[:k, :k])
    c_inv = _lower_inverse(low[k:, k:])
    out = torch.zeros_like(low)
    out[:k, :k] = a_inv
    out[k:, k:] = c_inv
    torch.mm(c_inv, low[k:, :k] @ a_inv, out=out[k:, :k])
    out[k:, :k].neg_()
    return out


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run the column sweep's small ops on one thread. They are far below the size where
    intra-op threads pay: each parallel region costs a thread wake-up (milliseconds on a
    busy host, where the sweep's ~10,000 regions took 25 s of a 4096x4096 layer) and gains
    nothing. The per-block GEMMs run outside, with the caller's threads."""
    before = torch.get_num_threads()
    if before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def sparsegpt_prune(
    weight: torch.Tensor, hinv: torch.Tensor, pattern: NMPattern, blocksize: int = 128
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W', keep)``: the N:M reconstruction of ``weight`` ``[out, cols]`` (fp32, changed in
    place) given the upper Cholesky factor ``hinv`` of the dampened inverse Hessian.

    Same arithmetic as the reference, with its lazy update applied at two levels: inside a
    group of M the columns update each other one by one (on ``[M, out]`` only), and the
    group's errors reach the rest of the block in one GEMM; blocks reach the remaining
    columns in one GEMM, as in the reference. ``blocksize`` must be a multiple of M. The
    work is done on ``W^T`` so that a column of ``W`` is one contiguous row.
    """
    n_prune = pattern.m - pattern.n
    cols = weight.shape[1]
    wt = weight.t().contiguous()  # [cols, out]
    pruned_t = torch.zeros(wt.shape, dtype=torch.bool, device=wt.device)
    diag = torch.diagonal(hinv)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        err_t = torch.empty_like(wt[i1:i2])
        with _one_thread():
            _sweep_block(wt[i1:i2], err_t, pruned_t[i1:i2], hinv[i1:i2, i1:i2],
                         diag[i1:i2], pattern.m, n_prune)  # fmt: skip
        if i2 < cols:
            wt[i2:].addmm_(hinv[i1:i2, i2:].t(), err_t, alpha=-1)
    weight.copy_(wt.t())
    return weight, ~pruned_t.t()


def _sweep_block(w_t: torch.Tensor, err_t: torch.Tensor, pruned_t: torch.Tensor,
                 h1: torch.Tensor, d1: torch.Tensor, m: int, n_prune: int) -> None:  # fmt: skip
    """One block, transposed (``w_t`` ``[block, out]``): per group of M, choose its mask by
    OBS saliency ``w^2 / d^2``, prune and compensate column by column inside the group
    (``err = w / d`` on the pruned weights, as the reference's ``(w - q) / d``), then
    update the rest of the block with the group's errors in one GEMM. All in place."""
    d_sq = (d1 * d1).unsqueeze(1)
    d = d1.tolist()
    count = w_t.shape[0]
    for g in range(0, count, m):
        wg = w_t[g : g + m]
        pg = pruned_t[g : g + m]
        score = wg.square().div_(d_sq[g : g + m])
        pg.scatter_(0, torch.topk(score, n_prune, dim=0, largest=False).indices, True)
        for j in range(m):
            col, err, gone = wg[j], err_t[g + j], pg[j]
            torch.div(col, d[g + j], out=err).mul_(gone)
            if j + 1 < m:
                wg[j + 1 :].addr_(h1[g + j, g + j + 1 : g + m], err, alpha=-1)
            col.masked_fill_(gone, 0)
        if g + m < count:
            w_t[g + m :].addmm_(h1[g : g + m, g + m :].t(), err_t[g : g + m], alpha=-1)
