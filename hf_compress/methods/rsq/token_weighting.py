"""RSQ's *scale* step: weight each calibration token by the attention it receives (Sung et al., arXiv 2503.01820).

*Rotate*: ``rotation.rotate_model`` before anything is measured. *Scale*: per decoder layer, on the layer's
(partially quantized) inputs, the attention each token receives — ``s_j = Σ_heads Σ_queries A[h, i, j]`` — is
min-max scaled to ``[r_min, 1]``, normalised to mean 1 per sample and weights every token of every linear of
that layer in the GPTQ Hessian ``H = Σ_t r_t x_t x_tᵀ``. *Quantize*: GPTQ (or any planner) as usual.

The attention maps are computed from the block's own ``q_proj``/``k_proj`` and rotary embedding rather than
requested from the attention module: recent transformers only return maps from the eager implementation,
and this way any attention backend works and memory stays at one sample's ``heads × T × T``.
"""

from __future__ import annotations

import sys

import torch
from torch import nn


def _attention_parts(block: nn.Module):
    attn = getattr(block, "self_attn", None)
    norm = getattr(block, "input_layernorm", None)
    rope = getattr(sys.modules.get(type(attn).__module__), "apply_rotary_pos_emb", None) if attn is not None else None
    if attn is None or norm is None or rope is None or not all(hasattr(attn, n) for n in ("q_proj", "k_proj", "head_dim")):
        raise ValueError(f"attention-concentration weighting supports Llama-family blocks (input_layernorm, self_attn with "
                         f"q_proj/k_proj and rotary embeddings); {type(block).__name__} is not one")
    return attn, norm, rope


@torch.no_grad()
def attention_concentration(block: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    """``[T]`` attention received by each token of one sample, summed over heads and queries (causal)."""
    attn, norm, rope = _attention_parts(block)
    hidden = args[0] if args else kwargs["hidden_states"]
    pos = kwargs.get("position_embeddings")
    if pos is None:
        raise ValueError(f"{type(block).__name__} was called without position_embeddings: cannot rebuild its attention")
    x = norm(hidden)
    b, t, _ = x.shape
    q = attn.q_proj(x).view(b, t, -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(b, t, -1, attn.head_dim).transpose(1, 2)
    if hasattr(attn, "q_norm"):  # Qwen3-style per-head norms
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = rope(q, k, *pos)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = (q.float() @ k.float().transpose(-1, -2)) * getattr(attn, "scaling", attn.head_dim**-0.5)
    causal = torch.ones(t, t, dtype=torch.bool, device=scores.device).triu(1)
    probs = scores.masked_fill(causal, float("-inf")).softmax(dim=-1)
    return probs.sum(dim=(1, 2))[0]  # sum over heads and queries → attention received per key token


def importance_weights(scores: torch.Tensor, r_min: float) -> torch.Tensor:
    """Min-max scale to ``[r_min, 1]``, then normalise to mean 1 (as RSQ's ``add_batch`` does)."""
    lo, hi = scores.min(), scores.max()
    r = torch.full_like(scores, 1.0) if hi - lo <= 0 else (scores - lo) / (hi - lo) * (1 - r_min) + r_min
    return r / r.mean()


def attention_token_weights(r_min: float):
    """A ``token_weights`` callback for ``run_sequential``."""

    def weights(block, inputs):
        return [importance_weights(attention_concentration(block, a, k), r_min) for a, k in inputs]

    return weights
