"""Finding a ViT's parts without naming its class, and the attention that token reduction needs.

Token reduction works on any pre-norm vision transformer whose encoder layers hold two LayerNorms (before
attention, before the MLP, in that order), an attention module with ``q_proj``/``k_proj``/``v_proj`` and an
``o_proj``/``out_proj``, and an ``mlp``: transformers' ViT and DeiT (and CLIP's / SigLIP's vision towers) share that
layout. The encoder layers are the longest ``nn.ModuleList`` of such layers; the prefix tokens (CLS, DeiT's
distillation token) are the positions the position embedding has beyond the patches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class BlockParts:
    """The modules of one encoder layer that the reduced forward calls."""

    norm_attention: nn.Module
    norm_mlp: nn.Module
    mlp: nn.Module
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear
    num_heads: int
    scaling: float


def block_parts(layer: nn.Module) -> BlockParts:
    """The parts of ``layer``; TypeError naming what is missing for a layer of another layout."""
    norms = [m for m in layer.children() if isinstance(m, nn.LayerNorm)]
    attention = next((m for m in layer.modules() if all(hasattr(m, n) for n in ("q_proj", "k_proj", "v_proj"))), None)
    mlp = getattr(layer, "mlp", None)
    out = None if attention is None else getattr(attention, "o_proj", None) or getattr(attention, "out_proj", None)
    if len(norms) != 2 or out is None or not isinstance(mlp, nn.Module):
        raise TypeError(f"{type(layer).__name__} is not a pre-norm ViT layer (needs two LayerNorm children, an "
                        "attention module with q_proj/k_proj/v_proj and o_proj/out_proj, and an `mlp`)")
    heads = getattr(attention, "num_attention_heads", None) or getattr(attention, "num_heads", None)
    head_dim = attention.q_proj.out_features // heads
    scaling = getattr(attention, "scaling", None) or head_dim ** -0.5
    return BlockParts(norms[0], norms[1], mlp, attention.q_proj, attention.k_proj, attention.v_proj, out, heads, scaling)


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    """The longest ``nn.ModuleList`` of pre-norm ViT layers in ``model``."""
    best = None
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) and (best is None or len(module) > len(best)):
            try:
                for layer in module:
                    block_parts(layer)
            except TypeError:
                continue
            best = module
    if best is None:
        raise TypeError(f"{type(model).__name__} has no list of pre-norm ViT encoder layers (q_proj/k_proj/v_proj "
                        "attention, two LayerNorms, an mlp); token reduction supports ViT/DeiT-style models")
    return best


def token_counts(model: nn.Module) -> tuple[int, int]:
    """``(num_tokens, num_prefix)``: tokens an encoder layer sees, and how many of them are prefix tokens."""
    patches = next((m.num_patches for m in model.modules() if isinstance(getattr(m, "num_patches", None), int)), None)
    positions = next((p for n, p in model.named_parameters() if n.endswith("position_embeddings")), None)
    if patches is None or positions is None:
        raise TypeError(f"{type(model).__name__} has no patch embedding (`num_patches`) and `position_embeddings`; "
                        "pass num_prefix explicitly")
    return positions.shape[-2], positions.shape[-2] - patches


def attend(parts: BlockParts, h: torch.Tensor, log_size: torch.Tensor | None = None,
           key_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Self-attention of normed ``h [B, N, C]`` → ``(output [B, N, C], class attention [B, N])``.

    ``log_size [B, N]`` is added to every query's logits (proportional attention). ``key_mask [B, N]`` (a search's
    soft 0/1 token mask) removes keys the way DiffRate does — weights ``exp(logit)·mask`` renormalised, each token
    still attending itself — so its gradient reaches the rates. The class-attention row is the mean over heads
    of query 0's attention weights: the importance score.
    """
    B, N, _ = h.shape
    q, k, v = (proj(h).view(B, N, parts.num_heads, -1).transpose(1, 2) for proj in (parts.q, parts.k, parts.v))
    bias = None if log_size is None else log_size[:, None, None, :].to(q.dtype)
    if key_mask is None:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=parts.scaling)
        logits = (q[:, :, :1] @ k.transpose(-1, -2)) * parts.scaling
        cls_attention = (logits if bias is None else logits + bias).softmax(-1)[:, :, 0].mean(1)
    else:
        logits = (q @ k.transpose(-1, -2)) * parts.scaling
        if bias is not None:
            logits = logits + bias
        keep = key_mask[:, None, None, :]
        eye = torch.eye(N, dtype=keep.dtype, device=keep.device)
        keep = keep + (1 - keep) * eye  # a removed token still attends to itself (its row stays well defined)
        weights = (logits - logits.amax(-1, keepdim=True).detach()).exp() * keep
        weights = (weights + 1e-6 / N) / (weights.sum(-1, keepdim=True) + 1e-6)
        out = weights @ v
        cls_attention = weights[:, :, 0].mean(1)
    return parts.o(out.transpose(1, 2).reshape(B, N, -1)), cls_attention
