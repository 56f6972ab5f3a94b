"""GPTQ (Frantar et al., 2022): per-module second-order rounding with calibration Hessians."""

from __future__ import annotations

from hf_compress.config import HfcConfig
from hf_compress.solvers.dispatch import run_solver


class GPTQConfig(HfcConfig):
    """GPTQ with damping, lazy blocks, act-order (static groups), clip search and true-sequential order.

    Args:
        bits, group_size, sym: the grid.
        damp: Hessian damping as a fraction of its mean diagonal.
        block_size: columns per lazy update block.
        act_order: quantize columns by descending Hessian diagonal.
        clip_grid: candidate range shrinks per group (0 disables the clipping search).
        dataset: calibration source (required).
    """

    quant_method = "hfc_gptq"
    method_keys = ("damp", "block_size", "act_order", "clip_grid")
    needs_calibration = True

    def __init__(self, bits: int = 4, group_size: int = 128, sym: bool = False, damp: float = 0.01,
                 block_size: int = 128, act_order: bool = True, clip_grid: int = 20, **kwargs):
        if not 0 <= damp < 1:
            raise ValueError(f"damp must be in [0, 1), got {damp}")
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
        super().__init__(bits=bits, group_size=group_size, sym=sym, damp=damp, block_size=block_size,
                         act_order=act_order, clip_grid=clip_grid, **kwargs)

    def solve(self, weight, stats, spec, name=None):
        return run_solver("gptq", self, weight, stats, spec)
