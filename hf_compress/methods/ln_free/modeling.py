"""Structurally LN-free GPT-2 and Llama: every norm is an affine map, so the model is linear in the residual
stream except for attention softmax and the MLP nonlinearity, and direct logit attribution is exact.

State-dict names are those of GPT-2 / Llama (``ln_1.weight`` …); only the maths of the norm modules differs. The
classes register with the Auto classes when hf-compress is imported (or by its interpreter-start hook), so plain
``AutoModelForCausalLM.from_pretrained`` loads an export.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.gpt2.modeling_gpt2 import GPT2LMHeadModel
from transformers.models.llama.modeling_llama import LlamaForCausalLM

from hf_compress.integrations.hub import HubCardMixin

from hf_compress.methods.ln_free.configuration import LNFreeGPT2Config, LNFreeLlamaConfig
from hf_compress.methods.ln_free.norms import first_rows
from hf_compress.methods.ln_free.swap import install_position_hook


class AffineNorm(nn.Module):
    """``(x - μ(x)) ⊙ w + b`` (``centre``) or ``x ⊙ w``: a LayerNorm/RMSNorm whose σ is a folded constant.

    ``position0``: the token at position 0 uses its own ``weight_first`` (γ/σ_pos0; the position-0 σ of an LN
    removal run that kept it). Still affine per token, so direct logit attribution stays exact.
    """

    uses_position0 = True

    def __init__(self, hidden_size: int, centre: bool = True, bias: bool = True, position0: bool = False):
        super().__init__()
        self.centre = centre
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.bias = nn.Parameter(torch.zeros(hidden_size)) if bias else None
        self.weight_first = nn.Parameter(torch.ones(hidden_size)) if position0 else None
        self._first = None

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        """The per-token weight for ``x [..., T, C]``: ``weight``, or ``weight_first`` at position 0."""
        if self.weight_first is None:
            return self.weight
        return torch.where(first_rows(self._first, x), self.weight_first, self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.centre:
            x = x - x.mean(-1, keepdim=True)
        x = x * self.scale(x)
        return x + self.bias if self.bias is not None else x

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, centre={self.centre}, position0={self.weight_first is not None}"


class LNFreeGPT2LMHeadModel(HubCardMixin, GPT2LMHeadModel):
    """GPT-2 with :class:`AffineNorm` in place of every LayerNorm (export of an LN-removal fine-tune)."""

    config_class = LNFreeGPT2Config

    def __init__(self, config: LNFreeGPT2Config):
        super().__init__(config)
        width, p0 = config.hidden_size, bool(getattr(config, "position0_scale", False))
        for block in self.transformer.h:
            block.ln_1, block.ln_2 = AffineNorm(width, position0=p0), AffineNorm(width, position0=p0)
        self.transformer.ln_f = AffineNorm(width, position0=p0)
        self.post_init()
        if p0:
            install_position_hook(self.transformer)

    def _init_weights(self, module):
        if isinstance(module, AffineNorm):
            with torch.no_grad():
                module.weight.fill_(1.0)
                if module.bias is not None:
                    module.bias.zero_()
                if module.weight_first is not None:
                    module.weight_first.fill_(1.0)
            return
        super()._init_weights(module)


class LNFreeLlamaForCausalLM(HubCardMixin, LlamaForCausalLM):
    """Llama with constant-scale norms ``x ⊙ w`` (RMSNorm always divides by the RMS, so a plain Llama cannot)."""

    config_class = LNFreeLlamaConfig

    def __init__(self, config: LNFreeLlamaConfig):
        super().__init__(config)
        width, p0 = config.hidden_size, bool(getattr(config, "position0_scale", False))
        for layer in self.model.layers:
            layer.input_layernorm = AffineNorm(width, centre=False, bias=False, position0=p0)
            layer.post_attention_layernorm = AffineNorm(width, centre=False, bias=False, position0=p0)
        self.model.norm = AffineNorm(width, centre=False, bias=False, position0=p0)
        self.post_init()
        if p0:
            install_position_hook(self.model)

    def _init_weights(self, module):
        if isinstance(module, AffineNorm):
            with torch.no_grad():
                module.weight.fill_(1.0)
                if module.weight_first is not None:
                    module.weight_first.fill_(1.0)
            return
        super()._init_weights(module)


def register() -> None:
    """Make ``AutoModelForCausalLM`` know the LN-free architectures (idempotent)."""
    from transformers.models.auto.modeling_auto import AutoModelForCausalLM

    from hf_compress.methods.ln_free.configuration import register as register_config

    register_config()
    AutoModelForCausalLM.register(LNFreeGPT2Config, LNFreeGPT2LMHeadModel, exist_ok=True)
    AutoModelForCausalLM.register(LNFreeLlamaConfig, LNFreeLlamaForCausalLM, exist_ok=True)
