"""Where hf-compress keeps derived files (a converted model, the CLI's option table); imports nothing heavy."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``HF_COMPRESS_CACHE``, else ``$XDG_CACHE_HOME/hf_compress`` (``~/.cache/hf_compress``)."""
    root = os.environ.get("HF_COMPRESS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "hf_compress"
    )
    return Path(root)
