"""Per-column widths (BAQ, high-impact channels): allocation, storage in bit-width segments, solvers, configs
through every way in, fresh-process round trips, exact size accounting, the plan view, and bad input."""

import itertools
import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import hf_compress
from hf_compress import BAQConfig, GPTQConfig, HighImpactConfig
from hf_compress.allocation.budgets import choose_options, equal_loss_bits
from hf_compress.formats.columns import fit_column_grid, mixed_spec
from hf_compress.formats.grid import QuantSpec
from hf_compress.formats.linear import PackedLinear
from hf_compress.plan import overall_bits, plan_rows, plan_table, plot_plan
from hf_compress.report import checkpoint_bytes, size_report
from hf_compress.sensitivity import profile
from hf_compress.solvers.gptq import gptq_quantize, relative_output_error

from conftest import fresh_process_logits, save_char_tokenizer, tiny_gpt2, tiny_llama

IDS = torch.tensor([[5, 17, 99, 3, 64, 120, 7, 7, 31, 2]])


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


# -- allocation ------------------------------------------------------------------------------------------------
def test_equal_loss_bits_meets_budget_and_follows_loss():
    torch.manual_seed(0)
    scores = torch.rand(500).pow(6) * 1e3 + 1e-6  # losses spread over many orders of magnitude
    for target in (1.5, 2.0, 2.5, 3.0, 3.25, 6.9):
        bits = equal_loss_bits(scores, torch.ones(500), target, 1, 8)
        assert bits.min() >= 1 and bits.max() <= 8
        assert target - 1 / 500 - 1e-9 <= bits.double().mean() <= target + 1e-9
        order = torch.argsort(scores)
        assert (bits[order][1:] >= bits[order][:-1] - 1).all()  # higher loss, (nearly) never fewer bits
    assert torch.equal(equal_loss_bits(torch.ones(10), torch.ones(10), 3.0, 2, 4), torch.full((10,), 3))
    # the closed form: doubling a column's loss by 4x buys it exactly one more bit (slope 1/2)
    bits = equal_loss_bits(torch.tensor([1.0, 4.0, 16.0]), torch.ones(3), 3.0, 1, 8, slope=0.5)
    assert bits.tolist() == [2, 3, 4]


def test_equal_loss_bits_bad_input():
    with pytest.raises(ValueError, match="cannot be met"):
        equal_loss_bits(torch.ones(4), torch.ones(4), 0.5, 1, 8)
    with pytest.raises(ValueError, match="cannot be met"):
        equal_loss_bits(torch.ones(4), torch.ones(4), 4.5, 2, 4)
    with pytest.raises(ValueError, match="NaN"):
        equal_loss_bits(torch.tensor([1.0, float("nan")]), torch.ones(2), 3.0, 2, 4)


def test_choose_options_matches_brute_force():
    torch.manual_seed(1)
    for _ in range(20):
        costs = torch.rand(5, 3).sort(dim=1, descending=True).values  # more bits, less cost
        prices = torch.tensor([[10.0, 12.0, 15.0]]).repeat(5, 1) * torch.rand(5, 1).add(0.5)
        budget = float(prices[:, 0].sum() + torch.rand(1) * (prices[:, 2] - prices[:, 0]).sum())
        best = min((sum(float(costs[i, k]) for i, k in enumerate(c)), c)
                   for c in itertools.product(range(3), repeat=5)
                   if sum(float(prices[i, k]) for i, k in enumerate(c)) <= budget)
        got = choose_options(costs, prices, budget)
        assert float(prices[torch.arange(5), got].sum()) <= budget + 1e-6
        assert float(costs[torch.arange(5), got].sum()) <= best[0] * 1.15 + 1e-9  # near-optimal (Lagrangian + greedy)
    with pytest.raises(ValueError, match="below the cheapest"):
        choose_options(torch.ones(2, 2), torch.tensor([[5.0, 6.0], [5.0, 6.0]]), 9.0)


