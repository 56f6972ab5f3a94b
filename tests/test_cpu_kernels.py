"""CPU fast paths of packed modules (issue 18): each kernel against the torch reference, the fallback, the
reference mode, plans rebuilt when weights change, autograd, the report, and the real model."""

from __future__ import annotations

import logging

import pytest
import torch

import hf_compress
from hf_compress.formats.grid import QuantSpec
from hf_compress.formats.linear import PackedLinear
from hf_compress.kernels.dispatch import cpu_plan
from hf_compress.kernels.report import kernel_report
from hf_compress.solvers.rtn import rtn_quantize


@pytest.fixture
def fast(monkeypatch):
    monkeypatch.setenv("HF_COMPRESS_KERNELS", "auto")


def packed(out_f, in_f, bits, group, sym=False, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out_f, in_f, generator=g)
    spec = QuantSpec(bits, group, sym)
    r = rtn_quantize(W, spec)
    return PackedLinear.from_codes(r.codes, r.scales, r.zeros, spec, torch.randn(out_f, generator=g) if bias else None)


def relative_error(module, x):
    with torch.no_grad():
        y = module(x)
        ref = torch.nn.functional.linear(x, module.dequantized_weight(), module.bias)
        bf16 = torch.nn.functional.linear(x.bfloat16(), module.dequantized_weight().bfloat16(),
                                          module.bias.bfloat16() if module.bias is not None else None).float()
    scale = ref.abs().max()
    return float((y - ref).abs().max() / scale), float((bf16 - ref).abs().max() / scale), y


@pytest.mark.parametrize("bits,group,sym,shape,kind", [
    (4, 64, False, (96, 128), "int4"), (3, 32, True, (64, 64), "int4"), (2, -1, False, (32, 256), "int4"),
    (2, 512, False, (32, 512), "int4"),  # one 512-wide group: kernel groups of 256 repeat its scale
    (1, 32, False, (32, 64), "int4"), (8, -1, False, (48, 64), "int8"), (6, -1, True, (48, 64), "int8"),
    (8, 32, False, (48, 64), "dense"), (4, 48, False, (32, 96), "dense"), (4, 32, False, (24, 64), "dense"),
])
def test_each_kernel_matches_the_reference_within_bf16_rounding(fast, bits, group, sym, shape, kind):
    module = packed(*shape, bits, group, sym)
    x = torch.randn(2, 5, shape[1])
    err, bf16_err, y = relative_error(module, x)
    assert cpu_plan(module).kinds == [kind]
    assert y.dtype == torch.float32 and y.shape == (2, 5, shape[0])
    assert err < 2.5 * bf16_err + 1e-3, (err, bf16_err)  # the kernel is as accurate as a bf16 dense matmul


def test_fallback_is_logged_once_with_the_reason_and_reported(fast, caplog):
    import hf_compress.kernels.dispatch as dispatch

    dispatch._warned.clear()
    module = packed(24, 64, 4, 32)
    with caplog.at_level(logging.WARNING, logger="hf_compress.kernels.dispatch"), torch.no_grad():
        module(torch.randn(1, 64))
        module(torch.randn(1, 64))
    said = [r.message for r in caplog.records if "dense bf16 copy" in r.message]
    assert len(said) == 1 and "out_features 24 is not a multiple of 16" in said[0]
    model = torch.nn.Sequential(module, packed(32, 24, 4, -1, bias=False))
    rows = kernel_report(model)
    assert [r["kernels"] for r in rows] == [["dense"], ["int8"]]  # one group per row: any width fits int8
    assert "not a multiple of 16" in rows[0]["fallback"][0] and rows[1]["fallback"] == []


def test_mixed_width_module_joins_narrow_segments_into_one_int4_call(fast):
    """BAQ-style per-column widths: the 2/3/4-bit segments (each with a short last group) become one int4 weight,
    padded to whole groups with zero inputs; the 8-bit columns (one group per row, 40 columns: not a multiple of
    the int8 op's 16) run through the int8 op, padded."""
    torch.manual_seed(0)
    W = torch.randn(32, 200)
    col_bits = torch.tensor([2] * 70 + [3] * 50 + [4] * 40 + [8] * 40)[torch.randperm(200)]
    r = rtn_quantize(W, QuantSpec(8, 64, False), col_bits=col_bits)
    module = PackedLinear.from_codes(r.codes, r.scales, r.zeros, r.spec, None, r.col_bits)
    err, bf16_err, _ = relative_error(module, torch.randn(3, 200))
    assert cpu_plan(module).kinds == ["int4", "int8"]
    assert err < 2.5 * bf16_err + 1e-3, (err, bf16_err)


@pytest.mark.parametrize("shape,group", [((32, 200), 64), ((32, 40), -1)])
def test_short_groups_and_odd_widths_are_padded_not_refused(fast, shape, group):
    module = packed(*shape, 4 if group != -1 else 8, group)
    err, bf16_err, _ = relative_error(module, torch.randn(4, shape[1]))
    assert cpu_plan(module).kinds == (["int4"] if group != -1 else ["int8"])
    assert err < 2.5 * bf16_err + 1e-3, (err, bf16_err)


def test_reference_mode_is_exact_and_auto_is_not(monkeypatch):
    module = packed(64, 128, 4, 64)
    x = torch.randn(4, 128)
    exact = torch.nn.functional.linear(x, module.dequantized_weight(), module.bias)
    monkeypatch.setenv("HF_COMPRESS_KERNELS", "reference")
    with torch.no_grad():
        assert torch.equal(module(x), exact)
    monkeypatch.setenv("HF_COMPRESS_KERNELS", "auto")
    with torch.no_grad():
        assert not torch.equal(module(x), exact)
    monkeypatch.setenv("HF_COMPRESS_KERNELS", "fastest")
    with pytest.raises(ValueError, match="HF_COMPRESS_KERNELS='fastest'"):
        module(x)


