"""Turn a pretrained Llama-family decoder into a recursive model (Relaxed Recursive Transformers, §2)."""

from __future__ import annotations

import torch
from transformers.models.llama.modeling_llama import LlamaForCausalLM

from hf_compress.methods.recursive.configuration import RecursiveLlamaConfig
from hf_compress.methods.recursive.modeling import RecursiveLlamaForCausalLM
from hf_compress.methods.recursive.sharing import init_sources, position_groups


def check_convertible(model) -> None:
    """Recursive conversion rewrites decoder blocks by name; refuse what it cannot rewrite faithfully."""
    if isinstance(model, RecursiveLlamaForCausalLM):
        raise TypeError("the model is already recursive; convert the original model instead")
    if not isinstance(model, LlamaForCausalLM):
        raise TypeError(
            f"recursive conversion supports Llama-family causal LMs (LlamaForCausalLM), got {type(model).__name__}"
        )
    if getattr(model, "is_quantized", False) or getattr(model.config, "quantization_config", None):
        raise TypeError("recursive conversion needs a dense model; convert before quantizing")


def convert(model, num_loops: int = 2, scheme: str = "cycle", init: str = "stepwise",
            tie_norms: bool = True) -> RecursiveLlamaForCausalLM:
    """Return a recursive copy of ``model`` whose K = L/B unique blocks are applied B times.

    ``init`` picks the shared weights (stepwise | average | lower; see ``sharing.init_sources``).
    ``tie_norms=False`` keeps every position's own RMSNorm gains (2·d parameters per position): the paper ties
    them, but only untied norms let a full-rank relaxed LoRA reproduce the original model exactly.
    """
    check_convertible(model)
    layers = model.config.num_hidden_layers
    sources = init_sources(layers, num_loops, scheme, init)  # validates the setting with a plain ValueError
    cfg = model.config.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "auto_map"):
        cfg.pop(key, None)
    config = RecursiveLlamaConfig(**cfg, num_loops=num_loops, recursion_scheme=scheme, recursion_init=init,
                                  tie_norms=tie_norms)
    config.architectures = [RecursiveLlamaForCausalLM.__name__]
    groups = position_groups(layers, num_loops, scheme)

    original = model.state_dict()
    state = {k: v.clone() for k, v in original.items() if not k.startswith("model.layers.")}
    layer_names = [n for n, _ in model.model.layers[0].named_parameters()]
    for block, (source_layers, positions) in enumerate(zip(sources, groups)):
        for name in layer_names:
            if "layernorm" in name and not tie_norms:
                for position in positions:
                    state[f"model.layers.{position}.{name}"] = original[f"model.layers.{position}.{name}"].clone()
                continue
            stacked = torch.stack([original[f"model.layers.{i}.{name}"].float() for i in source_layers])
            dtype = original[f"model.layers.{source_layers[0]}.{name}"].dtype
            state[f"model.layers.{positions[0]}.{name}"] = stacked.mean(0).to(dtype)

    with torch.device("meta"):
        recursive = RecursiveLlamaForCausalLM(config)
    missing, unexpected = recursive.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if k not in recursive.all_tied_weights_keys]
    if missing or unexpected:
        raise ValueError(f"recursive conversion left weights unset {missing[:5]} / unexpected {unexpected[:5]}")
    recursive.tie_weights(recompute_mapping=False)
    _copy_buffers(model, recursive)
    recursive.generation_config = model.generation_config
    return recursive.to(next(model.parameters()).device).train(model.training)


def _copy_buffers(source, target) -> None:
    """Non-persistent buffers (rotary inverse frequencies) are not in the state dict; take them from the source."""
    source_buffers = dict(source.named_buffers())
    for name, buffer in list(target.named_buffers()):
        if buffer.device.type == "meta" and name in source_buffers:
            parent_name, _, attr = name.rpartition(".")
            parent = target.get_submodule(parent_name)
            parent._buffers[attr] = source_buffers[name].clone()
