"""The recursive Llama architecture: L unrolled positions that share K = L/B blocks, stored once.

Why unrolled positions with shared ``nn.Parameter`` objects (the Mixture-of-Recursions layout) rather than K
modules called B times: every position keeps its own ``layer_idx``, so the KV cache, ``generate()``, gradient
checkpointing and PEFT (one LoRA per position) work unchanged. The sharing is declared through transformers'
own tied-weights mechanism, so ``save_pretrained`` writes only the K owners' tensors and ``from_pretrained``
re-ties the rest — a checkpoint of about 1/B of the decoder weights that plain ``AutoModelForCausalLM`` loads
wherever hf-compress is installed (the class is registered with the Auto classes at import).
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import LlamaForCausalLM

from hf_compress.integrations.hub import HubCardMixin

from hf_compress.methods.recursive.configuration import RecursiveLlamaConfig
from hf_compress.methods.recursive.sharing import loop_boundaries, position_groups


def layer_ties(config: RecursiveLlamaConfig, layer_param_names) -> dict[str, str]:
    """``{target: owner}`` for every parameter of a non-owning position (norms only when ``tie_norms``)."""
    ties = {}
    for group in position_groups(config.num_hidden_layers, config.num_loops, config.recursion_scheme):
        owner, *others = group
        for position in others:
            for name in layer_param_names:
                if "layernorm" in name and not config.tie_norms:
                    continue
                ties[f"model.layers.{position}.{name}"] = f"model.layers.{owner}.{name}"
    return ties


class RecursiveLlamaForCausalLM(HubCardMixin, LlamaForCausalLM):
    """Llama whose decoder positions share blocks; optional early-exit loss after every loop (CYCLE)."""

    config_class = RecursiveLlamaConfig

    def __init__(self, config: RecursiveLlamaConfig):
        super().__init__(config)
        ties = self.get_expanded_tied_weights_keys()
        # transformers reads these keys as regular expressions when it drops duplicates on save
        self._tied_weights_keys = {"^" + re.escape(t) + "$": s for t, s in ties.items()}
        self.all_tied_weights_keys = ties
        self.tie_weights(recompute_mapping=False)

    def get_expanded_tied_weights_keys(self, all_submodels: bool = False) -> dict:
        if all_submodels:
            return super().get_expanded_tied_weights_keys(all_submodels=True)
        ties = {"lm_head.weight": "model.embed_tokens.weight"} if self.config.tie_word_embeddings else {}
        names = [n for n, _ in self.model.layers[0].named_parameters()]
        ties.update(layer_ties(self.config, names))
        return ties

    def loop_boundaries(self) -> list[int]:
        return loop_boundaries(self.config.num_hidden_layers, self.config.num_loops, self.config.recursion_scheme)

    def exit_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Shared final norm + head on an intermediate hidden state (the paper's early-exit head)."""
        return self.lm_head(self.model.norm(hidden))

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                labels=None, use_cache=None, logits_to_keep=0, **kwargs):
        # explicit arguments: Trainer keeps only the dataset columns that forward's signature names
        kwargs.update(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      inputs_embeds=inputs_embeds, use_cache=use_cache, logits_to_keep=logits_to_keep)
        if cache is not None:
            kwargs["cache"] = cache
        weight = self.config.early_exit_loss_weight
        if not (self.training and weight > 0 and labels is not None):
            return super().forward(labels=labels, **kwargs)
        captured, handles = {}, []
        for b, position in enumerate(self.loop_boundaries()[:-1]):
            layer = self.model.layers[position]
            handles.append(layer.register_forward_hook(lambda m, i, o, b=b: captured.__setitem__(b, o)))
        try:
            out = super().forward(labels=labels, **kwargs)
        finally:
            for h in handles:
                h.remove()
        out.loss = out.loss + weight * self._intermediate_loss(captured, out.logits, labels)
        return out

    def _intermediate_loss(self, captured: dict, final_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Σ over earlier loops of CE (+ KL from the detached final loop): the paper's 'aggressive' 0.1 weighting."""
        shift_labels = labels[:, 1:].reshape(-1)
        mask = shift_labels != -100
        teacher = F.log_softmax(final_logits[:, :-1].detach().float(), -1).reshape(-1, final_logits.shape[-1])[mask]
        total = final_logits.new_zeros(())
        for b in sorted(captured):
            hidden = captured[b][0] if isinstance(captured[b], tuple) else captured[b]
            logits = self.exit_logits(hidden)[:, :-1].float().reshape(-1, final_logits.shape[-1])
            total = total + F.cross_entropy(logits, shift_labels, ignore_index=-100)
            if self.config.early_exit_distill and mask.any():
                student = F.log_softmax(logits[mask], -1)
                total = total + F.kl_div(student, teacher, log_target=True, reduction="batchmean")
        return total


def register() -> None:
    """Make ``AutoModelForCausalLM`` know the recursive architecture (idempotent)."""
    from transformers.models.auto.modeling_auto import AutoModelForCausalLM

    from hf_compress.methods.recursive.configuration import register as register_config

    register_config()
    AutoModelForCausalLM.register(RecursiveLlamaConfig, RecursiveLlamaForCausalLM, exist_ok=True)
