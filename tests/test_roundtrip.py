"""Quantize → save → load gives identical logits: in-process, via from_pretrained(quantization_config=...),
and in a fresh interpreter that never imports hf_compress."""

import json
import warnings
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import hf_compress
from hf_compress import GPTQConfig, RTNConfig
from hf_compress.formats.linear import PackedLinear

from conftest import TINY_MODELS, save_char_tokenizer, subprocess_env

IDS = torch.tensor([[5, 17, 99, 3, 64, 120, 7, 7, 31, 2]])

CONFIGS = {
    "rtn4": lambda: RTNConfig(bits=4, group_size=32),
    "gptq3": lambda: GPTQConfig(bits=3, group_size=48),  # 48 does not divide 64: a short last group
    "gptq2sym": lambda: GPTQConfig(bits=2, group_size=16, sym=True),
    "gptq8": lambda: GPTQConfig(bits=8, group_size=-1, act_order=False),
}


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("config_name", sorted(CONFIGS))
def test_quantize_save_load_identical(tiny_model, config_name, calib, char_tokenizer, tmp_path):
    dense = logits(tiny_model)
    n_linear = 14 if hasattr(tiny_model, "model") else 8  # Llama: 7 Linears per block; GPT-2: 4 Conv1Ds
    config = CONFIGS[config_name]()
    hf_compress.quantize(tiny_model, config, calibration=calib, tokenizer=char_tokenizer, progress=False)
    packed = [m for m in tiny_model.modules() if isinstance(m, PackedLinear)]
    assert len(packed) == n_linear
    quant = logits(tiny_model)
    assert not torch.equal(quant, dense)
    rel = ((quant - dense).norm() / dense.norm()).item()
    assert rel < {2: 0.8, 3: 0.3, 4: 0.15, 8: 0.01}[config.bits]
    hf_compress.save_pretrained(tiny_model, tmp_path / "q")
    saved = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == config.quant_method and len(saved["plan"]) == n_linear
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert torch.equal(logits(loaded), quant)
    out = loaded.generate(IDS, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, IDS.shape[1] + 4)


@pytest.mark.parametrize("arch", sorted(TINY_MODELS))
def test_quantize_on_load_equals_quantize_in_memory(arch, tmp_path, text_corpus, char_tokenizer):
    TINY_MODELS[arch]().save_pretrained(tmp_path / "dense")
    config = RTNConfig(bits=4, group_size=32)
    on_load = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", quantization_config=config)
    in_memory = hf_compress.quantize(TINY_MODELS[arch](), RTNConfig(bits=4, group_size=32), progress=False)
    assert torch.equal(logits(on_load), logits(in_memory))
    on_load.save_pretrained(tmp_path / "q")
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "q")), logits(in_memory))


def test_gptq_on_load_with_dataset(tmp_path, text_corpus):
    TINY_MODELS["llama"]().save_pretrained(tmp_path / "dense")
    save_char_tokenizer(tmp_path / "dense")
    data = tmp_path / "calib.txt"
    data.write_text(text_corpus)
    model = AutoModelForCausalLM.from_pretrained(
        tmp_path / "dense", quantization_config=GPTQConfig(bits=4, group_size=32, dataset=str(data), num_samples=4, seq_len=64))
    assert sum(isinstance(m, PackedLinear) for m in model.modules()) == 14
    assert model.config.quantization_config.report["seconds"] >= 0


FRESH = """
import sys, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1])
with torch.no_grad():
    out = m(torch.tensor({ids})).logits
from safetensors.torch import save_file
save_file({{"logits": out}}, sys.argv[2])
print("hf_compress" in sys.modules)
"""


