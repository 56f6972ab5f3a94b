"""RSQ: rotation invariance (tiny and SmolLM2), attention-concentration weights against eager attention maps,
token-weighted Hessians, RSQConfig through the ways in with fresh-process round trips, and bad input."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import hf_compress
from hf_compress import BAQConfig, GPTQConfig, RSQConfig
from hf_compress.calibration.runner import collect_stats
from hf_compress.formats.linear import PackedLinear
from hf_compress.methods.rsq.rotation import random_orthogonal, rotate_model, sylvester_hadamard
from hf_compress.methods.rsq.token_weighting import attention_concentration, importance_weights

from conftest import fresh_process_logits, save_char_tokenizer, tiny_gpt2, tiny_llama

IDS = torch.tensor([[5, 17, 99, 3, 64, 120, 7, 7, 31, 2]])


def tied_llama(seed=0, hidden=48, heads=3):
    """Like SmolLM2 in the ways that matter here: tied embeddings, GQA, a hidden size that is not a power of
    two (48 = 3·16) and random (non-unit) norm gains."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=96, num_hidden_layers=2, num_attention_heads=heads,
                      num_key_value_heads=1, vocab_size=128, tie_word_embeddings=True, max_position_embeddings=128)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand_like(p) + 0.5)
    return model


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("n", [16, 48, 64, 576, 9])
def test_orthogonal_constructions(n):
    Q = random_orthogonal(n, seed=3)
    assert torch.allclose(Q @ Q.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert (Q.abs() > 1e-12).float().mean() > 0.99  # dense: every output mixes every input
    assert not torch.equal(Q, random_orthogonal(n, seed=4))
    assert torch.equal(Q, random_orthogonal(n, seed=3))
    with pytest.raises(ValueError, match="powers of two"):
        sylvester_hadamard(12)


def test_rotation_is_invariant_and_loads_natively(tmp_path):
    model = tied_llama()
    expect = logits(model)
    rotate_model(model, seed=1)
    assert not model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert torch.allclose(model.model.layers[0].input_layernorm.weight, torch.ones(48))
    got = logits(model)
    assert torch.allclose(got, expect, atol=1e-4), (got - expect).abs().max()
    model.save_pretrained(tmp_path / "r")
    assert torch.allclose(fresh_process_logits(tmp_path / "r", IDS, tmp_path), expect, atol=1e-4)
    # the weights really changed: outlier structure of a reading linear is spread out
    assert not torch.allclose(model.model.layers[0].self_attn.q_proj.weight, tied_llama().model.layers[0].self_attn.q_proj.weight)


def test_rotation_refuses_unsupported_models():
    with pytest.raises(ValueError, match="Llama-family"):
        rotate_model(tiny_gpt2())
    model = tied_llama()
    model.model.layers[0].input_layernorm.forward = lambda x: x * 2  # not an RMSNorm any more
    with pytest.raises(ValueError, match="not a plain RMSNorm"):
        rotate_model(model)
    q = hf_compress.quantize(tied_llama(), hf_compress.RTNConfig(bits=4, group_size=16), progress=False)
    with pytest.raises(ValueError, match="dense model"):
        rotate_model(q)


def test_attention_concentration_matches_eager_attention_maps():
    model = tied_llama()
    model.config._attn_implementation = "eager"
    captured = {}

    def grab(_m, args, kwargs):
        captured["args"], captured["kwargs"] = args, kwargs

    block = model.model.layers[1]
    h = block.register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        out = model(IDS, output_attentions=True)
    h.remove()
    expect = out.attentions[1][0].sum(dim=(0, 1))  # heads, queries
    got = attention_concentration(block, captured["args"], captured["kwargs"])
    assert torch.allclose(got, expect, atol=1e-5)
    w = importance_weights(got, 0.01)
    assert w.mean().item() == pytest.approx(1.0) and (w.max() / w.min()).item() == pytest.approx(100, rel=1e-4)


def test_token_weights_scale_the_hessian():
    lin = torch.nn.Linear(4, 3)
    x = torch.randn(1, 5, 4)
    w = torch.tensor([[0.1, 0.2, 3.0, 1.0, 0.7]])
    stats = collect_stats(lin, {"": lin}, [((x,), {})], "m", weights=[w])  # the block is the module itself
    X = x[0]
    expect = 2 * (X.T * w[0]) @ X / 5
    assert torch.allclose(stats[""].hessian, expect, atol=1e-6)


def test_rsq_round_trip_and_on_load(tmp_path, calib, char_tokenizer, text_corpus):
    model = tied_llama()
    dense = logits(model)
    config = RSQConfig(bits=4, group_size=16)
    hf_compress.quantize(model, config, calibration=calib, tokenizer=char_tokenizer, progress=False)
    assert isinstance(model.model.layers[0].self_attn.q_proj, PackedLinear)
    quant = logits(model)
    assert (quant - dense).norm() / dense.norm() < 0.2
    hf_compress.save_pretrained(model, tmp_path / "q")
    saved = json.loads((tmp_path / "q" / "config.json").read_text())
    assert saved["quantization_config"]["quant_method"] == "hfc_rsq" and saved["tie_word_embeddings"] is False
    assert torch.equal(fresh_process_logits(tmp_path / "q", IDS, tmp_path), quant)
    # quantize on load
    tied_llama().save_pretrained(tmp_path / "dense")
    save_char_tokenizer(tmp_path / "dense")
    (tmp_path / "c.txt").write_text(text_corpus)
    on_load = AutoModelForCausalLM.from_pretrained(
        tmp_path / "dense", quantization_config=RSQConfig(bits=4, group_size=16, dataset=str(tmp_path / "c.txt"),
                                                          num_samples=8, seq_len=64))
    assert torch.equal(logits(on_load), quant)  # same data, seeds and rotation: the same model
    on_load.save_pretrained(tmp_path / "q2")
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "q2")), quant)


