"""Round-to-nearest: the data-free baseline every other method is measured against."""

from __future__ import annotations

from hf_compress.config import HfcConfig
from hf_compress.solvers.rtn import rtn_quantize


class RTNConfig(HfcConfig):
    """Round-to-nearest; no calibration data.

    Args:
        bits, group_size, sym: the grid.
        clip_grid: candidate clipping ranges searched per group (0: none).
    """

    quant_method = "hfc_rtn"
    method_keys = ("clip_grid",)

    def __init__(self, bits: int = 4, group_size: int = 128, sym: bool = False, clip_grid: int = 0, **kwargs):
        super().__init__(bits=bits, group_size=group_size, sym=sym, clip_grid=clip_grid, **kwargs)

    def solve(self, weight, stats, spec, name=None):
        return rtn_quantize(weight, spec, None if stats is None else stats.hessian, self.clip_grid)
