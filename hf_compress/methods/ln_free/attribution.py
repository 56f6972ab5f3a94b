"""Direct logit attribution on a structurally LN-free GPT-2: exact, because ``ln_f`` is affine.

``logits = W_U((x - μ(x)) ⊙ w + b)`` with ``x = embed + Σ attn_l + Σ mlp_l``; centring is linear, so
``logits = Σ_c W_U((c - μ(c)) ⊙ w) + W_U b`` — one term per component plus a constant, summing to the logits.
"""

from __future__ import annotations

import torch

from hf_compress.methods.ln_free.modeling import AffineNorm


@torch.no_grad()
def direct_logit_attribution(model, input_ids: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """``({component: logit contribution [B, T, V]}, logits)`` for a structural LN-free GPT-2 export.

    Components: ``embed`` (token + position), ``attn.{l}``, ``mlp.{l}`` and ``bias`` (ln_f's bias through the
    unembedding). Their sum equals the logits up to float rounding.
    """
    ln_f = getattr(getattr(model, "transformer", None), "ln_f", None)
    if not isinstance(ln_f, AffineNorm):
        raise TypeError("direct_logit_attribution needs a structurally LN-free GPT-2 (export_structural)")
    outputs, handles = {}, []
    for i, block in enumerate(model.transformer.h):
        handles.append(block.attn.register_forward_hook(lambda m, a, o, i=i: outputs.__setitem__(f"attn.{i}", o[0])))
        handles.append(block.mlp.register_forward_hook(lambda m, a, o, i=i: outputs.__setitem__(f"mlp.{i}", o)))
    handles.append(model.transformer.drop.register_forward_hook(lambda m, a, o: outputs.__setitem__("embed", o)))
    try:
        logits = model(input_ids=input_ids, use_cache=False).logits
    finally:
        for h in handles:
            h.remove()
    unembed = model.lm_head.weight
    order = ["embed"] + [f"{k}.{i}" for i in range(len(model.transformer.h)) for k in ("attn", "mlp")]
    contributions = {}
    for name in order:
        c = outputs[name]
        contributions[name] = ((c - c.mean(-1, keepdim=True)) * ln_f.scale(c)) @ unembed.T
    contributions["bias"] = (ln_f.bias @ unembed.T).expand_as(logits)
    return contributions, logits
