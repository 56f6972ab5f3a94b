"""Configurations of the token-reduced ViT/DeiT architectures, importable without transformers' modelling code.

The per-layer kept-token counts are plain config fields, so ``config.json`` holds the whole compression and the
weights are the original model's. Kept apart from the model classes so ``AutoConfig`` learns the model types early
(while transformers is still importing); the model classes register themselves when such a config is built.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers.models.deit.configuration_deit import DeiTConfig
from transformers.models.vit.configuration_vit import ViTConfig

from hf_compress._imports import register_model_module
from hf_compress.methods.diffrate.flops import FlopsSpec
from hf_compress.methods.diffrate.rates import check_schedule


class _KeptTokensMixin:
    """``prune_kept`` / ``merge_kept``: tokens kept after each layer's pruning / merging (prefix tokens included).

    ``None`` (both) means no reduction. ``diffrate_search`` records how the counts were found (target, FLOPs).
    """

    def validate_architecture(self):
        super().validate_architecture()
        self._check_kept()

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        _register_model_class()

    def _check_kept(self):
        if (self.prune_kept is None) != (self.merge_kept is None):
            raise ValueError("prune_kept and merge_kept must be given together (or neither)")
        if self.prune_kept is not None:
            spec = FlopsSpec.from_config(self, self.num_prefix_tokens)
            check_schedule(self.prune_kept, self.merge_kept, spec.num_tokens, self.num_prefix_tokens,
                           self.num_hidden_layers)


@strict
class DiffRateViTConfig(_KeptTokensMixin, ViTConfig):
    """A ViT config plus a fixed per-layer token-reduction schedule."""

    model_type = "hfc_diffrate_vit"

    prune_kept: list | None = None
    merge_kept: list | None = None
    num_prefix_tokens: int = 1
    diffrate_search: dict | None = None


@strict
class DiffRateDeiTConfig(_KeptTokensMixin, DeiTConfig):
    """A DeiT config plus a fixed per-layer token-reduction schedule (CLS and distillation token are prefix)."""

    model_type = "hfc_diffrate_deit"

    prune_kept: list | None = None
    merge_kept: list | None = None
    num_prefix_tokens: int = 2
    diffrate_search: dict | None = None


def register() -> None:
    """Make ``AutoConfig`` know the token-reduced model types (idempotent)."""
    from transformers.models.auto.configuration_auto import AutoConfig

    AutoConfig.register(DiffRateViTConfig.model_type, DiffRateViTConfig, exist_ok=True)
    AutoConfig.register(DiffRateDeiTConfig.model_type, DiffRateDeiTConfig, exist_ok=True)


def _register_model_class() -> None:
    register_model_module("hf_compress.methods.diffrate.modeling")
