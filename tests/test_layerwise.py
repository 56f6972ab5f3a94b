"""Layer-wise Quantization config: ranking → per-layer widths → plan; errors for impossible budgets."""

import subprocess
import sys

import pytest
import torch

import hf_compress
from hf_compress import LayerwiseQuantConfig
from hf_compress.sensitivity import profile

from conftest import tiny_llama, subprocess_env


def test_budget_validation():
    with pytest.raises(ValueError, match="outside"):
        LayerwiseQuantConfig(high_bits=4, low_bits=2, target_bits=4.5)
    with pytest.raises(ValueError, match="outside"):
        LayerwiseQuantConfig(high_bits=4, low_bits=2, target_bits=1.5)
    with pytest.raises(ValueError, match="exactly one"):
        LayerwiseQuantConfig()
    with pytest.raises(ValueError, match="below high_bits"):
        LayerwiseQuantConfig(high_bits=2, low_bits=4, low_fraction=0.5)
    with pytest.raises(ValueError, match="score"):
        LayerwiseQuantConfig(score="magic", low_fraction=0.5)
    assert LayerwiseQuantConfig(high_bits=4, low_bits=2, target_bits=3.0).layers_moved_down(30) == 15


@pytest.mark.parametrize("score", ["lim", "zd", "random"])
def test_least_important_layers_get_low_bits_and_round_trip(score, calib, char_tokenizer, tmp_path):
    config = LayerwiseQuantConfig(score=score, high_bits=4, low_bits=2, low_fraction=0.5, solver="rtn", group_size=32)
    model = hf_compress.quantize(tiny_llama(), config, calibration=calib, tokenizer=char_tokenizer, progress=False)
    widths = config.layer_bits
    assert sorted(widths) == [2, 4]
    for i, b in enumerate(widths):
        assert model.model.layers[i].mlp.down_proj.spec.bits == b
    if score == "zd":
        from hf_compress.sensitivity.profiling import layer_zd_scores

        z = layer_zd_scores(tiny_llama())
        assert widths[z.index(min(z))] == 2
    with torch.no_grad():
        expect = model(torch.tensor([[1, 2, 3]])).logits
    model.save_pretrained(tmp_path / "q")
    code = ("import sys, torch; from transformers import AutoModelForCausalLM;"
            "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]); from safetensors.torch import save_file; save_file({'l': m(torch.tensor([[1, 2, 3]])).logits.detach()}, sys.argv[2])")
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path / "q"), str(tmp_path / "l.safetensors")], cwd=tmp_path,
                         env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    from safetensors.torch import load_file

    assert torch.equal(load_file(str(tmp_path / "l.safetensors"))["l"], expect)


def test_ranking_from_a_saved_profile_and_gptq_solver(calib, char_tokenizer, tmp_path):
    prof = profile(tiny_llama(), calib, char_tokenizer, group_size=32, fisher_samples=0, progress=False)
    prof.save(tmp_path / "p")
    config = LayerwiseQuantConfig(score="lim", low_fraction=0.5, profile=str(tmp_path / "p"), group_size=32)
    hf_compress.quantize(tiny_llama(), config, calibration=calib, tokenizer=char_tokenizer, progress=False)
    lims = [l["lim"] for l in prof.layers]
    assert config.layer_bits[lims.index(min(lims))] == 2

    from conftest import tiny_gpt2

    with pytest.raises(ValueError, match="does not match"):
        hf_compress.quantize(tiny_gpt2(), LayerwiseQuantConfig(score="lim", low_fraction=0.5, solver="rtn",
                                                              profile=str(tmp_path / "p")), progress=False)