def test_plan_is_rebuilt_when_the_weights_change_and_stays_out_of_the_state_dict(fast):
    a, b = packed(32, 64, 4, 32, seed=0), packed(32, 64, 4, 32, seed=1)
    x = torch.randn(2, 64)
    with torch.no_grad():
        a(x)
        keys = set(a.state_dict())
        a.load_state_dict(b.state_dict())
        assert set(a.state_dict()) == keys
        assert torch.equal(a(x), b(x))


def test_autograd_through_the_input_takes_the_reference_path(fast):
    module = packed(32, 64, 4, 32)
    x = torch.randn(3, 64, requires_grad=True)
    module(x).sum().backward()
    assert torch.allclose(x.grad, module.dequantized_weight().sum(0).expand(3, -1), atol=1e-5)


def test_kernel_report_lists_every_packed_module(fast):
    from conftest import tiny_llama

    model = hf_compress.quantize(tiny_llama(), hf_compress.RTNConfig(bits=4, group_size=32), progress=False)
    rows = hf_compress.kernel_report(model)
    assert len(rows) == 14 and all(r["kernels"] == ["int4"] and not r["fallback"] for r in rows)
    from hf_compress.kernels.report import format_kernel_report

    assert format_kernel_report(rows).startswith("kernels: int4 × 14")


# -- the real model ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_packed(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)  # all 30 blocks (RTN: ~2 s)
    hf_compress.quantize(model, hf_compress.RTNConfig(bits=4, group_size=64), progress=False)
    return model, AutoTokenizer.from_pretrained(smollm2_dir)


def test_real_blocks_match_the_reference_and_greedy_decoding_agrees(smollm2_packed, monkeypatch):
    """SmolLM2-135M (4-bit g64): fast logits within bf16 tolerance of the reference; greedy decoding of 32
    tokens equal, or different only after a step where the reference's top two logits were a near-tie."""
    from hf_compress.formats.linear import dequantization_cache

    model, tok = smollm2_packed
    ids = tok("The history of the city of Paris begins", return_tensors="pt").input_ids
    monkeypatch.setenv("HF_COMPRESS_KERNELS", "auto")
    with torch.no_grad():
        fast_logits = model(ids).logits
        fast_tokens = model.generate(ids, max_new_tokens=32, do_sample=False)[0, ids.shape[1]:]
    assert {tuple(r["kernels"]) for r in hf_compress.kernel_report(model)} == {("int4",)}
    monkeypatch.setenv("HF_COMPRESS_KERNELS", "reference")
    with torch.no_grad(), dequantization_cache():  # the reference numerics, dequantized once per module
        ref_logits = model(ids).logits
        out = model.generate(ids, max_new_tokens=32, do_sample=False, output_scores=True, return_dict_in_generate=True)
    ref_tokens = out.sequences[0, ids.shape[1]:]
    spread = ref_logits.std()
    drift, agree = float((fast_logits - ref_logits).abs().mean() / spread), (fast_logits.argmax(-1) == ref_logits.argmax(-1)).float().mean()
    print(f"mean |fast - reference| / std(reference logits) = {drift:.4f}; top-1 agreement {float(agree):.3f}")
    assert drift < 0.02 and agree > 0.85
    print("fast:     ", tok.decode(fast_tokens))
    print("reference:", tok.decode(ref_tokens))
    differ = (fast_tokens != ref_tokens).nonzero()
    if len(differ):
        step = int(differ[0])
        top2 = out.scores[step][0].topk(2).values
        gap = float(top2[0] - top2[1])
        print(f"first difference at step {step}: reference top-2 logit gap {gap:.3f}")
        assert gap < 0.5, f"decoding diverged at step {step} where the reference was not a near-tie (gap {gap:.3f})"


@pytest.mark.parametrize("bits", [2, 4])
def test_many_rows_take_the_dequantize_and_gemm_path_and_match(fast, bits, monkeypatch):
    """Prefill-sized inputs (≥ LARGE_M rows) are served by dequantize + bf16 GEMM, as accurate as the kernel."""
    import hf_compress.kernels.cpu_linear as cpu_linear

    module = packed(64, 128, bits, 32)
    calls = []
    original = cpu_linear.shift_dequantizer

    def counted(mod):
        dense = original(mod)
        return lambda: calls.append(1) or dense()

    monkeypatch.setattr(cpu_linear, "shift_dequantizer", counted)
    small, _, _ = relative_error(module, torch.randn(cpu_linear.LARGE_M - 1, 128))
    assert calls == []
    large, bf16_err, _ = relative_error(module, torch.randn(2, cpu_linear.LARGE_M, 128))
    assert calls == [1] and large < 2.5 * bf16_err + 1e-3 and small < 0.01


def test_large_modules_are_converted_block_by_block_exactly(fast, monkeypatch):
    """A module taller than one conversion block gives the same kernel layout as converting it whole."""
    import hf_compress.kernels.cpu_int4 as cpu_int4

    module = packed(96, 64, 4, 32)
    whole = cpu_plan(module).segments[0].payload.packed.clone()
    monkeypatch.setattr(cpu_int4, "CONVERT_ROWS", 64)  # 96 rows: a full block of 64 and a tail
    module.__dict__.pop("_cpu_plan")
    assert torch.equal(cpu_plan(module).segments[0].payload.packed, whole)
    err, bf16_err, _ = relative_error(module, torch.randn(3, 64))
    assert err < 2.5 * bf16_err + 1e-3
