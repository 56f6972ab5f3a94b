"""Configuration of the recursive Llama architecture, importable without transformers' modelling code.

It is kept apart from the model class so that ``AutoConfig`` can learn the model type early, while
transformers is still importing; the model class registers itself the first time such a config is built.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers.models.llama.configuration_llama import LlamaConfig

from hf_compress._imports import register_model_module
from hf_compress.methods.recursive.sharing import check_recursion, loop_boundaries


@strict
class RecursiveLlamaConfig(LlamaConfig):
    """A Llama config plus the recursion settings; ``num_hidden_layers`` counts unrolled positions (L)."""

    model_type = "hfc_recursive_llama"

    num_loops: int = 2
    recursion_scheme: str = "cycle"
    recursion_init: str | None = None
    tie_norms: bool = True
    early_exit_loss_weight: float = 0.0
    early_exit_distill: bool = True
    early_exit_threshold: float | None = None

    def validate_architecture(self):
        super().validate_architecture()
        check_recursion(self.num_hidden_layers, self.num_loops, self.recursion_scheme)
        if self.early_exit_loss_weight < 0:
            raise ValueError(f"early_exit_loss_weight must be >= 0, got {self.early_exit_loss_weight}")
        if self.early_exit_loss_weight > 0:
            loop_boundaries(self.num_hidden_layers, self.num_loops, self.recursion_scheme)
        if self.early_exit_threshold is not None and not 0 < self.early_exit_threshold <= 1:
            raise ValueError(f"early_exit_threshold must lie in (0, 1], got {self.early_exit_threshold}")

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        # Whoever builds this config is about to look up its model class: make sure it is registered (the
        # interpreter-start hook may have had to skip that while transformers was still importing).
        _register_model_class()

    @property
    def num_unique_layers(self) -> int:
        return self.num_hidden_layers // self.num_loops


def register() -> None:
    """Make ``AutoConfig`` know the recursive model type (idempotent)."""
    from transformers.models.auto.configuration_auto import AutoConfig

    AutoConfig.register(RecursiveLlamaConfig.model_type, RecursiveLlamaConfig, exist_ok=True)


def _register_model_class() -> None:
    register_model_module("hf_compress.methods.recursive.modeling")
