"""Learned early exit for CYCLE recursive models: a per-loop uncertainty head (DeeDiff's idea applied to loops)
and a decoder that really skips the remaining loops of a token that exits.

DeeDiff (Tang et al., arXiv 2309.17074) attaches an uncertainty estimation module to every exit and trains it with
a layer-wise loss: each exit's task loss is weighted by (1 − u), and u regresses onto that exit's error. Here the
error of loop b for a token is whether its argmax differs from the last loop's (the quantity an exit must
predict: leaving early is harmless when the answer would not change), u_b = σ(w_b·[norm(h_b), max log p_b,
H(p_b)] + c_b) on the shared final norm of the hidden state after loop b and two features of that loop's exit
distribution p_b, and the loss is

    L = CE_last + Σ_b mean((1 − sg(u_b)) · CE_b) + Σ_b BCE(u_b, 1[argmax_b ≠ argmax_last])

with sg the stop-gradient: without it the trunk could lower the weighted CE simply by raising u. The head reads
detached features, so its regression does not pull on the shared blocks.

At decode time a token whose u_b falls below ``1 − threshold`` leaves after loop b; the loops it skips still owe
the KV cache an entry, which is filled from the exiting hidden state (CALM's state propagation: only the K/V
projections of the skipped positions run, not their attention or MLP). So the speed-up is real, and so is the
quality: later tokens attend to the propagated entries, not to ones a full forward would have computed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from hf_compress.methods.recursive.early_exit import _unwrap, loop_hidden_states


class LoopExitHead(nn.Module):
    """One linear uncertainty probe per early loop (``num_loops − 1`` of them) on the loop's normed hidden state
    plus two features of its exit logits (top log-probability and entropy): ``hidden_size + 3`` params each.

    Why the two logit features: a probe on the hidden state alone was measured worse than the plain max-probability
    rule on the small base (RESULTS.md); with them the probe can learn that rule and correct it."""

    def __init__(self, hidden_size: int, num_loops: int):
        super().__init__()
        if num_loops < 2:
            raise ValueError(f"early exit needs at least 2 loops, got {num_loops}")
        self.probes = nn.ModuleList(nn.Linear(hidden_size + 2, 1) for _ in range(num_loops - 1))

    @classmethod
    def for_model(cls, model) -> LoopExitHead:
        base = _unwrap(model)
        return cls(base.config.hidden_size, base.config.num_loops)

    def forward(self, normed_hidden: torch.Tensor, loop: int, logits: torch.Tensor) -> torch.Tensor:
        """Predicted probability that loop ``loop`` (0-based) disagrees with the last loop, per token."""
        logp = F.log_softmax(logits.float(), -1)
        top = logp.amax(-1, keepdim=True)
        entropy = -(logp.exp() * logp).sum(-1, keepdim=True)
        features = torch.cat([normed_hidden, top.to(normed_hidden.dtype), entropy.to(normed_hidden.dtype)], -1)
        return torch.sigmoid(self.probes[loop](features).squeeze(-1))


def layerwise_exit_loss(model, head: LoopExitHead, input_ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The DeeDiff-style loss above on a batch of token windows; returns ``(loss, parts)``."""
    base = _unwrap(model)
    hiddens, out = loop_hidden_states(model, input_ids, labels=input_ids, use_cache=False)
    labels = input_ids[:, 1:].reshape(-1)
    final = out.logits[:, :-1].detach().argmax(-1).reshape(-1)
    loss, parts = out.loss, {"ce_last": float(out.loss.detach())}
    for b, hidden in enumerate(hiddens):
        normed = base.model.norm(hidden)[:, :-1]
        logits = base.lm_head(normed).reshape(-1, out.logits.shape[-1])
        ce = F.cross_entropy(logits.float(), labels, reduction="none")
        u = head(normed.detach().reshape(-1, normed.shape[-1]), b, logits.detach())
        wrong = (logits.detach().argmax(-1) != final).float()
        bce = F.binary_cross_entropy(u, wrong)
        loss = loss + ((1 - u.detach()) * ce).mean() + bce
        parts[f"ce_loop{b + 1}"], parts[f"bce_loop{b + 1}"] = float(ce.mean().detach()), float(bce.detach())
    return loss, parts


