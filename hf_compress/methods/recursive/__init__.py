"""Relaxed Recursive Transformers: shared-layer models (a registered architecture), relaxed per-position LoRA
(a PEFT method), early exit and continuous depth-wise batching.

Submodules load lazily: the configuration must be importable while transformers itself is still importing.
"""

from __future__ import annotations

from hf_compress._imports import lazy_attributes
from hf_compress.registry import Method, register_method

PAPER = "[Bae et al., arXiv 2410.20672](https://arxiv.org/abs/2410.20672)"
register_method(Method(
    title="Relaxed Recursive Transformers", name="recursive", kind="architecture", paper=PAPER,
    summary="Relaxed Recursive Transformers: tie layers into loops (+ per-position LoRA, early exit)",
    cli="hf_compress.methods.recursive.cli:add_command",
    model_types={"hfc_recursive_llama": "recursive"}, register_architecture="hf_compress.methods.recursive.configuration:register",
    peft_types={"HFC_RELAXED_RECURSIVE_LORA": "relaxed_lora"}, register_peft="hf_compress.methods.recursive.relaxed_lora:register",
    card={"recursive": "hf_compress.methods.recursive.card:recursive_card",
          "relaxed_lora": "hf_compress.methods.recursive.card:relaxed_lora_card"},
))

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
    "LoopExitHead": "exit_head",
    "layerwise_exit_loss": "exit_head",
    "exit_decode_step": "exit_head",
    "exit_generate": "exit_head",
    "teacher_forced_exits": "exit_head",
    "RecursiveUptrainer": "uptraining",
    "forward_kl": "uptraining",
}

__all__ = list(_LAZY)
__getattr__ = lazy_attributes(__name__, _LAZY)
