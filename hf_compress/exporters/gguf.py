"""Export a (packed) Llama-architecture model as one GGUF file that llama.cpp and transformers read.

Weights: packed modules become ggml blocks carrying our codes unchanged (``gguf_blocks``); what has no exact
block type is refused with the module names, or written as F16 with ``widen=True`` (the size cost is
reported). Norms are F32 (llama.cpp requires it), other dense tensors F16. A head tied to the embeddings is
not written (llama.cpp and transformers then reuse ``token_embd``). Q and K rows are permuted into llama.cpp's
rotary layout, as its own converter does. Metadata: the ``llama.*`` hyper-parameters and, for byte-level BPE
tokenizers (``tokenizer.json`` with a BPE model), the vocabulary, token types, merges and special ids.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from hf_compress.exporters import is_tied
from hf_compress.exporters.gguf_blocks import block_type, encode
from hf_compress.formats.linear import PackedLinear

SUPPORTED = ("llama",)
BLOCK_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
TOP_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


@dataclass
class GgufReport:
    """What went where: per written tensor its ggml type, and the modules widened to F16 (with why)."""

    path: Path
    types: dict[str, str] = field(default_factory=dict)
    widened: dict[str, str] = field(default_factory=dict)
    widened_extra_bytes: int = 0


def gguf_name(hf_name: str) -> str | None:
    if hf_name in TOP_NAMES:
        return TOP_NAMES[hf_name]
    parts = hf_name.split(".")
    if len(parts) >= 4 and parts[:2] == ["model", "layers"]:
        rest = BLOCK_NAMES.get(".".join(parts[3:]))
        return None if rest is None else f"blk.{parts[2]}.{rest}"
    return None


def _permute_rows(rows: np.ndarray, n_head: int) -> np.ndarray:
    """HF → llama.cpp rotary layout of Q/K output rows (the inverse of transformers' ``_reverse_permute``)."""
    return rows.reshape(n_head, 2, rows.shape[0] // n_head // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def _modules(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if gguf_name(name) is not None}


def plan_check(model: nn.Module, widen: bool) -> dict[str, str]:
    """Modules without an exact block type → reason; refused (ValueError listing them) unless ``widen``."""
    bad = {}
    for name, module in _modules(model).items():
        if isinstance(module, PackedLinear):
            kind, reason = block_type(module)
            if kind is None:
                bad[name] = reason
    if bad and not widen:
        listed = "; ".join(f"{n}: {r}" for n, r in list(bad.items())[:6])
        raise ValueError(f"GGUF cannot hold {len(bad)} packed module(s) exactly ({listed}{'; …' if len(bad) > 6 else ''}); "
                         "pass widen=True (CLI: --widen) to write them as F16, with the size cost reported")
    return bad


def write_gguf(model: nn.Module, path: Path, tokenizer=None, widen: bool = False) -> GgufReport:
    import gguf

    cfg = model.config
    if getattr(cfg, "model_type", None) not in SUPPORTED:
        raise ValueError(f"GGUF export supports {SUPPORTED} models, not {getattr(cfg, 'model_type', type(model).__name__)!r}")
    bad = plan_check(model, widen)
    report = GgufReport(Path(path))
    writer = gguf.GGUFWriter(str(path), "llama")
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    writer.add_name(str(getattr(cfg, "_name_or_path", "") or "hf-compress export"))
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(float(_rope_theta(cfg)))
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(cfg.vocab_size)
    if tokenizer is not None:
        _add_tokenizer(writer, tokenizer, cfg.vocab_size)
    tied = is_tied(model)
    for name, module in _modules(model).items():
        if name == "lm_head" and tied:
            continue
        target = gguf_name(name) + ".weight"
        heads = {"attn_q": cfg.num_attention_heads, "attn_k": cfg.num_key_value_heads}.get(target.split(".")[-2])
        if isinstance(module, PackedLinear) and name not in bad:
            kind = block_type(module)[0]
            data = encode(module, kind)
            if heads:
                data = _permute_rows(data, heads)
            writer.add_tensor(target, data, raw_dtype=getattr(gguf.GGMLQuantizationType, kind))
            report.types[target] = kind
            continue
        if isinstance(module, PackedLinear):
            weight = module.dequantized_weight(torch.float32)
            report.widened[name] = bad[name]
            report.widened_extra_bytes += weight.numel() * 2 - sum(
                t.numel() * t.element_size() for t in module.buffers() if t is not None)
        else:
            weight = module.weight.detach().float()
        array = weight.cpu().numpy()
        if heads:
            array = _permute_rows(array, heads)
        norm = target.endswith("norm.weight")
        array = array.astype(np.float32 if norm else np.float16)
        writer.add_tensor(target, array)
        report.types[target] = "F32" if norm else "F16"
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return report


def _rope_theta(cfg) -> float:
    params = getattr(cfg, "rope_parameters", None) or {}
    return params.get("rope_theta") or getattr(cfg, "rope_theta", None) or 10000.0


def tokenizer_is_bpe(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is not None and json.loads(backend.to_str()).get("model", {}).get("type") == "BPE"


def _add_tokenizer(writer, tokenizer, vocab_size: int) -> None:
    """Byte-level BPE vocabularies (GPT-2 style, what SmolLM2, Llama 3, Qwen use) as llama.cpp's "gpt2" model."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise ValueError(f"GGUF export writes byte-level BPE tokenizers; this one is {model.get('type') or type(tokenizer).__name__} "
                         "(pass tokenizer=None to export the weights alone)")
    vocab = tokenizer.get_vocab()
    tokens = [""] * vocab_size
    for token, idx in vocab.items():
        if idx < vocab_size:
            tokens[idx] = token
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    added = {t.get("id") for t in spec.get("added_tokens", []) if t.get("special")}
    types = [3 if i in special or i in added else (5 if not tokens[i] else 1) for i in range(vocab_size)]
    tokens = [t or f"[PAD{i}]" for i, t in enumerate(tokens)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for setter, token_id in (("add_bos_token_id", tokenizer.bos_token_id), ("add_eos_token_id", tokenizer.eos_token_id),
                             ("add_unk_token_id", tokenizer.unk_token_id), ("add_pad_token_id", tokenizer.pad_token_id)):
        if token_id is not None:
            getattr(writer, setter)(int(token_id))
    writer.add_add_bos_token(False)
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)


def plan(model: nn.Module, widen: bool = False, servable: str = "refuse") -> dict[str, str]:
    """Export-time check (``servable`` is compressed-tensors' and does not apply here)."""
    if getattr(model.config, "model_type", None) not in SUPPORTED:
        raise ValueError(f"GGUF export supports {SUPPORTED} models, not {getattr(model.config, 'model_type', type(model).__name__)!r}")
    return plan_check(model, widen)


def write(model: nn.Module, folder: Path, bad: dict[str, str], tokenizer=None, dtype=None) -> dict:
    name = Path(str(getattr(model.config, "_name_or_path", "") or "model")).name or "model"
    report = write_gguf(model, folder / f"{name}.gguf", tokenizer=tokenizer, widen=bool(bad))
    return {"file": report.path.name, "types": report.types, "widened": report.widened,
            "extra_bytes": report.widened_extra_bytes, "tokenizer": tokenizer is not None,
            "readers": ["transformers GGUF loader (from_pretrained(dir, gguf_file=...))", "gguf package reader"]}
