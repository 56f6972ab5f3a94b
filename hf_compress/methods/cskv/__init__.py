"""CSKV: low-rank key/value channels (activation-scaled SVD), a cache of compressed pre-RoPE latents with a
full-precision window, optional A/B reconstruction training; a registered Llama architecture."""

from __future__ import annotations

from hf_compress._imports import lazy_attributes
from hf_compress.registry import Method, register_method

PAPER = "[Wang et al., arXiv 2409.10593](https://arxiv.org/abs/2409.10593)"
register_method(Method(
    title="CSKV", name="cskv", kind="architecture", paper=PAPER,
    summary="CSKV: low-rank key/value channels (ASVD init, optional A/B training), cache of compressed latents",
    cli="hf_compress.methods.cskv.cli:add_command",
    model_types={"hfc_cskv_llama": "cskv"},
    register_architecture="hf_compress.methods.cskv.configuration:register",
    card={"cskv": "hf_compress.methods.cskv.card:cskv_card"},
))

_LAZY = {
    "CSKVLlamaConfig": "configuration", "CSKVLlamaForCausalLM": "modeling", "CSKVAttention": "modeling",
    "register": "modeling", "CSKVCacheLayer": "cache", "convert": "asvd", "collect_scales": "asvd", "asvd_factors": "asvd",
    "ranks_for": "asvd", "train_reconstruction": "training",
}
__all__ = list(_LAZY)
__getattr__ = lazy_attributes(__name__, _LAZY)
