"""SparseGPT (Frantar & Alistarh, ICML 2023) for N:M, following the reference
``fasterprune`` of IST-DASLab/sparsegpt.

The layer-wise problem is ``min ||W X^T - W' X^T||`` with ``W'`` N:M. Columns are visited
left to right in blocks of ``blocksize``; at the first column of every group of M the mask
of the group is chosen by the OBS saliency ``w^2 / [H^-1]_jj^2`` and each pruned weight's
error is spread over the columns not yet visited, through the upper Cholesky factor of the
dampened inverse Hessian. Lazy batch updates (the block) keep it to one GEMM per block.
"""

from __future__ import annotations

import logging
import warnings

import torch

from nmfx.pattern import NMPattern

__all__ = ["inverse_hessian_factor", "sparsegpt_prune"]

log = logging.getLogger("nmfx.prune")
_MAX_RETRIES = 6


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
    factor as ``cholesky(cholesky_inverse(cholesky(h)), upper=True)``, about twice the work.
    """
    chol = torch.linalg.cholesky(h.flip(0, 1))
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    return torch.linalg.solve_triangular(chol, eye, upper=False).flip(0, 1)


def sparsegpt_prune(
    weight: torch.Tensor, hinv: torch.Tensor, pattern: NMPattern, blocksize: int = 128
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W', keep)``: the N:M reconstruction of ``weight`` ``[out, cols]`` (fp32, changed in
    place) given the upper Cholesky factor ``hinv`` of the dampened inverse Hessian.

    Same arithmetic as the reference, with its lazy update applied at two levels: inside a
    group of M the columns update each other one by one (on ``[out, M]`` only), and the
    group's errors reach the rest of the block in one GEMM; blocks reach the remaining
    columns in one GEMM, as in the reference. ``blocksize`` must be a multiple of M.
    """
    n_prune, m = pattern.m - pattern.n, pattern.m
    w = weight
    cols = w.shape[1]
    pruned = torch.zeros_like(w, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        h1 = hinv[i1:i2, i1:i2]
        d1 = torch.diagonal(h1)
        for g in range(0, i2 - i1, m):
            _sweep_group(w1, err1, h1, d1, pruned[:, i1 + g : i1 + g + m], g, m, n_prune)
            if g + m < i2 - i1:
                w1[:, g + m :] -= err1[:, g : g + m] @ h1[g : g + m, g + m :]
        w[:, i1:i2] = w1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return w, ~pruned


def _sweep_group(w1: torch.Tensor, err1: torch.Tensor, h1: torch.Tensor, d1: torch.Tensor,
                 pruned: torch.Tensor, g: int, m: int, n_prune: int) -> None:  # fmt: skip
    """One group of M columns starting at ``g``: choose its mask by OBS saliency, then prune
    and compensate column by column within the group (``pruned`` is written in place)."""
    wg = w1[:, g : g + m]
    dg = d1[g : g + m]
    score = wg**2 / dg.reshape(1, -1) ** 2
    pruned.scatter_(1, torch.topk(score, n_prune, dim=1, largest=False).indices, True)
    for j in range(m):
        col = wg[:, j]
        q = col.masked_fill(pruned[:, j], 0)
        err = (col - q) / dg[j]
        if j + 1 < m:
            wg[:, j + 1 :] -= err.unsqueeze(1) * h1[g + j, g + j + 1 : g + m].unsqueeze(0)
        wg[:, j] = q
        err1[:, g + j] = err
