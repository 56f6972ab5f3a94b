"""Triton dequantization of a ``PackedLinear`` (CUDA, or CPU under ``TRITON_INTERPRET=1``).

The packed stream is a little-endian bitstream for every width (see ``formats.packing``), so one kernel reads
code ``i`` from bits ``[i·b, i·b + b)``: two neighbouring bytes always cover it, also for 3-bit codes that
straddle a byte boundary. Precision contract (matches ``reference.py`` bit for bit): the fp16 scale is first
rounded to the output dtype, ``(q − z)`` is exact, and the product is rounded once to the output dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hf_compress.formats.columns import scatter_columns

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def _read_codes(stream, idx, n_bytes, BITS: tl.constexpr, mask):
    bitpos = idx * BITS
    byte = bitpos >> 3
    lo = tl.load(stream + byte, mask=mask, other=0).to(tl.int32)
    hi = tl.load(stream + byte + 1, mask=mask & (byte + 1 < n_bytes), other=0).to(tl.int32)
    return ((lo | (hi << 8)) >> (bitpos & 7)) & ((1 << BITS) - 1)


@triton.jit
def _dequant_kernel(codes_ptr, scales_ptr, zeros_ptr, out_ptr, rows, cols, groups, width, n_code_bytes, n_zero_bytes,
                    BITS: tl.constexpr, SYM: tl.constexpr, OUT_DTYPE: tl.constexpr,
                    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]
    mask = (r < rows) & (c < cols)
    q = _read_codes(codes_ptr, r * cols + c, n_code_bytes, BITS, mask)
    g = r * groups + c // width
    scale = tl.load(scales_ptr + g, mask=mask, other=0.0).to(OUT_DTYPE).to(tl.float32)
    if SYM:
        zero = tl.full(q.shape, 1 << (BITS - 1), tl.int32)
    else:
        zero = _read_codes(zeros_ptr, g, n_zero_bytes, BITS, mask)
    w = (q - zero).to(tl.float32) * scale
    tl.store(out_ptr + r * cols + c, w.to(OUT_DTYPE), mask=mask)


def dequantize_triton(module, dtype=torch.float32, block_r: int = 16, block_c: int = 64) -> torch.Tensor:
    """Dense ``[out, in]`` weight of ``module`` in ``dtype`` (fp32, fp16 or bf16); one launch per width segment."""
    if dtype not in _TL_DTYPES:
        raise TypeError(f"Triton dequantize supports {list(_TL_DTYPES)}, not {dtype}")
    rows = module.out_features
    parts, segs = [], []
    for seg, codes, scales, zeros in module.segment_tensors():
        cols, spec = seg.n_cols, seg.spec
        out = torch.empty(rows, cols, dtype=dtype, device=codes.device)
        scales = scales.contiguous()
        zeros = codes if zeros is None else zeros  # unused when symmetric
        grid = (triton.cdiv(rows, block_r), triton.cdiv(cols, block_c))
        _dequant_kernel[grid](codes, scales, zeros, out, rows, cols, scales.shape[1], spec.width(cols), codes.numel(),
                              zeros.numel(), BITS=spec.bits, SYM=spec.sym, OUT_DTYPE=_TL_DTYPES[dtype],
                              BLOCK_R=block_r, BLOCK_C=block_c)
        parts.append(out)
        segs.append(seg)
    return scatter_columns(parts, segs, module.in_features)
