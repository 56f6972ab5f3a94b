"""BAQ: Bit Allocation Quantization (arXiv 2506.05664), stored for real.

Pass 1 measures GPTQ's per-column loss ``L_j`` at a reference width (a :class:`SensitivityProfile`, so a saved
profile skips the pass). The closed form then gives column ``j`` the width ``R̄ + θ⁻¹·log2(L_j / geomean L)``
(equal loss per column), rounded to integers under the average-bit budget; pass 2 runs GPTQ with those
widths. The released code only fake-quantizes with non-power-of-two level counts; we keep integer widths and
store each width's columns as one packed segment (``formats.columns``), so the checkpoint really is that small.

``granularity="module"`` gives each module one width from its total GPTQ loss per weight — the same closed
form across modules, under one model-wide budget (our extension; the paper allocates inside a layer only).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from hf_compress.allocation.budgets import equal_loss_bits
from hf_compress.allocation.fused import fused_groups
from hf_compress.config import HfcConfig
from hf_compress.solvers.dispatch import run_solver
from hf_compress.formats.columns import mixed_spec
from hf_compress.formats.grid import QuantSpec
from hf_compress.formats.packing import check_bits
from hf_compress.sensitivity.profiling import profile_for



class BAQConfig(HfcConfig):
    """Equal-loss bit allocation from GPTQ column losses under a fractional average-bit budget.

    Args:
        target_bits: average code width over the planned weights (e.g. 2.5, 3.0, 3.25). Scales and zero points
            come on top; the realised bits per weight are reported after quantization.
        granularity: ``"column"`` (a width per input column, the paper) or ``"module"`` (one width per module).
        min_bits, max_bits: allowed widths (1..8).
        theta: the closed form's divisor, ``b_j = R̄ + log2(L_j/geomean L)/theta`` (2 is exact reverse
            water-filling; the released code hard-codes 1.95).
        profile: a saved :class:`SensitivityProfile` with column losses (skips pass 1).
        fused_groups: allocate projections servers fuse (q/k/v, gate/up; ``allocation.fused``) as one item, so
            they share one width (``"module"``) or one column assignment (``"column"``). With ``granularity="module"``
            and servable widths this gives a mixed plan vLLM can serve.
        group_size, sym, damp, block_size, act_order, clip_grid: the GPTQ grid and solver options.
    """

    quant_method = "hfc_baq"
    method_keys = ("target_bits", "granularity", "min_bits", "max_bits", "theta", "profile", "damp", "block_size",
                   "act_order", "clip_grid", "fused_groups")
    needs_calibration = True
    derived_keys = ("bits",)  # = max_bits

    def __init__(self, target_bits: float = 3.0, granularity: str = "column", min_bits: int = 1, max_bits: int = 8,
                 theta: float = 1.95, profile: str | None = None, group_size: int = 128, sym: bool = False,
                 damp: float = 0.01, block_size: int = 128, act_order: bool = True, clip_grid: int = 20,
                 fused_groups: bool = False, **kwargs):
        kwargs.pop("bits", None)  # derived; present when a saved config is read back
        if granularity not in ("column", "module"):
            raise ValueError(f"granularity must be 'column' or 'module', got {granularity!r}")
        check_bits(min_bits), check_bits(max_bits)
        if min_bits >= max_bits:
            raise ValueError(f"min_bits ({min_bits}) must be below max_bits ({max_bits})")
        if not isinstance(target_bits, (int, float)) or not min_bits <= target_bits <= max_bits:
            raise ValueError(f"target_bits {target_bits!r} is outside the allowed widths [{min_bits}, {max_bits}]")
        if not theta > 0:
            raise ValueError(f"theta must be positive, got {theta}")
        super().__init__(bits=max_bits, group_size=group_size, sym=sym, target_bits=target_bits,
                         granularity=granularity, min_bits=min_bits, max_bits=max_bits, theta=theta, profile=profile,
                         damp=damp, block_size=block_size, act_order=act_order, clip_grid=clip_grid,
                         fused_groups=bool(fused_groups), **kwargs)
        self._col_bits: dict[str, torch.Tensor] = {}

    @property
    def reference_bits(self) -> int:
        return int(min(max(round(self.target_bits), self.min_bits), self.max_bits))

    def resolve_plan(self, model: nn.Module, batches=None) -> dict[str, QuantSpec]:
        if self.plan:
            return super().resolve_plan(model, batches)
        prof = profile_for(self, model, batches, self.reference_bits)
        names = self.planned_module_names(model)
        slope = 1 / self.theta
        # items of the allocation: fused sets share one decision (a fused matrix is one module to a server)
        items = fused_groups(names) if self.fused_groups else [[n] for n in names]
        if self.granularity == "module":
            losses = torch.tensor([sum(prof.modules[n]["gptq_loss"] for n in item) for item in items], dtype=torch.float64)
            counts = torch.tensor([sum(math.prod(prof.modules[n]["shape"]) for n in item) for item in items],
                                  dtype=torch.float64)
            bits = equal_loss_bits(losses / counts, counts, self.target_bits, self.min_bits, self.max_bits, slope)
            return {n: QuantSpec(int(b), self.group_size, self.sym) for item, b in zip(items, bits.tolist()) for n in item}
        plan = {}
        for item in items:  # members of a fused set read the same inputs: one column assignment for the set
            losses = sum(prof.module_vector(n, "column_loss") for n in item)
            col_bits = equal_loss_bits(losses, torch.ones_like(losses), self.target_bits, self.min_bits, self.max_bits, slope)
            for n in item:
                self._col_bits[n] = col_bits.to(torch.uint8)
                plan[n] = mixed_spec(col_bits, self.group_size, self.sym)
        return plan

    def solve(self, weight, stats, spec, name=None):
        col_bits = self._col_bits.get(name) if spec.is_mixed else None
        if spec.is_mixed and col_bits is None:
            raise ValueError(f"{name}: a per-column plan needs its column assignment; quantize from a profile, not a bare plan")
        return run_solver("gptq", self, weight, stats, spec, col_bits=col_bits)
