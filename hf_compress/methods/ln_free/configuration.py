"""Configurations of the structurally LN-free architectures, importable without transformers' modelling code.

Kept apart from the model classes so that ``AutoConfig`` learns the model types early, while transformers is still
importing; the model classes register themselves the first time such a config is built.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers.models.gpt2.configuration_gpt2 import GPT2Config
from transformers.models.llama.configuration_llama import LlamaConfig

from hf_compress._imports import register_model_module


@strict
class LNFreeGPT2Config(GPT2Config):
    """GPT-2 whose ``ln_1``/``ln_2``/``ln_f`` are affine maps ``(x - μ(x)) ⊙ w + b`` (1/σ_avg folded into ``w``)."""

    model_type = "hfc_ln_free_gpt2"
    position0_scale: bool = False  # position 0 has its own folded norm weights (``weight_first``)

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        _register_model_class()


@strict
class LNFreeLlamaConfig(LlamaConfig):
    """Llama whose RMSNorms are constant scales ``x ⊙ w`` (1/σ_avg folded into ``w``)."""

    model_type = "hfc_ln_free_llama"
    position0_scale: bool = False  # position 0 has its own folded norm weights (``weight_first``)

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        _register_model_class()


def register() -> None:
    """Make ``AutoConfig`` know the LN-free model types (idempotent)."""
    from transformers.models.auto.configuration_auto import AutoConfig

    AutoConfig.register(LNFreeGPT2Config.model_type, LNFreeGPT2Config, exist_ok=True)
    AutoConfig.register(LNFreeLlamaConfig.model_type, LNFreeLlamaConfig, exist_ok=True)


def _register_model_class() -> None:
    register_model_module("hf_compress.methods.ln_free.modeling")
