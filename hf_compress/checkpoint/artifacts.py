"""What kind of hf-compress artifact a checkpoint folder holds, from its own metadata.

Saving (is this folder ours to update?), cards and pushes all ask here. The kind comes from ``config.json`` /
``adapter_config.json`` and the methods' declarations in the registry; nothing is unpickled and no weights are
loaded.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from hf_compress.checkpoint.verify import verify_safetensors_file
from hf_compress.registry import methods, resolve

EXPORT_REPORT = "hf_compress_export.json"  # marks a serving export (hf_compress.exporters)
WEIGHT_PICKLES = re.compile(r"^(pytorch_model|adapter_model|model)[\w.-]*\.(bin|pt|pth)$|\.ckpt$")


@dataclass
class Artifact:
    """A checkpoint folder and what it is: ``quantized``, ``adapter`` (a PEFT adapter hf-compress did not make) or
    a kind a registered method declares."""

    kind: str
    folder: Path
    config: dict = field(default_factory=dict)
    adapter_config: dict = field(default_factory=dict)

    @property
    def weight_files(self) -> list[Path]:
        return sorted([*self.folder.glob("*.safetensors"), *self.folder.glob("*.gguf")])

    @property
    def weight_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.weight_files)


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); the checkpoint is corrupt") from None


def inspect_checkpoint(folder: str | os.PathLike) -> Artifact:
    """Classify ``folder``; raise ``FileNotFoundError``/``ValueError`` naming what is missing or unusable."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {folder}")
    pickles = sorted(p.name for p in folder.iterdir() if p.is_file() and WEIGHT_PICKLES.search(p.name))
    if pickles:
        raise ValueError(f"{folder} holds pickle weight files ({', '.join(pickles)}); hf-compress publishes safetensors only")
    for f in folder.glob("*.safetensors"):
        verify_safetensors_file(f)
    if (folder / EXPORT_REPORT).is_file():  # a serving export: its own format's files, described by the report
        read_json(folder / EXPORT_REPORT)
        config = read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
        return Artifact("export", folder, config=config)
    if (folder / "adapter_config.json").is_file() and not (folder / "adapter_model.safetensors").is_file():
        raise ValueError(f"{folder} has adapter_config.json but no adapter_model.safetensors")
    if not (folder / "adapter_config.json").is_file():
        if not (folder / "config.json").is_file():
            raise ValueError(f"{folder} has neither config.json nor adapter_config.json: not a saved model or adapter")
        if not list(folder.glob("*.safetensors")):
            raise ValueError(f"{folder} has a config.json but no *.safetensors weights")
    kind = artifact_kind(folder)
    if kind is None:
        model_type = read_json(folder / "config.json").get("model_type", "")
        raise ValueError(
            f"{folder} is a plain {model_type or 'unknown'} checkpoint, not one hf-compress made "
            "(no hfc_* quantization_config, no model type a registered method declares); push it with transformers' "
            "push_to_hub"
        )
    if (folder / "adapter_config.json").is_file():
        return Artifact(kind, folder, adapter_config=read_json(folder / "adapter_config.json"))
    return Artifact(kind, folder, config=read_json(folder / "config.json"))


def artifact_kind(folder: str | os.PathLike) -> str | None:
    """The kind of hf-compress artifact ``folder``'s metadata describes — ``quantized``, ``adapter`` (a PEFT adapter
    hf-compress did not make), or a kind a registered method claims by its model/PEFT type or recogniser — or None
    (a plain checkpoint, or no checkpoint at all). Reads only the JSON configs."""
    folder = Path(folder)
    if (folder / EXPORT_REPORT).is_file():
        return "export"
    if (folder / "adapter_config.json").is_file():
        peft_type = read_json(folder / "adapter_config.json").get("peft_type")
        return _claimed_kind("peft_types", peft_type) or "adapter"
    if not (folder / "config.json").is_file():
        return None
    config = read_json(folder / "config.json")
    quant = config.get("quantization_config") or {}
    if str(quant.get("quant_method", "")).startswith("hfc_"):
        return "quantized"
    kind = _claimed_kind("model_types", config.get("model_type"))
    if kind:
        return kind
    for method in methods():
        if method.recognize:
            kind = resolve(method.recognize)(config)
            if kind:
                return kind
    return None


def _claimed_kind(field: str, value) -> str | None:
    """The artifact kind a registered method gives ``value`` in its ``model_types`` / ``peft_types``."""
    for method in methods():
        kind = getattr(method, field).get(value)
        if kind:
            return kind
    return None
