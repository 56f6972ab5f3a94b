"""Reading the card templates in ``model_cards/``: one place for checkpoint cards and export cards alike."""

from __future__ import annotations

import importlib
from pathlib import Path


def template_text(template: str) -> str:
    """Read ``model_cards/<template>.md`` by file path: ``hf_compress.model_cards`` is a folder of package data
    (no ``__init__``), which ``importlib.resources`` cannot open in a source checkout."""
    for folder in importlib.import_module("hf_compress.model_cards").__path__:
        path = Path(folder) / f"{template}.md"
        if path.is_file():
            return path.read_text(encoding="utf-8")
    raise FileNotFoundError(f"hf-compress is missing its model-card template {template}.md")
