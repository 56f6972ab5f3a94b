"""The CSKV Llama: each attention gains low-rank key/value compressors ``A`` (hidden → r) and ``B`` (r → kv_dim)
beside its original ``k_proj``/``v_proj`` (the bi-branch of CSKV, arXiv 2409.10593 §3): the original projections
give the exact K/V of the newest tokens, the compressors give the latents that are cached for every token.

With a :class:`~hf_compress.methods.cskv.cache.CSKVCacheLayer` (what ``generate()`` builds from the config), old
tokens are attended through ``RoPE(B_k c_k)`` and ``B_v c_v``. With any other cache, or none (a plain forward),
every token is attended through its reconstruction — the model a CSKV cache approximates at long context.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.llama.modeling_llama import (LlamaAttention, LlamaForCausalLM, LlamaRotaryEmbedding,
                                                      apply_rotary_pos_emb, eager_attention_forward, rotate_half)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from hf_compress.integrations.hub import HubCardMixin
from hf_compress.kv_cache.generation import PlannedCacheMixin
from hf_compress.methods.cskv.cache import CSKVCacheLayer
from hf_compress.methods.cskv.configuration import CSKVLlamaConfig


class CSKVAttention(LlamaAttention):
    """Llama attention + ``k_a``/``k_b``/``v_a``/``v_b`` compressors and a latent cache."""

    def __init__(self, config: CSKVLlamaConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        kv_dim = config.num_key_value_heads * self.head_dim
        rk, rv = config.cskv["rank_k"][layer_idx], config.cskv["rank_v"][layer_idx]
        self.k_a, self.k_b = nn.Linear(config.hidden_size, rk, bias=False), nn.Linear(rk, kv_dim, bias=config.attention_bias)
        self.v_a, self.v_b = nn.Linear(config.hidden_size, rv, bias=False), nn.Linear(rv, kv_dim, bias=config.attention_bias)
        self.rotary = LlamaRotaryEmbedding(config)  # re-applies RoPE to reconstructed old keys (no weights)

    def _heads(self, x):
        return x.view(*x.shape[:-1], -1, self.head_dim).transpose(1, 2)

    def _rope(self, keys, positions):
        cos, sin = self.rotary(keys, positions)
        cos, sin = cos.unsqueeze(1).to(keys.dtype), sin.unsqueeze(1).to(keys.dtype)
        return keys * cos + rotate_half(keys) * sin

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, position_ids=None,
                **kwargs):
        cache = kwargs.pop("past_key_values", cache)  # the name before transformers 5.24
        b, t = hidden_states.shape[:2]
        query = self._heads(self.q_proj(hidden_states))
        cos, sin = position_embeddings
        layer = None if cache is None or self.layer_idx >= len(getattr(cache, "layers", [])) else cache.layers[self.layer_idx]
        ck, cv = self.k_a(hidden_states), self.v_a(hidden_states)
        if isinstance(layer, CSKVCacheLayer):
            key, value = self._heads(self.k_proj(hidden_states)), self._heads(self.v_proj(hidden_states))
            query, key = apply_rotary_pos_emb(query, key, cos, sin)
            if position_ids is None:
                position_ids = torch.arange(layer.get_seq_length(), layer.get_seq_length() + t, device=query.device)[None]
            old_k, old_v, old_pos, key, value = layer.update_cskv(key, value, ck, cv, position_ids.expand(b, t))
            if old_k is not None:
                key = torch.cat([self._rope(self._heads(self.k_b(old_k)), old_pos), key], dim=-2)
                value = torch.cat([self._heads(self.v_b(old_v)), value], dim=-2)
        else:
            key = self._heads(self.k_b(ck))
            value = self._heads(self.v_b(cv))
            query, key = apply_rotary_pos_emb(query, key, cos, sin)
            if cache is not None:
                key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        out, weights = attention(self, query, key, value, attention_mask,
                                 dropout=0.0 if not self.training else self.attention_dropout, scaling=self.scaling,
                                 **kwargs)
        return self.o_proj(out.reshape(b, t, -1).contiguous()), weights


class CSKVLlamaForCausalLM(PlannedCacheMixin, HubCardMixin, LlamaForCausalLM):
    """Llama with CSKV attention; ``generate()`` uses a CSKV latent cache built from ``config.cskv``."""

    config_class = CSKVLlamaConfig

    def __init__(self, config: CSKVLlamaConfig):
        super().__init__(config)
        for i, layer in enumerate(self.model.layers):
            layer.self_attn = CSKVAttention(config, i)
        self.post_init()

    def planned_cache(self):
        from transformers.cache_utils import Cache

        c = self.config.cskv
        position_dtype = torch.int16 if self.config.max_position_embeddings < 2**15 else torch.int32
        return Cache(layers=[CSKVCacheLayer(rk, rv, c["window"], c["latent_bits"], c["group_size"], position_dtype)
                             for rk, rv in zip(c["rank_k"], c["rank_v"])])

    def compressor_parameters(self):
        """The A/B parameters (what reconstruction training updates)."""
        return [p for n, p in self.named_parameters() if n.rsplit(".", 2)[-2] in ("k_a", "k_b", "v_a", "v_b")]


def register() -> None:
    from transformers.models.auto.modeling_auto import AutoModelForCausalLM

    from hf_compress.methods.cskv.configuration import register as register_config

    register_config()
    AutoModelForCausalLM.register(CSKVLlamaConfig, CSKVLlamaForCausalLM, exist_ok=True)
