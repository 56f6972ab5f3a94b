"""Glue to the rest of the Hugging Face stack: model cards (and, in later issues, Trainer callbacks and Hub push)."""

from .lisa import LisaCallback, LisaConfig, LisaSchedule
from .model_card import render_model_card

__all__ = ["LisaCallback", "LisaConfig", "LisaSchedule", "render_model_card"]
