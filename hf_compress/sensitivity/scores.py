"""Sensitivity scores as pure tensor functions (statistics in, scores out)."""

from __future__ import annotations

import torch


def lim_score(x_in: torch.Tensor, x_out: torch.Tensor) -> float:
    """Layer Input Modification (Dumitru et al.): ``−mean_t cos(x_in_t, x_out_t)``; higher = the block changes
    its input more = more important."""
    a, b = x_in.reshape(-1, x_in.shape[-1]).float(), x_out.reshape(-1, x_out.shape[-1]).float()
    return float(-torch.nn.functional.cosine_similarity(a, b, dim=-1).mean())


def zd_score(weights: list[torch.Tensor]) -> float:
    """Z-score distribution (Dumitru et al.): share of a layer's weights with ``(w − μ)/σ > 1``, over all its
    weights together. Data-free; the paper reads *smaller* as more important, so rankings take a direction."""
    flat = torch.cat([w.detach().reshape(-1).float() for w in weights])
    z = (flat - flat.mean()) / flat.std().clamp(min=1e-12)
    return float((z > 1).float().mean())


def fisher_loss_increase(grad_sq: torch.Tensor, delta: torch.Tensor) -> float:
    """Second-order estimate of the loss increase from perturbing weights by ``delta``:
    ``½ Σ F_ii Δ_i²`` with the diagonal (empirical) Fisher ``F_ii = E[g_i²]``."""
    return float(0.5 * (grad_sq.float() * delta.float() ** 2).sum())
