"""CSKV: low-rank key/value latents cached pre-RoPE, RoPE re-applied, exact K/V for a recent window.

Exactness anchors: at full rank the latent path must reproduce the dense model (RoPE re-applied at the stored
positions, also under left padding and beam reordering); with a window covering every token the output is the
dense model's whatever the rank. Below full rank: ASVD beats plain SVD where activations are uneven, training
lowers the reconstruction error, and the cache really holds fewer bytes.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import subprocess_env
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from hf_compress.kv_cache import cache_bytes
from hf_compress.methods.cskv import CSKVCacheLayer, asvd_factors, collect_scales, convert, train_reconstruction

VOCAB, KV_DIM = 128, 64  # 2 KV heads × head_dim 32


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=128, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=512)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def batches():
    return torch.randint(1, VOCAB, (4, 96), generator=torch.Generator().manual_seed(3))


def prompt(batch=1, length=70, seed=1):
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def gen(m, ids, cache=None, **kw):
    kw = {"max_new_tokens": 30, "do_sample": False, "pad_token_id": 0, "output_logits": True,
          "return_dict_in_generate": True, **kw}
    return m.generate(ids, cache=cache, **kw) if cache is not None else m.generate(ids, **kw)


def rel_error(a, b) -> float:
    return max(float((x - y).norm() / y.norm()) for x, y in zip(a.logits, b.logits))


def test_full_rank_latent_path_reproduces_the_dense_model(model, batches):
    full = convert(model, rank_k=KV_DIM, rank_v=KV_DIM, scales=collect_scales(model, batches, progress=False))
    ids = prompt(length=100)
    ref = gen(model, ids, DynamicCache(config=model.config))
    out = gen(full, ids)  # no cache argument: the CSKV cache comes from the config
    assert isinstance(out.past_key_values.layers[0], CSKVCacheLayer)
    assert out.past_key_values.layers[0]._ck.tail.shape[-2] == 129  # latents of every fed token (the last one is never fed)
    assert torch.equal(out.sequences, ref.sequences)
    assert rel_error(out, ref) < 1e-4
    # a plain forward (no cache) attends through the reconstructions: the dense model at full rank
    torch.testing.assert_close(full(ids).logits, model(ids).logits, atol=1e-4, rtol=1e-4)


def test_window_covering_every_token_is_exact_at_any_rank(model):
    low = convert(model, rank_k=8, rank_v=8, window=200)
    ids = prompt(length=50)
    ref = gen(model, ids, DynamicCache(config=model.config))
    out = gen(low, ids)
    assert torch.equal(out.sequences, ref.sequences)
    assert all(torch.equal(a, b) for a, b in zip(out.logits, ref.logits))


def test_left_padding_beam_search_and_continuation_at_full_rank(model):
    full = convert(model, rank_k=KV_DIM, rank_v=KV_DIM, window=8)
    ids = prompt(batch=2, length=60)
    mask = torch.ones_like(ids)
    ids[1, :20], mask[1, :20] = 0, 0
    ref = gen(model, ids, DynamicCache(config=model.config), attention_mask=mask)
    out = gen(full, ids, attention_mask=mask)
    assert torch.equal(out.sequences, ref.sequences)  # stored positions follow the padded rows' position ids
    kw = {"num_beams": 3, "output_logits": False}
    assert torch.equal(gen(full, prompt(), **kw).sequences,
                       gen(model, prompt(), DynamicCache(config=model.config), **kw).sequences)
    low = convert(model, reduction=0.5, window=8, latent_bits=4)
    whole = gen(low, prompt(), max_new_tokens=40)
    first = gen(low, prompt(), max_new_tokens=20)
    second = gen(low, first.sequences, first.past_key_values, max_new_tokens=20)
    assert torch.equal(second.sequences, whole.sequences)


def test_asvd_beats_plain_svd_when_activations_are_uneven():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 128, generator=g)
    x = torch.randn(2048, 128, generator=g)
    x[:, :8] *= 20  # a few outlier channels, as in LLM activations
    scale = x.abs().mean(0)
    errors = {}
    for name, s in (("svd", None), ("asvd", scale)):
        a, b = asvd_factors(w, s, rank=16)
        errors[name] = float((x @ w.T - x @ a.T @ b.T).pow(2).mean())
    assert errors["asvd"] < 0.8 * errors["svd"], errors
    a, b = asvd_factors(w, scale, rank=64)
    torch.testing.assert_close(b @ a, w, atol=1e-4, rtol=1e-4)  # full rank is exact


def test_training_lowers_reconstruction_error_and_output_error(model, batches):
    low = convert(model, reduction=0.75, window=8, scales=collect_scales(model, batches, progress=False))
    ids = prompt(length=80)
    ref = gen(model, ids, DynamicCache(config=model.config))
    before = rel_error(gen(low, ids), ref)
    frozen = {n: p.clone() for n, p in low.named_parameters() if n.rsplit(".", 2)[-2] not in ("k_a", "k_b", "v_a", "v_b")}
    losses = train_reconstruction(low, model, batches, steps=60, lr=3e-3, progress=False)
    assert losses[-1] < 0.8 * losses[0], losses[:1] + losses[-1:]
    assert rel_error(gen(low, ids), ref) < before
    assert all(torch.equal(p, frozen[n]) for n, p in low.named_parameters() if n in frozen)  # only A/B moved


def test_cache_bytes_shrink_with_rank_and_latent_bits(model):
    ids = prompt(length=300)
    dense = cache_bytes(gen(model, ids, DynamicCache(config=model.config), max_new_tokens=1).past_key_values)
    sizes = {}
    for reduction, bits in ((0.5, 16), (0.75, 16), (0.75, 4)):
        out = gen(convert(model, reduction=reduction, latent_bits=bits), ids, max_new_tokens=1)
        sizes[(reduction, bits)] = cache_bytes(out.past_key_values)
    assert sizes[(0.75, 4)] < sizes[(0.75, 16)] < sizes[(0.5, 16)] < dense
    layer = out.past_key_values.layers[0]
    assert layer._ck.blocks.packed.dtype == torch.uint8 and layer._pos.dtype == torch.int16


def test_bad_input_raises_at_construction(model):
    with pytest.raises(ValueError, match="rank"):
        convert(model, rank_k=KV_DIM + 1, rank_v=8)
    with pytest.raises(ValueError, match="reduction"):
        convert(model, reduction=1.0)
    with pytest.raises(ValueError, match="bits"):
        convert(model, reduction=0.5, latent_bits=3)
    with pytest.raises(ValueError, match="one rank per decoder layer"):
        convert(model, rank_k=[8, 8], rank_v=8)
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=64))
    with pytest.raises(ValueError, match="Llama-family"):
        convert(gpt2, reduction=0.5)
    with pytest.raises(TypeError, match="latents"):
        CSKVCacheLayer(8, 8).update(torch.zeros(1, 2, 1, 32), torch.zeros(1, 2, 1, 32))


def test_saves_and_loads_natively_in_a_fresh_process(model, tmp_path):
    low = convert(model, reduction=0.5, latent_bits=4, window=16)
    ids = prompt(length=70)
    expected = gen(low, ids).sequences
    low.save_pretrained(tmp_path / "cskv")
    config = json.loads((tmp_path / "cskv" / "config.json").read_text())
    assert config["model_type"] == "hfc_cskv_llama" and config["cskv"]["latent_bits"] == 4
    assert "CSKV" in (tmp_path / "cskv" / "README.md").read_text()
    script = ("import sys, json, torch; from transformers import AutoModelForCausalLM;"
              "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]);"
              "out = m.generate(torch.tensor(json.loads(sys.argv[2])), max_new_tokens=30, do_sample=False,"
              " pad_token_id=0, return_dict_in_generate=True);"
              "print(json.dumps({'seq': out.sequences.tolist(), 'layer': repr(out.past_key_values.layers[0])}))")
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "cskv"), json.dumps(ids.tolist())],
                          cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["layer"].startswith("CSKVCacheLayer(rank_k=32")
    assert got["seq"] == expected.tolist()
