"""LayerNorm-free models (Heimersheim 2024; Baroni et al. 2025): remove every LayerNorm/RMSNorm by fine-tuning,
then export a model whose norms are affine maps (a registered architecture) or a plain GPT-2 checkpoint.

Submodules load lazily: the configurations must be importable while transformers itself is still importing.
"""

from __future__ import annotations

from .._imports import lazy_attributes

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
