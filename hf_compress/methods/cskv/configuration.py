"""Configuration of the CSKV Llama (low-rank key/value channels), importable without transformers' modelling code."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers.models.llama.configuration_llama import LlamaConfig

from hf_compress._imports import register_model_module

CSKV_FIELDS = {"rank_k", "rank_v", "window", "latent_bits", "group_size"}


def check_cskv(cskv: dict, num_layers: int, kv_dim: int) -> dict:
    """Raise a ValueError naming the problem unless ``cskv`` describes ``num_layers`` layers of ``kv_dim`` channels."""
    from hf_compress.kv_cache.quantizer import check_kv_bits

    if not isinstance(cskv, dict):
        raise TypeError(f"cskv settings must be a dict, got {type(cskv).__name__}")
    if set(cskv) != CSKV_FIELDS:
        raise ValueError(f"cskv settings need exactly the fields {sorted(CSKV_FIELDS)}, got {sorted(cskv)}")
    for name in ("rank_k", "rank_v"):
        ranks = cskv[name]
        if not isinstance(ranks, list) or len(ranks) != num_layers:
            raise ValueError(f"cskv {name} must list one rank per decoder layer ({num_layers}), got {ranks!r}")
        bad = [r for r in ranks if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= kv_dim]
        if bad:
            raise ValueError(f"cskv {name} {bad} out of range: a rank must lie in [1, kv_dim={kv_dim}]")
    check_kv_bits(cskv["latent_bits"], "latent bits")
    for name in ("window", "group_size"):
        if isinstance(cskv[name], bool) or not isinstance(cskv[name], int) or cskv[name] < (0 if name == "window" else 1):
            raise ValueError(f"cskv {name} must be a {'non-negative' if name == 'window' else 'positive'} integer, "
                             f"got {cskv[name]!r}")
    return cskv


@strict
class CSKVLlamaConfig(LlamaConfig):
    """A Llama config plus ``cskv``: per-layer latent ranks of keys and values, the full-precision window, the
    latents' width."""

    model_type = "hfc_cskv_llama"

    cskv: dict | None = None

    def validate_architecture(self):
        super().validate_architecture()
        if self.cskv is None:
            raise ValueError("a CSKV config needs its `cskv` settings (ranks per layer)")
        head_dim = getattr(self, "head_dim", None) or self.hidden_size // self.num_attention_heads
        check_cskv(self.cskv, self.num_hidden_layers, self.num_key_value_heads * head_dim)

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        register_model_module("hf_compress.methods.cskv.modeling")


def register() -> None:
    from transformers.models.auto.configuration_auto import AutoConfig

    AutoConfig.register(CSKVLlamaConfig.model_type, CSKVLlamaConfig, exist_ok=True)
