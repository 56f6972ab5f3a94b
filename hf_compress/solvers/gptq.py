"""GPTQ (Frantar et al., 2022) as a pure tensor function.

Objective per layer: minimise ``‖(W − Ŵ) X‖²`` = ``tr((W − Ŵ) H (W − Ŵ)ᵀ)`` with ``H = XᵀX`` over the calibration
tokens. Columns are quantized one at a time; the error of column ``j`` is pushed onto the not-yet-quantized
columns through the upper Cholesky factor of ``H⁻¹`` (lazy block updates for speed).

Levers beyond the textbook version, each optional:
- ``act_order``: process columns by descending ``diag(H)`` so the most-used inputs are fixed while the most
  freedom remains. Grids use *static groups* (parameters fixed on the original weights before the pass), so
  no permutation is stored and loading needs no index map. Static groups are the default even without
  act-order: fitting a group's grid to the error-fed weights lets the feedback widen later ranges, and was
  worse at 2-3 bits on our tests (``static_groups=False`` keeps the textbook behaviour).
- ``clip_grid``: per-group range shrinking that minimises the ``diag(H)``-weighted error (see ``grid``).
- column losses ``(w − ŵ)² / d_j²`` are returned, as BAQ's Hessian proxy needs them.
- ``col_bits``: a width per input column (BAQ, high-impact channels); grids then live in bit-width segments
  (see ``formats.columns``) and are always static.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hf_compress.formats.columns import fit_column_grid, mixed_spec
from hf_compress.formats.grid import QuantSpec, group_params, quantize_column
from hf_compress.solvers.refit import column_grid, refit_grid


@dataclass
class SolverResult:
    codes: torch.Tensor  # uint8 [out, in]
    scales: torch.Tensor  # float [out, groups] (mixed widths: [out, Σ groups] in segment order)
    zeros: torch.Tensor  # float (integer-valued), like scales
    column_loss: torch.Tensor | None = None  # [in], GPTQ's per-column loss
    output_error: float | None = None  # tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)
    spec: QuantSpec | None = None  # what was stored, when it differs from the requested spec (mixed widths)
    col_bits: torch.Tensor | None = None  # uint8 [in], mixed widths only


def column_spec(spec: QuantSpec, col_bits: torch.Tensor | None) -> QuantSpec:
    """The spec to store for ``col_bits`` on ``spec``'s grid (``spec`` itself when no widths are given)."""
    return spec if col_bits is None else mixed_spec(col_bits, spec.group_size, spec.sym)


def _inverse_cholesky(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + λI)⁻¹``, raising damping until it is positive definite."""
    # Why in place and step by step: at 13824 inputs each n × n fp32 matrix is 764 MB, and an identity matrix, the
    # damped copy, L, its inverse and U all alive at once made GPTQ the largest term of a streamed run's peak.
    mean_diag = torch.diag(H).mean()
    for attempt in range(6):
        lam = damp * (10**attempt) * mean_diag
        damped = H.clone()
        damped.diagonal().add_(lam)  # = H + λI exactly (off the diagonal nothing is added)
        L, info = torch.linalg.cholesky_ex(damped)
        del damped
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            del L
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            del Hinv
            if int(info) == 0 and torch.isfinite(U).all():
                return U
    raise ValueError("Hessian is not positive definite even with strong damping (degenerate calibration data?)")


def relative_output_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """``tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)``: the share of the layer's output energy lost to quantization."""
    D, W = (W - W_hat).float(), W.float()
    num = ((D @ H) * D).sum()
    den = ((W @ H) * W).sum().clamp(min=1e-12)
    return float(num / den)


