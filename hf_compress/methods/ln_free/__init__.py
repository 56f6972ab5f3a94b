"""LayerNorm-free models (Heimersheim 2024; Baroni et al. 2025): remove every LayerNorm/RMSNorm by fine-tuning,
then export a model whose norms are affine maps (a registered architecture) or a plain GPT-2 checkpoint.

Submodules load lazily: the configurations must be importable while transformers itself is still importing.
"""

from __future__ import annotations

from hf_compress._imports import lazy_attributes
from hf_compress.registry import Method, register_method

PAPER = "[Heimersheim, arXiv 2409.13710](https://arxiv.org/abs/2409.13710)"
register_method(Method(
    title="LayerNorm removal by fine-tuning", name="ln-free", kind="architecture", paper=PAPER,
    summary="LayerNorm-free models: remove every norm by fine-tuning, export affine-norm or plain GPT-2 checkpoints",
    cli="hf_compress.methods.ln_free.cli:add_command",
    model_types={"hfc_ln_free_gpt2": "ln_free", "hfc_ln_free_llama": "ln_free"},
    register_architecture="hf_compress.methods.ln_free.configuration:register",
    recognize="hf_compress.methods.ln_free.card:recognize",
    card={"ln_free": "hf_compress.methods.ln_free.card:ln_free_card",
          "ln_free_compatible": "hf_compress.methods.ln_free.card:ln_free_compatible_card"},
))

_LAZY = {
    "FakeLayerNorm": "norms",
    "FakeRMSNorm": "norms",
    "make_removable": "swap",
    "fake_status": "swap",
    "removable_norms": "swap",
    "estimate_std": "swap",
    "LNRemovalSchedule": "schedule",
    "LNRemovalCallback": "callback",
    "LNFreeTrainer": "aux_loss",
    "residual_norm_loss": "aux_loss",
    "export_structural": "export",
    "export_compatible": "export",
    "to_structural": "export",
    "to_compatible": "export",
    "load_compatible": "export",
    "LNFreeGPT2Config": "configuration",
    "LNFreeLlamaConfig": "configuration",
    "LNFreeGPT2LMHeadModel": "modeling",
    "LNFreeLlamaForCausalLM": "modeling",
    "register": "modeling",
    "direct_logit_attribution": "attribution",
}

__all__ = list(_LAZY)
__getattr__ = lazy_attributes(__name__, _LAZY)
