"""hf-compress: layer-wise model compression, native to the Hugging Face stack.

Importing the package registers its quantization methods with transformers. The heavy modules load lazily,
so the interpreter-start hook that makes checkpoints load without this import stays cheap.
"""

from __future__ import annotations

import importlib

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
}

__all__ = [*_LAZY, "register", "__version__"]


def register() -> None:
    """Register hf-compress's methods with transformers; safe to call any number of times."""
    importlib.import_module("hf_compress.quantizer").register()


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hf_compress' has no attribute {name!r}")


register()
