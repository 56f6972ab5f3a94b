"""Round-to-nearest on a group-wise grid: the baseline every calibrated method must beat."""

from __future__ import annotations

import torch

from ..formats.grid import QuantSpec, dequantize_weight, group_params, quantize_weight
from .gptq import SolverResult, relative_output_error


def rtn_quantize(W: torch.Tensor, spec: QuantSpec, H: torch.Tensor | None = None, clip_grid: int = 0) -> SolverResult:
    """Min-max grid (optionally clip-searched, ``diag(H)``-weighted when ``H`` is given), then round."""
    W = W.float()
    importance = None if H is None else torch.diag(H)
    scales, zeros = group_params(W, spec, importance, clip_grid)
    codes = quantize_weight(W, scales, zeros, spec)
    err = None if H is None else relative_output_error(W, dequantize_weight(codes, scales, zeros, spec), H.float())
    return SolverResult(codes, scales, zeros, None, err)
