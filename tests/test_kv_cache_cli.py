"""``hf-compress kv-plan`` and ``hf-compress cskv`` end to end on a tiny Llama saved with a character tokenizer: exit
0, a folder plain ``AutoModelForCausalLM`` loads whose ``generate()`` uses the saved cache, exit 2 on bad input."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import save_char_tokenizer
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from hf_compress.cli.commands import main


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=128, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=512)
    path = tmp_path_factory.mktemp("llama") / "model"
    LlamaForCausalLM(cfg).save_pretrained(path)
    save_char_tokenizer(path)
    return str(path)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "calib.txt"
    path.write_text(" ".join(["the quick brown fox jumps over a lazy dog"] * 60))
    return str(path)


CALIB = ["--num-samples", "2", "--seq-len", "64"]


def _generate(path):
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    out = model.generate(torch.randint(1, 95, (1, 80), generator=torch.Generator().manual_seed(0)), max_new_tokens=4,
                         do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    return out.past_key_values.layers


def test_kv_plan_command(llama_dir, text_file, tmp_path, capsys):
    out = tmp_path / "planned"
    assert main(["kv-plan", llama_dir, "--out", str(out), "--avg-bits", "3", "--dataset", text_file, *CALIB]) == 0
    plan = json.loads((out / "config.json").read_text())["kv_cache_plan"]
    assert sum(plan["key_bits"] + plan["value_bits"]) / 4 <= 3
    assert "average bits" in capsys.readouterr().out
    assert repr(_generate(out)[0]).startswith("QuantizedKVLayer(")


def test_cskv_command(llama_dir, text_file, tmp_path):
    out = tmp_path / "cskv"
    assert main(["cskv", llama_dir, "--out", str(out), "--reduction", "0.5", "--latent-bits", "4", "--train-steps", "3",
                 "--dataset", text_file, *CALIB]) == 0
    assert json.loads((out / "config.json").read_text())["cskv"]["rank_k"] == [32, 32]
    assert repr(_generate(out)[0]).startswith("CSKVCacheLayer(rank_k=32")


def test_bad_input_exits_2(llama_dir, text_file, tmp_path, capsys):
    base = [llama_dir, "--out", str(tmp_path / "x"), "--dataset", text_file, *CALIB]
    assert main(["kv-plan", *base, "--avg-bits", "1"]) == 2
    assert "below the cheapest" in capsys.readouterr().err
    assert main(["kv-plan", *base, "--avg-bits", "3", "--pairs", "KV8,KV5"]) == 2
    assert "unknown KV pair" in capsys.readouterr().err
    assert main(["cskv", *base, "--reduction", "1.5"]) == 2
    assert "reduction" in capsys.readouterr().err
