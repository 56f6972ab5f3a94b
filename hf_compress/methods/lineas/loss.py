"""LinEAS's objective as plain tensor functions: token-mean pooling, the summed per-coordinate 1-D Wasserstein
loss, and the proximal step of the sparse-group-lasso (paper §3, Alg. 1)."""

from __future__ import annotations

import math

import torch

__all__ = ["lineas_loss", "pooled_mean", "prox_sparse_group_", "sorted_w2"]


def pooled_mean(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token-mean of ``h`` (B, T, D) over the positions where ``mask`` (B, T) is 1: one vector per prompt, as the
    paper's ``pooling_op: mean`` (padding must not pull the mean towards the pad token's activation)."""
    if h.dim() != 3 or mask.shape != h.shape[:2]:
        raise ValueError(f"pooled_mean expects h (B, T, D) and mask (B, T), got {tuple(h.shape)} and {tuple(mask.shape)}")
    mask = mask.to(h.dtype).unsqueeze(-1)
    return (h * mask).sum(1) / mask.sum(1).clamp(min=1)


def _quantiles(sorted_x: torch.Tensor, k: int) -> torch.Tensor:
    """``k`` evenly spaced quantiles (mid-points) of each column of the column-sorted ``sorted_x`` (n, D), by linear
    interpolation; for ``k == n`` these are the sorted values themselves."""
    n = sorted_x.shape[0]
    if k == n:
        return sorted_x
    pos = ((torch.arange(k, dtype=torch.float64) + 0.5) * n / k - 0.5).clamp(0, n - 1)
    lo = pos.floor().long()
    hi = (lo + 1).clamp(max=n - 1)
    w = (pos - lo).to(sorted_x.dtype).unsqueeze(1).to(sorted_x.device)
    return torch.lerp(sorted_x[lo], sorted_x[hi], w)


def sorted_w2(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``Δ(U, V) = Σ_j W2²(U_·j, V_·j)``: the squared 1-D Wasserstein distances between the columns of ``u`` (n, D)
    and ``v`` (m, D), summed over the D coordinates. In 1-D the optimal coupling matches sorted values, so
    ``W2² = (1/n) ‖sort(U_·j) − sort(V_·j)‖²``; for n ≠ m both sides are compared at max(n, m) quantiles."""
    if u.dim() != 2 or v.dim() != 2 or u.shape[1] != v.shape[1] or not len(u) or not len(v):
        raise ValueError(f"sorted_w2 expects (n, D) and (m, D) with n, m >= 1, got {tuple(u.shape)} and {tuple(v.shape)}")
    k = max(len(u), len(v))
    su = _quantiles(torch.sort(u.float(), dim=0).values, k)
    sv = _quantiles(torch.sort(v.float(), dim=0).values, k)
    return (su - sv).pow(2).mean(0).sum()


def lineas_loss(source: list[torch.Tensor], target: list[torch.Tensor]) -> torch.Tensor:
    """``C = Σ_ℓ Δ(ξ_ℓ, η_ℓ)`` over the steered layers (pooled source activations through the steered model, pooled
    target activations through the base model). A non-finite activation is an error, not a silent NaN loss."""
    if len(source) != len(target) or not source:
        raise ValueError(f"lineas_loss needs one source and one target tensor per steered layer, got {len(source)} "
                         f"and {len(target)}")
    for i, (s, t) in enumerate(zip(source, target)):
        if not (torch.isfinite(s).all() and torch.isfinite(t).all()):
            raise ValueError(f"non-finite activations at steered layer {i}: the model produced NaN/inf (check the "
                             "model's dtype, or lower the learning rate if this happens during training)")
    return sum(sorted_w2(s, t) for s, t in zip(source, target))


@torch.no_grad()
def prox_sparse_group_(omega: torch.Tensor, bias: torch.Tensor, l1, group, steps=(1.0, 1.0)) -> None:
    """Proximal step of ``l1 (‖ω − 1‖₁ + ‖b‖₁) + group √d (‖ω − 1‖₂ + ‖b‖₂)``, in place: soft-threshold every
    coordinate of (ω − 1, b), then shrink each of the two groups towards zero as a whole — the prox of the
    sparse-group-lasso is exactly this composition (Simon et al. 2013).

    ``steps`` are the step sizes of ω and b (scalars for SGD: the learning rate; per-coordinate tensors for Adam:
    ``lr / (√v̂ + ε)``, the prox in the optimizer's diagonal metric — exact for the ℓ1 term; the group term uses the
    group's mean step). With Adam a plain ``lr · l1`` threshold would be meaningless: Adam moves every coordinate by
    about ``lr`` whatever its gradient, so ``l1 < 1`` would zero nothing and ``l1 > 1`` everything."""
    d = omega.numel()
    for delta, base, step in ((omega - 1, 1.0, steps[0]), (bias.clone(), 0.0, steps[1])):
        if l1 > 0:
            delta = torch.sign(delta) * (delta.abs() - l1 * step).clamp(min=0)
        if group > 0:
            norm = delta.norm()
            mean_step = step.mean() if isinstance(step, torch.Tensor) else step
            delta = delta * (1 - group * mean_step * math.sqrt(d) / norm).clamp(min=0) if norm > 0 else delta
        (omega if base == 1.0 else bias).copy_(delta + base)
