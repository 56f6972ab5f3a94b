"""KVTuner: a searched per-layer (K bits, V bits) plan for the KV cache, saved in the model's config and used by
``generate()`` (a registered Llama architecture whose weights are the base model's)."""

from __future__ import annotations

from hf_compress._imports import lazy_attributes
from hf_compress.registry import Method, register_method

PAPER = "[Li et al., ICML 2025, arXiv 2502.04420](https://arxiv.org/abs/2502.04420)"
register_method(Method(
    title="KVTuner", name="kvtuner", kind="architecture", paper=PAPER,
    summary="KVTuner: per-layer K/V cache widths searched under an average-bit budget, used by generate()",
    cli="hf_compress.methods.kvtuner.cli:add_command", command="kv-plan",
    model_types={"hfc_kvtuner_llama": "kvtuner"},
    register_architecture="hf_compress.methods.kvtuner.configuration:register",
    card={"kvtuner": "hf_compress.methods.kvtuner.card:kvtuner_card"},
))

_LAZY = {
    "KVTunerLlamaConfig": "configuration", "KVTunerLlamaForCausalLM": "modeling", "with_kv_plan": "modeling",
    "register": "modeling", "kv_plan": "tune", "parse_pairs": "tune", "DEFAULT_PAIRS": "tune",
    "pair_errors": "sensitivity", "knapsack_search": "search", "nsga2_search": "search", "plan_error": "search",
}
__all__ = list(_LAZY)
__getattr__ = lazy_attributes(__name__, _LAZY)
