"""Refit a quantized module's scales and zero points to its codes, under the full calibration Hessian.

A solver (GPTQ, RTN) picks codes ``q`` on a grid fitted *before* rounding: min-max ranges with a clipping search
weighted by ``diag(H)``. Once the codes are fixed, the dequantized weight ``ŵ = (q − z)·s`` is linear in each
group's ``s`` and in its offset ``m = −z·s``, so the parameters that minimise the layer's output error

    ``tr((W − Ŵ) H (W − Ŵ)ᵀ)``   (``H = XᵀX``, the GPTQ objective, cross-group terms included)

are one small least-squares problem per output row (2 unknowns per group). GPTQ's error feedback makes the codes
of later columns compensate earlier ones, so the best parameters for the *chosen* codes are not the ones the
codes were chosen on. The stored format is unchanged: the zero point is rounded back to an integer on the grid
and the scale is refitted with that zero held, then rounded to float16; a row keeps its old parameters unless
the refit lowers its error. Nothing extra is stored, so the bits per weight are those of the plain solver.

``rounds > 1`` alternates: re-run the solver on the refitted (fixed) grid to choose new codes, refit again.
"""

from __future__ import annotations

import torch

from hf_compress.formats.columns import ColumnGrid, segments, split_stored
from hf_compress.formats.grid import SCALE_DTYPE, QuantSpec, expand_groups


def column_groups(spec: QuantSpec, in_features: int, col_bits: torch.Tensor | None = None):
    """``(group, maxq)``: each input column's index into the stored ``[rows, Σ groups]`` parameters, and each
    stored group's largest code."""
    segs = segments(spec, in_features, col_bits)
    group = torch.empty(in_features, dtype=torch.int64)
    maxq, offset = [], 0
    for seg in segs:
        n_groups = seg.spec.groups(seg.n_cols)
        local = torch.arange(seg.n_cols) // seg.spec.width(seg.n_cols) + offset
        group[slice(None) if seg.cols is None else seg.cols] = local
        maxq += [2**seg.spec.bits - 1] * n_groups
        offset += n_groups
    return group, torch.tensor(maxq, dtype=torch.float32)


def column_grid(scales: torch.Tensor, zeros: torch.Tensor, spec: QuantSpec, in_features: int,
                col_bits: torch.Tensor | None = None) -> ColumnGrid:
    """The per-column expansion of stored parameters (what a solver quantizes against)."""
    segs = segments(spec, in_features, col_bits)
    rows = scales.shape[0]
    col_scale, col_zero = torch.empty(rows, in_features), torch.empty(rows, in_features)
    col_maxq = torch.empty(in_features, dtype=torch.int64)
    for s, z, seg in zip(split_stored(scales, segs), split_stored(zeros, segs), segs):
        idx = slice(None) if seg.cols is None else seg.cols
        col_scale[:, idx] = expand_groups(s.float(), seg.spec, seg.n_cols)
        col_zero[:, idx] = expand_groups(z.float(), seg.spec, seg.n_cols)
        col_maxq[idx] = 2**seg.spec.bits - 1
    return ColumnGrid(scales, zeros, col_scale, col_zero, col_maxq)


def _gram(A: torch.Tensor, B: torch.Tensor, H: torch.Tensor, onehot: torch.Tensor, members: list) -> torch.Tensor:
    """``G[r, g, h] = Σ_{i∈g, j∈h} A[r,i] H[i,j] B[r,j]`` for every row ``r`` (``A``, ``B``: ``[rows, n]``)."""
    out = A.new_zeros(A.shape[0], len(members), onehot.shape[1])
    for g, idx in enumerate(members):
        out[:, g] = ((A[:, idx] @ H[idx]) * B) @ onehot
    return out


def _row_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    D = W - W_hat
    return ((D @ H) * D).sum(1)


def refit_grid(W: torch.Tensor, H: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
               spec: QuantSpec, col_bits: torch.Tensor | None = None, ridge: float = 1e-6):
    """Scales and zero points (same shapes and dtypes as given) minimising ``tr(ΔW H ΔWᵀ)`` for fixed ``codes``.

    Each row keeps its given parameters unless the refit lowers that row's error, so the result is never worse
    (on ``H``) than the input. Symmetric grids keep their fixed zero points and refit scales only.
    """
    W, H = W.float(), H.float()
    rows, n = W.shape
    group, maxq = column_groups(spec, n, col_bits)
    n_groups = int(maxq.numel())
    onehot = torch.nn.functional.one_hot(group, n_groups).float()  # [n, G]
    members = [torch.nonzero(group == g).flatten() for g in range(n_groups)]
    Q = codes.float()
    HW = W @ H
    eye = torch.eye(n_groups)

    def solve(M, b):
        reg = ridge * M.diagonal(dim1=1, dim2=2).mean(1).clamp(min=1e-12)[:, None, None]
        sol = torch.linalg.solve_ex(M + reg * torch.eye(M.shape[1]), b.unsqueeze(2))
        return sol[0].squeeze(2), sol[1] == 0

    zero = zeros.float().clone()
    if not spec.sym:
        # joint (scale, offset) per group: ŵ = s·q + m, then the nearest on-grid integer zero point z = −m/s
        ones = torch.ones_like(Q)
        M = torch.cat([torch.cat([_gram(Q, Q, H, onehot, members), _gram(Q, ones, H, onehot, members)], 2),
                       torch.cat([_gram(ones, Q, H, onehot, members), _gram(ones, ones, H, onehot, members)], 2)], 1)
        b = torch.cat([(HW * Q) @ onehot, HW @ onehot], 1)
        theta, ok = solve(M, b)
        s, m = theta[:, :n_groups], theta[:, n_groups:]
        good = ok[:, None] & (s > 0) & torch.isfinite(s) & torch.isfinite(m)
        z = torch.minimum(torch.round(-m / s.clamp(min=1e-12)).clamp(min=0), maxq)
        zero = torch.where(good, z, zero)
    # scales with the integer zero points held: ŵ = s·(q − z)
    C = Q - zero[:, group]
    s, ok = solve(_gram(C, C, H, onehot, members), (HW * C) @ onehot)
    s = s.to(SCALE_DTYPE).float()
    good = ok[:, None] & (s > 0) & torch.isfinite(s)
    s = torch.where(good, s, scales.float())
    old = _row_error(W, (Q - zeros.float()[:, group]) * scales.float()[:, group], H)
    new = _row_error(W, C * s[:, group], H)
    keep = ~(new < old)
    s = torch.where(keep[:, None], scales.float(), s)
    zero = torch.where(keep[:, None], zeros.float(), zero)
    return s.to(scales.dtype), zero.to(zeros.dtype)


def validate(config) -> None:
    """The ``refit`` option every config accepts (an option group registered by ``methods.gptq``)."""
    if isinstance(config.refit, bool) or not isinstance(config.refit, int) or config.refit < 0:
        raise ValueError(f"refit must be a non-negative integer (rounds), got {config.refit!r}")
