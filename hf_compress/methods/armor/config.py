"""ARMOR (Liu et al., ICLR'26): 2:4 pruning as ``A (W′ ⊙ M) B`` with block-diagonal factors, stored as the sparse core
plus the factors (``SparseSpec.factor_block``)."""

from __future__ import annotations

from hf_compress.formats.sparse import SparseSpec
from hf_compress.methods.sparse.config import SparseConfig


class ArmorConfig(SparseConfig):
    """ARMOR 2:4 pruning with block-diagonal correction factors.

    Args:
        factor_block: block size of A and B (must divide every planned module's dimensions; 32 fits SmolLM2).
        iters: optimisation iterations per module (the paper: 3000–20 000 on GPUs; a few hundred on CPU).
        lr: Adam learning rate of the continuous step (in normalised coordinates).
        bits, group_size, sym: optionally store the sparse core as integer codes.
    """

    quant_method = "hfc_armor"
    method_keys = ("sparsity", "pattern", "factor_block", "iters", "lr")
    needs_calibration = True

    def __init__(self, factor_block: int = 32, iters: int = 200, lr: float = 5e-3, pattern: str = "2:4",
                 sparsity: float | None = None, **kwargs):
        if pattern != "2:4":
            raise ValueError(f"ARMOR's sparse core is 2:4 (its mask step enumerates the 6 patterns of 2 in 4), got {pattern!r}")
        if not isinstance(factor_block, int) or factor_block < 4 or factor_block % 4:
            raise ValueError(f"factor_block must be a positive multiple of 4, got {factor_block!r}")
        if not isinstance(iters, int) or iters < 0:
            raise ValueError(f"iters must be a non-negative integer, got {iters!r}")
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr!r}")
        super().__init__(sparsity=sparsity, pattern=pattern, factor_block=factor_block, iters=iters, lr=lr, **kwargs)

    def module_spec(self, module, sparsity, pattern=None) -> SparseSpec:
        spec = super().module_spec(module, sparsity, pattern)
        return SparseSpec(spec.pattern, sparsity=spec.sparsity, bits=spec.bits, group_size=spec.group_size,
                          sym=spec.sym, factor_block=self.factor_block)

    def prune_weight(self, weight, hessian, spec):
        from hf_compress.methods.armor.solver import armor

        return armor(weight, hessian, spec.factor_block, self.iters, self.lr, self.seed)
