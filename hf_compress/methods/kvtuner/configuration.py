"""Configuration of a Llama that carries its KV cache plan, importable without transformers' modelling code
(``AutoConfig`` learns the model type while transformers is still importing; the model class registers itself
the first time such a config is built)."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers.models.llama.configuration_llama import LlamaConfig

from hf_compress._imports import register_model_module


@strict
class KVTunerLlamaConfig(LlamaConfig):
    """A Llama config plus ``kv_cache_plan``: the per-layer K/V widths ``generate()`` builds its cache from."""

    model_type = "hfc_kvtuner_llama"

    kv_cache_plan: dict | None = None

    def validate_architecture(self):
        super().validate_architecture()
        if self.kv_cache_plan is not None:
            from hf_compress.kv_cache.plan import KVPlan

            KVPlan.from_dict(self.kv_cache_plan).check_model(self)

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        register_model_module("hf_compress.methods.kvtuner.modeling")


def register() -> None:
    """Make ``AutoConfig`` know the model type (idempotent)."""
    from transformers.models.auto.configuration_auto import AutoConfig

    AutoConfig.register(KVTunerLlamaConfig.model_type, KVTunerLlamaConfig, exist_ok=True)
