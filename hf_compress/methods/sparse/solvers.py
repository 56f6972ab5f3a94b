"""Pruning solvers as pure tensor functions: masks from scores, magnitude, Wanda, SparseGPT.

Each takes ``W [out, in]`` (and the calibration Hessian ``H = 2/N · Σ x xᵀ`` where used) and a target —
``prune`` weights (unstructured) or an N:M pattern — and returns a :class:`PruneResult` whose mask meets the
target exactly: N of every M input columns per row, or exactly ``prune`` zeros (spread over the rows as evenly as
integers allow, each row compared on its own as Wanda does).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PruneResult:
    weight: torch.Tensor  # [out, in] float32, zero where pruned
    mask: torch.Tensor  # [out, in] bool, True = kept
    output_error: float | None = None  # tr(ΔW H ΔWᵀ) / tr(W H Wᵀ), when a Hessian is known


def row_counts(rows: int, cols: int, prune: int) -> torch.Tensor:
    """Weights to prune per row so that they sum to ``prune`` exactly (the first rows take the remainder)."""
    if not 0 <= prune <= rows * cols:
        raise ValueError(f"cannot prune {prune} of {rows * cols} weights")
    base, rem = divmod(prune, rows)
    return torch.full((rows,), base, dtype=torch.long) + (torch.arange(rows) < rem)


def mask_from_scores(score: torch.Tensor, prune: int | None = None, nm: tuple[int, int] | None = None) -> torch.Tensor:
    """Keep the highest scores: the top N of each group of M input columns (``nm``), or all but the ``prune``
    lowest, compared within each output row."""
    out_f, in_f = score.shape
    if nm is not None:
        n, m = nm
        if in_f % m:
            raise ValueError(f"N:M {n}:{m} needs in_features divisible by {m}, got {in_f}")
        groups = score.reshape(out_f, in_f // m, m)
        keep = torch.zeros_like(groups, dtype=torch.bool)
        keep.scatter_(2, groups.topk(n, dim=2).indices, True)
        return keep.view(out_f, in_f)
    counts = row_counts(out_f, in_f, prune).to(score.device)
    order = score.argsort(dim=1)  # ascending: the first counts[r] of row r are pruned
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(in_f, device=score.device).expand(out_f, in_f))
    return ranks >= counts.unsqueeze(1)


def output_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor | None) -> float | None:
    """Relative output error ``tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)`` on the calibration inputs."""
    if H is None:
        return None
    D = (W - W_hat).float()
    den = float(((W.float() @ H) * W.float()).sum())
    return float(((D @ H) * D).sum()) / max(den, 1e-30)


def magnitude(W: torch.Tensor, prune: int | None = None, nm=None, H=None) -> PruneResult:
    """Keep the largest |W| (the data-free baseline)."""
    mask = mask_from_scores(W.abs().float(), prune, nm)
    W_hat = W.float() * mask
    return PruneResult(W_hat, mask, output_error(W, W_hat, H))


def wanda(W: torch.Tensor, H: torch.Tensor, prune: int | None = None, nm=None) -> PruneResult:
    """Wanda (Sun et al., 2023): score ``|W_ij| · ‖X_j‖₂``; ``diag(H)`` is ``‖X_j‖² · 2/N``, the same order."""
    norms = H.diagonal().clamp(min=0).sqrt()
    mask = mask_from_scores(W.abs().float() * norms.unsqueeze(0), prune, nm)
    W_hat = W.float() * mask
    return PruneResult(W_hat, mask, output_error(W, W_hat, H))


def sparsegpt(W: torch.Tensor, H: torch.Tensor, prune: int | None = None, nm=None, block_size: int = 128,
              damp: float = 0.01) -> PruneResult:
    """SparseGPT (Frantar & Alistarh, 2023): prune column blocks left to right, choosing the mask by the OBS
    saliency ``w² / [H⁻¹]_jj²`` and spreading each pruned weight's error over the not-yet-pruned columns through
    the Cholesky factor of ``H⁻¹`` (the same lazy block update as GPTQ).

    Unstructured: each row prunes its exact count, spread over the blocks in proportion to their width, and chooses
    within each block by saliency. N:M: each group of M chooses its N when the block reaches it.
    """
    out_f, in_f = W.shape
    W = W.clone().float()
    H = H.clone().float()
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H.diagonal().add_(damp * H.diagonal().mean())
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    mask = torch.ones_like(W, dtype=torch.bool)
    counts = None if nm is not None else row_counts(out_f, in_f, prune).to(W.device)
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        d = Hinv1.diagonal()
        Err1 = torch.zeros_like(W1)
        mask1 = torch.ones_like(W1, dtype=torch.bool)
        if nm is None:
            # cumulative shares keep every row's total exact: row r prunes floor(c_r·i2/in) − floor(c_r·i1/in) here
            take = counts * i2 // in_f - counts * i1 // in_f
            mask1 = _drop_lowest(W1 ** 2 / d.unsqueeze(0) ** 2, take)
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                n, m = nm
                tmp = W1[:, i:i + m] ** 2 / d[i:i + m].unsqueeze(0) ** 2
                keep = torch.zeros_like(tmp, dtype=torch.bool).scatter_(1, tmp.topk(n, dim=1).indices, True)
                mask1[:, i:i + m] = keep
            w = W1[:, i]
            q = w * mask1[:, i]
            err = (w - q) / d[i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            W1[:, i] = q
            Err1[:, i] = err
        W[:, i1:i2] = W1
        mask[:, i1:i2] = mask1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    W = W * mask
    return PruneResult(W, mask, None)


def _drop_lowest(score: torch.Tensor, take: torch.Tensor) -> torch.Tensor:
    """Per row r, False at its ``take[r]`` lowest scores."""
    order = score.argsort(dim=1)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(score.shape[1], device=score.device).expand_as(order))
    return ranks >= take.unsqueeze(1)
