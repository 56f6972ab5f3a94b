"""Relaxed recursive LoRA as a PEFT method: one LoRA per unrolled position on the shared weights.

It is PEFT's LoRA (layers, save/load, adapters, ``load_adapter``) with three differences that the method needs,
hence a subclass rather than a new tuner: the scaling is fixed at 1 (``lora_alpha == r``) so that SVD factors
reproduce residuals exactly; the shared weights stay trainable (the paper trains everything); and merging is
refused, because a position's delta merged into a shared weight would change every position that shares it.
PEFT only accepts its own closed enum in ``register_peft_method``, so the type is written into PEFT's mappings.
"""

from __future__ import annotations

import enum
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.tuners.lora import LoraConfig, LoraLayer, LoraModel
from tqdm.auto import tqdm

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class HfcPeftType(str, enum.Enum):
    """A str-Enum (not a bare str): transformers' ``load_adapter`` reads ``peft_type.value``."""

    RELAXED_RECURSIVE_LORA = "HFC_RELAXED_RECURSIVE_LORA"


@dataclass
class RelaxedRecursiveLoraConfig(LoraConfig):
    """LoRA config for a recursive model; build it with :func:`relaxed_lora_config` to get scaling 1."""

    train_shared_weights: bool = field(default=True, metadata={"help": "also train the shared (tied) weights"})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = HfcPeftType.RELAXED_RECURSIVE_LORA


class RelaxedRecursiveLoraModel(LoraModel):
    """PEFT's LoRA tuner, with shared weights trainable and merging refused."""

    def _mark_only_adapters_as_trainable(self, model) -> None:
        super()._mark_only_adapters_as_trainable(model)
        if any(getattr(c, "train_shared_weights", False) for c in self.peft_config.values()):
            for name, param in model.named_parameters():
                if self.prefix not in name:
                    param.requires_grad_(True)

    def _check_merge_allowed(self):
        raise TypeError(
            "relaxed recursive LoRA cannot be merged: its weights are shared between positions and each position "
            "has its own delta; use hf_compress.methods.recursive.relaxed_lora.to_llama() to export a plain Llama instead"
        )


def register() -> None:
    """Write the method into PEFT's type mappings (idempotent)."""
    key = HfcPeftType.RELAXED_RECURSIVE_LORA
    PEFT_TYPE_TO_CONFIG_MAPPING[key] = RelaxedRecursiveLoraConfig
    PEFT_TYPE_TO_TUNER_MAPPING[key] = RelaxedRecursiveLoraModel
    PEFT_TYPE_TO_PREFIX_MAPPING[key] = "lora_"


def is_registered() -> bool:
    return PEFT_TYPE_TO_TUNER_MAPPING.get(HfcPeftType.RELAXED_RECURSIVE_LORA) is RelaxedRecursiveLoraModel


def _module_ranks(model, ranks) -> dict[str, int]:
    """Resolve ``ranks`` (int, "full", or {module type: int | "full"}) to a rank per module type (0 = no LoRA)."""
    layer = model.model.layers[0]
    shapes = {n.rsplit(".", 1)[-1]: m.weight.shape for n, m in layer.named_modules() if n.endswith(LINEAR_NAMES)}
    if not isinstance(ranks, dict):
        ranks = dict.fromkeys(shapes, ranks)
    unknown = set(ranks) - set(shapes)
    if unknown:
        raise ValueError(f"ranks name unknown module types {sorted(unknown)}; known: {sorted(shapes)}")
    resolved = {}
    for name, rank in ranks.items():
        full = min(shapes[name])
        rank = full if rank == "full" else rank
        if not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank <= full:
            raise ValueError(f"rank for {name} must be an integer in [0, {full}] or 'full', got {ranks[name]!r}")
        resolved[name] = rank
    return resolved


