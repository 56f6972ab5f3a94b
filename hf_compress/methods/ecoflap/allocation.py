"""ECoFLaP stage 1 (Sung et al., ICLR'24, §3.2): zeroth-order block importance and water-filling keep ratios.

Importance of a block is MeZO's projected gradient ``|L(θ + εz) − L(θ − εz)| / 2ε`` summed over calibration windows,
from forward passes only (no backward, no activations kept). Deviation from the released code, flagged: it perturbs
every weight tensor on its own (7 per Llama block × 32 samples × 2 passes); we perturb the block's weights jointly,
one z per window, which estimates the same quantity up to a constant (``E|zᵀg| = √(2/π)·‖g‖``) with 7× fewer passes.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from tqdm.auto import tqdm


@torch.no_grad()
def zeroth_order_scores(model: nn.Module, groups: list[list[nn.Parameter]], batches: torch.Tensor, eps: float = 1e-3,
                        seed: int = 0, progress: bool = True) -> list[float]:
    """Per group of weight tensors: ``Σ_windows |L(θ+εz) − L(θ−εz)| / 2ε`` with a fresh Gaussian ``z`` per window."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    scores = []
    try:
        for g, params in enumerate(tqdm(groups, desc="ECoFLaP zeroth-order scores", unit="block", disable=not progress)):
            total = 0.0
            for i, row in enumerate(batches):
                gen = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + g * 7919 + i)
                zs = [torch.randn(p.shape, generator=gen).to(device=p.device, dtype=p.dtype) for p in params]
                ids = row.unsqueeze(0).to(device)
                originals = [p.detach().clone() for p in params]
                losses = []
                try:
                    for sign in (1.0, -1.0):  # θ+εz, θ−εz, from saved copies (adding and subtracting would drift)
                        for p, z, p0 in zip(params, zs, originals):
                            p.copy_(p0 + sign * eps * z)
                        losses.append(float(model(input_ids=ids, labels=ids, use_cache=False).loss))
                finally:
                    for p, p0 in zip(params, originals):
                        p.copy_(p0)
                total += abs(losses[0] - losses[1]) / (2 * eps)
            scores.append(total)
    finally:
        model.train(was_training)
    return scores


def water_fill(sizes: list[int], scores: list[float], sparsity: float, max_sparsity: float) -> list[int]:
    """Weights to keep per group: exactly ``N − round(sparsity·N)`` in total, each group at least
    ``ceil(n_g·(1 − max_sparsity))`` (so no group is pruned beyond ``max_sparsity``) and at most ``n_g``; the rest is
    poured in proportion to the scores, a group that fills up passing its share on (integer water-filling)."""
    if len(sizes) != len(scores) or not sizes:
        raise ValueError("water_fill needs one score per group")
    if not 0 <= sparsity <= max_sparsity < 1:
        raise ValueError(f"need 0 <= sparsity <= max_sparsity < 1, got sparsity={sparsity}, max_sparsity={max_sparsity}")
    total = sum(sizes)
    target = total - round(sparsity * total)
    keep = [min(n, math.ceil(n * (1 - max_sparsity))) for n in sizes]
    if sum(keep) > target:  # the floors alone overshoot (only when max_sparsity ≈ sparsity): take back evenly
        keep = _largest_remainder([n * target / total for n in sizes], target, sizes)
        return keep
    weights = [max(float(s), 0.0) for s in scores]
    remaining = target - sum(keep)
    while remaining > 0:
        open_ = [g for g in range(len(sizes)) if keep[g] < sizes[g]]
        w = [weights[g] for g in open_]
        if sum(w) <= 0:
            w = [float(sizes[g]) for g in open_]  # no signal left: pour in proportion to the room
        shares = [remaining * x / sum(w) for x in w]
        room = [sizes[g] - keep[g] for g in open_]
        add = _largest_remainder(shares, remaining, room) if sum(room) > 0 else [0] * len(open_)
        for g, a in zip(open_, add):
            keep[g] += a
        remaining -= sum(add)
    return keep


def _largest_remainder(shares: list[float], total: int, caps: list[int]) -> list[int]:
    """Integers summing to ``min(total, Σ caps)``, each ≤ its cap, as close to ``shares`` as rounding allows."""
    out = [min(int(math.floor(s)), c) for s, c in zip(shares, caps)]
    left = min(total, sum(caps)) - sum(out)
    order = sorted(range(len(shares)), key=lambda i: shares[i] - math.floor(shares[i]), reverse=True)
    while left > 0:
        moved = False
        for i in order:
            if left and out[i] < caps[i]:
                out[i] += 1
                left -= 1
                moved = True
        if not moved:
            break
    return out


def split_keep(keep: int, sizes: list[int]) -> list[int]:
    """A group's kept count over its modules in proportion to their sizes (same sparsity up to rounding)."""
    total = sum(sizes)
    return _largest_remainder([keep * n / total for n in sizes], keep, sizes)
