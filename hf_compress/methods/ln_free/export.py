"""Export an LN-removal fine-tune in two forms that load with plain ``AutoModelForCausalLM.from_pretrained``.

* structural (:func:`export_structural`): the registered ``hfc_ln_free_gpt2`` / ``hfc_ln_free_llama`` architecture,
  norms are affine maps with 1/σ_avg folded into their weight — exactly LN-free, direct logit attribution is exact.
* compatible (:func:`export_compatible`, GPT-2 only): a plain ``GPT2LMHeadModel`` that any transformers install
  loads — the released models' trick ``γ ← γ·1e6/σ_avg``, ``eps ← 1e12``, so
  ``LN(x) ≈ (x - μ)/1e6 · γ·1e6/σ_avg``.
  It still computes a (negligible) σ, and the 1e6-scaled γ overflows fp16 (max 65504): fp32/bf16 only.

The QK and V paths of the attention-input norm were frozen at different σ: the export's single norm uses the QK
σ, and the ratio r = σ_qk/σ_v is folded into the V projection
(``W_v ← r·W_v``, ``b_v ← b_v + (1 - r)·β W_v``).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from hf_compress.checkpoint.atomic import atomic_directory
from hf_compress.methods.ln_free.swap import architecture, fake_status, position0_active, removable_norms

COMPAT_SCALE, COMPAT_EPS = 1e6, 1e12
_BUFFERS = ("std_ema", "std_seen", "avg_std", "is_fake", "avg_std_v", "v_is_fake", "first_special", "std_ema_first",
            "avg_std_first", "avg_std_v_first")


def _check_all_fake(model) -> None:
    real = [name for name, fake in fake_status(model).items() if not fake]
    if real:
        raise ValueError(f"{len(real)} norms are not removed yet ({', '.join(real[:6])}…): finish the schedule first")


def _config_dict(model) -> dict:
    d = model.config.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "_name_or_path", "auto_map"):
        d.pop(key, None)
    return d


def folded_state_dict(model, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """The model's weights with every norm's 1/σ_avg folded into its weight (times ``scale``)."""
    _check_all_fake(model)
    norms = removable_norms(model)
    prefix = {id(m): n for n, m in model.named_modules()}
    sd = {k: v.detach().clone() for k, v in model.state_dict().items() if k.rsplit(".", 1)[-1] not in _BUFFERS}
    for name, (norm, path) in norms.items():
        if path == "v":
            continue
        sd[f"{prefix[id(norm)]}.weight"] = (norm.weight.detach().float() / norm.avg_std * scale).to(norm.weight.dtype)
        if bool(norm.first_special):
            sd[f"{prefix[id(norm)]}.weight_first"] = (norm.weight.detach().float() / norm.avg_std_first
                                                      * scale).to(norm.weight.dtype)
    gpt2 = architecture(model) == "gpt2"
    blocks = model.transformer.h if gpt2 else model.model.layers
    for block in blocks:
        norm = block.ln_1 if gpt2 else block.input_layernorm
        r = float(norm.avg_std / norm.avg_std_v)
        if gpt2:
            conv = block.attn.c_attn
            width = conv.weight.shape[0]
            w_v, b_v = conv.weight[:, 2 * width:].detach(), conv.bias[2 * width:].detach()
            name = prefix[id(conv)]
            sd[f"{name}.weight"][:, 2 * width:] = r * w_v
            sd[f"{name}.bias"][2 * width:] = b_v + (1 - r) * (norm.bias.detach() @ w_v)
        else:
            name = prefix[id(block.self_attn.v_proj)]
            sd[f"{name}.weight"] = r * sd[f"{name}.weight"]
    return sd


def to_structural(model):
    """The structurally LN-free model (registered architecture) equal to the fine-tuned ``model``."""
    from hf_compress.methods.ln_free.configuration import LNFreeGPT2Config, LNFreeLlamaConfig
    from hf_compress.methods.ln_free.modeling import LNFreeGPT2LMHeadModel, LNFreeLlamaForCausalLM

    gpt2 = architecture(model) == "gpt2"
    config = (LNFreeGPT2Config if gpt2 else LNFreeLlamaConfig)(**_config_dict(model))
    config.architectures = ["LNFreeGPT2LMHeadModel" if gpt2 else "LNFreeLlamaForCausalLM"]
    config.position0_scale = position0_active(model)
    sd = folded_state_dict(model)
    out = (LNFreeGPT2LMHeadModel if gpt2 else LNFreeLlamaForCausalLM)(config).to(next(model.parameters()).dtype)
    out.load_state_dict(sd, strict=True)
    return out.eval()


def to_compatible(model, dtype: torch.dtype = torch.float32):
    """A plain ``GPT2LMHeadModel`` (γ·1e6/σ_avg, eps 1e12) equal to the fine-tuned GPT-2 ``model``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    if architecture(model) != "gpt2":
        raise TypeError("the compatible export exists for GPT-2 only: RMSNorm has no epsilon trick that removes σ "
                        "(use export_structural)")
    _check_fp16(dtype)
    if position0_active(model):
        raise ValueError("the compatible export has one σ per LayerNorm, but this model still gives position 0 its own "
                         "σ: collapse it first (schedule gap_pos0 / remove(model, 'pos0')) or use export_structural")
    d = _config_dict(model)
    d["layer_norm_epsilon"] = COMPAT_EPS
    config = GPT2Config(**d)
    config.architectures = ["GPT2LMHeadModel"]
    sd = folded_state_dict(model, scale=COMPAT_SCALE)
    out = GPT2LMHeadModel(config)
    out.load_state_dict(sd, strict=True)
    from hf_compress.integrations.hub import enable_hub_cards

    enable_hub_cards(out, tags=["layernorm-free"])
    return out.to(dtype).eval()


def _check_fp16(dtype) -> None:
    if dtype == torch.float16:
        raise ValueError("the compatible LN-free GPT-2 scales LayerNorm weights by 1e6, which overflows float16 "
                         "(max 65504): use float32 or bfloat16, or the structural export")


def _save(model, path, tokenizer) -> Path:
    """Atomic save with the model card (which says which export form it is, and its caveats)."""
    from hf_compress.integrations.hub import _plain_save, write_card

    with atomic_directory(path) as tmp:
        _plain_save(model, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_card(model, tmp, repo_id=Path(path).name)
    return Path(path)


def export_structural(model, path: str | os.PathLike, tokenizer=None) -> Path:
    """Save the structurally LN-free form of ``model`` (all norms removed) to ``path`` atomically."""
    return _save(to_structural(model), path, tokenizer)


def export_compatible(model, path: str | os.PathLike, tokenizer=None, dtype: torch.dtype = torch.float32) -> Path:
    """Save a plain-GPT-2 checkpoint of ``model`` (any transformers loads it; fp32/bf16 only) atomically."""
    return _save(to_compatible(model, dtype), path, tokenizer)


def load_compatible(path: str | os.PathLike, dtype: torch.dtype = torch.float32, **kwargs):
    """Load a compatible export, refusing float16 (the 1e6-scaled LayerNorm weights overflow it)."""
    from transformers import AutoModelForCausalLM

    _check_fp16(dtype)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    if getattr(model.config, "layer_norm_epsilon", 0) < COMPAT_EPS:
        warnings.warn(f"{path} does not look like a compatible LN-free export (layer_norm_epsilon < 1e12)")
    return model
