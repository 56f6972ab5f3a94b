"""Layer-wise Quantization (Dumitru et al., arXiv 2406.17415): rank decoder layers by importance, keep the
most important at ``high_bits`` and move the rest to ``low_bits``.

Average bits = high − (k / L)(high − low) for k layers moved down, so a target average fixes k. Importance:
LIM (higher = more important), ZD (share of weights with z > 1; higher read as more important here — the
paper's direction is ambiguous, see the method notes), or a seeded random order as the control.
"""

from __future__ import annotations

import torch
from torch import nn

from hf_compress.calibration.discovery import decoder_layers, quantizable_modules
from hf_compress.config import HfcConfig
from hf_compress.solvers.dispatch import run_solver
from hf_compress.formats.grid import QuantSpec

SCORES = ("lim", "zd", "random")


class LayerwiseQuantConfig(HfcConfig):
    """Per-layer bit widths from a layer ranking.

    Args:
        score: ``"lim"``, ``"zd"`` or ``"random"`` (control).
        high_bits, low_bits: the two widths.
        low_fraction: share of layers moved to ``low_bits``; or
        target_bits: the average width over layers (exactly one of the two).
        solver: ``"gptq"`` or ``"rtn"`` for every module.
        profile: a saved :class:`SensitivityProfile` (folder or file) to rank by instead of measuring.
        fused_groups: accepted for symmetry with the other planners; a width per decoder layer already gives fused
            projections (q/k/v, gate/up) one scheme, so the plan is unchanged.
    """

    quant_method = "hfc_layerwise"
    method_keys = ("score", "high_bits", "low_bits", "low_fraction", "target_bits", "solver", "profile",
                   "damp", "block_size", "act_order", "clip_grid", "layer_bits", "fused_groups")

    derived_keys = ("bits", "layer_bits")  # bits = high_bits

    def __init__(self, score: str = "lim", high_bits: int = 4, low_bits: int = 2, low_fraction: float | None = None,
                 target_bits: float | None = None, solver: str = "gptq", profile: str | None = None,
                 group_size: int = 128, sym: bool = False, damp: float = 0.01, block_size: int = 128,
                 act_order: bool = True, clip_grid: int = 20, layer_bits=None, fused_groups: bool = False, **kwargs):
        kwargs.pop("bits", None)  # derived (= high_bits); present when a saved config is read back
        if score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {score!r}")
        if solver not in ("gptq", "rtn"):
            raise ValueError(f"solver must be 'gptq' or 'rtn', got {solver!r}")
        QuantSpec(high_bits), QuantSpec(low_bits)
        if low_bits >= high_bits:
            raise ValueError(f"low_bits ({low_bits}) must be below high_bits ({high_bits})")
        if (low_fraction is None) == (target_bits is None) and kwargs.get("plan") is None:
            raise ValueError("give exactly one of low_fraction and target_bits")
        if low_fraction is not None and not 0 <= low_fraction <= 1:
            raise ValueError(f"low_fraction must be in [0, 1], got {low_fraction}")
        if target_bits is not None and not low_bits <= target_bits <= high_bits:
            raise ValueError(f"target_bits {target_bits} is outside [{low_bits}, {high_bits}]: no mix of the two widths reaches it")
        super().__init__(bits=high_bits, group_size=group_size, sym=sym, score=score, high_bits=high_bits,
                         low_bits=low_bits, low_fraction=low_fraction, target_bits=target_bits, solver=solver,
                         profile=profile, damp=damp, block_size=block_size, act_order=act_order, clip_grid=clip_grid,
                         layer_bits=layer_bits, fused_groups=bool(fused_groups), **kwargs)

    @property
    def needs_calibration(self) -> bool:
        return self.solver == "gptq" or (self.score == "lim" and self.profile is None and not self.plan)

    @property
    def solver_needs_statistics(self) -> bool:
        return self.solver == "gptq"

    def layers_moved_down(self, num_layers: int) -> int:
        if self.low_fraction is not None:
            return round(self.low_fraction * num_layers)
        return round((self.high_bits - self.target_bits) * num_layers / (self.high_bits - self.low_bits))

    def layer_importance(self, model: nn.Module, batches) -> list[float]:
        _, layers = decoder_layers(model)
        if self.score == "random":
            return torch.rand(len(layers), generator=torch.Generator().manual_seed(self.seed)).tolist()
        if self.profile is not None:
            from hf_compress.sensitivity import SensitivityProfile

            prof = SensitivityProfile.load(self.profile)
            prof.check_model(model)
            return prof.layer_scores(self.score)
        from hf_compress.sensitivity.profiling import layer_lim_scores, layer_zd_scores

        return layer_lim_scores(model, batches) if self.score == "lim" else layer_zd_scores(model)

    def resolve_plan(self, model: nn.Module, batches=None) -> dict[str, QuantSpec]:
        if self.plan:
            return super().resolve_plan(model, batches)
        prefix, layers = decoder_layers(model)
        importance = self.layer_importance(model, batches)
        k = self.layers_moved_down(len(layers))
        low = set(sorted(range(len(layers)), key=lambda i: importance[i])[:k])
        self.layer_bits = [self.low_bits if i in low else self.high_bits for i in range(len(layers))]
        plan = {}
        for i, block in enumerate(layers):
            for rel, _ in quantizable_modules(block):
                name = f"{prefix}.{i}.{rel}"
                if not self.is_excluded(name):
                    plan[name] = QuantSpec(self.layer_bits[i], self.group_size, self.sym)
        return plan

    def solve(self, weight, stats, spec, name=None):
        return run_solver(self.solver, self, weight, stats, spec)