# -- storage ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("group_size", [16, 24, -1])
def test_mixed_width_module_stores_exactly_and_dequantizes_like_the_grid(sym, group_size):
    torch.manual_seed(0)
    W = torch.randn(12, 70)
    col_bits = torch.randint(1, 9, (70,), dtype=torch.uint8)
    spec = mixed_spec(col_bits, group_size, sym)
    grid = fit_column_grid(W, spec, col_bits)
    codes = grid.quantize(W)
    mod = PackedLinear.from_codes(codes, grid.scales, grid.zeros, spec, col_bits=col_bits)
    assert torch.equal(mod.codes(), codes)
    assert torch.allclose(mod.dequantized_weight(), grid.dequantize(codes), atol=0, rtol=0)
    # storage: each segment's codes at its own width, scales per segment group, one byte per column of widths
    bits = sum(12 * n * b for b, n in spec.bit_groups)
    assert mod.weight.numel() * 8 - bits < 8 * 8 * len(spec.bit_groups)
    assert mod.col_bits.numel() == 70 and mod.scales.shape[1] == sum(spec.groups(n) for _, n in spec.bit_groups)
    err = (mod.dequantized_weight() - W).abs().mean(0)
    wide, narrow = col_bits >= 6, col_bits <= 2
    assert err[wide].mean() < err[narrow].mean()  # more bits, less error: widths really are per column


def test_mixed_spec_validation_and_serialisation():
    spec = QuantSpec(4, 64, False, bit_groups=((2, 10), (4, 6)))
    assert QuantSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert spec.code_bits(16) == pytest.approx((20 + 24) / 16)
    with pytest.raises(ValueError, match="ascending"):
        QuantSpec(4, 64, bit_groups=((4, 6), (2, 10)))
    with pytest.raises(ValueError, match="ascending"):
        QuantSpec(3, 64, bit_groups=((2, 10), (4, 6)))  # widest must equal bits
    with pytest.raises(ValueError, match="unsupported bit width"):
        QuantSpec(9, 64, bit_groups=((2, 10), (9, 6)))
    with pytest.raises(ValueError, match="cover 16 columns"):
        PackedLinear(20, 4, spec)


def test_gptq_with_allocated_widths_beats_uniform_on_heterogeneous_columns():
    """BAQ's premise on a problem with a known answer: when columns matter unequally, equal-loss widths at the
    same mean bits give a smaller output error than one width for all."""
    torch.manual_seed(0)
    n = 128
    X = torch.randn(4096, n) * torch.logspace(-1.5, 1.0, n)[torch.randperm(n)]
    H = 2 * X.T @ X / X.shape[0]
    W = torch.randn(64, n)
    uniform = gptq_quantize(W, H, QuantSpec(3, 32), clip_grid=10)
    bits = equal_loss_bits(uniform.column_loss, torch.ones(n), 3.0, 1, 8, slope=1 / 1.95)
    assert bits.double().mean() <= 3.0 and bits.unique().numel() > 2
    baq = gptq_quantize(W, H, QuantSpec(3, 32), clip_grid=10, col_bits=bits)
    assert baq.spec.is_mixed and torch.equal(baq.col_bits, bits.to(torch.uint8))
    assert baq.output_error < 0.7 * uniform.output_error
    mod = PackedLinear.from_codes(baq.codes, baq.scales, baq.zeros, baq.spec, col_bits=baq.col_bits)
    assert relative_output_error(W, mod.dequantized_weight(), H) == pytest.approx(baq.output_error, rel=1e-4)


# -- configs through the three ways in -------------------------------------------------------------------------
def _configs(profile_dir=None):
    return {
        "baq-column": BAQConfig(target_bits=2.5, group_size=16, profile=profile_dir),
        "baq-module": BAQConfig(target_bits=3.0, group_size=16, granularity="module", profile=profile_dir),
        "high-impact": HighImpactConfig(target_bits=2.1, group_size=16, fisher_samples=4, profile=profile_dir),
    }


@pytest.mark.parametrize("name", ["baq-column", "baq-module", "high-impact"])
def test_config_quantize_save_fresh_load_identical_and_size_exact(name, calib, char_tokenizer, tmp_path):
    config = _configs()[name]
    model = hf_compress.quantize(tiny_llama(), config, calibration=calib, tokenizer=char_tokenizer, progress=False)
    rows = plan_rows(model)
    code, bits = overall_bits(rows)
    assert code <= config.target_bits + 1e-9 and code >= config.target_bits - 0.1
    assert bits == pytest.approx(size_report(model).bits_per_weight, rel=1e-9)
    assert config.report["bits_per_weight"] == pytest.approx(bits, abs=1e-4)
    if name != "baq-module":
        assert any(r["code_bits"] != int(r["code_bits"]) for r in rows)  # really mixed within modules
    else:
        assert len({r["code_bits"] for r in rows}) > 1  # widths differ between modules
    expect = logits(model)
    model.save_pretrained(tmp_path / "q")
    saved = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == config.quant_method and len(saved["plan"]) == 14
    assert not any(k.startswith("_") for k in saved)
    on_disk = checkpoint_bytes(tmp_path / "q")
    ideal = size_report(model).ideal_bytes
    assert ideal <= on_disk <= 1.10 * ideal
    assert torch.equal(fresh_process_logits(tmp_path / "q", IDS, tmp_path), expect)


