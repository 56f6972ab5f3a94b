"""The auxiliary loss of Baroni et al. 2025: make residual norms uniform at the final norm's input, so that
``ln_f`` can become a constant without hurting the tokens whose σ is far from the average."""

from __future__ import annotations

import torch
from transformers import Trainer

from hf_compress.methods.ln_free.swap import architecture


def residual_norm_loss(resid: torch.Tensor, centre: bool = True) -> torch.Tensor:
    """``mean((σ_token - σ_target)²)``, σ_target the (detached) mean per-token σ of ``resid`` ``[B, T, C]``."""
    x = resid.float()
    std = x.std(-1, unbiased=False) if centre else x.pow(2).mean(-1).sqrt()
    return (std - std.mean().detach()).pow(2).mean()


def final_norm(model):
    return model.transformer.ln_f if architecture(model) == "gpt2" else model.model.norm


class LNFreeTrainer(Trainer):
    """A ``Trainer`` that adds ``aux_loss_weight · residual_norm_loss(input of ln_f)`` to the training loss.

    Args:
        aux_loss_weight: the weight (the paper uses 0.1 for GPT-2 small/medium, 0.03 large, 0.01 XL); 0 disables.
    """

    def __init__(self, *args, aux_loss_weight: float = 0.1, **kwargs):
        if not isinstance(aux_loss_weight, int | float) or aux_loss_weight < 0:
            raise ValueError(f"aux_loss_weight must be a number >= 0, got {aux_loss_weight!r}")
        super().__init__(*args, **kwargs)
        self.aux_loss_weight = float(aux_loss_weight)
        self.aux_history: list[float] = []  # unweighted aux loss per training forward, for loss curves

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.aux_loss_weight == 0 or not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        norm = final_norm(model)
        captured = []
        handle = norm.register_forward_pre_hook(lambda m, args: captured.append(args[0]))
        try:
            result = super().compute_loss(model, inputs, True, num_items_in_batch)
        finally:
            handle.remove()
        loss, outputs = result
        aux = residual_norm_loss(captured[0], getattr(norm, "centre", True))
        self.aux_history.append(float(aux.detach()))
        loss = loss + self.aux_loss_weight * aux
        return (loss, outputs) if return_outputs else loss
