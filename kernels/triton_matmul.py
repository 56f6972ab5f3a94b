"""Fused dequantize + matmul of a ``PackedLinear`` in Triton (CUDA, or CPU under ``TRITON_INTERPRET=1``).

``y = x · Wᵀ`` where each ``[BLOCK_K, BLOCK_N]`` tile of ``W`` is decoded from the packed bitstream inside the
kernel (codes read as in ``triton_dequant``: two neighbouring bytes cover any width, 3-bit codes included), so
the dense weight never exists in memory: at batch 1 (decode) the kernel reads ``bits/16`` of the bytes a
dense fp16 matmul reads. Accumulation is fp32, the tile is multiplied in the activations' dtype. Mixed-width
modules run one launch per width segment on their gathered input columns and sum. Grouped, per-row, sym and
asym grids all take the same kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hf_compress.kernels.triton_dequant import _TL_DTYPES, _read_codes


@triton.jit
def _packed_matmul_kernel(x_ptr, codes_ptr, scales_ptr, zeros_ptr, out_ptr, M, N, K, groups, width, n_code_bytes,
                          n_zero_bytes, stride_xm, stride_om, BITS: tl.constexpr, SYM: tl.constexpr,
                          DOT_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr):
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        x_mask = (m[:, None] < M) & (k[None, :] < K)
        x = tl.load(x_ptr + m[:, None] * stride_xm + k[None, :], mask=x_mask, other=0.0)
        w_mask = (k[:, None] < K) & (n[None, :] < N)  # the tile is [BLOCK_K, BLOCK_N]: W transposed
        q = _read_codes(codes_ptr, n[None, :] * K + k[:, None], n_code_bytes, BITS, w_mask)
        g = n[None, :] * groups + k[:, None] // width
        scale = tl.load(scales_ptr + g, mask=w_mask, other=0.0).to(tl.float32)
        if SYM:
            zero = tl.full(q.shape, 1 << (BITS - 1), tl.int32)
        else:
            zero = _read_codes(zeros_ptr, g, n_zero_bytes, BITS, w_mask)
        w = ((q - zero).to(tl.float32) * scale).to(DOT_DTYPE)
        acc += tl.dot(x.to(DOT_DTYPE), w)
    out_mask = (m[:, None] < M) & (n[None, :] < N)
    tl.store(out_ptr + m[:, None] * stride_om + n[None, :], acc.to(out_ptr.dtype.element_ty), mask=out_mask)


_AUTOTUNED = triton.autotune(
    configs=[triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w)
             for bm, bn, bk, w in ((16, 64, 64, 4), (16, 128, 64, 4), (16, 256, 32, 8), (32, 64, 64, 4),
                                   (64, 64, 32, 4), (64, 128, 32, 8), (128, 128, 32, 8))],
    key=["M", "N", "K", "BITS"],
)(_packed_matmul_kernel)


def packed_matmul_triton(module, x: torch.Tensor, blocks: tuple[int, int, int] | None = None) -> torch.Tensor:
    """``x [..., in] @ Wᵀ`` for a ``PackedLinear`` without materialising ``W``; ``blocks=(BM, BN, BK)`` skips
    the autotuner (the interpreter tests use small fixed blocks; each must be ≥ 16 for ``tl.dot``)."""
    if x.dtype not in _TL_DTYPES:
        raise TypeError(f"Triton packed matmul supports {list(_TL_DTYPES)}, not {x.dtype}")
    lead, k_all = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k_all)
    out = None
    for seg, codes, scales, zeros in module.segment_tensors():
        xs = (x2 if seg.cols is None else x2.index_select(1, seg.cols.to(x2.device))).contiguous()
        M, K, N = xs.shape[0], seg.n_cols, module.out_features
        y = torch.empty(M, N, dtype=x.dtype, device=x.device)
        zeros = codes if zeros is None else zeros  # unused when symmetric
        args = (xs, codes, scales.contiguous(), zeros, y, M, N, K, scales.shape[1], seg.spec.width(K), codes.numel(),
                zeros.numel(), xs.stride(0), y.stride(0))
        meta = {"BITS": seg.spec.bits, "SYM": seg.spec.sym, "DOT_DTYPE": _TL_DTYPES[x.dtype]}
        if blocks is None:
            grid = lambda cfg: (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"]))  # noqa: E731
            _AUTOTUNED[grid](*args, **meta)
        else:
            bm, bn, bk = blocks
            _packed_matmul_kernel[(triton.cdiv(M, bm), triton.cdiv(N, bn))](*args, **meta, BLOCK_M=bm, BLOCK_N=bn,
                                                                            BLOCK_K=bk)
        out = y if out is None else out + y
    return out.view(*lead, module.out_features)
