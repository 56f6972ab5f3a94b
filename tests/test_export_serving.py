"""Serving exports (issue 19): compressed-tensors for vLLM/transformers, GPTQ for GPTQModel/transformers — each read
back by that format's reader in a fresh process without hf-compress; vLLM servability (refuse, widen, fused sets);
fused-group-constrained planners; the export card and push."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from safetensors import safe_open

import hf_compress
from hf_compress.cli.commands import main
from hf_compress.exporters import REPORT
from hf_compress.formats.linear import PackedLinear

from conftest import save_char_tokenizer, subprocess_env, tiny_llama

IDS = [[5, 17, 99, 3, 64, 120, 7, 33, 2]]
TESTS = Path(__file__).resolve().parent
FRESH_CT = ("import sys, torch; from transformers import AutoModelForCausalLM;"
            "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32);"
            "assert not any(k.partition('.')[0] == 'hf_compress' for k in sys.modules), 'hf_compress was imported';"
            "from safetensors.torch import save_file; save_file({'logits': m(torch.tensor(eval(sys.argv[3]))).logits.detach()}, sys.argv[2])")


def reader_logits(folder, tmp_path, python=sys.executable, code=FRESH_CT, ids=IDS):
    out = tmp_path / f"reader_{Path(folder).name}.safetensors"
    run = subprocess.run([python, "-c", code, str(folder), str(out), str(ids)], cwd=tmp_path, capture_output=True,
                         text=True, timeout=600, env=subprocess_env(HF_COMPRESS_AUTOLOAD="0"))
    assert run.returncode == 0, run.stderr[-3000:]
    return load_file(str(out))["logits"]


def ours(model, ids=IDS):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits


def close(got, expected):  # fp16 dense tensors in the export (embeddings, norms)
    return float((got - expected).abs().max()) < 5e-3 * float(expected.abs().max()) + 1e-3


def rtn(bits, sym, group_size=32, **kw):
    return hf_compress.quantize(tiny_llama(), hf_compress.RTNConfig(bits=bits, group_size=group_size, sym=sym, **kw),
                                progress=False)


# -- compressed-tensors --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits,sym", [(4, False), (4, True), (3, True), (8, True), (8, False)])
def test_compressed_tensors_export_loads_with_transformers_without_hf_compress(tmp_path, bits, sym):
    pytest.importorskip("compressed_tensors")
    model = rtn(bits, sym)
    folder = hf_compress.export(model, tmp_path / "ct", format="compressed-tensors")
    quant = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert quant["quant_method"] == "compressed-tensors" and quant["format"] == "pack-quantized"
    (group,) = quant["config_groups"].values()  # one scheme; explicit module names as targets
    assert group["weights"]["num_bits"] == bits and group["weights"]["symmetric"] == sym
    assert len(group["targets"]) == 14 and "model.layers.1.mlp.down_proj" in group["targets"]
    assert quant["ignore"] == ["lm_head"]
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        packed = f.get_tensor("model.layers.0.mlp.down_proj.weight_packed")
        assert packed.dtype == torch.int32 and tuple(packed.shape) == (64, 96 * bits // 32)
        if not sym:  # zero points packed along the outputs, as vLLM reads them
            assert tuple(f.get_tensor("model.layers.0.mlp.down_proj.weight_zero_point").shape) == (64 * bits // 32, 3)
    assert close(reader_logits(folder, tmp_path), ours(model))
    report = json.loads((folder / REPORT).read_text())
    assert report["vllm"]["servable"] and report["written"]["counts"] == {"exact": 14, "unquantized": 1}


@pytest.mark.skipif(not os.environ.get("HF_COMPRESS_CT_ALT_PYTHON"),
                    reason="set HF_COMPRESS_CT_ALT_PYTHON to a python with another transformers/compressed-tensors "
                           "(e.g. 5.17 + 0.19) to check the export against that reader too")
@pytest.mark.parametrize("bits,sym", [(4, False), (3, True)])
def test_compressed_tensors_export_loads_with_another_reader_version(tmp_path, bits, sym):
    model = rtn(bits, sym)
    folder = hf_compress.export(model, tmp_path / "ct", format="compressed-tensors", servable="off")
    assert close(reader_logits(folder, tmp_path, python=os.environ["HF_COMPRESS_CT_ALT_PYTHON"]), ours(model))


def test_servability_refuses_unservable_schemes_then_widens_them_exactly(tmp_path, capsys):
    pytest.importorskip("compressed_tensors")
    model = rtn(3, False)
    with pytest.raises(ValueError, match=r"cannot serve 14 module\(s\).*asymmetric codes only at 4 or 8 bits.*"
                                         r"servable='widen'"):
        hf_compress.export(model, tmp_path / "ct", format="compressed-tensors")
    assert not (tmp_path / "ct").exists()  # refused before anything was written
    folder = hf_compress.export(model, tmp_path / "ct", format="compressed-tensors", servable="widen")
    report = json.loads((folder / REPORT).read_text())
    assert report["written"]["counts"] == {"widened": 14, "unquantized": 1} and report["extra_bytes"] > 0
    (group,) = json.loads((folder / "config.json").read_text())["quantization_config"]["config_groups"].values()
    assert group["weights"]["num_bits"] == 4 and not group["weights"]["symmetric"]
    assert close(reader_logits(folder, tmp_path), ours(model))  # 3-bit codes on the 4-bit grid: the same weights
    # transformers alone reads 3-bit asymmetric: servable="off" writes it as planned, the vLLM report says why not
    folder = hf_compress.export(model, tmp_path / "ct3", format="compressed-tensors", servable="off")
    report = json.loads((folder / REPORT).read_text())
    assert not report["vllm"]["servable"] and report["vllm"]["report"]["counts"]["widened"] == 14
    assert close(reader_logits(folder, tmp_path), ours(model))


def test_fused_projections_must_share_one_scheme(tmp_path):
    pytest.importorskip("compressed_tensors")
    plan = {"model.layers.0.self_attn.k_proj": {"bits": 8, "group_size": 32, "sym": True}}
    for i in range(2):
        for leaf in ("self_attn.q_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                     "mlp.down_proj") + (("self_attn.k_proj",) if i else ()):
            plan[f"model.layers.{i}.{leaf}"] = {"bits": 4, "group_size": 32 if "gate" not in leaf else 64, "sym": True}
    model = hf_compress.quantize(tiny_llama(), hf_compress.RTNConfig(plan=plan), progress=False)
    with pytest.raises(ValueError, match=r"layers\.0\.self_attn\.q_proj: fused with q_proj, k_proj, v_proj"):
        hf_compress.export(model, tmp_path / "ct", format="compressed-tensors")
    folder = hf_compress.export(model, tmp_path / "ct", format="compressed-tensors", servable="widen")
    written = json.loads((folder / REPORT).read_text())["written"]["modules"]
    assert {written[f"model.layers.0.self_attn.{p}_proj"]["written"] for p in "qkv"} == {"8-bit sym g32"}
    assert {written[f"model.layers.{i}.mlp.{p}_proj"]["written"] for i in range(2) for p in ("gate", "up")} == {"4-bit sym g32"}
    assert written["model.layers.1.self_attn.q_proj"]["status"] == "exact"
    assert close(reader_logits(folder, tmp_path), ours(model))


def test_fused_group_planner_gives_a_servable_mixed_plan(tmp_path, calib, char_tokenizer):
    pytest.importorskip("compressed_tensors")
    config = hf_compress.BAQConfig(target_bits=4.0, granularity="module", min_bits=2, max_bits=8, group_size=32,
                                   sym=True, fused_groups=True)
    model = hf_compress.quantize(tiny_llama(), config, calibration=calib, tokenizer=char_tokenizer, progress=False)
    specs = {n: m.spec for n, m in model.named_modules() if isinstance(m, PackedLinear)}
    for i in range(2):
        assert len({specs[f"model.layers.{i}.self_attn.{p}_proj"] for p in "qkv"}) == 1
        assert specs[f"model.layers.{i}.mlp.gate_proj"] == specs[f"model.layers.{i}.mlp.up_proj"]
    counts = {n: m.in_features * m.out_features for n, m in model.named_modules() if isinstance(m, PackedLinear)}
    assert sum(specs[n].bits * c for n, c in counts.items()) / sum(counts.values()) <= 4.0 + 1e-9
    assert len({s.bits for s in specs.values()}) > 1  # really mixed
    folder = hf_compress.export(model, tmp_path / "ct", format="compressed-tensors")  # servable as planned
    assert json.loads((folder / REPORT).read_text())["written"]["counts"] == {"exact": 14, "unquantized": 1}
    assert close(reader_logits(folder, tmp_path), ours(model))
    # the other planners take the option too
    hi = hf_compress.HighImpactConfig(target_bits=2.1, group_size=16, fisher_samples=2, solver="rtn", fused_groups=True)
    model = hf_compress.quantize(tiny_llama(), hi, calibration=calib, tokenizer=char_tokenizer, progress=False)
    attn = model.model.layers[0].self_attn
    assert torch.equal(attn.q_proj.col_bits, attn.k_proj.col_bits) and torch.equal(attn.k_proj.col_bits, attn.v_proj.col_bits)
    assert hf_compress.LayerwiseQuantConfig(target_bits=3, solver="rtn", score="random", fused_groups=True).fused_groups


def test_mixed_width_columns_are_refused_or_written_dense(tmp_path, calib, char_tokenizer):
    pytest.importorskip("compressed_tensors")
    config = hf_compress.BAQConfig(target_bits=3.0, group_size=32)
    model = hf_compress.quantize(tiny_llama(), config, calibration=calib, tokenizer=char_tokenizer, progress=False)
    with pytest.raises(ValueError, match="per-column mixed widths"):
        hf_compress.export(model, tmp_path / "ct", format="compressed-tensors", servable="off")
    folder = hf_compress.export(model, tmp_path / "ct", format="compressed-tensors", servable="widen")
    report = json.loads((folder / REPORT).read_text())
    assert report["written"]["counts"].get("dense", 0) > 0
    assert close(reader_logits(folder, tmp_path), ours(model))


# -- GPTQ ----------------------------------------------------------------------------------------------------------
def independent_gptq_logits(folder, tmp_path):
    out = tmp_path / f"gptq_{Path(folder).name}.safetensors"
    run = subprocess.run([sys.executable, str(TESTS / "gptq_reader.py"), str(folder), str(IDS), str(out)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env=subprocess_env(HF_COMPRESS_AUTOLOAD="0"))
    assert run.returncode == 0, run.stderr[-3000:]
    return load_file(str(out))["logits"]


@pytest.mark.parametrize("bits,sym,fmt", [(4, True, "gptq"), (4, False, "gptq_v2"), (3, True, "gptq"),
                                          (2, False, "gptq_v2"), (8, True, "gptq")])
def test_gptq_export_is_read_back_by_an_independent_reader(tmp_path, bits, sym, fmt):
    model = rtn(bits, sym)
    folder = hf_compress.export(model, tmp_path / "g", format="gptq")
    quant = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert quant["quant_method"] == "gptq" and quant["bits"] == bits and quant["checkpoint_format"] == fmt
    assert "dynamic" not in quant and not quant["desc_act"]
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert tuple(f.get_tensor("model.layers.0.mlp.down_proj.qweight").shape) == (96 * bits // 32, 64)
        assert tuple(f.get_tensor("model.layers.0.mlp.down_proj.qzeros").shape) == (3, 64 * bits // 32)
    assert close(independent_gptq_logits(folder, tmp_path), ours(model))


def test_gptq_mixed_plan_uses_dynamic_overrides(tmp_path):
    plan = {f"model.layers.{i}.{leaf}": {"bits": 8 if leaf == "mlp.down_proj" else 4, "group_size": 32, "sym": True}
            for i in range(2) for leaf in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                           "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    plan["model.layers.1.self_attn.o_proj"]["bits"] = 5  # no GPTQ width: refused, or widened to 8 exactly
    model = hf_compress.quantize(tiny_llama(), hf_compress.RTNConfig(plan=plan), progress=False)
    with pytest.raises(ValueError, match=r"layers\.1\.self_attn\.o_proj: GPTQ checkpoints hold 2, 3, 4 or 8 bits, not 5"):
        hf_compress.export(model, tmp_path / "g", format="gptq")
    folder = hf_compress.export(model, tmp_path / "g", format="gptq", widen=True)
    quant = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert quant["bits"] == 4 and set(quant["dynamic"]) == {
        r"+:^model\.layers\.0\.mlp\.down_proj$", r"+:^model\.layers\.1\.mlp\.down_proj$",
        r"+:^model\.layers\.1\.self_attn\.o_proj$"}
    assert all(v["bits"] == 8 for v in quant["dynamic"].values())
    assert close(independent_gptq_logits(folder, tmp_path), ours(model))


@pytest.mark.skipif(not os.environ.get("HF_COMPRESS_GPTQ_PYTHON"),
                    reason="gptqmodel needs torch>=2.14 (not installable beside this CPU torch); set "
                           "HF_COMPRESS_GPTQ_PYTHON to a python that has it to check the export with the reference reader")
@pytest.mark.parametrize("bits,sym", [(4, True), (4, False), (3, True)])
def test_gptq_export_loads_with_gptqmodel(tmp_path, bits, sym):
    model = rtn(bits, sym)
    folder = hf_compress.export(model, tmp_path / "g", format="gptq")
    code = FRESH_CT.replace("dtype=torch.float32", "dtype=torch.float16, device_map='cpu'").replace(
        ".logits.detach()", ".logits.float().detach()")
    assert close(reader_logits(folder, tmp_path, python=os.environ["HF_COMPRESS_GPTQ_PYTHON"], code=code), ours(model))


# -- bad input, atomicity, CLI, card, push ---------------------------------------------------------------------------
def test_bad_export_requests_are_refused_clearly(tmp_path):
    model = rtn(4, True)
    with pytest.raises(ValueError, match="unknown export format 'onnx'; formats: compressed-tensors, gptq, gguf"):
        hf_compress.export(model, tmp_path / "x", format="onnx")
    with pytest.raises(ValueError, match="servable must be one of refuse, widen, off"):
        hf_compress.export(model, tmp_path / "x", format="compressed-tensors", servable="maybe")
    with pytest.raises(ValueError, match="dtype must be one of"):
        hf_compress.export(model, tmp_path / "x", format="gptq", dtype="int8")
    with pytest.raises(ValueError, match="nothing to write as GPTQ"):
        hf_compress.export(tiny_llama(), tmp_path / "x", format="gptq")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(ValueError, match="is not empty and holds no checkpoint"):
        hf_compress.export(model, tmp_path / "mine", format="gptq")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_a_failed_export_keeps_the_previous_one(tmp_path, monkeypatch):
    from hf_compress.exporters import gptq

    model = rtn(4, True)
    folder = hf_compress.export(model, tmp_path / "g", format="gptq")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gptq, "save_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        hf_compress.export(rtn(3, True), tmp_path / "g", format="gptq")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_cli_exports_each_format_and_prints_the_servability_report(tmp_path, capsys):
    pytest.importorskip("compressed_tensors")
    hf_compress.save_pretrained(rtn(3, False), tmp_path / "q")
    save_char_tokenizer(tmp_path / "q")
    assert main(["export", str(tmp_path / "q"), str(tmp_path / "ct"), "--format", "compressed-tensors"]) == 2
    assert "cannot serve 14 module(s)" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "q"), str(tmp_path / "ct"), "--format", "compressed-tensors",
                 "--servable", "widen"]) == 0
    out = capsys.readouterr().out
    assert "widened  model.layers.0.self_attn.q_proj: 3-bit asym g32 -> 4-bit asym g32" in out and "widening" in out
    assert (tmp_path / "ct" / "tokenizer.json").is_file() or (tmp_path / "ct" / "tokenizer_config.json").is_file()
    assert main(["export", str(tmp_path / "q"), "--out", str(tmp_path / "g"), "--format", "gptq"]) == 0
    assert json.loads((tmp_path / "g" / REPORT).read_text())["checkpoint_format"] == "gptq_v2"


def test_export_card_names_format_plan_and_servability_and_push_uploads_the_folder(tmp_path):
    pytest.importorskip("compressed_tensors")
    from huggingface_hub import ModelCard
    from hub_standin import GOOD_TOKEN, HubStandIn, installed

    from hf_compress.integrations.card_inputs import perplexity_result

    model = rtn(4, False)
    folder = hf_compress.export(model, tmp_path / "tiny-ct", format="compressed-tensors",
                                results=[perplexity_result(12.5, protocol="through transformers' reader")])
    card = ModelCard.load(folder / "README.md")
    assert {"hf-compress", "export", "compressed-tensors"} <= set(card.data.tags)
    text = card.text
    assert "compressed-tensors (pack-quantized)" in text and "`hfc_rtn`" in text and "4.625 realised bits" in text
    assert "servable by vLLM" in text and "Marlin: 14" in text and "12.5" in text and "vllm serve tiny-ct" in text
    with installed(HubStandIn()) as hub:
        hf_compress.push_to_hub(folder, "me/tiny-ct", token=GOOD_TOKEN)
        files = hub.repos["me/tiny-ct"]["files"]
        assert {"config.json", "model.safetensors", REPORT, "README.md"} <= set(files)
        pushed = ModelCard(files["README.md"].decode())
        pushed.validate()
        assert "vllm serve me/tiny-ct" in pushed.text
        gguf_path = hf_compress.export(rtn(4, False, group_size=32), tmp_path / "tiny-gguf", format="gguf")
        hf_compress.push_to_hub(gguf_path.parent, "me/tiny-gguf", token=GOOD_TOKEN)
        assert gguf_path.name in hub.repos["me/tiny-gguf"]["files"]


# -- real model ------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_blocks_export_as_compressed_tensors(smollm2_dir, tmp_path):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    skip = [r"layers\.([3-9]|[12]\d)\."]  # blocks 0-2: the real shapes (576, 1536, GQA 9/3 heads), a small cost
    hf_compress.quantize(model, hf_compress.RTNConfig(bits=4, group_size=64, modules_to_not_convert=skip), progress=False)
    folder = hf_compress.export(model, tmp_path / "ct", format="compressed-tensors", tokenizer=tok)
    report = json.loads((folder / REPORT).read_text())
    assert set(report["written"]["counts"]) == {"exact", "unquantized"} and report["vllm"]["servable"]
    assert report["written"]["counts"]["exact"] == 21
    ids = [tok("The history of the city of Paris begins with").input_ids]
    expected, got = ours(model, ids), reader_logits(folder, tmp_path, ids=ids)
    rel = float((got - expected).abs().mean() / expected.std())
    assert rel < 0.01 and (got.argmax(-1) == expected.argmax(-1)).float().mean() > 0.9
