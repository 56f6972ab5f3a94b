"""Relaxed Recursive Transformers: shared-layer models (a registered architecture), relaxed per-position LoRA
(a PEFT method), early exit and continuous depth-wise batching.

Submodules load lazily: the configuration must be importable while transformers itself is still importing.
"""

from __future__ import annotations

from .._imports import lazy_attributes

_LAZY = {
    "convert": "conversion",
    "RecursiveLlamaConfig": "configuration",
    "RecursiveLlamaForCausalLM": "modeling",
    "register": "modeling",
    "init_sources": "sharing",
    "loop_boundaries": "sharing",
    "position_groups": "sharing",
    "relax": "relaxed_lora",
    "relaxed_lora_config": "relaxed_lora",
    "RelaxedRecursiveLoraConfig": "relaxed_lora",
    "save_relaxed": "relaxed_lora",
    "to_llama": "relaxed_lora",
    "loop_logits": "early_exit",
    "oracle_exit_loops": "early_exit",
    "confidence_exit_loops": "early_exit",
    "early_exit_generate": "early_exit",
    "simulate_throughput": "early_exit",
    "RecursiveUptrainer": "uptraining",
    "forward_kl": "uptraining",
}

__all__ = list(_LAZY)
__getattr__ = lazy_attributes(__name__, _LAZY)
