"""Per-layer, per-module and per-column sensitivity: the measured half of *sensitivity → budget*."""

from hf_compress.sensitivity.profiling import SensitivityProfile, profile

__all__ = ["SensitivityProfile", "profile"]
