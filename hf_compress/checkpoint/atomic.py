"""Atomic saves that never delete what they did not write, and integrity checks for checkpoints.

A save writes into a staging folder first, so a failure (disk full, Ctrl-C, an exception in a serializer) never
leaves a half-written checkpoint. A new target is staged beside it and swapped in with one rename; an existing
folder (an empty one, or a mount root that cannot be renamed) is staged inside itself, on its own filesystem,
and updated file by file: only the files the save wrote (and stale weight shards it replaces) are replaced,
everything else — a user's notes, a subfolder — stays untouched, and if anything fails the previous files are
put back. A target that holds something other than an hf-compress
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

# Files a new save makes obsolete even when it does not write them itself: weights under other shard names, and
# the measured results recorded for the previous checkpoint's card (they do not describe the new one).
STALE_WEIGHT_FILES = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "pytorch_model*.bin.index.json",
                      "hf_compress_card.json")


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
    entries = sorted(p.name for p in target.iterdir() if not _ours(p))  # a crashed save's staging is not the user's
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


STAGING_PREFIX = ".hf_compress-staging-"  # inside the target: same filesystem, works on a mount root
BACKUP_PREFIX = ".hf_compress-previous-"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _folder_error(target: Path, action: str, exc: OSError) -> OSError:
    return OSError(exc.errno, f"cannot write a checkpoint to {target}: {action} failed ({exc.strerror or exc})")


def check_writable(target: str | os.PathLike) -> Path:
    """Raise OSError naming ``target`` if a checkpoint could not be written there (for callers that check before
    minutes of work, like the CLI)."""
    target = Path(target)
    probe = target
    while not probe.exists():  # the nearest existing folder is where the new folders would be made
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise OSError(f"cannot write a checkpoint to {target}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OSError(f"cannot write a checkpoint to {target}: {probe} is not writable")
    return target


@contextmanager
def atomic_directory(target: str | os.PathLike, overwrite: bool = False):
    """Yield a staging folder whose files land in ``target`` only if the block finishes without error.

    A new target is staged beside it and appears with one rename. An existing folder (possibly a mount root,
    which cannot be renamed) is staged *inside* itself, so the save needs space on the target's filesystem and
    never renames the folder; its files are then swapped one by one, the previous checkpoint's files kept aside
    until the last rename and put back on any failure. Folders get the permissions the umask allows, as
    ``save_pretrained``'s do. See the module docstring for what is kept and what is refused
    (``check_save_target``)."""
    target = check_save_target(target, overwrite)
    existing = target.is_dir()
    try:
        if not existing:
            target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX if existing else f".{target.name}.tmp-",
                                    dir=target if existing else target.parent))
    except OSError as exc:
        raise _folder_error(target, "creating a staging folder", exc) from exc
    try:
        yield tmp
        try:
            _apply_umask(tmp)
            _commit(tmp, target, existing)
        except OSError as exc:
            raise _folder_error(target, "moving the new files in", exc) from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _apply_umask(folder: Path) -> None:
    """Modes a plain ``open`` would give: safetensors writes its files 0600 and mkdtemp makes folders 0700, so
    a server running under another user could not read the checkpoint."""
    mask = _umask()
    os.chmod(folder, 0o777 & ~mask)
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o777 & ~mask)
        for f in files:
            os.chmod(os.path.join(root, f), 0o666 & ~mask)


def _ours(p: Path) -> bool:
    return p.name.startswith((STAGING_PREFIX, BACKUP_PREFIX))


def _commit(tmp: Path, target: Path, existing: bool) -> None:
    """Move the new files into ``target``; on any failure restore what was there."""
    if not existing:
        os.replace(tmp, target)  # one rename onto a name nobody else holds
        return
    new = sorted(tmp.iterdir(), key=lambda p: p.name == "config.json")  # the config last: it says what loads
    names = {p.name for p in new}
    old = [p for p in sorted(target.iterdir()) if not _ours(p) and (p.name in names
           or (p.is_file() and any(fnmatch.fnmatch(p.name, g) for g in STALE_WEIGHT_FILES)))]
    backup = Path(tempfile.mkdtemp(prefix=BACKUP_PREFIX, dir=target))
    moved, placed = [], []
    try:
        for p in new:  # each new file replaces its namesake in one rename; the namesake is linked aside first
            dest = target / p.name
            if dest in old and dest.is_file():
                _keep_copy(dest, backup / p.name)  # dest stays in place until the rename below replaces it
                moved.append(dest)
            elif dest in old:
                os.replace(dest, backup / p.name)
                moved.append(dest)
            os.replace(p, dest)
            placed.append(dest)
        for p in old:  # stale shards of the previous checkpoint go last
            if p not in moved:
                os.replace(p, backup / p.name)
                moved.append(p)
    except BaseException:
        for p in placed:
            if p not in moved:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        for p in moved:
            if (backup / p.name).exists():
                if p.is_dir():
                    shutil.rmtree(p)
                os.replace(backup / p.name, p)
        shutil.rmtree(backup, ignore_errors=True)
        raise
    shutil.rmtree(backup, ignore_errors=True)


def _keep_copy(path: Path, aside: Path) -> None:
    """A second name for ``path`` (a hard link: no data copied), or a copy where the filesystem has no links."""
    try:
        os.link(path, aside)
    except OSError:
        shutil.copy2(path, aside)
