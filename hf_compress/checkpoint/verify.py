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


def verify_safetensors_file(path: str | os.PathLike) -> dict:
    """Raise ValueError naming ``path`` if its header is unreadable or its data is truncated; return the header
    (``{tensor name: {"dtype", "shape", "data_offsets"}}``)."""
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
    return {k: v for k, v in header.items() if k != "__metadata__"}


def verify_checkpoint_files(files) -> dict[str, list[int]]:
    """Check every safetensors file of a checkpoint; anything else (a pickle) is refused. Returns the shape of
    every stored tensor."""
    shapes = {}
    for f in files or []:
        f = Path(f)
        if f.suffix != ".safetensors":
            raise ValueError(f"hf-compress checkpoints are safetensors only; refusing to load {f}")
        shapes.update({k: v.get("shape") for k, v in verify_safetensors_file(f).items()})
    return shapes


def check_packed_tensors(model, stored: dict[str, list[int]], packed_type) -> None:
    """Every ``packed_type`` module of ``model`` (built from the plan) must find exactly its tensors, with its
    shapes, in the checkpoint: a plan that disagrees with the stored tensors (``sym`` for a module that stores zero
    points, a wrong width or group size) would otherwise load as a silently wrong layer, or with random buffers."""
    modules = {n: m for n, m in model.named_modules() if isinstance(m, packed_type)}
    if not modules or not stored:
        return
    prefix = getattr(model, "base_model_prefix", "") or ""
    renames = [lambda n: n, lambda n: f"{prefix}.{n}", lambda n: n.removeprefix(f"{prefix}.")]
    # the key layout of this checkpoint (the same head class, or a base model saved with / without its prefix)
    rename = max(renames, key=lambda r: sum(f"{r(n)}.weight" in stored for n in modules))
    for name, module in modules.items():
        key = rename(name)
        expected = {f"{key}.{n}": list(t.shape) for n, t in [*module.named_buffers(recurse=False),
                                                             *module.named_parameters(recurse=False)] if t is not None}
        found = {k: v for k, v in stored.items() if k.startswith(f"{key}.") and "." not in k[len(key) + 1:]}
        missing = sorted(k.rsplit(".", 1)[1] for k in set(expected) - set(found))
        unexpected = sorted(k.rsplit(".", 1)[1] for k in set(found) - set(expected))
        wrong = sorted(f"{k.rsplit('.', 1)[1]} {found[k]} (plan: {expected[k]})" for k in set(expected) & set(found)
                       if list(found[k]) != expected[k])
        if missing or unexpected or wrong:
            parts = [f"missing {missing}" if missing else "", f"unexpected {unexpected}" if unexpected else "",
                     f"shapes {wrong}" if wrong else ""]
            raise ValueError(f"the checkpoint's tensors of {name} do not match its plan entry {module.spec.to_dict()}: "
                             + "; ".join(p for p in parts if p) + ". The config.json or the weights are damaged.")
