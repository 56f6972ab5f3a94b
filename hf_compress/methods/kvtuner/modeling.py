"""A Llama whose ``generate()`` uses the per-layer quantized cache its config names — the weights are untouched, so
the checkpoint is the base model's plus a plan in ``config.json``; plain ``AutoModelForCausalLM`` loads it wherever
hf-compress is installed."""

from __future__ import annotations

import torch
from transformers.models.llama.modeling_llama import LlamaForCausalLM

from hf_compress.integrations.hub import HubCardMixin
from hf_compress.kv_cache.generation import PlannedCacheMixin
from hf_compress.kv_cache.plan import KVPlan, build_cache
from hf_compress.methods.kvtuner.configuration import KVTunerLlamaConfig


class KVTunerLlamaForCausalLM(PlannedCacheMixin, HubCardMixin, LlamaForCausalLM):
    """Llama + a KV plan: ``generate()`` builds a :class:`~hf_compress.kv_cache.QuantizedKVLayer` per layer."""

    config_class = KVTunerLlamaConfig

    def planned_cache(self):
        plan = self.config.kv_cache_plan
        return None if plan is None else build_cache(plan, self.config)


def with_kv_plan(model, plan: KVPlan) -> KVTunerLlamaForCausalLM:
    """``model`` (a Llama-family causal LM) as a :class:`KVTunerLlamaForCausalLM` carrying ``plan``; the weights are
    shared, not copied."""
    base = getattr(model.config, "model_type", None)
    if base not in ("llama", KVTunerLlamaConfig.model_type):
        raise ValueError(f"a saved KV plan needs a Llama-family model (model_type 'llama'), got {base!r}; for other "
                         "models pass hf_compress.kv_cache.build_cache(plan, config) to generate(cache=...)")
    plan.check_model(model.config)
    data = model.config.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "kv_cache_plan"):
        data.pop(key, None)
    config = KVTunerLlamaConfig(**data, kv_cache_plan=plan.to_dict())
    config._attn_implementation = model.config._attn_implementation
    with torch.device("meta"):
        new = KVTunerLlamaForCausalLM(config)
    new.load_state_dict(model.state_dict(), assign=True, strict=True)
    for name, buffer in model.named_buffers():  # non-persistent buffers (RoPE frequencies) are not in the state dict
        owner, _, leaf = name.rpartition(".")
        new.get_submodule(owner).register_buffer(leaf, buffer, persistent=leaf in new.get_submodule(owner).state_dict())
    new.tie_weights()
    new.generation_config = model.generation_config
    return new.to(dtype=next(model.parameters()).dtype).eval()


def register() -> None:
    """Make ``AutoModelForCausalLM`` know the architecture (idempotent)."""
    from transformers.models.auto.modeling_auto import AutoModelForCausalLM

    from hf_compress.methods.kvtuner.configuration import register as register_config

    register_config()
    AutoModelForCausalLM.register(KVTunerLlamaConfig, KVTunerLlamaForCausalLM, exist_ok=True)