def gptq_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    spec: QuantSpec,
    *,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = True,
    static_groups: bool = True,
    clip_grid: int = 0,
    col_bits: torch.Tensor | None = None,
    refit: int = 0,
) -> SolverResult:
    """Quantize ``W [out, in]`` against Hessian ``H [in, in]``; returns codes in the original column order.

    ``refit``: rounds of refitting scales and zero points to the chosen codes under the full Hessian
    (``solvers.refit``); each round after the first re-runs GPTQ on the refitted grid first. 0: off."""
    if H.shape != (W.shape[1], W.shape[1]):
        raise ValueError(f"Hessian shape {tuple(H.shape)} does not match weight input dimension {W.shape[1]}")
    if not torch.isfinite(H).all():
        raise ValueError("Hessian contains NaN or inf: calibration activations were not finite")
    W0 = W.float()
    W = W0.clone()
    H = H.float().clone()
    n = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    importance = torch.diag(H).clone()
    width = spec.width(n)
    if col_bits is not None and col_bits.numel() != n:
        raise ValueError(f"col_bits has {col_bits.numel()} widths for a weight with {n} input columns")
    spec = column_spec(spec, col_bits)
    static = static_groups or act_order or spec.is_mixed

    n_groups = spec.groups(n)
    scales = torch.zeros(W.shape[0], n_groups)
    zeros = torch.zeros(W.shape[0], n_groups)
    grid = None
    if static:
        grid = fit_column_grid(W, spec, col_bits, importance, clip_grid)
        scales, zeros = grid.scales, grid.zeros

    perm = torch.argsort(importance, descending=True) if act_order else torch.arange(n)
    Wp = W[:, perm]
    U = _inverse_cholesky(H[perm][:, perm], damp)

    def gptq_pass(grid, scales, zeros):
        W = Wp.clone()

        codes = torch.zeros_like(W, dtype=torch.uint8)
        losses = torch.zeros(n)
        for i1 in range(0, n, block_size):
            i2 = min(i1 + block_size, n)
            W1 = W[:, i1:i2].clone()
            E1 = torch.zeros_like(W1)
            U1 = U[i1:i2, i1:i2]
            for i in range(i2 - i1):
                col = int(perm[i1 + i])
                g = col // width
                if grid is None and col % width == 0:
                    # Natural order: the group's grid is fit to its columns *after* earlier error feedback.
                    ahead = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :width]
                    s, z = group_params(ahead, QuantSpec(spec.bits, -1, spec.sym), importance[col : col + width], clip_grid)
                    scales[:, g], zeros[:, g] = s[:, 0], z[:, 0]
                w = W1[:, i]
                d = U1[i, i]
                if grid is not None:
                    q = grid.quantize(w.unsqueeze(1), slice(col, col + 1))
                    w_hat = grid.dequantize(q, slice(col, col + 1)).squeeze(1)
                    q = q.squeeze(1)
                else:
                    q, w_hat = quantize_column(w, scales[:, g], zeros[:, g], spec.bits)
                codes[:, i1 + i] = q.to(torch.uint8)
                err = (w - w_hat) / d
                losses[col] = float((err**2).sum() / 2)
                W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
                E1[:, i] = err
            W[:, i2:] -= E1 @ U[i1:i2, i2:]
        out_codes = torch.empty_like(codes)
        out_codes[:, perm] = codes
        return out_codes, losses

    out_codes, losses = gptq_pass(grid, scales, zeros)
    for r in range(refit):
        if r:  # new codes on the refitted grid, then refit to them
            out_codes, losses = gptq_pass(grid, scales, zeros)
        scales, zeros = refit_grid(W0, H, out_codes, scales, zeros, spec, col_bits)
        grid = column_grid(scales, zeros, spec, n, col_bits)
    if grid is not None:
        W_hat = grid.dequantize(out_codes)
    else:
        from hf_compress.formats.grid import dequantize_weight

        W_hat = dequantize_weight(out_codes, scales, zeros, spec)
    mixed = spec.is_mixed
    return SolverResult(out_codes, scales, zeros, losses, relative_output_error(W0, W_hat, H),
                        spec if mixed else None, col_bits.to(torch.uint8) if mixed else None)