def test_configs_on_load_and_from_a_saved_profile(calib, char_tokenizer, tmp_path, text_corpus):
    prof = profile(tiny_llama(), calib, char_tokenizer, bits=3, group_size=16, fisher_samples=4, progress=False)
    prof.save(tmp_path / "p")
    assert len(prof.modules["model.layers.0.mlp.down_proj"]["column_fisher"]) == tiny_llama().model.layers[0].mlp.down_proj.in_features
    # from a saved profile: the plan follows the profile's losses, no pass 1
    config = _configs(str(tmp_path / "p"))["baq-column"]
    hf_compress.quantize(tiny_llama(), config, calibration=calib, tokenizer=char_tokenizer, progress=False)
    name = "model.layers.1.mlp.down_proj"
    losses = torch.tensor(prof.modules[name]["column_loss"])
    expect_bits = equal_loss_bits(losses, torch.ones_like(losses), 2.5, 1, 8, slope=1 / 1.95)
    assert torch.equal(config._col_bits[name], expect_bits.to(torch.uint8))
    # quantize-on-load with a dataset file
    tiny_llama().save_pretrained(tmp_path / "dense")
    save_char_tokenizer(tmp_path / "dense")
    data = tmp_path / "calib.txt"
    data.write_text(text_corpus)
    for cfg in (BAQConfig(target_bits=3.0, group_size=16, dataset=str(data), num_samples=8, seq_len=64),
                HighImpactConfig(target_bits=3.1, low_bits=3, high_bits=4, group_size=16, dataset=str(data),
                                 num_samples=8, seq_len=64, fisher_samples=2)):
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", quantization_config=cfg)
        assert isinstance(model.model.layers[0].mlp.up_proj, PackedLinear)
        model.save_pretrained(tmp_path / "q")
        assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "q")), logits(model))


def test_high_impact_keeps_top_fisher_channels_high(calib, char_tokenizer):
    config = HighImpactConfig(target_bits=2.1, group_size=16, fisher_samples=4, solver="rtn")
    model = hf_compress.quantize(tiny_llama(), config, calibration=calib, tokenizer=char_tokenizer, progress=False)
    assert set(config.module_ratios.values()) <= set(config.ratios)
    mod = model.model.layers[0].mlp.down_proj
    share = (mod.col_bits == 3).float().mean().item()
    n = mod.in_features
    assert share == pytest.approx(math.ceil(config.module_ratios["model.layers.0.mlp.down_proj"] * n) / n)


def test_cli_baq_and_high_impact_and_plan(tmp_path, text_corpus, capsys):
    from hf_compress.cli.commands import main

    tiny_llama().save_pretrained(tmp_path / "dense")
    save_char_tokenizer(tmp_path / "dense")
    data = tmp_path / "c.txt"
    data.write_text(text_corpus)
    common = ["--dataset", str(data), "--num-samples", "4", "--seq-len", "64", "--group-size", "16"]
    assert main(["quantize", str(tmp_path / "dense"), "--out", str(tmp_path / "b"), "--method", "baq", "--target-bits", "2.5", *common]) == 0
    assert main(["quantize", str(tmp_path / "dense"), "--out", str(tmp_path / "h"), "--method", "high-impact", "--high-bits", "3",
                 "--low-bits", "2", "--target-bits", "2.1", "--fisher-samples", "2", *common]) == 0
    capsys.readouterr()
    assert main(["plan", str(tmp_path / "b"), "--plot", str(tmp_path / "plan.png")]) == 0
    out = capsys.readouterr().out
    assert "| 0 |" in out and "| 1 |" in out and "bits per weight" in out
    assert (tmp_path / "plan.png").stat().st_size > 5000
    assert main(["quantize", str(tmp_path / "dense"), "--out", str(tmp_path / "x"), "--method", "baq", "--score", "zd", *common]) == 2
    assert "takes no --score" in capsys.readouterr().err
    assert main(["quantize", str(tmp_path / "dense"), "--out", str(tmp_path / "x"), "--method", "baq", "--target-bits", "9", *common]) == 2
    assert "outside the allowed widths" in capsys.readouterr().err


