"""Streaming quantization (issue 20, item 1): one decoder block in memory at a time, the same checkpoint as
quantizing in memory and saving, and clear refusals for what streaming cannot do."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_compress
from hf_compress.pipeline import streaming
from conftest import fresh_process_logits, save_char_tokenizer, tiny_llama

IDS = torch.tensor([[3, 17, 42, 99, 5, 64, 23, 77, 8, 120, 1, 56]])


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture
def source(tmp_path):
    """A tiny Llama saved in several shards (so blocks come from different files), with a tokenizer."""
    folder = tmp_path / "src"
    tiny_llama().save_pretrained(folder, max_shard_size="100KB")
    save_char_tokenizer(folder)
    assert len(list(folder.glob("*.safetensors"))) > 1
    return folder


def in_memory(source, config, calib, out):
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    hf_compress.quantize(model, config, calibration=calib, tokenizer=AutoTokenizer.from_pretrained(source),
                         progress=False)
    hf_compress.save_pretrained(model, out)


def quant_config_without_timing(folder: Path) -> dict:
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["report"].pop("seconds")
    return config


@pytest.mark.parametrize("make_config", [lambda: hf_compress.GPTQConfig(bits=3, group_size=32),
                                         lambda: hf_compress.RTNConfig(bits=4, group_size=32, dense_dtype="bfloat16"),
                                         lambda: hf_compress.GPTQConfig(bits=4, group_size=16, head_bits=8)],
                         ids=["gptq3", "rtn4-bf16", "gptq4-packed-head"])
def test_streamed_checkpoint_is_identical_to_the_in_memory_one(source, tmp_path, calib, make_config):
    in_memory(source, make_config(), calib, tmp_path / "memory")
    hf_compress.quantize_streaming(source, make_config(), tmp_path / "streamed", calibration=calib, progress=False)
    a, b = tensors(tmp_path / "memory"), tensors(tmp_path / "streamed")
    assert sorted(a) == sorted(b)
    different = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not different, different[:5]
    assert quant_config_without_timing(tmp_path / "memory") == quant_config_without_timing(tmp_path / "streamed")
    index = json.loads((tmp_path / "streamed" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3  # one shard per block, one for the rest
    # plain transformers in a fresh interpreter reads it, with the in-memory checkpoint's logits
    got = fresh_process_logits(tmp_path / "streamed", IDS, tmp_path)
    want = fresh_process_logits(tmp_path / "memory", IDS, tmp_path)
    assert torch.equal(got, want)


def test_only_one_block_holds_weights_at_a_time(source, tmp_path, calib, monkeypatch):
    load, release = streaming.StreamedBlocks.load, streaming.StreamedBlocks.release
    seen = []

    def materialized(io):
        return [i for i, block in enumerate(io.layers) if any(not t.is_meta for t in block.state_dict().values())]

    def counting_load(io, index, block):
        assert materialized(io) == [], "a block was still in memory when the next one was loaded"
        assert io.model.get_input_embeddings().weight.is_meta, "the embeddings are held while blocks are calibrated"
        load(io, index, block)
        seen.append(materialized(io))

    def checked_release(io, index, block):
        release(io, index, block)
        assert materialized(io) == []

    monkeypatch.setattr(streaming.StreamedBlocks, "load", counting_load)
    monkeypatch.setattr(streaming.StreamedBlocks, "release", checked_release)
    hf_compress.quantize_streaming(source, hf_compress.GPTQConfig(bits=4, group_size=32), tmp_path / "out",
                                   calibration=calib, progress=False)
    assert seen == [[0], [1]]


def test_blocks_without_planned_modules_are_copied_dense(source, tmp_path, calib):
    config = lambda: hf_compress.GPTQConfig(bits=4, group_size=32, modules_to_not_convert=[r"layers\.1\."])
    in_memory(source, config(), calib, tmp_path / "memory")
    hf_compress.quantize_streaming(source, config(), tmp_path / "streamed", calibration=calib, progress=False)
    a, b = tensors(tmp_path / "memory"), tensors(tmp_path / "streamed")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert b["model.layers.1.mlp.down_proj.weight"].dtype == torch.float32


def test_what_streaming_cannot_do_is_refused_before_any_output(source, tmp_path, calib):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="whole model"):
        hf_compress.quantize_streaming(source, hf_compress.BAQConfig(target_bits=3.0, group_size=32), out,
                                       calibration=calib, progress=False)
    with pytest.raises(ValueError, match="transform the weights before planning"):
        hf_compress.quantize_streaming(source, hf_compress.GPTQConfig(bits=4, group_size=32, rotate=True), out,
                                       calibration=calib, progress=False)
    with pytest.raises(ValueError, match="GGUF"):
        hf_compress.quantize_streaming(str(tmp_path / "m.gguf"), hf_compress.RTNConfig(bits=4), out)
    with pytest.raises(FileNotFoundError, match="not found"):
        hf_compress.quantize_streaming(str(tmp_path / "nowhere" / "model"), hf_compress.RTNConfig(bits=4), out)
    with pytest.raises(TypeError, match="hf-compress config"):
        hf_compress.quantize_streaming(source, {"bits": 4}, out)
    assert not out.exists()


def test_bad_checkpoints_are_named(source, tmp_path):
    shard = sorted(source.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:100])  # truncated
    with pytest.raises(ValueError, match="truncated|cannot read"):
        hf_compress.quantize_streaming(source, hf_compress.RTNConfig(bits=4, group_size=32), tmp_path / "out",
                                       progress=False)
    shard.unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        hf_compress.quantize_streaming(source, hf_compress.RTNConfig(bits=4, group_size=32), tmp_path / "out",
                                       progress=False)
    assert not (tmp_path / "out").exists()


def test_a_failure_mid_run_keeps_the_previous_checkpoint(source, tmp_path, calib, monkeypatch):
    out = tmp_path / "out"
    hf_compress.quantize_streaming(source, hf_compress.RTNConfig(bits=4, group_size=32), out, progress=False)
    before = tensors(out)
    release = streaming.StreamedBlocks.release

    def dies_at_block_1(io, index, block):
        if index == 1:
            raise OSError("disk full")
        release(io, index, block)

    monkeypatch.setattr(streaming.StreamedBlocks, "release", dies_at_block_1)
    with pytest.raises(OSError, match="disk full"):
        hf_compress.quantize_streaming(source, hf_compress.GPTQConfig(bits=3, group_size=32), out, calibration=calib,
                                       progress=False)
    after = tensors(out)
    assert sorted(after) == sorted(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []


def test_cli_streams(source, tmp_path, capsys, text_corpus):
    from hf_compress.cli import main

    corpus = tmp_path / "calib.txt"
    corpus.write_text(text_corpus)
    main(["quantize", str(source), "--out", str(tmp_path / "out"), "--stream", "--method", "gptq", "--bits", "4",
          "--group-size", "32", "--dataset", str(corpus), "--num-samples", "4", "--seq-len", "32"])
    assert "streamed" in capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert type(model.config.quantization_config).__name__ == "GPTQConfig"
    assert len(model.config.quantization_config.plan) == 14 and model.config.quantization_config.num_samples == 4
    assert torch.isfinite(model(IDS).logits).all()
