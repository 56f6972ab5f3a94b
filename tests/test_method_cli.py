"""The method sub-commands (``hf-compress recursive | ln-free | lisa``) end to end on tiny models saved to disk:
exit code 0, an output that plain ``AutoModelForCausalLM`` loads and that is what the method should make, and a
clear exit-2 error for bad input."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import save_char_tokenizer, tiny_gpt2, tiny_llama

from hf_compress.cli.commands import build_parser, main

IDS = torch.randint(1, 95, (2, 16), generator=torch.Generator().manual_seed(0))
TRAIN = ["--batch-size", "2", "--seq-len", "32", "--lr", "1e-3"]


def _save_model(model, path):
    model.save_pretrained(path)
    save_char_tokenizer(path)
    return str(path)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return _save_model(tiny_llama(), tmp_path_factory.mktemp("llama") / "model")


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    return _save_model(tiny_gpt2(), tmp_path_factory.mktemp("gpt2") / "model")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex jolly boxing frogs".split()
    g = torch.Generator().manual_seed(0)
    path = tmp_path_factory.mktemp("data") / "train.txt"
    path.write_text(" ".join(words[i] for i in torch.randint(0, len(words), (600,), generator=g).tolist()))
    return str(path)


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def test_method_commands_are_registered_with_every_config_field():
    import dataclasses

    from hf_compress.methods.lisa.config import LisaSettings  # the flags; LisaConfig adds PEFT's own fields
    from hf_compress.methods.ln_free.schedule import LNRemovalSchedule

    parser = build_parser()
    args = parser.parse_args(["lisa", "--out", "o", "--dataset", "d", "--steps", "1"])
    assert args.handler.__module__ == "hf_compress.methods.lisa.cli"
    assert {f.name for f in dataclasses.fields(LisaSettings)} <= {k.removeprefix("lisa_") for k in vars(args)}
    args = parser.parse_args(["ln-free", "--out", "o", "--dataset", "d", "--steps", "1", "--gap-pos0", "3"])
    assert {f.name for f in dataclasses.fields(LNRemovalSchedule)} <= {k.removeprefix("schedule_") for k in vars(args)}
    assert args.schedule_gap_pos0 == 3 and args.schedule_start == LNRemovalSchedule().start
    args = parser.parse_args(["recursive", "--out", "o"])
    assert (args.loops, args.scheme, args.init, args.untie_norms, args.steps) == (2, "cycle", "stepwise", False, 0)


def test_recursive_command(llama_dir, text_file, tmp_path, capsys):
    out = tmp_path / "rec"
    assert main(["recursive", llama_dir, "--out", str(out), "--loops", "2", "--scheme", "cycle", "--init", "average",
                 "--uptrain-steps", "2", "--dataset", text_file, *TRAIN]) == 0
    assert "1 unique blocks x 2 loops" in capsys.readouterr().out
    model = _load(out)
    assert model.config.model_type == "hfc_recursive_llama" and model.config.num_loops == 2
    assert model.config.recursion_init == "average"
    assert torch.isfinite(_logits(model)).all()
    assert (out / "tokenizer.json").is_file() and (out / "README.md").is_file()


def test_recursive_relaxed_command(llama_dir, tmp_path):
    from peft import AutoPeftModelForCausalLM

    out = tmp_path / "relaxed"
    assert main(["recursive", llama_dir, "--out", str(out), "--scheme", "sequence", "--untie-norms",
                 "--relax-rank", "full"]) == 0
    base = _load(out)
    assert base.config.recursion_scheme == "sequence" and not base.config.tie_norms
    relaxed = AutoPeftModelForCausalLM.from_pretrained(out / "relaxed_lora").eval()
    # full-rank SVD-initialised LoRA on untied norms reproduces the original model
    torch.testing.assert_close(_logits(relaxed), _logits(_load(llama_dir)), rtol=0, atol=1e-4)


def test_recursive_bad_input(llama_dir, gpt2_dir, tmp_path, capsys):
    assert main(["recursive", llama_dir, "--out", str(tmp_path / "r"), "--loops", "3"]) == 2
    err = capsys.readouterr().err
    assert "hf-compress recursive: error:" in err and "does not divide" in err
    assert main(["recursive", gpt2_dir, "--out", str(tmp_path / "r")]) == 2
    assert "Llama-family" in capsys.readouterr().err
    assert main(["recursive", llama_dir, "--out", str(tmp_path / "r"), "--uptrain-steps", "2"]) == 2
    assert "--dataset is required" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


SCHEDULE = ["--start", "1", "--gap-ln2", "1", "--gap-ln1qk", "1", "--gap-ln1v", "1", "--gap-ln-f", "1"]  # last: ln_f at 7


@pytest.mark.parametrize("export", ["structural", "compatible"])
def test_ln_free_command(gpt2_dir, text_file, tmp_path, capsys, export):
    out = tmp_path / export
    assert main(["ln-free", gpt2_dir, "--out", str(out), "--dataset", text_file, "--steps", "8", *SCHEDULE,
                 "--export", export, *TRAIN]) == 0
    assert f"saved the {export} export" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    model = _load(out)
    if export == "structural":
        assert config["model_type"] == model.config.model_type == "hfc_ln_free_gpt2"
    else:
        assert config["model_type"] == "gpt2" and config["layer_norm_epsilon"] == 1e12
    assert torch.isfinite(_logits(model)).all()


def test_ln_free_bad_input(gpt2_dir, llama_dir, text_file, tmp_path, capsys):
    base = ["--out", str(tmp_path / "x"), "--dataset", text_file, *TRAIN]
    assert main(["ln-free", gpt2_dir, *base, "--steps", "7", *SCHEDULE]) == 2
    err = capsys.readouterr().err
    assert "hf-compress ln-free: error:" in err and "last norm at step 7" in err and "--steps 8" in err
    assert main(["ln-free", llama_dir, *base, "--steps", "8", *SCHEDULE, "--export", "compatible"]) == 2
    assert "GPT-2 only" in capsys.readouterr().err
    assert main(["ln-free", gpt2_dir, *base, "--steps", "8", "--gap-ln2", "-1"]) == 2
    assert "gap_ln2 must be an integer >= 0" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_lisa_command(llama_dir, text_file, tmp_path, capsys):
    out = tmp_path / "lisa"
    assert main(["lisa", llama_dir, "--out", str(out), "--dataset", text_file, "--steps", "3",
                 "--num-active-layers", "1", "--interval-steps", "2", *TRAIN]) == 0
    assert "1 of 2 layers every 2 steps" in capsys.readouterr().out
    before, after = _load(llama_dir), _load(out)
    assert type(after).__name__ == "LlamaForCausalLM"
    emb0, emb1 = before.get_input_embeddings().weight, after.get_input_embeddings().weight
    assert not torch.equal(emb0, emb1) and torch.isfinite(emb1).all()
    assert all(torch.isfinite(p).all() for p in after.parameters())
    assert torch.isfinite(_logits(after)).all()
    # OUT may never be the input model's folder
    again = ["lisa", llama_dir, "--out", llama_dir, "--dataset", text_file, "--steps", "1", *TRAIN]
    assert main(again) == 2 and "input model's folder" in capsys.readouterr().err


def test_lisa_bad_input(llama_dir, text_file, tmp_path, capsys):
    base = ["lisa", llama_dir, "--out", str(tmp_path / "x"), "--dataset", text_file, "--steps", "2", *TRAIN]
    assert main([*base, "--num-active-layers", "3"]) == 2
    err = capsys.readouterr().err
    assert "hf-compress lisa: error:" in err and "num_active_layers=3 exceeds the 2 decoder layers" in err
    assert main([*base, "--interval-steps", "0"]) == 2
    assert "interval_steps must be >= 1" in capsys.readouterr().err
    assert main(["lisa", llama_dir, "--out", str(tmp_path / "x"), "--dataset", str(tmp_path / "none.txt"),
                 "--steps", "2"]) == 2
    assert "not found" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
