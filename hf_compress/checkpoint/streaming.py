"""Reading a safetensors checkpoint one module at a time, and writing one shard per decoder block.

What streaming quantization (``pipeline.streaming``) needs from the disk: the tensors of one block at a time,
never the whole state dict (``safe_open`` maps the file and copies only the tensors asked for), and a sharded
checkpoint written block by block in the layout ``from_pretrained`` reads (``model.safetensors.index.json``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def resolve_checkpoint_folder(source: str | os.PathLike) -> Path:
    """A local folder as is; a Hub id through ``snapshot_download`` (configs, tokenizer, safetensors only)."""
    path = Path(source)
    if str(source).endswith(".gguf"):
        raise ValueError(f"streaming reads safetensors checkpoints; {source} is a GGUF file: convert it once with "
                         "`hf_compress.load_model` and `save_pretrained`, or quantize it in memory")
    if path.is_dir():
        return path
    if os.path.sep in str(source) or path.exists():
        raise FileNotFoundError(f"model folder not found: {source}")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(source), allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt",
                                                                 "tokenizer*"]))


class SafetensorsSource:
    """The tensors of a (sharded) safetensors checkpoint by name, read on demand."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        index, single = self.folder / INDEX, self.folder / SINGLE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (ValueError, KeyError) as exc:
                raise ValueError(f"{index} is not a safetensors index (no weight_map): {exc}") from exc
            self.files = {key: self.folder / name for key, name in weight_map.items()}
        elif single.is_file():
            self.files = None  # filled below from the file's header
        else:
            raise FileNotFoundError(f"{self.folder} holds no {SINGLE} or {INDEX}: streaming needs safetensors "
                                    "weights (pickled .bin checkpoints are never read)")
        if self.files is None:
            with self._open(single) as handle:
                self.files = {key: single for key in handle.keys()}
        missing = sorted({str(p) for p in self.files.values() if not p.is_file()})
        if missing:
            raise FileNotFoundError(f"the checkpoint index names shard files that are missing: {missing[:3]}")

    @staticmethod
    def _open(path: Path):
        """A fresh handle, closed after use: an open handle keeps the file mapped, and every page read through it
        would stay in the process's resident memory (25 GiB for a 25 GiB checkpoint) until it is closed."""
        try:
            return safe_open(str(path), framework="pt")
        except Exception as exc:  # safetensors raises its own error types for truncated or corrupt headers
            raise ValueError(f"cannot read {path}: {exc} (truncated or not a safetensors file?)") from exc

    def __contains__(self, key: str) -> bool:
        return key in self.files

    def get(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        if key not in self.files:
            raise KeyError(key)
        handle = self._open(self.files[key])
        try:
            with handle:
                tensor = handle.get_tensor(key)
        except Exception as exc:
            raise ValueError(f"cannot read tensor {key} from {self.files[key]}: {exc}") from exc
        return tensor if dtype is None or not tensor.is_floating_point() else tensor.to(dtype)


def materialize(module: nn.Module, prefix: str, source: SafetensorsSource, dtype: torch.dtype,
                init_buffers, skip: set[str] = frozenset()) -> list[str]:
    """Give every meta tensor of ``module`` (state-dict names under ``prefix``) real storage on the CPU: parameters
    and persistent buffers from ``source``, non-persistent buffers (rotary frequencies) from ``init_buffers(m)``
    — the model's own initialisation, as ``from_pretrained`` does after a meta load. Returns the names not found
    in the checkpoint (the caller decides: tied weights are fine, anything else is an error). ``skip``: submodule
    names (relative) left on the meta device."""
    missing = []
    for rel, sub in module.named_modules():
        if any(rel == s or rel.startswith(s + ".") for s in skip):
            continue
        non_persistent = [n for n, b in sub._buffers.items() if b is not None and n in sub._non_persistent_buffers_set]
        if non_persistent:
            for name in non_persistent:
                sub._buffers[name] = torch.empty_like(sub._buffers[name], device="cpu")
            init_buffers(sub)
        for name, param in list(sub._parameters.items()):
            if param is None or not param.is_meta:
                continue
            key = ".".join(p for p in (prefix, rel, name) if p)
            if key not in source:
                missing.append(key)
                continue
            value = source.get(key, dtype if param.is_floating_point() else None)
            if value.shape != param.shape:
                raise ValueError(f"checkpoint tensor {key} has shape {tuple(value.shape)}, the model expects "
                                 f"{tuple(param.shape)}: config and weights do not belong together")
            sub._parameters[name] = nn.Parameter(value, requires_grad=param.requires_grad)
        for name, buf in list(sub._buffers.items()):
            if buf is None or not buf.is_meta or name in sub._non_persistent_buffers_set:
                continue
            key = ".".join(p for p in (prefix, rel, name) if p)
            if key not in source:
                missing.append(key)
                continue
            sub._buffers[name] = source.get(key, dtype if buf.is_floating_point() else None)
    return missing


class ShardWriter:
    """Writes ``model-XXXXX-of-YYYYY.safetensors`` shards into ``folder`` and, at the end, their index."""

    def __init__(self, folder: str | os.PathLike, total: int):
        self.folder, self.total = Path(folder), total
        self.weight_map: dict[str, str] = {}
        self.total_size = 0

    def write(self, index: int, tensors: dict[str, torch.Tensor]) -> Path:
        from hf_compress.checkpoint.verify import verify_safetensors_file

        name = f"model-{index + 1:05d}-of-{self.total:05d}.safetensors"
        tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
        clash = [k for k in tensors if k in self.weight_map]
        if clash:
            raise ValueError(f"tensors written twice: {clash[:3]}")
        path = self.folder / name
        save_file(tensors, str(path), metadata={"format": "pt"})
        verify_safetensors_file(path)
        for key, value in tensors.items():
            self.weight_map[key] = name
            self.total_size += value.numel() * value.element_size()
        return path

    def finish(self) -> Path:
        path = self.folder / INDEX
        index = {"metadata": {"total_size": self.total_size},
                 "weight_map": dict(sorted(self.weight_map.items()))}
        path.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        return path
