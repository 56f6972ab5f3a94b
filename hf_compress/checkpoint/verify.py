"""Integrity checks run before transformers reads a checkpoint's weights.

Each safetensors file's header is checked against its size first, so a truncated or corrupt file is reported by
name instead of surfacing as an opaque deserialisation error deep in transformers; anything but safetensors is
refused (never unpickle).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path


def verify_safetensors_file(path: str | os.PathLike) -> None:
    """Raise ValueError naming ``path`` if its header is unreadable or its data is truncated."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint file is missing: {path}")
    size = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            (header_len,) = struct.unpack("<Q", fh.read(8))
            if header_len > size - 8:
                raise ValueError("header length exceeds file size")
            header = json.loads(fh.read(header_len))
    except (struct.error, UnicodeDecodeError, json.JSONDecodeError, ValueError) as exc:
        raise ValueError(f"corrupt or truncated checkpoint file {path}: unreadable safetensors header ({exc})") from None
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    expected = 8 + header_len + (max(ends) if ends else 0)
    if size < expected:
        raise ValueError(f"truncated checkpoint file {path}: {size} bytes, header promises {expected}")


def verify_checkpoint_files(files) -> None:
    """Check every safetensors file of a checkpoint; anything else (a pickle) is refused."""
    for f in files or []:
        f = Path(f)
        if f.suffix != ".safetensors":
            raise ValueError(f"hf-compress checkpoints are safetensors only; refusing to load {f}")
        verify_safetensors_file(f)