def relaxed_lora_config(model, ranks=64, train_shared_weights: bool = True, **lora_kwargs) -> RelaxedRecursiveLoraConfig:
    """A config with one rank per module type and ``lora_alpha == r`` everywhere (scaling 1)."""
    from hf_compress.methods.recursive.modeling import RecursiveLlamaForCausalLM

    if not isinstance(model, RecursiveLlamaForCausalLM):
        raise TypeError(f"relaxed recursive LoRA applies to a recursive model, got {type(model).__name__}; "
                        "convert it first with hf_compress.methods.recursive.convert")
    resolved = {k: r for k, r in _module_ranks(model, ranks).items() if r > 0}
    if not resolved:
        raise ValueError("every rank is 0: that is the plain recursive model, no adapter needed")
    default = max(resolved.values())
    lora_kwargs.setdefault("task_type", "CAUSAL_LM")  # lets AutoPeftModelForCausalLM load the base by Auto class
    return RelaxedRecursiveLoraConfig(
        r=default, lora_alpha=default, target_modules=sorted(resolved),
        rank_pattern={k: r for k, r in resolved.items()}, alpha_pattern={k: r for k, r in resolved.items()},
        train_shared_weights=train_shared_weights, **lora_kwargs,
    )


def _truncated_svd(residual: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, A)`` with ``B @ A`` the best rank-``rank`` approximation; randomized SVD when the rank is small
    (a full SVD of every residual of a 30-layer model takes minutes on a CPU)."""
    residual = residual.float()
    if rank * 4 >= min(residual.shape):
        u, s, vh = torch.linalg.svd(residual, full_matrices=False)
    else:
        u, s, v = torch.svd_lowrank(residual, q=min(rank + 16, min(residual.shape)), niter=6)
        vh = v.T
    return u[:, :rank] * s[:rank], vh[:rank]


def relax(recursive_model, original_model=None, ranks=64, init: str = "svd", train_shared_weights: bool = True,
          progress: bool = True, **lora_kwargs) -> PeftModel:
    """Wrap a recursive model in relaxed LoRA; ``init="svd"`` starts each position's LoRA at the truncated SVD of
    (original weight − shared weight), ``init="zero"`` at PEFT's default (B = 0: the pure recursive model)."""
    if init not in ("svd", "zero"):
        raise ValueError(f"init must be 'svd' or 'zero', got {init!r}")
    if init == "svd" and original_model is None:
        raise ValueError("init='svd' needs the original (non-recursive) model the recursive one was converted from")
    config = relaxed_lora_config(recursive_model, ranks, train_shared_weights, **lora_kwargs)
    if init == "svd":
        _check_same_shape(recursive_model, original_model)
    peft_model = get_peft_model(recursive_model, config)
    if init == "svd":
        svd_initialise(peft_model, original_model, progress=progress)
    from hf_compress.integrations.hub import enable_hub_cards

    enable_hub_cards(peft_model, tags=["relaxed-recursive-lora"])
    return peft_model


def _check_same_shape(recursive_model, original_model) -> None:
    if original_model.config.num_hidden_layers != recursive_model.config.num_hidden_layers:
        raise ValueError(f"original model has {original_model.config.num_hidden_layers} layers, the recursive one "
                         f"{recursive_model.config.num_hidden_layers} positions: not the model it was converted from")
    for name in ("hidden_size", "intermediate_size", "num_key_value_heads"):
        if getattr(original_model.config, name) != getattr(recursive_model.config, name):
            raise ValueError(f"original and recursive models differ in {name}")


@torch.no_grad()
def svd_initialise(peft_model, original_model, adapter_name: str = "default", progress: bool = True) -> None:
    """Set every position's LoRA to the truncated SVD of its residual; a zero residual (the position whose
    original layer *is* the shared block) keeps the standard init, as the paper does."""
    originals = dict(original_model.named_modules())
    targets = [(n, m) for n, m in peft_model.base_model.model.named_modules() if isinstance(m, LoraLayer)]
    for name, module in tqdm(targets, desc="SVD init of relaxed LoRA", disable=not progress):
        if adapter_name not in module.lora_A:
            continue
        shared = module.get_base_layer().weight
        residual = originals[name].weight.to(shared.device, torch.float32) - shared.float()
        if not residual.any():
            continue
        rank = module.r[adapter_name]
        if module.scaling[adapter_name] != 1:
            raise ValueError(f"{name}: LoRA scaling is {module.scaling[adapter_name]}, SVD init needs 1 (alpha == r)")
        b, a = _truncated_svd(residual, rank)
        module.lora_A[adapter_name].weight.copy_(a.to(module.lora_A[adapter_name].weight.dtype))
        module.lora_B[adapter_name].weight.copy_(b.to(module.lora_B[adapter_name].weight.dtype))


