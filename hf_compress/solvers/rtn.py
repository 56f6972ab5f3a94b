"""Round-to-nearest on a group-wise grid: the baseline every calibrated method must beat."""

from __future__ import annotations

import torch

from hf_compress.formats.columns import fit_column_grid
from hf_compress.formats.grid import QuantSpec
from hf_compress.solvers.refit import column_grid, refit_grid
from hf_compress.solvers.gptq import SolverResult, column_spec, relative_output_error


def rtn_quantize(W: torch.Tensor, spec: QuantSpec, H: torch.Tensor | None = None, clip_grid: int = 0,
                 col_bits: torch.Tensor | None = None, refit: int = 0) -> SolverResult:
    """Min-max grid (optionally clip-searched, ``diag(H)``-weighted when ``H`` is given), then round.
    ``col_bits`` gives each input column its own width (stored in bit-width segments). ``refit`` (needs ``H``):
    rounds of refitting the grid to the codes under ``H`` and re-rounding on it (``solvers.refit``)."""
    W = W.float()
    spec = column_spec(spec, col_bits)
    importance = None if H is None else torch.diag(H)
    grid = fit_column_grid(W, spec, col_bits, importance, clip_grid)
    codes = grid.quantize(W)
    for r in range(refit if H is not None else 0):
        if r:
            codes = grid.quantize(W)
        scales, zeros = refit_grid(W, H, codes, grid.scales, grid.zeros, spec, col_bits)
        grid = column_grid(scales, zeros, spec, W.shape[1], col_bits)
    err = None if H is None else relative_output_error(W, grid.dequantize(codes), H.float())
    mixed = spec.is_mixed
    return SolverResult(codes, grid.scales, grid.zeros, None, err, spec if mixed else None,
                        col_bits.to(torch.uint8) if mixed else None)