def _propagate_kv(layer, hidden: torch.Tensor, position_embeddings, cache) -> None:
    """Write the KV entry of a skipped position from ``hidden`` (K/V projections + RoPE only)."""
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    shape = (*x.shape[:-1], -1, attn.head_dim)
    k = attn.k_proj(x).view(shape).transpose(1, 2)
    v = attn.v_proj(x).view(shape).transpose(1, 2)
    cos, sin = position_embeddings
    k, _ = apply_rotary_pos_emb(k, k, cos, sin)
    cache.update(k, v, attn.layer_idx)


@torch.no_grad()
def exit_decode_step(model, token: torch.Tensor, cache, position: int, should_exit) -> tuple[torch.Tensor, int]:
    """Run one token (shape ``(1, 1)``) loop by loop; after loop b (0-based) ``should_exit(b, normed_hidden,
    logits)`` decides whether it leaves. Returns ``(logits (1, vocab), 1-based exit loop)``."""
    base = _unwrap(model)
    m, layers = base.model, base.model.layers
    boundaries = base.loop_boundaries()
    h = m.embed_tokens(token)
    position_ids = torch.tensor([[position]], device=token.device)
    pe = m.rotary_emb(h, position_ids=position_ids)
    start = 0
    for b, end in enumerate(boundaries):
        for p in range(start, end + 1):
            h = layers[p](h, attention_mask=None, position_embeddings=pe, position_ids=position_ids, cache=cache,
                          use_cache=True)
        start = end + 1
        normed = m.norm(h)
        logits = base.lm_head(normed)[:, -1]
        if b < len(boundaries) - 1 and should_exit(b, normed[:, -1], logits):
            for p in range(start, len(layers)):
                _propagate_kv(layers[p], h, pe, cache)
            return logits, b + 1
    return logits, len(boundaries)


def head_rule(head: LoopExitHead | None, threshold: float):
    """Exit when the learned head's confidence 1 − u_b reaches ``threshold`` (never, with no head)."""
    if head is not None and not 0 < threshold <= 1:
        raise ValueError(f"threshold must lie in (0, 1], got {threshold}")
    return lambda b, normed, logits: head is not None and float(1 - head(normed, b, logits)) >= threshold


def max_prob_rule(threshold: float):
    """The untrained baseline: exit when the loop's top softmax probability reaches ``threshold``."""
    return lambda b, normed, logits: float(logits.float().softmax(-1).amax()) >= threshold


@torch.no_grad()
def teacher_forced_exits(model, ids: torch.Tensor, should_exit) -> tuple[float, list[int]]:
    """Feed ``ids`` (1-D) one token at a time with real exits; ``(mean next-token CE, exit loop per token)``."""
    from transformers import DynamicCache

    base = _unwrap(model)
    cache = DynamicCache(config=base.config)
    nll, exits = 0.0, []
    for t in range(len(ids) - 1):
        logits, loop = exit_decode_step(model, ids[t].view(1, 1), cache, t, should_exit)
        nll += float(F.cross_entropy(logits.float(), ids[t + 1].view(1)))
        exits.append(loop)
    return nll / (len(ids) - 1), exits


@torch.no_grad()
def exit_generate(model, input_ids: torch.Tensor, max_new_tokens: int, should_exit):
    """Greedy decoding with real exits (batch size 1): the prompt runs every loop, each new token leaves at
    its exit loop. Returns ``(ids, exit loop per generated token)``."""
    from transformers import DynamicCache

    base = _unwrap(model)
    if input_ids.shape[0] != 1:
        raise ValueError("exit_generate decodes one sequence at a time (batch size 1)")
    cache = DynamicCache(config=base.config)
    out = model(input_ids=input_ids[:, :-1], cache=cache, use_cache=True) if input_ids.shape[1] > 1 else None
    cache = out.past_key_values if out is not None else cache
    ids, exits = input_ids, []
    for _ in range(max_new_tokens):
        logits, loop = exit_decode_step(model, ids[:, -1:], cache, ids.shape[1] - 1, should_exit)
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
        exits.append(loop)
    return ids, exits
