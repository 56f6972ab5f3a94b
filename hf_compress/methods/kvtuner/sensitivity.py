"""KVTuner's offline sensitivity: how much each layer's attention output moves when its K and V are quantized.

For every decoder layer and every candidate (K bits, V bits) pair we measure the relative error
``‖O(K̂, V̂) − O(K, V)‖² / ‖O(K, V)‖²`` of the attention output on calibration text (KVTuner, arXiv 2502.04420,
§4: the attention-output error is the quantity per-layer sensitivities are defined on). The model runs at full
precision throughout, so each layer is scored on the inputs it sees in the unquantized model; the quantized
outputs are computed on the side and discarded. The probe is an attention function registered with
transformers' ``AttentionInterface`` for the duration of the pass: it sees the post-RoPE keys exactly as the
cache would store them.
"""

from __future__ import annotations

import contextlib

import torch
from tqdm.auto import tqdm

from hf_compress.kv_cache.quantizer import fake_quantize

PROBE = "hfc_kv_sensitivity"


@torch.no_grad()
def pair_errors(model, batches: torch.Tensor, pairs: list[tuple[int, int]], group_size: int = 32,
                progress: bool = True) -> torch.Tensor:
    """``[num_layers, len(pairs)]`` mean relative attention-output error of each layer under each pair.

    Args:
        model: a transformers causal LM with full-attention layers (fp32 or bf16).
        batches: token windows ``[N, T]``; ``T`` is cut to a multiple of ``group_size`` (keys are quantized in
            whole token groups).
        pairs: candidate (key bits, value bits).
        group_size: the KIVI group of the cache the plan is for.
    """
    text = model.config.get_text_config(decoder=True)
    t = batches.shape[1] // group_size * group_size
    if t == 0:
        raise ValueError(f"calibration windows of {batches.shape[1]} tokens are shorter than one group ({group_size})")
    totals = torch.zeros(text.num_hidden_layers, len(pairs), dtype=torch.float64)
    device = next(model.parameters()).device
    with _probe(model, pairs, group_size, totals):
        for row in tqdm(batches[:, :t], desc="KV sensitivity", disable=not progress):
            model(row[None].to(device), use_cache=False)
    return (totals / batches.shape[0]).float()


@contextlib.contextmanager
def _probe(model, pairs, group_size, totals):
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def attention(module, query, key, value, attention_mask, **kwargs):
        out, weights = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
        ref = out.float()
        norm = ref.pow(2).sum().clamp_min(1e-30)
        cache = {}
        for j, (kb, vb) in enumerate(pairs):
            k = cache.setdefault(("k", kb), fake_quantize(key, kb, "channel", group_size))
            v = cache.setdefault(("v", vb), fake_quantize(value, vb, "token", group_size))
            approx, _ = sdpa_attention_forward(module, query, k, v, attention_mask, **kwargs)
            totals[module.layer_idx, j] += float((approx.float() - ref).pow(2).sum() / norm)
        return out, weights

    AttentionInterface.register(PROBE, attention)
    previous = model.config._attn_implementation
    model.set_attn_implementation(PROBE)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)
