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


def model_family(model: nn.Module) -> str:
    """``"encoder-decoder"`` (T5, BART), ``"encoder"`` (BERT-like: a masked-LM family not configured as a decoder)
    or ``"decoder"`` (causal LMs), from the model's config; what calibration and the methods' support lists use."""
    config = getattr(model, "config", None)
    if config is None:
        return "decoder"
    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder"
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

    model_type = getattr(config, "model_type", None)
    causal_class = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False) and (
            causal_class is None or type(model).__name__ != causal_class):
        return "encoder"
    return "decoder"


def max_positions(model: nn.Module) -> int | None:
    """The longest sequence the model's position embeddings cover, when its config says."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


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
