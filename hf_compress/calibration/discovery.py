"""Find decoder blocks and the modules a weight solver can handle — by structure, not by architecture name."""

from __future__ import annotations

import torch
from torch import nn


def _conv1d_class():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a hard dependency
        return ()
    return (Conv1D,)


def is_linear_like(module: nn.Module) -> bool:
    """``nn.Linear`` or GPT-2's transposed ``Conv1D``."""
    return isinstance(module, (nn.Linear, *_conv1d_class()))


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The weight as ``[out, in]`` whatever the module's own layout."""
    if isinstance(module, nn.Linear):
        return module.weight
    if _conv1d_class() and isinstance(module, _conv1d_class()):
        return module.weight.t()
    raise TypeError(f"{type(module).__name__} is not a linear layer")


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ``nn.ModuleList`` of repeated blocks holding the most parameters (``model.layers``, ``transformer.h``…)."""
    best, best_size = None, 0
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and len({type(m) for m in mod}) == 1:
            size = sum(p.numel() for p in mod.parameters())
            if size > best_size:
                best, best_size = (name, mod), size
    if best is None:
        raise ValueError(f"cannot find the decoder blocks of {type(model).__name__}: no ModuleList of repeated blocks")
    return best


def quantizable_modules(root: nn.Module):
    """``(relative_name, module)`` for every linear-like module under ``root``."""
    return [(n, m) for n, m in root.named_modules() if n and is_linear_like(m)]


def unsupported_weight_modules(root: nn.Module) -> list[str]:
    """Leaf modules under ``root`` that hold a 2-D+ weight but that no solver handles (listed, then skipped)."""
    out = []
    for n, m in root.named_modules():
        if n and not is_linear_like(m) and not list(m.children()):
            w = getattr(m, "weight", None)
            if isinstance(w, torch.Tensor) and w.dim() >= 2:
                out.append(n)
    return out


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the module at dotted ``name`` under ``root``."""
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)
