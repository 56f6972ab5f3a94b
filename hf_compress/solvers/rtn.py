"""Round-to-nearest on a group-wise grid: the baseline every calibrated method must beat."""

from __future__ import annotations

import torch

from hf_compress.formats.columns import fit_column_grid
from hf_compress.formats.grid import QuantSpec
from hf_compress.solvers.gptq import SolverResult, column_spec, relative_output_error


def rtn_quantize(W: torch.Tensor, spec: QuantSpec, H: torch.Tensor | None = None, clip_grid: int = 0,
                 col_bits: torch.Tensor | None = None) -> SolverResult:
    """Min-max grid (optionally clip-searched, ``diag(H)``-weighted when ``H`` is given), then round.
    ``col_bits`` gives each input column its own width (stored in bit-width segments)."""
    W = W.float()
    spec = column_spec(spec, col_bits)
    importance = None if H is None else torch.diag(H)
    grid = fit_column_grid(W, spec, col_bits, importance, clip_grid)
    codes = grid.quantize(W)
    err = None if H is None else relative_output_error(W, grid.dequantize(codes), H.float())
    mixed = spec.is_mixed
    return SolverResult(codes, grid.scales, grid.zeros, None, err, spec if mixed else None,
                        col_bits.to(torch.uint8) if mixed else None)
