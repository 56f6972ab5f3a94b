"""Glue to the rest of the Hugging Face stack: the LISA Trainer callback, Hub push and model cards.

Names load lazily: the registered architectures import ``integrations.hub`` while transformers may still be
importing, and must not pull in ``transformers.Trainer`` (LISA) at that point.
"""

from .._imports import lazy_attributes

_LAZY = {
    "LisaCallback": ".lisa", "LisaConfig": ".lisa", "LisaSchedule": ".lisa",
    "inspect_checkpoint": ".artifacts", "perplexity_result": ".artifacts", "record_card_inputs": ".artifacts",
    "push_to_hub": ".hub", "render_card": ".model_card",
}
__all__ = list(_LAZY)
__getattr__ = lazy_attributes(__name__, _LAZY)
