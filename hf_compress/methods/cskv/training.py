"""CSKV's optional layer-wise reconstruction training: only the compressors A/B move.

Loss per layer (CSKV §3.4, ``kvmse_lambda = 1``, LM loss off): ``MSE(RoPE(K), RoPE(K̂)) + MSE(V, V̂)`` with
``K = x W_kᵀ`` from the original projection and ``K̂ = x A_kᵀ B_kᵀ``. RoPE rotates both by the same orthogonal
matrix per position, so the roped MSE equals the pre-RoPE one; we compute that. The inputs ``x`` are those of the
unmodified model (the paper's attention uses the original K/V during training), captured once, so each layer
trains on its own without a backward pass through the network.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@torch.no_grad()
def _layer_inputs(base, windows: torch.Tensor) -> list[torch.Tensor]:
    from hf_compress.methods.cskv.asvd import _attention_layers

    attns = _attention_layers(base)
    inputs = [[] for _ in attns]
    handles = [a.k_proj.register_forward_pre_hook(lambda m, args, i=i: inputs[i].append(args[0].detach()[0]))
               for i, a in enumerate(attns)]
    try:
        device = next(base.parameters()).device
        for row in windows:
            base(row[None].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return [torch.cat(x) for x in inputs]


def train_reconstruction(model, base, windows: torch.Tensor, steps: int = 200, lr: float = 1e-3,
                         batch_tokens: int = 2048, seed: int = 0, progress: bool = True) -> list[float]:
    """Train every layer's ``k_a/k_b/v_a/v_b`` of the CSKV ``model`` for ``steps`` Adam steps on minibatches of
    ``batch_tokens`` inputs captured from ``base`` (the Llama it was converted from) on ``windows``.

    Returns the mean loss over layers before training and after each step (``steps + 1`` values).
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    xs = _layer_inputs(base, windows)
    gen = torch.Generator().manual_seed(seed)
    history = torch.zeros(steps + 1)
    for i, (x, layer) in enumerate(tqdm(list(zip(xs, model.model.layers)), desc="CSKV A/B training",
                                        disable=not progress)):
        attn = layer.self_attn
        x = x.float()
        with torch.no_grad():
            target_k, target_v = attn.k_proj(x.to(attn.k_proj.weight.dtype)).float(), attn.v_proj(x.to(attn.v_proj.weight.dtype)).float()
        params = [p for m in (attn.k_a, attn.k_b, attn.v_a, attn.v_b) for p in m.parameters()]
        dtypes = [p.dtype for p in params]
        for p in params:  # train in fp32 even for a bf16 model ("to avoid overflow", as the release does)
            p.data = p.data.float()
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=lr)

        def loss_on(idx):
            xb = x[idx]
            return F.mse_loss(attn.k_b(attn.k_a(xb)), target_k[idx]) + F.mse_loss(attn.v_b(attn.v_a(xb)), target_v[idx])

        with torch.no_grad():
            history[0] += float(loss_on(slice(None)))
        for step in range(steps):
            idx = torch.randint(0, x.shape[0], (min(batch_tokens, x.shape[0]),), generator=gen)
            loss = loss_on(idx)
            opt.zero_grad()
            loss.backward()
            opt.step()
            history[step + 1] += float(loss.detach())
        with torch.no_grad():
            history[-1] += float(loss_on(slice(None))) - float(loss.detach())  # report the full-data final loss
        for p, dtype in zip(params, dtypes):
            p.requires_grad_(False)
            p.data = p.data.to(dtype)
    return (history / len(xs)).tolist()
