"""Per-layer quantized KV caches under generate(), and KVTuner's plan search / saved plan.

A tiny random Llama with head_dim 32 (one value group per head) runs every generate() mode: a 16-bit plan must
reproduce DynamicCache exactly; quantized plans must stay close, degrade with fewer bits, and really hold the
packed bytes they claim.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import pytest
import torch
from conftest import subprocess_env
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from hf_compress.kv_cache import KVPlan, QuantizedKVLayer, build_cache, cache_bytes

LAYERS, VOCAB = 3, 128


def kv_llama(seed: int = 0, layers: int = LAYERS):
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=128, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=512)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def model():
    return kv_llama()


def prompt(batch=1, length=50, seed=1):
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def run(model, ids, cache, **kw):
    kw = {"max_new_tokens": 40, "do_sample": False, "pad_token_id": 0, "output_logits": True,
          "return_dict_in_generate": True, **kw}
    return model.generate(ids, cache=cache, **kw)


def logit_error(a, b) -> float:
    """Max over steps of the relative L2 distance of the step logits."""
    return max(float((x - y).norm() / y.norm()) for x, y in zip(a.logits, b.logits))


def plan(bits_k, bits_v=None, **kw):
    return KVPlan.uniform(LAYERS, bits_k, bits_v, **kw)


# -- generate(): 16 bits is DynamicCache, quantized stays close -----------------------------------------------------
@pytest.mark.parametrize("length", [10, 50, 130])  # shorter than the 32-token window, a bit longer, several groups
def test_16_bit_plan_reproduces_dynamic_cache(model, length):
    ids = prompt(length=length)
    ref = run(model, ids, DynamicCache(config=model.config))
    out = run(model, ids, build_cache(plan(16), model.config))
    assert torch.equal(out.sequences, ref.sequences)
    assert all(torch.equal(a, b) for a, b in zip(out.logits, ref.logits))


def test_quantized_plans_stay_close_and_degrade_with_fewer_bits(model):
    ids = prompt(length=130)
    ref = run(model, ids, DynamicCache(config=model.config))
    errors = {b: logit_error(run(model, ids, build_cache(plan(b), model.config)), ref) for b in (8, 4, 2)}
    assert errors[8] < errors[4] < errors[2], errors
    assert errors[8] < 0.01 and errors[4] < 0.1, errors
    # mixed widths land between their uniform neighbours
    mixed = logit_error(run(model, ids, build_cache(plan(8, 4), model.config)), ref)
    assert errors[8] <= mixed <= errors[4] * 1.2, (mixed, errors)


def test_window_shorter_than_prompt_is_quantized_and_short_prompt_is_not(model):
    long_cache, short_cache = build_cache(plan(4), model.config), build_cache(plan(4), model.config)
    ref_short = run(model, prompt(length=10), DynamicCache(config=model.config), max_new_tokens=5)
    short = run(model, prompt(length=10), short_cache, max_new_tokens=5)
    # 15 tokens never leave the full-precision window: nothing is quantized, the run is exact
    assert torch.equal(short.sequences, ref_short.sequences)
    assert all(layer._keys.blocks.tokens == 0 for layer in short_cache.layers)
    run(model, prompt(length=130), long_cache, max_new_tokens=5)
    for layer in long_cache.layers:
        stored = layer._keys.blocks.tokens
        assert stored % 32 == 0 and 32 <= layer.get_seq_length() - stored < 64


def test_sampling_matches_dynamic_cache_at_16_bits_and_runs_quantized(model):
    ids = prompt()
    torch.manual_seed(7)
    ref = run(model, ids, DynamicCache(config=model.config), do_sample=True, top_k=20, temperature=0.9)
    torch.manual_seed(7)
    out = run(model, ids, build_cache(plan(16), model.config), do_sample=True, top_k=20, temperature=0.9)
    assert torch.equal(out.sequences, ref.sequences)
    torch.manual_seed(7)
    q = run(model, ids, build_cache(plan(4, 2), model.config), do_sample=True, top_k=20, temperature=0.9)
    assert q.sequences.shape == ref.sequences.shape and int(q.sequences.max()) < VOCAB


def test_beam_search(model):
    ids = prompt(length=70)
    kw = {"num_beams": 3, "num_return_sequences": 2, "output_logits": False, "max_new_tokens": 30}
    ref = run(model, ids, DynamicCache(config=model.config), **kw)
    out = run(model, ids, build_cache(plan(16), model.config), **kw)
    assert torch.equal(out.sequences, ref.sequences)
    q = run(model, ids, build_cache(plan(8), model.config), **kw)
    assert q.sequences.shape == ref.sequences.shape
    assert (q.sequences == ref.sequences).float().mean() > 0.9  # 8-bit beams follow the full-precision ones


def test_reorder_moves_every_stored_part_of_the_batch():
    torch.manual_seed(0)
    k, v = torch.randn(2, 2, 100, 32), torch.randn(2, 2, 100, 32)
    layer, swapped = QuantizedKVLayer(4, 2), QuantizedKVLayer(4, 2)
    layer.update(k, v)
    swapped.update(k.flip(0), v.flip(0))
    layer.reorder_cache(torch.tensor([1, 0]))
    nk, nv = torch.randn(2, 2, 1, 32), torch.randn(2, 2, 1, 32)
    a, b = layer.update(nk.flip(0), nv.flip(0)), swapped.update(nk.flip(0), nv.flip(0))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    layer.batch_repeat_interleave(2)
    assert layer.update(torch.randn(4, 2, 1, 32), torch.randn(4, 2, 1, 32))[0].shape == (4, 2, 102, 32)


def test_batch_with_left_padding(model):
    ids = prompt(batch=2, length=60)
    mask = torch.ones_like(ids)
    ids[1, :25], mask[1, :25] = 0, 0  # second row: 35 real tokens, left-padded
    kw = {"attention_mask": mask}
    ref = run(model, ids, DynamicCache(config=model.config), **kw)
    out = run(model, ids, build_cache(plan(16), model.config), **kw)
    assert torch.equal(out.sequences, ref.sequences)
    q = run(model, ids, build_cache(plan(8), model.config), **kw)
    assert logit_error(q, ref) < 0.01
    # the padded row decodes as it does alone (8-bit cache both times; padding only adds masked positions)
    alone = run(model, ids[1:, 25:], DynamicCache(config=model.config))
    assert (ref.sequences[1, 60:] == alone.sequences[0, 35:]).float().mean() > 0.9


@pytest.mark.parametrize("bits", [16, 4])
def test_continue_from_returned_cache(model, bits):
    ids = prompt(length=40)
    whole = run(model, ids, build_cache(plan(bits), model.config), max_new_tokens=40)
    first = run(model, ids, build_cache(plan(bits), model.config), max_new_tokens=20)
    second = run(model, first.sequences, first.past_key_values, max_new_tokens=20)
    assert torch.equal(second.sequences, whole.sequences)


# -- bytes -----------------------------------------------------------------------------------------------------------
def test_real_bytes_are_packed_codes_plus_fp16_statistics(model):
    ids = prompt(length=200)
    ref = run(model, ids, DynamicCache(config=model.config), max_new_tokens=1)
    sizes = {}
    for bits in (8, 4, 2):
        cache = build_cache(plan(bits), model.config)
        run(model, ids, cache, max_new_tokens=1)
        layer = cache.layers[0]
        n_q, tail = layer._keys.blocks.tokens, layer.get_seq_length() - layer._keys.blocks.tokens
        heads, dim = 2, 32
        codes = 2 * heads * n_q * dim * bits // 8  # keys + values, packed
        stats = 2 * 2 * heads * n_q * dim // 32 * 2  # scale + zero (fp16) per group of 32, keys + values
        full = 2 * heads * tail * dim * 4  # fp32 tail
        assert layer.nbytes() == codes + stats + full
        assert layer._keys.blocks.packed.dtype == torch.uint8
        sizes[bits] = cache_bytes(cache)
    dense = cache_bytes(ref.past_key_values)
    assert dense == LAYERS * 2 * 2 * 200 * 32 * 4
    assert sizes[2] < sizes[4] < sizes[8] < dense


# -- bad input at construction ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [3, 1, 32, 4.0, "4", True])
def test_unknown_bit_widths_raise(bad):
    with pytest.raises(ValueError, match="bits"):
        KVPlan.uniform(LAYERS, bad)
    with pytest.raises(ValueError, match="bits"):
        QuantizedKVLayer(key_bits=16, value_bits=bad)


def test_plan_for_wrong_number_of_layers_raises(model):
    with pytest.raises(ValueError, match="4 layers but the model has 3"):
        build_cache(KVPlan.uniform(4, 4), model.config)
    with pytest.raises(ValueError, match="key widths"):
        KVPlan([4, 4, 4], [4, 4])
    with pytest.raises(ValueError, match="unknown KV plan fields"):
        KVPlan.from_dict({"key_bits": [4] * 3, "value_bits": [4] * 3, "bits": 4})
    with pytest.raises(ValueError, match="group_size"):
        KVPlan.uniform(LAYERS, 4, group_size=0)


# -- KVTuner ---------------------------------------------------------------------------------------------------------
def test_knapsack_is_exact_and_nsga2_never_beats_it():
    from hf_compress.methods.kvtuner import knapsack_search, plan_error
    from hf_compress.methods.kvtuner.tune import DEFAULT_PAIRS, parse_pairs

    pairs = parse_pairs(DEFAULT_PAIRS)
    errors = torch.rand(4, len(pairs), generator=torch.Generator().manual_seed(0))
    for budget in (2.0, 3.0, 3.5, 5.0):
        choice = knapsack_search(errors, pairs, budget)
        feasible = [c for c in itertools.product(range(len(pairs)), repeat=4)
                    if sum(sum(pairs[j]) for j in c) <= 8 * budget]
        best = min(plan_error(errors, c) for c in feasible)
        assert sum(sum(pairs[j]) for j in choice) <= 8 * budget
        assert plan_error(errors, choice) == pytest.approx(best)
    pytest.importorskip("optuna")
    from hf_compress.methods.kvtuner import nsga2_search

    choice = nsga2_search(errors, pairs, 3.0, n_trials=60)
    assert sum(sum(pairs[j]) for j in choice) <= 24
    assert plan_error(errors, choice) >= plan_error(errors, knapsack_search(errors, pairs, 3.0)) - 1e-9
    with pytest.raises(ValueError, match="below the cheapest"):
        knapsack_search(errors, pairs, 1.5)


def test_sensitivity_orders_widths_and_plan_meets_budget(model):
    from hf_compress.methods.kvtuner import kv_plan, pair_errors
    from hf_compress.methods.kvtuner.tune import parse_pairs

    batches = prompt(batch=2, length=96)
    errors = pair_errors(model, batches, parse_pairs("KV8,KV4,KV2,K16V4"), progress=False)
    assert errors.shape == (LAYERS, 4)
    assert (errors[:, 0] < errors[:, 1]).all() and (errors[:, 1] < errors[:, 2]).all()
    assert model.config._attn_implementation != "hfc_kv_sensitivity"  # the probe is removed afterwards
    p = kv_plan(model, batches, 3.0, progress=False)
    assert p.average_bits <= 3.0 and p.num_layers == LAYERS
    with pytest.raises(ValueError, match="unknown KV pair"):
        kv_plan(model, batches, 3.0, pairs="KV8,KV3")


def test_saved_plan_is_used_by_plain_from_pretrained_generate_in_a_fresh_process(model, tmp_path):
    from hf_compress.methods.kvtuner import with_kv_plan

    p = KVPlan([8, 4, 2], [4, 2, 2])
    planned = with_kv_plan(model, p)
    ids = prompt(length=70)
    expected = run(model, ids, build_cache(p, model.config), max_new_tokens=30)
    assert torch.equal(run(planned, ids, None, max_new_tokens=30).sequences, expected.sequences)  # no cache argument
    planned.save_pretrained(tmp_path / "planned")
    assert "KVTuner" in (tmp_path / "planned" / "README.md").read_text()
    assert json.loads((tmp_path / "planned" / "config.json").read_text())["kv_cache_plan"]["key_bits"] == [8, 4, 2]
    script = ("import sys, json, torch; from transformers import AutoModelForCausalLM;"
              "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]);"
              "out = m.generate(torch.tensor(json.loads(sys.argv[2])), max_new_tokens=30, do_sample=False, pad_token_id=0,"
              " return_dict_in_generate=True);"
              "print(json.dumps({'seq': out.sequences.tolist(), 'layers': [repr(l) for l in out.past_key_values.layers]}))")
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "planned"), json.dumps(ids.tolist())],
                          cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["layers"][0].startswith("QuantizedKVLayer(K8V4") and got["layers"][2].startswith("QuantizedKVLayer(KV2")
    assert got["seq"] == expected.sequences.tolist()
    # an explicit cache still wins over the saved plan
    dense = run(planned, ids, DynamicCache(config=model.config), max_new_tokens=30)
    assert torch.equal(dense.sequences, run(model, ids, DynamicCache(config=model.config), max_new_tokens=30).sequences)


def test_saved_plan_refuses_non_llama_models():
    from transformers import GPT2Config, GPT2LMHeadModel

    from hf_compress.methods.kvtuner import with_kv_plan

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=64))
    with pytest.raises(ValueError, match="Llama-family"):
        with_kv_plan(gpt2, KVPlan.uniform(2, 4))


# -- the quantizer itself --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("axis", ["channel", "token"])
def test_blocks_round_trip_within_half_a_step_and_unpack_matches_the_shared_format(bits, axis):
    from hf_compress.formats.packing import unpack_codes
    from hf_compress.kv_cache.quantizer import QuantizedBlocks, unpack_byte_aligned

    x = torch.randn(2, 3, 64, 32, generator=torch.Generator().manual_seed(bits))
    x[..., 5] *= 10  # an outlier channel: per-channel keys confine it to its own groups
    blocks = QuantizedBlocks(bits, axis, 32)
    blocks.append(x[..., :32, :])
    blocks.append(x[..., 32:, :])  # appended block by block = quantized at once
    once = QuantizedBlocks(bits, axis, 32)
    once.append(x)
    assert torch.equal(blocks.dequantize(torch.float32), once.dequantize(torch.float32))
    step = blocks.scale.float().max()
    assert (blocks.dequantize(torch.float32) - x).abs().max() <= step / 2 + 1e-2 * step
    n = x.numel()
    assert torch.equal(unpack_byte_aligned(blocks.packed, bits)[:n], unpack_codes(blocks.packed.reshape(-1), bits, n))
    assert blocks.packed.numel() == n * bits // 8
