"""CSKV's initialisation: activation-scaled SVD (ASVD) of ``k_proj``/``v_proj`` into ``B·A``, and the conversion of a
Llama into a CSKV Llama.

ASVD (Yuan et al., arXiv 2312.05821): scale the weight's input channels by ``s^α`` (``s`` = mean |x| of the
projection's input on calibration text, α = 0.5 as in CSKV's release), truncate the SVD there, and undo the scaling
in ``A``: ``W ≈ B·A`` with ``B = U_r √Σ_r`` and ``A = √Σ_r V_rᵀ S⁻¹``. Channels that carry large activations are
approximated more closely, which is what the output error weights them by.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

ALPHA = 0.5


@torch.no_grad()
def collect_scales(model, batches: torch.Tensor, progress: bool = True) -> list[torch.Tensor]:
    """Per layer, the mean absolute value of every input channel of ``k_proj`` (= that of ``v_proj``)."""
    layers = _attention_layers(model)
    sums = [None] * len(layers)
    count = [0]

    def hook(i):
        def record(module, args):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1]).abs().sum(0)
            sums[i] = x if sums[i] is None else sums[i] + x
        return record

    handles = [attn.k_proj.register_forward_pre_hook(hook(i)) for i, attn in enumerate(layers)]
    try:
        device = next(model.parameters()).device
        for row in tqdm(batches, desc="CSKV activation scales", disable=not progress):
            model(row[None].to(device), use_cache=False)
            count[0] += row.numel()
    finally:
        for h in handles:
            h.remove()
    return [s / count[0] for s in sums]


def asvd_factors(weight: torch.Tensor, scale: torch.Tensor | None, rank: int, alpha: float = ALPHA):
    """``weight`` (out × in) ≈ ``B @ A`` with A (rank × in), B (out × rank); ``scale=None`` is the plain SVD."""
    w = weight.double()
    s = torch.ones(w.shape[1], dtype=torch.float64) if scale is None else scale.double().clamp_min(1e-6) ** alpha
    u, sigma, vh = torch.linalg.svd(w * s, full_matrices=False)
    root = sigma[:rank].sqrt()
    a = (root[:, None] * vh[:rank]) / s
    b = u[:, :rank] * root
    return a.to(weight.dtype), b.to(weight.dtype)


def ranks_for(reduction: float, kv_dim: int, multiple: int = 8) -> int:
    """Latent rank that removes ``reduction`` of the ``kv_dim`` channels, rounded to a multiple of ``multiple``."""
    if not isinstance(reduction, (int, float)) or not 0 <= reduction < 1:
        raise ValueError(f"channel reduction must lie in [0, 1), got {reduction!r}")
    return max(multiple, int(round(kv_dim * (1 - reduction) / multiple)) * multiple)


def convert(model, reduction: float | None = None, rank_k=None, rank_v=None, scales=None, window: int = 32,
            latent_bits: int = 16, group_size: int = 32):
    """A :class:`CSKVLlamaForCausalLM` from a Llama-family ``model`` (weights shared, compressors initialised by
    ASVD with ``scales`` from :func:`collect_scales`, or plain SVD without).

    Args:
        reduction: fraction of key/value channels removed (0.8 → latents of 20 % of kv_dim), or give
        rank_k / rank_v: an int (every layer) or one int per layer.
        window: newest tokens whose exact K/V are kept.
        latent_bits: 16, or 8/4/2 to quantize the cached latents KIVI-style.
    """
    from hf_compress.methods.cskv.configuration import CSKVLlamaConfig, check_cskv
    from hf_compress.methods.cskv.modeling import CSKVLlamaForCausalLM

    layers = _attention_layers(model)
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_dim = cfg.num_key_value_heads * head_dim
    if (reduction is None) == (rank_k is None and rank_v is None):
        raise ValueError("give either `reduction` or `rank_k`/`rank_v`")
    if reduction is not None:
        rank_k = rank_v = ranks_for(reduction, kv_dim)
    per_layer = lambda r: list(r) if isinstance(r, (list, tuple)) else [r] * len(layers)  # noqa: E731
    settings = check_cskv({"rank_k": per_layer(rank_k), "rank_v": per_layer(rank_v if rank_v is not None else rank_k),
                           "window": window, "latent_bits": latent_bits, "group_size": group_size}, len(layers), kv_dim)
    if scales is not None and len(scales) != len(layers):
        raise ValueError(f"{len(scales)} activation scales for {len(layers)} layers")
    data = cfg.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "cskv", "kv_cache_plan"):
        data.pop(key, None)
    config = CSKVLlamaConfig(**data, cskv=settings)
    config._attn_implementation = cfg._attn_implementation
    dtype = next(model.parameters()).dtype
    new = CSKVLlamaForCausalLM(config).to(dtype)
    missing, unexpected = new.load_state_dict(model.state_dict(), strict=False)
    if unexpected or any(n.rsplit(".", 2)[-2] not in ("k_a", "k_b", "v_a", "v_b") for n in missing):
        raise ValueError(f"model does not match a Llama layout: missing {missing[:4]}, unexpected {unexpected[:4]}")
    with torch.no_grad():
        for i, (old, attn) in enumerate(zip(layers, new.model.layers)):
            scale = None if scales is None else scales[i]
            for proj, a, b, rank in ((old.k_proj, attn.self_attn.k_a, attn.self_attn.k_b, settings["rank_k"][i]),
                                     (old.v_proj, attn.self_attn.v_a, attn.self_attn.v_b, settings["rank_v"][i])):
                wa, wb = asvd_factors(proj.weight.float(), scale, rank)
                a.weight.copy_(wa), b.weight.copy_(wb)
                if proj.bias is not None:
                    b.bias.copy_(proj.bias)
    new.generation_config = model.generation_config
    return new.eval()


def _attention_layers(model) -> list:
    """The attention modules, refusing models without Llama's separate k_proj/v_proj and rotary layout."""
    kind = getattr(model.config, "model_type", None)
    layers = getattr(getattr(model, "model", None), "layers", None)
    if kind not in ("llama", "hfc_cskv_llama") or layers is None:
        raise ValueError(f"CSKV needs a Llama-family model (separate k_proj/v_proj, rotary positions, full "
                         f"attention); got model_type {kind!r}")
    attns = [layer.self_attn for layer in layers]
    if not all(hasattr(a, "k_proj") and hasattr(a, "v_proj") for a in attns):
        raise ValueError("CSKV needs separate k_proj and v_proj in every attention layer")
    return attns
