"""hf-compress: layer-wise model compression, native to the Hugging Face stack.

Importing the package registers its methods with transformers lazily (as transformers loads the parts that
need them, see ``integrations.autoload``). Everything else loads on first use, so the interpreter-start hook
that makes checkpoints load without this import stays cheap.
"""

from __future__ import annotations

import importlib
import sys

__version__ = "0.1.0"

_LAZY = {
    "quantize": "hf_compress.pipeline",
    "HfcConfig": "hf_compress.config",
    "RTNConfig": "hf_compress.config",
    "GPTQConfig": "hf_compress.config",
    "LayerwiseQuantConfig": "hf_compress.layerwise",
    "BAQConfig": "hf_compress.baq",
    "HighImpactConfig": "hf_compress.high_impact",
    "RSQConfig": "hf_compress.rsq",
    "rotate_model": "hf_compress.rotation",
    "plan_table": "hf_compress.plan",
    "plot_plan": "hf_compress.plan",
    "CalibrationSpec": "hf_compress.calibration.data",
    "save_pretrained": "hf_compress.checkpoint",
    "load_model": "hf_compress.models",
    "perplexity": "hf_compress.evaluation",
    "size_report": "hf_compress.report",
    "PackedLinear": "hf_compress.formats.linear",
    "profile": "hf_compress.sensitivity",
    "SensitivityProfile": "hf_compress.sensitivity",
    "LNRemovalSchedule": "hf_compress.ln_free.schedule",
    "LNRemovalCallback": "hf_compress.ln_free.callback",
    "push_to_hub": "hf_compress.integrations.hub",
    "render_card": "hf_compress.integrations.model_card",
    "record_card_inputs": "hf_compress.integrations.artifacts",
    "perplexity_result": "hf_compress.integrations.artifacts",
}

__all__ = [*_LAZY, "register", "__version__"]


def register() -> bool:
    """Register hf-compress's methods with transformers now (PEFT methods register once ``peft`` is imported);
    safe to call any number of times. Returns whether the transformers registrations are done (False when
    called from inside transformers' own import: they then finish as soon as that import does).

    Importing hf-compress does not need this: it installs the lazy registration of ``integrations.autoload``.
    """
    from .integrations import autoload

    return autoload.register_now()


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hf_compress' has no attribute {name!r}")


_autoload = importlib.import_module("hf_compress.integrations.autoload")
_autoload.install()
