"""Atomic saves that never delete what they did not write, and integrity checks for checkpoints.

A save writes into a sibling temporary folder first, so a failure (disk full, Ctrl-C, an exception in a
serializer) never leaves a half-written checkpoint. A new or empty target is then swapped in with one rename.
A folder that already holds files is updated file by file: only the files the save wrote (and stale weight
shards it replaces) are moved aside, everything else — a user's notes, a subfolder — stays untouched, and if
anything fails the moved files are put back. A target that holds something other than an hf-compress
checkpoint is refused unless the caller says ``overwrite=True`` (and even then unrelated files are kept):
``transformers``' ``save_pretrained`` also keeps unrelated files, and a tool must never destroy a model (or a
thesis) it did not produce. Loading checks each safetensors file's header against its size first, so a
truncated or corrupt file is reported by name instead of surfacing as an opaque error deep in transformers.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

# Files a new save makes obsolete even when it does not write them itself: weights under other shard names.
STALE_WEIGHT_FILES = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "pytorch_model*.bin.index.json")


def check_save_target(target: str | os.PathLike, overwrite: bool = False) -> Path:
    """Raise before any work if saving into ``target`` could replace something hf-compress did not make.

    Allowed without ``overwrite``: a missing or empty folder, or one holding an hf-compress checkpoint (its
    other files are kept). Refused: a file, a folder holding another model, a non-empty folder that is no
    checkpoint at all.
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise ValueError(f"cannot save a checkpoint to {target}: it is a file, not a folder")
    if not target.is_dir() or overwrite:
        return target
    entries = sorted(p.name for p in target.iterdir())
    if not entries:
        return target
    from hf_compress.checkpoint.artifacts import artifact_kind

    if artifact_kind(target) not in (None, "adapter"):  # an hf-compress artifact (a foreign adapter is not one)
        return target
    shown = ", ".join(entries[:5]) + (", …" if len(entries) > 5 else "")
    if (target / "config.json").is_file() or (target / "adapter_config.json").is_file():
        raise ValueError(f"{target} holds a model that hf-compress did not make ({shown}); saving there would replace "
                         "it. Choose another folder, or pass overwrite=True (--overwrite) to replace its checkpoint "
                         "files (other files are kept)")
    raise ValueError(f"{target} is not empty and holds no checkpoint ({shown}). Choose another folder, or pass "
                     "overwrite=True (--overwrite) to save into it anyway (its files are kept)")


@contextmanager
def atomic_directory(target: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary folder whose files land in ``target`` only if the block finishes without error.

    See the module docstring for what is kept and what is refused (``check_save_target``)."""
    target = check_save_target(target, overwrite)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    except OSError as exc:
        raise OSError(f"cannot write a checkpoint to {target}: {exc.strerror or exc} ({target.parent})") from exc
    try:
        yield tmp
        _commit(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _commit(tmp: Path, target: Path) -> None:
    """Move the new files into ``target``; on any failure restore what was there."""
    if not target.exists() or not any(target.iterdir()):
        os.replace(tmp, target)  # one rename (POSIX renames onto an empty folder too)
        return
    new = sorted(tmp.iterdir())
    names = {p.name for p in new}
    old = [p for p in sorted(target.iterdir()) if p.name in names
           or (p.is_file() and any(fnmatch.fnmatch(p.name, g) for g in STALE_WEIGHT_FILES))]
    backup = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    moved, placed = [], []
    try:
        for p in old:
            os.replace(p, backup / p.name)
            moved.append(p)
        for p in new:
            os.replace(p, target / p.name)
            placed.append(target / p.name)
    except BaseException:
        for p in placed:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        for p in moved:
            os.replace(backup / p.name, p)
        shutil.rmtree(backup, ignore_errors=True)
        raise
    shutil.rmtree(backup, ignore_errors=True)
