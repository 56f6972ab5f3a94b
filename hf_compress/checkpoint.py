"""Atomic saves and integrity checks for checkpoints.

A save writes into a sibling temporary folder and renames it into place only when every file is written, so
a failure (disk full, Ctrl-C, an exception in a serializer) never leaves a half-written checkpoint. Loading
checks each safetensors file's header against its size first, so a truncated or corrupt file is reported by
name instead of surfacing as an opaque deserialisation error deep in transformers.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_directory(target: str | os.PathLike):
    """Yield a temporary folder that replaces ``target`` only if the block finishes without error."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        backup = None
        if target.exists():
            backup = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, backup)
        os.replace(tmp, target)
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_pretrained(model, save_directory: str | os.PathLike, tokenizer=None, base_model: str | None = None,
                    results: list[dict] | None = None, **kwargs) -> Path:
    """``model.save_pretrained`` made atomic (safetensors only), plus ``tokenizer`` and, for a model hf-compress
    made, its model card (``base_model`` and measured ``results`` are recorded for it)."""
    from .integrations.hub import _plain_save, is_hfc_model, write_card

    kwargs.pop("safe_serialization", None)
    with atomic_directory(save_directory) as tmp:
        _plain_save(model, tmp, **kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for f in Path(tmp).glob("*.safetensors"):
            verify_safetensors_file(f)
        if is_hfc_model(model):
            write_card(model, tmp, repo_id=Path(save_directory).name, base_model=base_model, results=results)
    return Path(save_directory)


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
