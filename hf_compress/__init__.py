"""hf-compress: layer-wise model compression, native to the Hugging Face stack.

Importing the package registers its quantization methods with transformers. The heavy modules load lazily,
so the interpreter-start hook that makes checkpoints load without this import stays cheap.
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
    """Register hf-compress's methods with transformers (and PEFT, once imported); safe to call any number of
    times. Returns whether everything that needs transformers is registered.

    The architectures subclass transformers models, so they register only once transformers' modelling code can
    be imported; when this runs from inside transformers' own import, the interpreter-start hook retries as
    transformers' modules finish loading.
    """
    global _registering
    if _registering:  # re-entered from transformers' import while we import it; the outer call finishes
        return False
    _registering = True
    try:
        if _initializing(("transformers", "hf_compress.recursive", "hf_compress.ln_free", "peft")):
            return False
        importlib.import_module("hf_compress.quantizer").register()
        importlib.import_module("hf_compress.recursive.modeling").register()
        importlib.import_module("hf_compress.ln_free.modeling").register()
        if "peft" in sys.modules:
            importlib.import_module("hf_compress.recursive.relaxed_lora").register()
        return True
    finally:
        _registering = False


def peft_registered() -> bool:
    module = sys.modules.get("hf_compress.recursive.relaxed_lora")
    return module is not None and module.is_registered()


_registering = False


def _initializing(prefixes) -> bool:
    """Whether a module under one of ``prefixes`` is half-imported (importing from it would fail)."""
    for name, module in list(sys.modules.items()):
        if name.startswith(prefixes) and getattr(getattr(module, "__spec__", None), "_initializing", False):
            return True
    return False


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hf_compress' has no attribute {name!r}")


register()
