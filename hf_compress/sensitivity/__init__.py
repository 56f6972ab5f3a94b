"""Per-layer, per-module and per-column sensitivity: the measured half of *sensitivity → budget*."""

from .profiling import SensitivityProfile, profile

__all__ = ["SensitivityProfile", "profile"]
