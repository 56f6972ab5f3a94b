"""Bad input raises a clear error naming the problem and never leaves a half-written checkpoint."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_compress
from hf_compress import CalibrationSpec, GPTQConfig, RTNConfig

from conftest import tiny_gpt2, tiny_llama


def test_config_validation():
    with pytest.raises(ValueError, match="unsupported bit width"):
        GPTQConfig(bits=9)
    with pytest.raises(ValueError, match="group_size"):
        RTNConfig(group_size=0)
    with pytest.raises(ValueError, match="unknown options"):
        GPTQConfig(bits=4, blocksize=64)
    with pytest.raises(ValueError, match="damp"):
        GPTQConfig(damp=1.5)
    with pytest.raises(TypeError, match="hf-compress config"):
        hf_compress.quantize(tiny_llama(), {"bits": 4})


def test_gptq_without_calibration_data():
    with pytest.raises(ValueError, match="needs calibration data"):
        hf_compress.quantize(tiny_llama(), GPTQConfig(bits=4, group_size=32), progress=False)


def test_empty_calibration(char_tokenizer):
    with pytest.raises(ValueError, match="empty"):
        hf_compress.quantize(tiny_llama(), GPTQConfig(bits=4, group_size=32), calibration=["", "  "],
                             tokenizer=char_tokenizer, progress=False)
    with pytest.raises(ValueError, match="fewer than one window"):
        hf_compress.quantize(tiny_llama(), GPTQConfig(bits=4, group_size=32),
                             calibration=CalibrationSpec(["short"], 2, 64), tokenizer=char_tokenizer, progress=False)


def test_nan_activations_are_reported(calib, char_tokenizer):
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight[3] = float("nan")
    with pytest.raises(ValueError, match=r"layers\.0\.self_attn\.q_proj contain NaN or inf"):
        hf_compress.quantize(model, GPTQConfig(bits=4, group_size=32), calibration=calib,
                             tokenizer=char_tokenizer, progress=False)


def test_nan_weights_are_refused():
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="up_proj"):
        hf_compress.quantize(model, RTNConfig(bits=4, group_size=32), progress=False)


def test_unquantizable_modules_are_listed_not_fatal(caplog):
    model = tiny_llama()
    model.model.layers[0].extra = torch.nn.Conv2d(2, 2, 3)  # a weight no solver handles
    hf_compress.quantize(model, RTNConfig(bits=4, group_size=32), progress=False)
    report = model.config.quantization_config.report
    assert report["skipped"] == ["0.extra"]
    assert "stay dense" in caplog.text


def test_exclusions_are_applied_and_everything_excluded_is_an_error():
    model = hf_compress.quantize(tiny_llama(), RTNConfig(bits=4, group_size=32, modules_to_not_convert=[r"mlp\."]), progress=False)
    assert isinstance(model.model.layers[0].mlp.up_proj, torch.nn.Linear)
    assert len(model.config.quantization_config.plan) == 8
    with pytest.raises(ValueError, match="nothing to quantize"):
        hf_compress.quantize(tiny_llama(), RTNConfig(modules_to_not_convert=["layers"]), progress=False)


def test_quantizing_twice_is_refused():
    model = hf_compress.quantize(tiny_llama(), RTNConfig(bits=4, group_size=32), progress=False)
    with pytest.raises(ValueError, match="already quantized"):
        hf_compress.quantize(model, RTNConfig(bits=4, group_size=32), progress=False)


@pytest.fixture
def saved(tmp_path):
    model = hf_compress.quantize(tiny_gpt2(), RTNConfig(bits=3, group_size=32), progress=False)
    hf_compress.save_pretrained(model, tmp_path / "q")
    return tmp_path / "q"


def test_truncated_checkpoint_names_the_file(saved):
    f = saved / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match=r"truncated.*model\.safetensors"):
        AutoModelForCausalLM.from_pretrained(saved)


def test_corrupt_header_names_the_file(saved):
    f = saved / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:20] = b"\x00garbage!!!\xff"
    f.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"corrupt.*model\.safetensors"):
        AutoModelForCausalLM.from_pretrained(saved)


def test_plan_naming_a_missing_module(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["quantization_config"]["plan"]["transformer.h.7.mlp.c_fc"] = {"bits": 4, "group_size": 32, "sym": False}
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"transformer\.h\.7\.mlp\.c_fc"):
        AutoModelForCausalLM.from_pretrained(saved)


def test_plan_missing_from_config(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["quantization_config"]["plan"] = None
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="holds no plan"):
        AutoModelForCausalLM.from_pretrained(saved)


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    model = hf_compress.quantize(tiny_llama(), RTNConfig(bits=4, group_size=32), progress=False)
    import transformers.modeling_utils

    def boom(tensors, filename, **kwargs):
        open(filename, "wb").write(b"partial")  # a shard begun, then the disk fills up
        raise OSError("disk full")

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        hf_compress.save_pretrained(model, tmp_path / "q")
    assert list(tmp_path.iterdir()) == []


def test_failed_save_keeps_the_previous_checkpoint(saved, monkeypatch):
    before = sorted(p.name for p in saved.iterdir())
    model = hf_compress.quantize(tiny_llama(), RTNConfig(bits=4, group_size=32), progress=False)
    monkeypatch.setattr(type(model), "save_pretrained", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("crash")))
    with pytest.raises(RuntimeError, match="crash"):
        hf_compress.save_pretrained(model, saved)
    assert sorted(p.name for p in saved.iterdir()) == before
    assert sorted(p.name for p in saved.parent.iterdir()) == ["q"]
