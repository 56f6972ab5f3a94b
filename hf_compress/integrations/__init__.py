"""Glue to the rest of the Hugging Face stack: the LISA Trainer callback, Hub push and model cards.

Names load lazily: the registered architectures import ``integrations.hub`` while transformers may still be
importing, and must not pull in ``transformers.Trainer`` (LISA) at that point.
"""

import importlib

_LAZY = {
    "LisaCallback": ".lisa", "LisaConfig": ".lisa", "LisaSchedule": ".lisa",
    "inspect_checkpoint": ".artifacts", "perplexity_result": ".artifacts", "record_card_inputs": ".artifacts",
    "push_to_hub": ".hub", "render_card": ".model_card",
}
__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
