"""Layer-wise high-impact parameter ratios (Pham et al., ACL'26): per module, a share of input channels chosen by
Fisher importance stays at ``high_bits``, the rest goes to ``low_bits``; the share per module is optimised under
one model-wide bit budget.

The paper's objective is ``½ δᵀMδ`` with ``M`` built from measured loss increases per (layer, ratio) and
within-block pairs. We take ``M`` from the same second-order model with the diagonal empirical Fisher
``F = E[g²]`` as the Hessian: the loss increase of an option is ``½ Σ F_ij Δ_ij²`` with ``Δ`` the option's
rounding error, and with a diagonal Hessian the cross terms vanish, so the problem separates into a
multiple-choice knapsack (``allocation.choose_options``). This costs one Fisher pass instead of the paper's
thousands of single-layer and pairwise loss evaluations (too many forwards for a CPU; notes §4). The paper then
refines with AdaRound + OmniQuant LWC; we run GPTQ (or RTN) on the chosen mixed grid.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from tqdm.auto import tqdm

from hf_compress.allocation.budgets import choose_options
from hf_compress.allocation.fused import fused_groups
from hf_compress.sensitivity.profiling import fisher_diagonals, profile_for
from hf_compress.calibration.discovery import weight_matrix
from hf_compress.config import HfcConfig
from hf_compress.solvers.dispatch import run_solver
from hf_compress.formats.columns import fit_column_grid, mixed_spec
from hf_compress.formats.grid import QuantSpec

PAPER_RATIOS = (0.02, 0.05, 0.10, 0.15, 0.20)


def high_impact_columns(column_fisher: torch.Tensor, ratio: float, low_bits: int, high_bits: int) -> torch.Tensor:
    """Per-column widths: the ``ceil(ratio · in)`` columns of largest Fisher mass at ``high_bits``."""
    n = column_fisher.numel()
    k = math.ceil(ratio * n - 1e-9)
    col_bits = torch.full((n,), low_bits, dtype=torch.uint8)
    col_bits[torch.argsort(column_fisher, descending=True)[:k]] = high_bits
    return col_bits


class HighImpactConfig(HfcConfig):
    """Per-module high-impact channel shares under an average-bit budget.

    Args:
        target_bits: average code width over the planned weights; must lie between what the smallest and the
            largest ratio give everywhere.
        low_bits, high_bits: widths of ordinary and high-impact channels (the paper: 2/3 for a 2-bit target,
            3/4 for a 3-bit target).
        ratios: candidate shares per module (the paper's {2, 5, 10, 15, 20}%).
        fisher_samples: calibration windows for the Fisher diagonal (ignored with a saved ``profile``).
        profile: a saved :class:`SensitivityProfile` holding per-column Fisher sums.
        solver: ``"gptq"`` or ``"rtn"`` on the chosen grid.
        fused_groups: choose one share and one channel set per fused set (q/k/v, gate/up; ``allocation.fused``),
            from the set's summed Fisher mass, so fused members share one scheme.
    """

    quant_method = "hfc_high_impact"
    method_keys = ("target_bits", "low_bits", "high_bits", "ratios", "fisher_samples", "profile", "solver", "damp",
                   "block_size", "act_order", "clip_grid", "module_ratios", "fused_groups")
    needs_calibration = True  # the Fisher diagonal needs data, with either solver

    derived_keys = ("bits", "module_ratios")  # bits = high_bits

    def __init__(self, target_bits: float = 2.1, low_bits: int = 2, high_bits: int = 3, ratios: tuple = PAPER_RATIOS,
                 fisher_samples: int = 8, profile: str | None = None, solver: str = "gptq", group_size: int = 128,
                 sym: bool = False, damp: float = 0.01, block_size: int = 128, act_order: bool = True,
                 clip_grid: int = 20, module_ratios=None, fused_groups: bool = False, **kwargs):
        kwargs.pop("bits", None)
        QuantSpec(low_bits), QuantSpec(high_bits)
        if low_bits >= high_bits:
            raise ValueError(f"low_bits ({low_bits}) must be below high_bits ({high_bits})")
        ratios = tuple(float(r) for r in ratios)
        if not ratios or any(not 0 <= r <= 1 for r in ratios) or list(ratios) != sorted(set(ratios)):
            raise ValueError(f"ratios must be distinct shares in [0, 1], ascending; got {ratios}")
        lo, hi = low_bits + ratios[0] * (high_bits - low_bits), low_bits + ratios[-1] * (high_bits - low_bits)
        if not isinstance(target_bits, (int, float)) or not lo - 1e-9 <= target_bits <= hi + 1e-9:
            raise ValueError(f"target_bits {target_bits!r} cannot be met: ratios {ratios} of {high_bits}-bit channels "
                             f"over {low_bits}-bit give [{lo:.4g}, {hi:.4g}] bits")
        if solver not in ("gptq", "rtn"):
            raise ValueError(f"solver must be 'gptq' or 'rtn', got {solver!r}")
        if not isinstance(fisher_samples, int) or fisher_samples < 1:
            raise ValueError(f"fisher_samples must be a positive integer, got {fisher_samples!r}")
        super().__init__(bits=high_bits, group_size=group_size, sym=sym, target_bits=target_bits, low_bits=low_bits,
                         high_bits=high_bits, ratios=list(ratios), fisher_samples=fisher_samples, profile=profile,
                         solver=solver, damp=damp, block_size=block_size, act_order=act_order, clip_grid=clip_grid,
                         module_ratios=module_ratios, fused_groups=bool(fused_groups), **kwargs)
        self._col_bits: dict[str, torch.Tensor] = {}

    @property
    def solver_needs_statistics(self) -> bool:
        return self.solver == "gptq"

    def _column_fisher(self, model, batches, names) -> dict[str, torch.Tensor]:
        if self.profile is not None:
            prof = profile_for(self, model, None, self.high_bits)
            return {n: prof.module_vector(n, "column_fisher") for n in names}
        if batches is None:
            raise ValueError("HighImpactConfig needs calibration data for the Fisher diagonal, or a saved `profile=`")
        fisher = fisher_diagonals(model, batches, names, self.fisher_samples, progress=True)
        return {n: f.sum(0).double() for n, f in fisher.items()}

    def option_costs(self, W: torch.Tensor, column_fisher: torch.Tensor, select_by: torch.Tensor | None = None):
        """Per candidate ratio: (Fisher loss increase ½ Σ F Δ², code bits, col_bits) of rounding ``W``; the
        high-impact columns are picked by ``select_by`` (a fused set's summed Fisher) when given."""
        rows = W.shape[0]
        weight = (column_fisher.float() / rows).clamp(min=0)  # F_ij ≈ column sum spread evenly over rows
        select_by = column_fisher if select_by is None else select_by
        out = []
        for ratio in self.ratios:
            col_bits = high_impact_columns(select_by, ratio, self.low_bits, self.high_bits)
            spec = mixed_spec(col_bits, self.group_size, self.sym)
            grid = fit_column_grid(W, spec, col_bits if spec.is_mixed else None, weight, self.clip_grid)
            delta = W.float() - grid.dequantize(grid.quantize(W))
            out.append((0.5 * float((weight * (delta**2).sum(0)).sum()), rows * float(col_bits.double().sum()), col_bits))
        return out

    def resolve_plan(self, model: nn.Module, batches=None) -> dict[str, QuantSpec]:
        if self.plan:
            return super().resolve_plan(model, batches)
        names = self.planned_module_names(model)
        fisher = self._column_fisher(model, batches, names)
        items = fused_groups(names) if self.fused_groups else [[n] for n in names]
        options, total = {}, 0
        for item in tqdm(items, desc="High-impact options", disable=len(items) < 50):
            shared = sum(fisher[n] for n in item)  # fused members read the same inputs: one channel set
            per_member = []
            for n in item:
                W = weight_matrix(model.get_submodule(n)).detach()
                if fisher[n].numel() != W.shape[1]:
                    raise ValueError(f"{n}: Fisher vector has {fisher[n].numel()} columns, the weight {W.shape[1]}")
                per_member.append(self.option_costs(W, fisher[n], shared))
                total += W.numel()
            # an item's option k: the members' costs and prices added, one column assignment
            options[item[0]] = [(sum(m[k][0] for m in per_member), sum(m[k][1] for m in per_member), per_member[0][k][2])
                                for k in range(len(self.ratios))]
        keys = [item[0] for item in items]
        costs = torch.tensor([[c for c, _, _ in options[n]] for n in keys])
        prices = torch.tensor([[p for _, p, _ in options[n]] for n in keys])
        try:
            choice = choose_options(costs, prices, self.target_bits * total)
        except ValueError as exc:
            raise ValueError(f"target_bits {self.target_bits} cannot be met by these layers: {exc}") from None
        plan, self.module_ratios = {}, {}
        for item, k in zip(items, choice.tolist()):
            col_bits = options[item[0]][k][2]
            spec = mixed_spec(col_bits, self.group_size, self.sym)
            for n in item:
                if spec.is_mixed:
                    self._col_bits[n] = col_bits
                plan[n] = spec
                self.module_ratios[n] = self.ratios[k]
        return plan

    def solve(self, weight, stats, spec, name=None):
        col_bits = self._col_bits.get(name) if spec.is_mixed else None
        if spec.is_mixed and col_bits is None:
            raise ValueError(f"{name}: a per-column plan needs its column assignment; quantize with Fisher data, not a bare plan")
        return run_solver(self.solver, self, weight, stats, spec, col_bits=col_bits)
