"""Token-reduced ViT / DeiT image classifiers: the original architecture plus the fixed schedule in its config.

The state dict is the original model's; ``__init__`` applies :func:`~.reduction.apply_token_reduction` with the
config's counts. The classes register with ``AutoModelForImageClassification`` when hf-compress is imported (or by
its interpreter-start hook), so a saved model loads with plain ``from_pretrained`` and no ``trust_remote_code``.
"""

from __future__ import annotations

from transformers.models.deit.modeling_deit import DeiTForImageClassification
from transformers.models.vit.modeling_vit import ViTForImageClassification

from hf_compress.integrations.hub import HubCardMixin
from hf_compress.methods.diffrate.configuration import DiffRateDeiTConfig, DiffRateViTConfig
from hf_compress.methods.diffrate.layout import token_counts
from hf_compress.methods.diffrate.rates import check_schedule
from hf_compress.methods.diffrate.reduction import apply_token_reduction


class DiffRateViTForImageClassification(HubCardMixin, ViTForImageClassification):
    """``ViTForImageClassification`` whose encoder layers prune and merge tokens by ``config.prune_kept/merge_kept``."""

    config_class = DiffRateViTConfig

    def __init__(self, config: DiffRateViTConfig):
        super().__init__(config)
        apply_token_reduction(self, config.prune_kept, config.merge_kept, num_prefix=config.num_prefix_tokens)


class DiffRateDeiTForImageClassification(HubCardMixin, DeiTForImageClassification):
    """``DeiTForImageClassification`` with the same fixed token reduction (CLS + distillation token kept)."""

    config_class = DiffRateDeiTConfig

    def __init__(self, config: DiffRateDeiTConfig):
        super().__init__(config)
        apply_token_reduction(self, config.prune_kept, config.merge_kept, num_prefix=config.num_prefix_tokens)


# plain classifier → (its token-reduced class, that class's config)
CONVERSIONS = {
    ViTForImageClassification: (DiffRateViTForImageClassification, DiffRateViTConfig),
    DeiTForImageClassification: (DiffRateDeiTForImageClassification, DiffRateDeiTConfig),
}


def compress(model, prune_kept, merge_kept, search_info: dict | None = None):
    """A token-reduced copy of ``model`` (a ViT/DeiT image classifier, plain or already token-reduced) that runs
    the schedule ``(prune_kept, merge_kept)`` and saves/loads it natively.

    Raises TypeError for other model classes (:func:`apply_token_reduction` works on them in memory) and
    ValueError/TypeError for a bad schedule.
    """
    base = next((c for c in type(model).__mro__ if c in CONVERSIONS), None)
    if base is None:
        names = ", ".join(c.__name__ for c in CONVERSIONS)
        raise TypeError(f"compress() saves {names} models, got {type(model).__name__}; use "
                        "apply_token_reduction() for an in-memory reduction of other ViT layouts")
    cls, config_cls = CONVERSIONS[base]
    num_tokens, num_prefix = token_counts(model)
    # checked here as well as by the config, whose validator wraps the ValueError in huggingface_hub's own error
    prune_kept, merge_kept = check_schedule(prune_kept, merge_kept, num_tokens, num_prefix,
                                            model.config.num_hidden_layers)
    settings = model.config.to_dict()
    for key in ("model_type", "architectures", "transformers_version"):
        settings.pop(key, None)
    settings.update(prune_kept=prune_kept, merge_kept=merge_kept, num_prefix_tokens=num_prefix,
                    diffrate_search=search_info or settings.get("diffrate_search"))
    config = config_cls(**settings)
    reduced = cls(config).to(next(model.parameters()).dtype)
    reduced.load_state_dict(model.state_dict())
    return reduced.train(model.training)


def register() -> None:
    """Make ``AutoModelForImageClassification`` know the token-reduced architectures (idempotent)."""
    from transformers.models.auto.modeling_auto import AutoModelForImageClassification

    from hf_compress.methods.diffrate.configuration import register as register_config

    register_config()
    for config_cls, model_cls in ((DiffRateViTConfig, DiffRateViTForImageClassification),
                                  (DiffRateDeiTConfig, DiffRateDeiTForImageClassification)):
        AutoModelForImageClassification.register(config_cls, model_cls, exist_ok=True)
