"""ARMOR (Liu et al., arXiv 2510.05528, §3): ``Ŵ = A · (W′ ⊙ M) · B`` with block-diagonal ``A``, ``B`` and a 2:4 mask.

Objective (NoWag's proxy, in row/column-normalised coordinates so one learning rate fits every layer):
``L = Σ_ij ρ_i δ_j (W̄ − Ŵ̄)_ij² / Σ_ij ρ_i δ_j W̄_ij²`` with ``W = diag(r) W̄ diag(c)``, ``ρ = r²``, ``δ = c² ⊙ diag(H)`` —
i.e. exactly the Hessian-diagonal-weighted error of the original weights, scaled by its value at ``Ŵ = 0``.

Each iteration: (1) one Adam step on ``A, B, W′`` with the mask fixed; (2) the sparse-core step: in every
``b × b`` block pick one group of 4 (sampled ∝ the L1 norm of the loss gradient on it) and replace it by the best of
its 6 possible 2:4 patterns, each with its closed-form least-squares values given ``A``, ``B`` and every other entry.
Blocks are disjoint in ``Ŵ``, so all are updated at once; the step never increases the loss. Initialisation is
NoWag-P (the top 2 of 4 by ``W̄² δ``: Wanda's ranking), ``A = B = I``. The best iterate is returned. The norms are
folded back into ``A`` and ``B`` at the end.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from hf_compress.formats.sparse import block_diag_left, block_diag_right
from hf_compress.methods.sparse.solvers import mask_from_scores, output_error

PAIRS = torch.tensor([[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]])  # the 6 ways to keep 2 of 4


@dataclass
class ArmorResult:
    weight: torch.Tensor  # the sparse core [out, in], zero where pruned
    mask: torch.Tensor
    factors: tuple  # (A [out/b, b, b], B [in/b, b, b]) with the norms folded in
    output_error: float | None = None
    losses: list = field(default_factory=list)  # proxy loss per iteration (index 0: the Wanda-style start)


def _eye_blocks(n: int, b: int) -> torch.Tensor:
    return torch.eye(b).expand(n // b, b, b).clone()


def armor(W: torch.Tensor, H: torch.Tensor, block: int = 32, iters: int = 200, lr: float = 5e-3, seed: int = 0
          ) -> ArmorResult:
    """Factorise ``W [out, in]`` as ``A (W′ ⊙ M) B`` with a 2:4 ``M`` under the Hessian ``H [in, in]``."""
    out_f, in_f = W.shape
    if in_f % block or out_f % block or block % 4:
        raise ValueError(f"ARMOR block {block} must be a multiple of 4 dividing both {out_f} and {in_f}")
    W = W.float()
    d = H.diagonal().float().clamp(min=0)
    r = W.norm(dim=1).clamp(min=1e-8)
    c = (W / r[:, None]).norm(dim=0).clamp(min=1e-8)
    Wn = W / r[:, None] / c[None, :]
    rho, delta = r ** 2, c ** 2 * d + 1e-12 * (c ** 2 * d).mean()
    weight = rho[:, None] * delta[None, :]
    scale = max(float((weight * Wn ** 2).sum()), 1e-30)
    mask = mask_from_scores(Wn ** 2 * delta[None, :], nm=(2, 4))
    Wp = Wn.clone().requires_grad_(True)
    A = _eye_blocks(out_f, block).requires_grad_(True)
    B = _eye_blocks(in_f, block).requires_grad_(True)
    opt = torch.optim.Adam([A, B, Wp], lr=lr)
    gen = torch.Generator().manual_seed(seed)

    def loss_of(A_, C_, B_):
        R = Wn - block_diag_left(A_, block_diag_right(C_, B_))
        return (weight * R ** 2).sum() / scale, R

    with torch.no_grad():
        best_loss = float(loss_of(A, Wn * mask, B)[0])
    best = (A.detach().clone(), (Wn * mask).clone(), B.detach().clone(), mask.clone())
    losses = [best_loss]
    for step in range(iters + 1):
        opt.zero_grad()
        loss, _ = loss_of(A, Wp * mask, B)  # the loss of the state the previous iteration left
        if step:
            losses.append(float(loss.detach()))
            if losses[-1] < best_loss:
                best_loss = losses[-1]
                best = (A.detach().clone(), (Wp.detach() * mask).clone(), B.detach().clone(), mask.clone())
        if step == iters:
            break
        loss.backward()
        opt.step()
        with torch.no_grad():
            _, R = loss_of(A, Wp * mask, B)
            _mask_step(Wp, mask, A, B, R, rho, delta, block, gen)
    A_, C, B_, M = best
    A_ = A_ * r.view(-1, block, 1)  # diag(r) · A: scales A's rows, still block-diagonal
    B_ = B_ * c.view(-1, 1, block)  # B · diag(c): scales B's columns
    W_hat = block_diag_left(A_, block_diag_right(C, B_))
    return ArmorResult(C, M, (A_, B_), output_error(W, W_hat, H.float()), losses)


def _mask_step(Wp, mask, A, B, R, rho, delta, b: int, gen) -> None:
    """In every (row block, column block) pick one 4-group and give it its best 2:4 pattern and values (in place)."""
    out_f, in_f = Wp.shape
    nI, nJ = out_f // b, in_f // b
    At, Bt = A.transpose(1, 2), B.transpose(1, 2)
    grad = block_diag_left(At, block_diag_right(rho[:, None] * delta[None, :] * R, Bt))  # ∝ −∂L/∂C
    groups = grad.abs().view(nI, b, nJ, b // 4, 4).sum(-1).permute(0, 2, 1, 3).reshape(nI * nJ, b * b // 4)
    # a sample ∝ the group norms by the Gumbel-max trick (torch.multinomial is several times slower here)
    gumbel = -torch.log(-torch.log(torch.rand(groups.shape, generator=gen).clamp(1e-20, 1 - 1e-7)))
    pick = (groups.clamp(min=1e-30).log() + gumbel).argmax(dim=1)
    I = torch.arange(nI).repeat_interleave(nJ)
    J = torch.arange(nJ).repeat(nI)
    r_loc, g_loc = pick // (b // 4), pick % (b // 4)
    rows = I * b + r_loc
    cols = J[:, None] * b + g_loc[:, None] * 4 + torch.arange(4)  # [P, 4]
    a = A[I, :, r_loc]  # column r of A's block: [P, b]
    Bs = B[J[:, None], (g_loc[:, None] * 4 + torch.arange(4)), :]  # rows of B's block for the group: [P, 4, b]
    cS = (Wp[rows[:, None], cols] * mask[rows[:, None], cols])  # [P, 4]
    R_blk = R.view(nI, b, nJ, b).permute(0, 2, 1, 3).reshape(nI * nJ, b, b)
    R0 = R_blk + a[:, :, None] * torch.einsum("pk,pkb->pb", cS, Bs)[:, None, :]  # the group's contribution removed
    rho_I = rho.view(nI, b)[I]
    delta_J = delta.view(nJ, b)[J]
    u = torch.einsum("pij,pi->pj", R0, rho_I * a) * delta_J  # [P, b]
    s = (rho_I * a ** 2).sum(1)  # [P]
    Bp = Bs[:, PAIRS, :]  # [P, 6, 2, b]
    f = torch.einsum("pkqb,pb->pkq", Bp, u)
    G = s[:, None, None, None] * torch.einsum("pkqb,pkrb->pkqr", Bp * delta_J[:, None, None, :], Bp)
    G = G + 1e-10 * G.diagonal(dim1=-2, dim2=-1).mean(-1).clamp(min=1e-30)[..., None, None] * torch.eye(2)
    g00, g01, g11 = G[..., 0, 0], G[..., 0, 1], G[..., 1, 1]  # closed-form 2×2 solve (batched LAPACK is slower)
    det = g00 * g11 - g01 * g01
    v = torch.stack([g11 * f[..., 0] - g01 * f[..., 1], g00 * f[..., 1] - g01 * f[..., 0]], dim=-1) / det[..., None]
    gain = (f * v).sum(-1)  # loss reduction of each pattern (up to the common constant)
    best = gain.argmax(dim=1)
    keep = PAIRS[best]  # [P, 2]
    vals = v[torch.arange(len(best)), best]  # [P, 2]
    new_mask = torch.zeros(len(best), 4, dtype=torch.bool).scatter_(1, keep, True)
    new_vals = torch.zeros(len(best), 4).scatter_(1, keep, vals)
    mask[rows[:, None], cols] = new_mask
    Wp.data[rows[:, None], cols] = torch.where(new_mask, new_vals, Wp.data[rows[:, None], cols])
