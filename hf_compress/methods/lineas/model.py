"""LinEAS as a PEFT method: the tuner that ``get_peft_model(model, LineasConfig(...))`` builds.

Which activations are steered on Llama-family decoders: the output of every ``post_attention_layernorm``, i.e. the
normalised input of each MLP block. Why this one and not the residual stream (each block's output):

* It is the paper's choice (``.*post.*layernorm`` on Gemma-2, "LayerNorm outputs work best"), and on a norm with a
  bias LinEAS is exactly a re-parameterised LN tuning; RMSNorm (Llama, SmolLM2, Mistral, Qwen) has no bias, so the
  map's ``b`` is the one thing the model could not express before.
* Normalised activations have the same scale at every depth, so one learning rate and one loss scale serve every
  layer. The residual stream's norm grows with depth and carries a few "massive activation" coordinates, so a
  summed per-coordinate W2 loss on it would be dominated by the last layers and by those coordinates.
* The residual stream itself is never rescaled, so a strength between 0 and 1 moves the model smoothly.

Any other module can be named in ``target_modules`` (block outputs, ``mlp``, ``o_proj``…): the wrapper steers the
last dimension of whatever tensor (or first tuple element) the module returns.

The adapter holds ω and b of every steered module (2·Σ d_ℓ values, float32), saved by PEFT as
``adapter_model.safetensors``; loading checks their shapes and refuses non-finite values.
"""

from __future__ import annotations

import torch
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.tuners.tuners_utils import BaseTuner

from hf_compress.methods.lineas.config import LineasConfig, LineasPeftType, check_strength
from hf_compress.methods.lineas.layer import LineasLayer, steered_dim

__all__ = ["DEFAULT_TARGETS", "LineasModel", "lineas_layers", "register"]

_PRE_MLP_NORM = ["post_attention_layernorm"]
# model_type -> modules whose outputs are steered when target_modules is None
DEFAULT_TARGETS: dict[str, list[str]] = {
    **dict.fromkeys(("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "phi3", "gemma",
                     "olmo2", "gpt_neox"), _PRE_MLP_NORM),
    # Gemma-2/3 normalise the attention and MLP outputs before the residual add: the paper's modules exactly
    **dict.fromkeys(("gemma2", "gemma3_text"), ["post_attention_layernorm", "post_feedforward_layernorm"]),
    "gpt2": ["ln_2"],
    "opt": ["final_layer_norm"],
}


class LineasModel(BaseTuner):
    """The LinEAS tuner (``peft_model.base_model``); ``set_strength`` is reachable on the ``PeftModel`` itself.

    Lifecycle: ``get_peft_model`` wraps the target modules with identity maps (trainable); ``train_lineas`` fits
    them (:mod:`hf_compress.methods.lineas.train`); ``save_pretrained`` / ``PeftModel.from_pretrained`` store and
    restore ω, b and the strength.
    """

    prefix = "lineas_"
    tuner_layer_cls = LineasLayer
    target_module_mapping = DEFAULT_TARGETS

    def _prepare_adapter_config(self, peft_config: LineasConfig, model_config: dict) -> LineasConfig:
        if peft_config.target_modules is None:
            model_type = model_config.get("model_type")
            if model_type not in DEFAULT_TARGETS:
                raise ValueError(f"LinEAS has no default modules for model type {model_type!r}: pass "
                                 "LineasConfig(target_modules=[...]) naming the modules whose outputs to steer "
                                 f"(defaults exist for {', '.join(sorted(DEFAULT_TARGETS))})")
            peft_config.target_modules = list(DEFAULT_TARGETS[model_type])
        return peft_config

    def _create_and_replace(self, peft_config: LineasConfig, adapter_name, target, target_name, parent, current_key,
                            **kwargs) -> None:
        if isinstance(target, LineasLayer):
            target.update_layer(adapter_name, peft_config.strength, peft_config.inference_mode)
            return
        new = LineasLayer(target, adapter_name, steered_dim(target), peft_config.strength, peft_config.inference_mode)
        if adapter_name not in self.active_adapters:
            new.requires_grad_(False)
        self._replace_module(parent, target_name, new, target)

    def _check_merge_allowed(self):
        raise TypeError("a LinEAS adapter cannot be merged into the weights: it adds a bias after modules that have "
                        "none (e.g. RMSNorm); keep the PeftModel, or set its strength")

    # -- strength ---------------------------------------------------------------------------------------------------
    def set_strength(self, strength: float, adapter_name: str | None = None) -> None:
        """Set λ of ``adapter_name`` (default: the active one) in every steered module and in its config, so that a
        later ``save_pretrained`` records it. 0 is the base model exactly."""
        strength = check_strength(strength)
        name = adapter_name or self.active_adapters[0]
        if name not in self.peft_config:
            raise ValueError(f"no LinEAS adapter named {name!r}; adapters: {sorted(self.peft_config)}")
        for layer in lineas_layers(self.model):
            if name in layer.strength:
                layer.set_strength(strength, name)
        self.peft_config[name].strength = strength

    def get_strength(self, adapter_name: str | None = None) -> float:
        return self.peft_config[adapter_name or self.active_adapters[0]].strength

    # -- loading: PEFT's key mapping, plus checks that turn a corrupt adapter into a clear error ----------------
    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        for key, value in state_dict.items():
            if cls.prefix in key and not torch.isfinite(value).all():
                raise ValueError(f"the LinEAS adapter is corrupt: {key} holds NaN or inf values")
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        own = dict(model.named_parameters())
        for key, value in remapped.items():
            if key in own and own[key].shape != value.shape:
                raise ValueError(f"the LinEAS adapter does not fit this base model: {key} has shape "
                                 f"{tuple(value.shape)}, the model's steered module {tuple(own[key].shape)}")
        return remapped


def lineas_layers(model) -> list[LineasLayer]:
    """The steered modules of ``model`` (a PeftModel, its tuner or the wrapped base), in forward order."""
    return [m for m in model.modules() if isinstance(m, LineasLayer)]


def register() -> None:
    """Write the method into PEFT's type mappings (idempotent)."""
    key = LineasPeftType.LINEAS
    PEFT_TYPE_TO_CONFIG_MAPPING[key] = LineasConfig
    PEFT_TYPE_TO_TUNER_MAPPING[key] = LineasModel
    PEFT_TYPE_TO_PREFIX_MAPPING[key] = LineasModel.prefix


register()