def base_state_dict(peft_model) -> dict[str, torch.Tensor]:
    """The recursive model's own weights (shared blocks as trained), without LoRA tensors or wrapper names."""
    model = peft_model.get_base_model()
    state = {}
    for key, value in model.state_dict().items():
        if ".lora_" in key:
            continue
        state[key.replace(".base_layer.", ".")] = value
    return state


def _is_main_process() -> bool:
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def save_relaxed(peft_model, directory, base_model_name_or_path: str | None = None,
                 is_main_process: bool | None = None) -> Path:
    """Save a relaxed model as two ordinary artefacts: the recursive base (``directory``, trained shared
    weights included) and the adapter (``directory/relaxed_lora``), whose ``base_model_name_or_path`` points at
    the base (``directory`` unless given, e.g. a Hub repo id) so ``AutoPeftModelForCausalLM`` loads both.

    Under ``torchrun`` / ``accelerate launch`` every rank holds the same trained model, and a training script
    calls this on every rank: only the main process writes (``is_main_process``: default rank 0 of an initialised
    process group, else True), the others return at once without waiting. Two ranks staging the same folder
    would otherwise race (measured: rank 1 failed with "…tmp has neither config.json nor adapter_config.json").
    Ranks that read the folder right after saving need a barrier of their own."""
    from hf_compress.checkpoint.atomic import atomic_directory
    from hf_compress.methods.recursive.modeling import RecursiveLlamaForCausalLM

    directory = Path(directory)
    if not (_is_main_process() if is_main_process is None else is_main_process):
        return directory
    base = peft_model.get_base_model()
    with torch.device("meta"):
        clean = RecursiveLlamaForCausalLM(base.config)
    clean.load_state_dict(base_state_dict(peft_model), assign=True, strict=False)
    clean.tie_weights(recompute_mapping=False)
    clean.generation_config = base.generation_config
    with atomic_directory(directory) as tmp:
        clean.save_pretrained(tmp)
        peft_model.save_pretrained(tmp / "relaxed_lora")
        config_path = tmp / "relaxed_lora" / "adapter_config.json"
        config = json.loads(config_path.read_text())
        config["base_model_name_or_path"] = base_model_name_or_path or os.fspath(directory.resolve())
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True))
        from hf_compress.integrations.hub import write_card

        write_card(clean, tmp, repo_id=directory.name)
        write_card(peft_model, tmp / "relaxed_lora", repo_id=f"{directory.name}-relaxed-lora")
    return directory


@torch.no_grad()
def to_llama(peft_model, adapter_name: str = "default"):
    """Materialise a relaxed model as a plain ``LlamaForCausalLM`` (every position's W' + BA written out):
    the export for tools that know nothing of recursion. It is L/B times larger than the recursive checkpoint."""
    from transformers import LlamaConfig, LlamaForCausalLM

    base = peft_model.get_base_model()
    cfg = base.config.to_dict()
    for key in ("model_type", "architectures", "num_loops", "recursion_scheme", "recursion_init", "tie_norms",
                "early_exit_loss_weight", "early_exit_distill", "early_exit_threshold", "auto_map"):
        cfg.pop(key, None)
    state = {k: v.clone() for k, v in base_state_dict(peft_model).items()}
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer) and adapter_name in module.lora_A:
            key = f"{name}.weight"
            state[key] = state[key] + module.get_delta_weight(adapter_name).to(state[key].dtype)
    with torch.device("meta"):
        llama = LlamaForCausalLM(LlamaConfig(**cfg))
    llama.load_state_dict(state, assign=True, strict=False)
    llama.tie_weights()
    for name, buffer in base.named_buffers():
        parent, _, attr = name.rpartition(".")
        if "rotary" in name:
            llama.get_submodule(parent)._buffers[attr] = buffer.clone()
    return llama.eval()


register()