def test_rotation_composes_with_baq(tmp_path, calib, char_tokenizer):
    config = BAQConfig(target_bits=3.0, group_size=16, rotate=True, token_weighting="attention", r_min=0.05)
    model = hf_compress.quantize(tied_llama(), config, calibration=calib, tokenizer=char_tokenizer, progress=False)
    assert model.model.layers[0].mlp.down_proj.spec.is_mixed
    expect = logits(model)
    model.save_pretrained(tmp_path / "q")
    assert torch.equal(fresh_process_logits(tmp_path / "q", IDS, tmp_path), expect)


def test_rsq_bad_input(calib, char_tokenizer):
    with pytest.raises(ValueError, match="r_min"):
        RSQConfig(r_min=0)
    with pytest.raises(ValueError, match="token_weighting"):
        GPTQConfig(token_weighting="magic")
    with pytest.raises(ValueError, match="Llama-family"):
        hf_compress.quantize(tiny_gpt2(), RSQConfig(group_size=16), calibration=calib, tokenizer=char_tokenizer, progress=False)
    with pytest.raises(ValueError, match="Llama-family"):  # token weighting alone also needs Llama-style attention
        hf_compress.quantize(tiny_gpt2(), RSQConfig(group_size=16, rotate=False), calibration=calib,
                             tokenizer=char_tokenizer, progress=False)
    with pytest.raises(ValueError, match="uses none"):
        hf_compress.quantize(tiny_llama(), hf_compress.RTNConfig(token_weighting="attention"), progress=False)


@pytest.mark.slow
def test_rotation_invariance_on_smollm2(smollm2_dir):
    from hf_compress.calibration.data import default_text_source
    from hf_compress.evaluation import perplexity
    from hf_compress.models import load_model

    from conftest import require_wikitext

    require_wikitext()
    model, tok = load_model(str(smollm2_dir))
    ids = tok("The quick brown fox jumps over the lazy dog. " * 8, return_tensors="pt").input_ids
    before = logits(model, ids)
    ppl_before = perplexity(model, tok, default_text_source("test"), 256, 4)
    rotate_model(model)
    after = logits(model, ids)
    assert (after - before).abs().max() < 2e-2 and (after - before).abs().mean() < 1e-3
    assert math.isclose(perplexity(model, tok, default_text_source("test"), 256, 4), ppl_before, rel_tol=1e-3)
