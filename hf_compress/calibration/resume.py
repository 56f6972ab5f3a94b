"""Resumable block-by-block calibration: a run killed at block k restarts from block k, not from zero.

After each finished block the runner hands us the block and the hidden states entering the next one; we write
the block's tensors (packed codes and all), those hidden states, and ``state.json`` (last, by atomic rename, so
a kill mid-write leaves the previous state valid). ``state.json`` carries a fingerprint of the config, the model's
weights and the calibration windows: resuming with anything different is refused (ValueError naming what
changed), since mixing blocks solved under two settings would be a silently wrong model.

On resume the finished blocks get their packed modules back (built from the recorded specs, then loaded
strictly), the saved hidden states replace the first block's captured ones, and the run continues. The folder is
removed once quantization completes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from hf_compress.calibration.discovery import set_submodule
from hf_compress.formats.grid import QuantSpec
from hf_compress.formats.linear import PackedLinear

STATE = "state.json"


def _digest(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def model_fingerprint(model: nn.Module) -> str:
    """Shapes of every tensor and the bytes of a sample of them (first, middle, last): cheap, and any other
    checkpoint or fine-tune differs in them."""
    state = model.state_dict()
    keys = sorted(state)
    shapes = hashlib.sha256(json.dumps([(k, list(state[k].shape)) for k in keys]).encode()).hexdigest()[:16]
    sample = [state[k] for k in (keys[0], keys[len(keys) // 2], keys[-1])] if keys else []
    return f"{shapes}-{_digest(*sample)}"


class ResumeState:
    """The on-disk state of one quantization run in ``folder`` (see the module docstring)."""

    def __init__(self, folder, config_dict: dict, model: nn.Module, batches: torch.Tensor | None):
        self.folder = Path(folder)
        settings = {k: v for k, v in config_dict.items() if k not in ("plan", "report")}
        self.fingerprint = {"config": hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16],
                            "model": model_fingerprint(model),
                            "calibration": _digest(batches) if batches is not None else None}
        self.done = -1
        self.specs: dict[str, dict] = {}
        self.report: dict[str, dict] = {}
        self._load()

    def _load(self) -> None:
        path = self.folder / STATE
        if not path.is_file():
            return
        try:
            state = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is corrupt ({exc}); delete {self.folder} to start over") from None
        changed = [k for k, v in self.fingerprint.items() if state.get("fingerprint", {}).get(k) != v]
        if changed:
            raise ValueError(f"{self.folder} holds a run with a different {' and '.join(changed)}; it cannot be resumed "
                             f"with these settings (delete the folder, or pass another resume_dir)")
        self.done, self.specs = state["done"], state["specs"]
        self.report.update(state["report"])

    def restore(self, layers: nn.ModuleList, prefix: str) -> torch.Tensor | None:
        """Put the finished blocks back (packed) and return the hidden states entering the next one."""
        if self.done < 0:
            return None
        for idx in range(self.done + 1):
            block = layers[idx]
            tensors = load_file(str(self.folder / f"block_{idx}.safetensors"))
            for name, spec in self.specs.items():
                rel = name[len(f"{prefix}.{idx}."):] if name.startswith(f"{prefix}.{idx}.") else None
                if rel is None:
                    continue
                old = block.get_submodule(rel)
                w = old.weight
                out_f, in_f = (w.shape[0], w.shape[1]) if isinstance(old, nn.Linear) else (old.out_features, old.in_features)
                new = PackedLinear(in_f, out_f, QuantSpec.from_dict(spec), bias=f"{rel}.bias" in tensors)
                set_submodule(block, rel, new)
            block.load_state_dict(tensors, strict=True)
        saved = load_file(str(self.folder / f"hidden_{self.done}.safetensors"))
        return [saved[f"sample_{i}"] for i in range(len(saved))]

    def save(self, idx: int, block: nn.Module, block_prefix: str, hidden: list[torch.Tensor]) -> None:
        """Record block ``idx`` as finished; ``self.report`` (shared with the caller) goes along."""
        self.folder.mkdir(parents=True, exist_ok=True)
        for rel, module in block.named_modules():
            if isinstance(module, PackedLinear):
                self.specs[f"{block_prefix}.{rel}"] = module.spec.to_dict()
        # every file of block idx is complete before state.json names it; the previous state stays valid till then
        save_file({k: v.contiguous() for k, v in block.state_dict().items()}, str(self.folder / f"block_{idx}.safetensors"))
        save_file({f"sample_{i}": h.contiguous() for i, h in enumerate(hidden)}, str(self.folder / f"hidden_{idx}.safetensors"))
        tmp = self.folder / (STATE + ".tmp")
        tmp.write_text(json.dumps({"fingerprint": self.fingerprint, "done": idx, "specs": self.specs,
                                   "report": self.report}))
        os.replace(tmp, self.folder / STATE)
        (self.folder / f"hidden_{self.done}.safetensors").unlink(missing_ok=True)
        self.done = idx

    def finish(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
