"""Glue to the rest of the Hugging Face stack: model cards (and, in later issues, Trainer callbacks and Hub push)."""

from .model_card import render_model_card

__all__ = ["render_model_card"]