def test_plan_table_and_plot(calib, char_tokenizer, tmp_path):
    model = hf_compress.quantize(tiny_llama(), _configs()["baq-column"], calibration=calib, tokenizer=char_tokenizer, progress=False)
    table = plan_table(model, per="module")
    assert table.count("model.layers.") == 14 and "1b" in table or "2b" in table
    assert plot_plan(model, tmp_path / "p.png").stat().st_size > 5000
    with pytest.raises(ValueError, match="no hf-compress packed modules"):
        plan_rows(tiny_llama())


# -- bad input -------------------------------------------------------------------------------------------------
def test_budget_and_option_errors():
    with pytest.raises(ValueError, match="outside the allowed widths"):
        BAQConfig(target_bits=0.5)
    with pytest.raises(ValueError, match="outside the allowed widths"):
        BAQConfig(target_bits=4.5, min_bits=2, max_bits=4)
    with pytest.raises(ValueError, match="granularity"):
        BAQConfig(granularity="row")
    with pytest.raises(ValueError, match="unsupported bit width"):
        BAQConfig(max_bits=9)
    with pytest.raises(ValueError, match=r"cannot be met.*\[2.02, 2.2\]"):
        HighImpactConfig(target_bits=2.5, low_bits=2, high_bits=3)
    with pytest.raises(ValueError, match="cannot be met"):
        HighImpactConfig(target_bits=1.9)
    with pytest.raises(ValueError, match="ratios"):
        HighImpactConfig(ratios=(0.2, 0.1))


def test_layers_that_cannot_meet_the_budget(calib, char_tokenizer):
    # 0.02 of 64 columns rounds up to 2 columns (3.1 %): every module's cheapest option costs more than 2.02 bits
    config = HighImpactConfig(target_bits=2.02, group_size=16, fisher_samples=2)
    with pytest.raises(ValueError, match="cannot be met by these layers"):
        hf_compress.quantize(tiny_llama(), config, calibration=calib, tokenizer=char_tokenizer, progress=False)


def test_profile_from_another_model_is_refused(calib, char_tokenizer, tmp_path):
    profile(tiny_gpt2(), calib, char_tokenizer, group_size=16, fisher_samples=2, progress=False).save(tmp_path / "g")
    for config in _configs(str(tmp_path / "g")).values():
        with pytest.raises(ValueError, match="does not match this model"):
            hf_compress.quantize(tiny_llama(), config, calibration=calib, tokenizer=char_tokenizer, progress=False)
    # a profile without Fisher sums cannot drive high-impact ratios
    profile(tiny_llama(), calib, char_tokenizer, group_size=16, fisher_samples=0, progress=False).save(tmp_path / "nf")
    with pytest.raises(ValueError, match="column_fisher"):
        hf_compress.quantize(tiny_llama(), _configs(str(tmp_path / "nf"))["high-impact"], calibration=calib,
                             tokenizer=char_tokenizer, progress=False)


def test_corrupt_column_widths_are_refused_on_load(calib, char_tokenizer, tmp_path):
    model = hf_compress.quantize(tiny_llama(), _configs()["baq-column"], calibration=calib, tokenizer=char_tokenizer, progress=False)
    model.save_pretrained(tmp_path / "q")
    path = next((tmp_path / "q").glob("*.safetensors"))
    tensors = load_file(path)
    key = "model.layers.0.mlp.up_proj.col_bits"
    tensors[key] = torch.where(tensors[key] == tensors[key].max(), tensors[key].min(), tensors[key])
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="do not match the plan's bit groups"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "q")


def test_gptq_rejects_mismatched_widths():
    with pytest.raises(ValueError, match="col_bits has 3 widths"):
        gptq_quantize(torch.randn(4, 8), torch.eye(8), QuantSpec(3), col_bits=torch.tensor([2, 3, 4]))
    assert GPTQConfig(bits=3).plan is None
