"""Bit budgets: turn per-item sensitivities into integer widths whose weighted mean meets a budget.

Two solvers, one per kind of sensitivity model:

- :func:`equal_loss_bits` — BAQ's closed form. With the high-resolution model ``loss_i(b) = s_i · 4^(−b)`` the
  optimum under ``Σ n_i b_i ≤ B`` is reverse water-filling: every item ends with the same loss, i.e.
  ``b_i = c + ½ log2 s_i``. Rounding to integers and clamping to the allowed widths breaks exactness, so the
  offset ``c`` is found by bisection and leftover budget goes, one bit at a time, where it buys most.
- :func:`choose_options` — a multiple-choice knapsack (each item picks one option with a measured cost and a
  bit price), solved by Lagrangian relaxation plus a greedy upgrade: what high-impact ratios need, where the
  cost of an option is measured rather than modelled.
"""

from __future__ import annotations

import math

import torch


def _check_budget(target: float, low: float, high: float, what: str) -> None:
    if not isinstance(target, (int, float)) or not math.isfinite(target):
        raise ValueError(f"target_bits must be a finite number, got {target!r}")
    if not low - 1e-9 <= target <= high + 1e-9:
        raise ValueError(f"target_bits {target} cannot be met: {what} reach only [{low:.4g}, {high:.4g}] bits")


def equal_loss_bits(scores: torch.Tensor, counts: torch.Tensor, target: float, min_bits: int, max_bits: int,
                    slope: float = 0.5) -> torch.Tensor:
    """Integer widths in ``[min_bits, max_bits]`` with ``Σ counts·bits / Σ counts ≤ target``, as close as possible.

    Args:
        scores: per-item loss at any common reference width (``s_i``; zeros go to ``min_bits``).
        counts: weights per item (the budget is a weighted mean).
        slope: ``∂b/∂log2 s`` (½ for exact reverse water-filling; BAQ's released code uses 1/1.95).
    """
    _check_budget(target, min_bits, max_bits, f"widths {min_bits}..{max_bits}")
    scores, counts = scores.double().flatten(), counts.double().flatten()
    if scores.shape != counts.shape or scores.numel() == 0:
        raise ValueError("scores and counts must be non-empty and of the same length")
    if not torch.isfinite(scores).all() or (scores < 0).any():
        raise ValueError("sensitivity scores must be finite and non-negative (NaN calibration data?)")
    total = counts.sum()
    positive = scores > 0
    log_s = torch.where(positive, scores.clamp(min=1e-300).log2(), torch.full_like(scores, -math.inf))

    def widths(c: float) -> torch.Tensor:
        b = torch.round(c + slope * log_s)
        return torch.where(positive, b, torch.full_like(b, min_bits)).clamp(min_bits, max_bits)

    def mean(b: torch.Tensor) -> float:
        return float((b * counts).sum() / total)

    finite = log_s[positive]
    lo = min_bits - 1 - slope * (float(finite.max()) if finite.numel() else 0.0)
    hi = max_bits + 1 - slope * (float(finite.min()) if finite.numel() else 0.0)
    for _ in range(100):  # largest offset whose rounded widths still fit the budget
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mean(widths(mid)) <= target + 1e-12 else (lo, mid)
    bits = widths(lo)
    # Greedy fill: +1 bit where the modelled loss drop per spent bit, s·4^(−b)·¾ per count, is largest.
    spare = target * total - (bits * counts).sum()
    key = torch.where(positive & (bits < max_bits), log_s - 2 * bits, torch.full_like(bits, -math.inf))
    for i in torch.argsort(key, descending=True).tolist():
        if not math.isfinite(float(key[i])) or spare < counts.min():
            break
        if counts[i] <= spare + 1e-9:
            bits[i] += 1
            spare -= counts[i]
    return bits.to(torch.int64)


def choose_options(costs: torch.Tensor, prices: torch.Tensor, budget: float) -> torch.Tensor:
    """Pick one option per item: minimise ``Σ costs[i, k_i]`` subject to ``Σ prices[i, k_i] ≤ budget``.

    ``costs``/``prices`` are ``[items, options]``. Lagrangian relaxation (bisection on the price of a bit) gives
    the convex-hull solution; the leftover budget then upgrades items greedily by cost saved per extra bit.
    Raises ValueError when even the cheapest options exceed the budget.
    """
    costs, prices = costs.double(), prices.double()
    if costs.shape != prices.shape or costs.dim() != 2:
        raise ValueError("costs and prices must both be [items, options]")
    if not torch.isfinite(costs).all():
        raise ValueError("option costs must be finite (NaN calibration data?)")
    floor, ceil = float(prices.min(1).values.sum()), float(prices.max(1).values.sum())
    if budget < floor - 1e-6:
        raise ValueError(f"budget {budget:.6g} is below the cheapest plan ({floor:.6g})")
    rows = torch.arange(costs.shape[0])

    def pick(lam: float) -> torch.Tensor:
        return torch.argmin(costs + lam * prices, dim=1)

    if budget >= ceil:
        return pick(0.0)  # no budget pressure: the cheapest cost everywhere
    lo, hi = 0.0, 1.0
    while float(prices[rows, pick(hi)].sum()) > budget and hi < 1e300:
        hi *= 10
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if float(prices[rows, pick(mid)].sum()) <= budget else (mid, hi)
    choice = pick(hi)
    spare = budget - float(prices[rows, choice].sum())
    while True:  # greedy upgrades with what is left
        extra = prices - prices[rows, choice].unsqueeze(1)
        saved = costs[rows, choice].unsqueeze(1) - costs
        ok = (extra > 0) & (extra <= spare + 1e-9) & (saved > 0)
        if not ok.any():
            return choice
        ratio = torch.where(ok, saved / extra.clamp(min=1e-12), torch.full_like(saved, -1.0))
        flat = int(torch.argmax(ratio))
        i, k = divmod(flat, costs.shape[1])
        spare -= float(extra[i, k])
        choice[i] = k
