"""The Triton dequantize kernel against the torch reference, under TRITON_INTERPRET=1 on CPU (tiny shapes)."""

import subprocess
import sys

import pytest

from conftest import subprocess_env

CHECK = r"""
import torch
from hf_compress.formats.grid import QuantSpec, group_params, quantize_weight
from hf_compress.formats.linear import PackedLinear
from hf_compress.kernels.reference import dequantize_reference
from hf_compress.kernels.triton_dequant import dequantize_triton
torch.manual_seed(0)
cases = 0
for bits in (1, 2, 3, 4, 5, 8):
    for sym in (False, True):
        for rows, cols, gs in ((5, 24, 8), (3, 37, 16), (17, 70, -1)):
            W = torch.randn(rows, cols)
            spec = QuantSpec(bits, gs, sym)
            s, z = group_params(W, spec)
            mod = PackedLinear.from_codes(quantize_weight(W, s, z, spec), s, z, spec)
            for dtype in (torch.float32, torch.float16):
                ref = dequantize_reference(mod, dtype)
                got = dequantize_triton(mod, dtype, block_r=4, block_c=16)
                assert got.dtype == dtype and torch.equal(got, ref), (bits, sym, rows, cols, gs, dtype)
                cases += 1
from hf_compress.formats.columns import fit_column_grid, mixed_spec
for sym in (False, True):  # mixed widths: one launch per bit-width segment, scattered back to column order
    W = torch.randn(6, 45)
    col_bits = torch.randint(1, 9, (45,), dtype=torch.uint8)
    spec = mixed_spec(col_bits, 8, sym)
    grid = fit_column_grid(W, spec, col_bits)
    mod = PackedLinear.from_codes(grid.quantize(W), grid.scales, grid.zeros, spec, col_bits=col_bits)
    for dtype in (torch.float32, torch.float16):
        assert torch.equal(dequantize_triton(mod, dtype, block_r=4, block_c=16), dequantize_reference(mod, dtype)), (sym, dtype)
        cases += 1
print("cases", cases)
"""


def test_triton_dequant_matches_reference_in_interpreter():
    pytest.importorskip("triton")
    run = subprocess.run([sys.executable, "-c", CHECK], env=subprocess_env(TRITON_INTERPRET="1"),
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "cases 76" in run.stdout


def test_cpu_tensors_use_the_reference():
    import torch

    from hf_compress.formats.grid import QuantSpec, group_params, quantize_weight
    from hf_compress.formats.linear import PackedLinear
    from hf_compress.kernels.dispatch import dequantize, dequantize_reference

    W = torch.randn(4, 32)
    spec = QuantSpec(4, 16)
    s, z = group_params(W, spec)
    mod = PackedLinear.from_codes(quantize_weight(W, s, z, spec), s, z, spec)
    assert torch.equal(dequantize(mod), dequantize_reference(mod))


MATMUL_CHECK = r"""
import torch
from hf_compress.formats.grid import QuantSpec, group_params, quantize_weight
from hf_compress.formats.linear import PackedLinear
from hf_compress.kernels.reference import dequantize_reference
from hf_compress.kernels.triton_matmul import packed_matmul_triton
torch.manual_seed(0)
cases, worst = 0, 0.0
def check(mod, x, dtype, tol):
    global cases, worst
    ref = torch.nn.functional.linear(x.to(dtype).float(), dequantize_reference(mod, torch.float32))
    got = packed_matmul_triton(mod, x.to(dtype), blocks=(16, 16, 16)).float()
    err = float((got - ref).abs().max() / ref.abs().max())
    assert got.shape == ref.shape and err < tol, (mod, dtype, err)
    cases += 1
    worst = max(worst, err) if dtype == torch.float32 else worst
for bits in (2, 3, 4, 8):
    for sym in (False, True):
        for rows, cols, gs in ((20, 40, 8), (17, 37, 16), (33, 48, -1)):
            W = torch.randn(rows, cols)
            spec = QuantSpec(bits, gs, sym)
            s, z = group_params(W, spec)
            mod = PackedLinear.from_codes(quantize_weight(W, s, z, spec), s, z, spec)
            x = torch.randn(2, 3, cols)
            check(mod, x, torch.float32, 1e-5)
            check(mod, x, torch.float16, 5e-3)
from hf_compress.formats.columns import fit_column_grid, mixed_spec
W = torch.randn(24, 45)
col_bits = torch.randint(2, 9, (45,), dtype=torch.uint8)
spec = mixed_spec(col_bits, 8, False)
grid = fit_column_grid(W, spec, col_bits)
mod = PackedLinear.from_codes(grid.quantize(W), grid.scales, grid.zeros, spec, col_bits=col_bits)
check(mod, torch.randn(5, 45), torch.float32, 1e-5)
print("cases", cases, "worst fp32", worst)
"""


def test_triton_fused_dequant_matmul_matches_reference_in_interpreter():
    """The fused kernel (decode GEMV and prefill GEMM on CUDA) against the reference: 2/3/4/8-bit, grouped with a
    short last group and per-row, sym and asym, fp32 and fp16 activations, and a mixed-width module."""
    pytest.importorskip("triton")
    run = subprocess.run([sys.executable, "-c", MATMUL_CHECK], env=subprocess_env(TRITON_INTERPRET="1"),
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "cases 49" in run.stdout, run.stdout
