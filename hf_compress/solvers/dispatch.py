"""One call for planner configs: run RTN or GPTQ with the solver options a config carries."""

from __future__ import annotations

from hf_compress.formats.grid import QuantSpec
from hf_compress.solvers.gptq import gptq_quantize
from hf_compress.solvers.rtn import rtn_quantize

SOLVERS = ("gptq", "rtn")


def run_solver(solver: str, config, weight, stats, spec: QuantSpec, col_bits=None):
    """Quantize ``weight`` to ``spec`` with ``solver`` (``"gptq"`` needs ``stats.hessian``), using the config's
    ``clip_grid``, ``refit`` (``solvers.refit``; needs the Hessian) and, for GPTQ, its ``damp``, ``block_size`` and
    ``act_order``."""
    if solver == "rtn":
        return rtn_quantize(weight, spec, None if stats is None else stats.hessian, config.clip_grid, col_bits=col_bits,
                            refit=getattr(config, "refit", 0))
    if solver != "gptq":
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    return gptq_quantize(weight, stats.hessian, spec, damp=config.damp, block_size=config.block_size,
                         act_order=config.act_order, clip_grid=config.clip_grid, col_bits=col_bits,
                         refit=getattr(config, "refit", 0))
