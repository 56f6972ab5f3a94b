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
    with pytest.raises(ValueError, match="has no `plan`"):
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


# -- what a new user hit (issue 17): silent corruption and unclear errors ------------------------------------------

def test_sym_flipped_in_the_plan_is_refused_naming_the_module(saved):
    cfg = json.loads((saved / "config.json").read_text())
    name = sorted(cfg["quantization_config"]["plan"])[0]
    cfg["quantization_config"]["plan"][name]["sym"] = True  # the module stores zero points
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=rf"{name}.*unexpected \['qzeros'\]"):
        AutoModelForCausalLM.from_pretrained(saved)


def test_plan_width_disagreeing_with_the_stored_codes_is_refused(saved):
    cfg = json.loads((saved / "config.json").read_text())
    name = sorted(cfg["quantization_config"]["plan"])[-1]
    cfg["quantization_config"]["plan"][name]["bits"] = 4  # stored at 3
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=rf"{name}.*shapes"):
        AutoModelForCausalLM.from_pretrained(saved)


@pytest.mark.parametrize("plan, message", [
    ("drop-bits", r"plan entry of '.*' has no \"bits\""),
    ([["model.layers.0.mlp.up_proj", {"bits": 4}]], "must map module names to specs, got a list"),
    ({"model.layers.0.mlp.up_proj": 4}, "plan entry of 'model.layers.0.mlp.up_proj' must be a dict"),
    ({"model.layers.0.mlp.up_proj": {"bits": 4, "group_size": 0}}, "plan entry of 'model.layers.0.mlp.up_proj' is invalid: group_size"),
])
def test_damaged_plan_names_the_key_and_the_module(saved, plan, message):
    cfg = json.loads((saved / "config.json").read_text())
    if plan == "drop-bits":
        plan = cfg["quantization_config"]["plan"]
        del plan[sorted(plan)[0]]["bits"]
    cfg["quantization_config"]["plan"] = plan
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=message):
        AutoModelForCausalLM.from_pretrained(saved)


def test_modules_to_not_convert_string_is_one_pattern():
    assert RTNConfig(modules_to_not_convert="down_proj").modules_to_not_convert == ["down_proj"]
    model = hf_compress.quantize(tiny_llama(), RTNConfig(bits=4, group_size=32, modules_to_not_convert="down_proj"),
                                 progress=False)
    packed = {n for n, m in model.named_modules() if isinstance(m, hf_compress.PackedLinear)}
    assert packed and not any("down_proj" in n for n in packed) and any("up_proj" in n for n in packed)
    with pytest.raises(TypeError, match="modules_to_not_convert"):
        RTNConfig(modules_to_not_convert=[3])
    with pytest.raises(ValueError, match="not a valid regex"):
        RTNConfig(modules_to_not_convert="(")


def test_modules_to_not_convert_matching_nothing_or_everything_is_said():
    with pytest.warns(UserWarning, match=r"\['lm_head_typo'\] match none"):
        hf_compress.quantize(tiny_llama(), RTNConfig(bits=4, modules_to_not_convert=["lm_head_typo"]), progress=False)
    with pytest.raises(ValueError, match=r"excludes all \d+ linear modules"):
        hf_compress.quantize(tiny_llama(), RTNConfig(bits=4, modules_to_not_convert="proj"), progress=False)


def test_group_larger_than_the_row_is_one_group_per_row():
    from hf_compress.formats.grid import QuantSpec, group_params

    huge, row = QuantSpec(4, 1_000_000), QuantSpec(4, -1)
    assert huge.width(64) == 64 and huge.groups(64) == 1
    W = torch.randn(8, 64)
    for a, b in zip(group_params(W, huge), group_params(W, row)):
        assert torch.equal(a, b)


def test_bits_docs_cli_and_code_agree():
    from hf_compress.cli.commands import build_parser
    from hf_compress.formats.packing import SUPPORTED_BITS

    lo, hi = SUPPORTED_BITS[0], SUPPORTED_BITS[-1]
    assert SUPPORTED_BITS == tuple(range(lo, hi + 1))
    assert f"{lo}–{hi}" in hf_compress.HfcConfig.__doc__
    for bits in SUPPORTED_BITS:
        RTNConfig(bits=bits)
    for bad in (lo - 1, hi + 1):
        with pytest.raises(ValueError, match="unsupported bit width"):
            RTNConfig(bits=bad)
        with pytest.raises(SystemExit):
            build_parser().parse_args(["quantize", "--out", "x", "--bits", str(bad)])
    assert build_parser().parse_args(["quantize", "--out", "x", "--bits", str(lo)]).bits == lo


def test_seq_len_beyond_the_positions_is_refused_with_both_numbers(char_tokenizer, text_corpus):
    for model in (tiny_llama(), tiny_gpt2()):  # both have 256 positions
        with pytest.raises(ValueError, match="seq_len 300 exceeds .* maximum of 256 positions"):
            hf_compress.quantize(model, GPTQConfig(bits=4, group_size=32), calibration=CalibrationSpec(
                [text_corpus], num_samples=2, seq_len=300), tokenizer=char_tokenizer, progress=False)


def test_token_ids_beyond_the_vocabulary_are_refused():
    with pytest.raises(ValueError, match="token id 500 is out of range .* vocabulary of 128"):
        hf_compress.quantize(tiny_llama(), GPTQConfig(bits=4, group_size=32),
                             calibration=torch.full((2, 16), 500), progress=False)


def test_encoder_decoder_is_refused_up_front_by_calibrated_methods(calib, char_tokenizer):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=128, d_model=32, d_ff=64, num_layers=2, num_heads=2,
                                             d_kv=16, decoder_start_token_id=0)).eval()
    for cfg in (GPTQConfig(bits=4, group_size=32), hf_compress.BAQConfig(target_bits=3, group_size=32),
                hf_compress.HighImpactConfig(target_bits=2.1, group_size=32)):
        with pytest.raises(ValueError, match="does not support T5ForConditionalGeneration .*encoder-decoder.*supports decoder, encoder"):
            hf_compress.quantize(t5, cfg, calibration=calib, tokenizer=char_tokenizer, progress=False)
    hf_compress.quantize(t5, RTNConfig(bits=4, group_size=32), progress=False)  # weight-only: any architecture
    assert any(isinstance(m, hf_compress.PackedLinear) for m in t5.modules())


def test_encoder_calibrated_on_raw_windows_is_warned_about(calib, char_tokenizer):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=128)).eval()
    with pytest.warns(UserWarning, match="BertModel is an encoder"):
        hf_compress.quantize(bert, GPTQConfig(bits=4, group_size=32), calibration=calib, tokenizer=char_tokenizer,
                             progress=False)