@pytest.mark.parametrize("arch", sorted(TINY_MODELS))
def test_fresh_process_loads_without_import_and_fails_loudly_when_switched_off(arch, tmp_path, calib, char_tokenizer):
    model = hf_compress.quantize(TINY_MODELS[arch](), GPTQConfig(bits=4, group_size=32), calibration=calib,
                                 tokenizer=char_tokenizer, progress=False)
    expect = logits(model)
    model.save_pretrained(tmp_path / "q")
    script = FRESH.format(ids=IDS.tolist())
    run = subprocess.run([sys.executable, "-c", script, str(tmp_path / "q"), str(tmp_path / "out.safetensors")],
                         cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().endswith("True")  # registered by the interpreter-start hook, not by the script
    assert torch.equal(load_file(str(tmp_path / "out.safetensors"))["logits"], expect)

    off = subprocess.run([sys.executable, "-c", script, str(tmp_path / "q"), str(tmp_path / "off.pt")],
                         cwd=tmp_path, env=subprocess_env(HF_COMPRESS_AUTOLOAD="0"), capture_output=True, text=True, timeout=300)
    assert off.returncode != 0
    assert "mismatch" in off.stderr.lower() or "size" in off.stderr.lower()
    assert not (tmp_path / "off.pt").exists()


def test_register_is_idempotent():
    hf_compress.register()
    hf_compress.register()
    import importlib

    quantize_module = importlib.import_module("hf_compress.pipeline.quantize")
    quantize_module.register()
    quantize_module.register()
    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING

    assert "hfc_gptq" in AUTO_QUANTIZER_MAPPING and "hfc_rtn" in AUTO_QUANTIZER_MAPPING


def test_checkpoint_size_is_within_10_percent_of_ideal(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_compress.report import checkpoint_bytes, size_report

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=704, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64, tie_word_embeddings=True)
    for bits in (2, 3, 4, 8):
        model = hf_compress.quantize(LlamaForCausalLM(cfg), RTNConfig(bits=bits, group_size=64), progress=False)
        size = size_report(model)
        expect_bpw = bits + (16 + bits) / 64
        assert size.bits_per_weight == pytest.approx(expect_bpw, rel=0.01)
        hf_compress.save_pretrained(model, tmp_path / f"q{bits}")
        on_disk = checkpoint_bytes(tmp_path / f"q{bits}")
        assert size.ideal_bytes <= on_disk <= 1.10 * size.ideal_bytes
        assert on_disk < 0.6 * size.fp16_bytes


def test_mixed_bit_widths_per_module_round_trip(tmp_path, calib, char_tokenizer):
    widths = {"q_proj": 2, "k_proj": 3, "v_proj": 8, "o_proj": 4, "gate_proj": 3, "up_proj": 4, "down_proj": 2}
    plan = {f"model.layers.{i}.{'self_attn' if 'proj' in k and k[0] in 'qkvo' else 'mlp'}.{k}":
            {"bits": b, "group_size": 32 if b < 8 else -1, "sym": b == 8} for i in range(2) for k, b in widths.items()}
    model = hf_compress.quantize(TINY_MODELS["llama"](), GPTQConfig(plan=plan), calibration=calib,
                                 tokenizer=char_tokenizer, progress=False)
    assert model.model.layers[1].self_attn.v_proj.spec.bits == 8
    assert model.model.layers[0].mlp.down_proj.spec.bits == 2
    expect = logits(model)
    model.save_pretrained(tmp_path / "q")
    run = subprocess.run([sys.executable, "-c", FRESH.format(ids=IDS.tolist()), str(tmp_path / "q"), str(tmp_path / "o.safetensors")],
                         cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert torch.equal(load_file(str(tmp_path / "o.safetensors"))["logits"], expect)
    with pytest.raises(ValueError, match="neither linear layers nor embeddings"):
        hf_compress.quantize(TINY_MODELS["llama"](), RTNConfig(plan={"model.norm": {"bits": 4}}), progress=False)


# -- checkpoint size: packed head, dense dtype, the split (issue 17) ------------------------------------------------

@pytest.mark.parametrize("head_bits", [8, 4])
def test_packed_tied_head_and_fp16_dense_parts_round_trip(tmp_path, head_bits):
    from transformers import AutoModelForCausalLM

    from conftest import tiny_llama
    from hf_compress.report import size_report

    def tied():
        model = tiny_llama()
        model.config.tie_word_embeddings = True
        model.tie_weights()
        assert model.lm_head.weight is model.model.embed_tokens.weight
        return model

    reference, model = tied(), tied()
    plain = hf_compress.quantize(tied(), hf_compress.RTNConfig(bits=4, group_size=32), progress=False)
    q = hf_compress.quantize(model, hf_compress.RTNConfig(bits=4, group_size=32, head_bits=head_bits,
                                                          dense_dtype="float16"), progress=False)
    assert isinstance(q.lm_head, hf_compress.PackedLinear) and q.lm_head.spec.bits == head_bits
    assert q.model.embed_tokens.weight.dtype == torch.float16 and q.config.tie_word_embeddings is False
    hf_compress.save_pretrained(q, tmp_path / "q")
    hf_compress.save_pretrained(plain, tmp_path / "plain")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert isinstance(loaded.lm_head, hf_compress.PackedLinear) and loaded.dtype == torch.float16
    ids = torch.tensor([[1, 5, 9, 33, 2, 70, 11]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, q(ids).logits)
        dense = reference(ids).logits
        assert (q(ids).logits.float() - dense).abs().mean() < 2 * (plain(ids).logits - dense).abs().mean()
    split = size_report(q)
    assert split.packed_bytes + split.dense_bytes == split.ideal_bytes
    assert split.largest_dense[0][0] == "model.embed_tokens.weight"
    assert size_report(q).dense_bytes < size_report(plain).dense_bytes / 1.9  # fp16 dense parts, head no longer dense
    assert "packed" in split.split() and "dense" in split.split()


def test_head_bits_and_dense_dtype_are_validated():
    with pytest.raises(ValueError, match="unsupported bit width"):
        hf_compress.RTNConfig(head_bits=12)
    with pytest.raises(ValueError, match="dense_dtype must be one of"):
        hf_compress.RTNConfig(dense_dtype="int8")


@pytest.mark.parametrize("bits,group_size,tie", [(8, 32, True), (4, 32, False), (3, 16, True), (4, 24, False)])
def test_packed_embeddings_round_trip_in_a_fresh_process(tmp_path, bits, group_size, tie):
    """embedding_bits packs the input table (tied or not); lookups match the dequantized table exactly, the
    checkpoint loads with identical logits in a process that never imports hf_compress, and it is smaller."""
    from conftest import fresh_process_logits, tiny_llama
    from hf_compress.report import size_report

    def model_():
        model = tiny_llama()
        if tie:
            model.config.tie_word_embeddings = True
            model.tie_weights()
        return model

    reference, plain, model = model_(), model_(), model_()
    plain = hf_compress.quantize(plain, RTNConfig(bits=4, group_size=group_size), progress=False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        q = hf_compress.quantize(model, RTNConfig(bits=4, group_size=group_size, embedding_bits=bits), progress=False)
    assert any("set head_bits too" in str(w.message) for w in seen) == tie
    table = q.model.embed_tokens
    assert isinstance(table, hf_compress.PackedEmbedding) and table.spec.bits == bits
    assert q.config.tie_word_embeddings is False and not isinstance(q.lm_head, PackedLinear)
    assert torch.equal(q.lm_head.weight, reference.lm_head.weight)  # an untied head keeps its exact weights
    ids = torch.tensor([[1, 5, 9, 33, 2, 70, 11, 5]])
    assert torch.equal(table(ids)[0], table.dequantized_weight()[ids[0]])
    with torch.no_grad():
        err = (table(ids) - reference.model.embed_tokens(ids)).abs().max()
        assert 0 < err < (0.02 if bits == 8 else 0.3)
    hf_compress.save_pretrained(q, tmp_path / "q")
    hf_compress.save_pretrained(plain, tmp_path / "plain")
    with torch.no_grad():
        expected = q(ids).logits
    assert torch.equal(fresh_process_logits(tmp_path / "q", ids, tmp_path), expected)
    table_bytes = table.in_features * table.out_features * 4
    saved = size_report(plain).ideal_bytes - size_report(q).ideal_bytes  # fp32 table → packed table
    assert saved < 0 if tie else saved > table_bytes * (1 - (bits + 1) / 32)


def test_packed_embeddings_follow_dense_dtype_and_refuse_float_ids():
    from conftest import tiny_llama

    q = hf_compress.quantize(tiny_llama(), RTNConfig(bits=4, group_size=32, embedding_bits=8, dense_dtype="bfloat16"),
                             progress=False)
    assert q.model.embed_tokens(torch.tensor([[3, 4]])).dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.isfinite(q(torch.tensor([[3, 4, 5]])).logits).all()
    with pytest.raises(TypeError, match="integer ids"):
        q.model.embed_tokens(torch.tensor([[3.0]]))
    with pytest.raises(ValueError, match="unsupported bit width"):
        RTNConfig(embedding_bits=9)
