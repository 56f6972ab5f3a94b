"""GGUF export (issue 19, first format): our codes as ggml blocks, read back by transformers' GGUF loader in a
fresh process without hf-compress and by the gguf package's own reader."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import hf_compress
from hf_compress.cli.commands import main
from hf_compress.exporters import REPORT

from conftest import save_char_tokenizer, subprocess_env, tiny_llama

pytest.importorskip("gguf")
IDS = [[5, 17, 99, 3, 64, 120, 7]]
FRESH_GGUF = ("import sys, torch; from transformers import AutoModelForCausalLM;"
              "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], gguf_file=sys.argv[2]);"
              "from safetensors.torch import save_file; save_file({'l': m(torch.tensor(eval(sys.argv[4]))).logits.detach()}, sys.argv[3])")


def gguf_logits(folder, file_name, tmp_path, ids=IDS):
    out = tmp_path / "gguf_logits.safetensors"
    run = subprocess.run([sys.executable, "-c", FRESH_GGUF, str(folder), file_name, str(out), str(ids)],
                         env=subprocess_env(HF_COMPRESS_AUTOLOAD="0"), capture_output=True, text=True, timeout=300,
                         cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    from safetensors.torch import load_file

    return load_file(str(out))["l"]


@pytest.mark.parametrize("bits,sym,kind", [(4, False, "Q4_1"), (4, True, "Q4_0"), (3, False, "Q4_0"),
                                           (2, False, "Q4_0"), (8, True, "Q8_0")])
def test_packed_plans_export_exactly_and_load_with_transformers_gguf_reader(tmp_path, bits, sym, kind):
    import gguf

    model = hf_compress.quantize(tiny_llama(), hf_compress.RTNConfig(bits=bits, group_size=64, sym=sym), progress=False)
    path = hf_compress.export(model, tmp_path / "out")
    reader = gguf.GGUFReader(str(path))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.ffn_down.weight"] == kind and types["blk.1.attn_q.weight"] == kind
    assert types["blk.0.attn_norm.weight"] == "F32" and "output.weight" in types  # untied head written
    # the gguf package's own dequantizer gives back our weights (k_proj: permuted rows, so use v_proj)
    tensor = next(t for t in reader.tensors if t.name == "blk.0.attn_v.weight")
    ours = model.model.layers[0].self_attn.v_proj.dequantized_weight()
    theirs = torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32))
    assert theirs.shape == ours.shape
    tol = 0 if kind != "Q4_1" else 2e-3 * float(ours.abs().max())  # Q4_1 rounds m = −s·z to fp16
    assert float((theirs - ours).abs().max()) <= tol
    with torch.no_grad():
        expected = model(torch.tensor(IDS)).logits
    got = gguf_logits(tmp_path / "out", path.name, tmp_path)
    assert float((got - expected).abs().max()) < 5e-3 * float(expected.abs().max()) + 1e-3  # fp16 embeddings
    report = json.loads((tmp_path / "out" / REPORT).read_text())
    assert report["widened"] == {} and (tmp_path / "out" / "README.md").is_file()


def test_tied_head_is_not_written_and_loads_tied(tmp_path):
    import gguf

    model = tiny_llama()
    model.config.tie_word_embeddings = True
    model.tie_weights()
    q = hf_compress.quantize(model, hf_compress.RTNConfig(bits=4, group_size=32), progress=False)
    path = hf_compress.export(q, tmp_path / "out")
    assert "output.weight" not in {t.name for t in gguf.GGUFReader(str(path)).tensors}
    with torch.no_grad():
        expected = q(torch.tensor(IDS)).logits
    got = gguf_logits(tmp_path / "out", path.name, tmp_path)
    assert float((got - expected).abs().max()) < 5e-3 * float(expected.abs().max()) + 1e-3


def test_plans_without_an_exact_block_type_are_refused_or_widened(tmp_path):
    model = hf_compress.quantize(tiny_llama(), hf_compress.RTNConfig(bits=5, group_size=32), progress=False)
    with pytest.raises(ValueError, match=r"cannot hold 14 packed module\(s\) exactly .*5-bit asymmetric.*widen=True"):
        hf_compress.export(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before anything was written
    path = hf_compress.export(model, tmp_path / "out", widen=True)
    report = json.loads((tmp_path / "out" / REPORT).read_text())
    assert len(report["widened"]) == 14 and report["extra_bytes"] > 0
    assert report["types"]["blk.0.ffn_up.weight"] == "F16"
    with torch.no_grad():
        expected = model(torch.tensor(IDS)).logits
    got = gguf_logits(tmp_path / "out", path.name, tmp_path)
    assert float((got - expected).abs().max()) < 5e-3 * float(expected.abs().max()) + 1e-3
    with pytest.raises(ValueError, match="unknown export format 'onnx'; formats: compressed-tensors, gptq, gguf"):
        hf_compress.export(model, tmp_path / "x", format="onnx")
    group48 = hf_compress.quantize(tiny_llama(), hf_compress.RTNConfig(bits=4, group_size=48), progress=False)
    with pytest.raises(ValueError, match="groups of 48 over 64 inputs are not whole blocks of 32"):
        hf_compress.export(group48, tmp_path / "y")


def test_reexport_replaces_our_export_atomically_and_foreign_folders_are_refused(tmp_path, monkeypatch):
    model = hf_compress.quantize(tiny_llama(), hf_compress.RTNConfig(bits=4, group_size=32), progress=False)
    first = hf_compress.export(model, tmp_path / "out")
    before = first.read_bytes()
    import hf_compress.exporters.gguf as exporter

    def broken(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(exporter, "write_gguf", broken)
    with pytest.raises(OSError, match="No space left"):
        hf_compress.export(model, tmp_path / "out")
    assert first.read_bytes() == before  # the previous export is intact
    monkeypatch.undo()
    hf_compress.export(model, tmp_path / "out")  # our own folder: replaced without overwrite
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(ValueError, match="not empty and holds no checkpoint"):
        hf_compress.export(model, tmp_path / "mine")


def test_cli_export(tmp_path, capsys):
    q = hf_compress.quantize(tiny_llama(), hf_compress.RTNConfig(bits=4, group_size=32), progress=False)
    hf_compress.save_pretrained(q, tmp_path / "q")
    save_char_tokenizer(tmp_path / "q")  # a WordLevel tokenizer: weights are exported alone, with a warning
    assert main(["export", str(tmp_path / "q"), "--out", str(tmp_path / "g")]) == 0
    captured = capsys.readouterr()
    assert "exported" in captured.out and "exporting the weights alone" in captured.err
    assert (tmp_path / "g" / REPORT).is_file()
    assert main(["export", str(tmp_path / "q"), "--out", str(tmp_path / "h"), "--format", "onnx"]) == 2
    assert "unknown export format" in capsys.readouterr().err


def test_smollm2_export_with_tokenizer(smollm2_dir, tmp_path):
    """The real model (4-bit g64, 30 blocks): logits through transformers' GGUF loader within fp16 tolerance,
    and the tokenizer written into the file tokenizes like the original."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    hf_compress.quantize(model, hf_compress.RTNConfig(bits=4, group_size=64), progress=False)
    path = hf_compress.export(model, tmp_path / "out", tokenizer=tok)
    text = "The history of the city of Paris begins with"
    ids = tok(text).input_ids
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits
    got = gguf_logits(tmp_path / "out", path.name, tmp_path, [ids])
    rel = float((got - expected).abs().mean() / expected.std())
    assert rel < 0.01 and (got.argmax(-1) == expected.argmax(-1)).float().mean() > 0.9
    gguf_tok = AutoTokenizer.from_pretrained(tmp_path / "out", gguf_file=path.name)
    assert gguf_tok(text).input_ids == ids
