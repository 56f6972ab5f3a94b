"""CPU weight-only matmul for 1–4-bit codes through PyTorch's own int4 kernel (no extra dependency).

``torch.ops.aten._weight_int4pack_mm_for_cpu`` multiplies activations by a weight held as 4-bit codes in its
own tiled layout with per-group ``(scale, zero)`` pairs and dequantizes as ``(q − 8)·scale + zero``. Our grid
``W = s·(q − z)`` maps onto it exactly with ``zero = (8 − z)·s``; 1-, 2- and 3-bit codes are a subset of the
4-bit range, so they use the same container unchanged. Why our own wrapper: the op is private ATen API with
shape rules (``N % 16``, group sizes 32–256) that we check here, once, so a module either gets the kernel or a
stated reason — never a wrong result.

Numerics: activations are cast to bf16 (the kernel is 10–80× slower with fp32 activations) and accumulate in
the kernel's own precision; results match the reference within bf16 rounding, not bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KERNEL_GROUPS = (256, 128, 64, 32)  # group sizes the op takes, largest first
COMPUTE_DTYPE = torch.bfloat16


@dataclass
class Int4Weight:
    """One weight (or one segment of a mixed module) in the kernel's layout."""

    packed: torch.Tensor  # uint8, the op's tiled layout
    scale_zero: torch.Tensor  # [K/g, N, 2] bf16
    group: int
    in_features: int


def available() -> bool:
    ops = torch.ops.aten
    return hasattr(ops, "_weight_int4pack_mm_for_cpu") and hasattr(ops, "_convert_weight_to_int4pack_for_cpu")


def kernel_group(width: int, in_features: int) -> int | None:
    """The op's group size that reproduces our groups of ``width`` columns (a divisor repeats scales), if any."""
    if in_features % width:
        return None  # a short last group: the op's groups are all equal
    return next((g for g in KERNEL_GROUPS if width % g == 0), None)


def unsupported_reason(bits: int, width: int, out_features: int, in_features: int) -> str | None:
    """Why a ``[out, in]`` weight of ``bits`` with groups of ``width`` columns cannot use the op (None: it can)."""
    if not available():
        return f"torch {torch.__version__} has no _weight_int4pack_mm_for_cpu"
    if bits > 4:
        return f"{bits}-bit codes do not fit the 4-bit container"
    if out_features % 16:
        return f"out_features {out_features} is not a multiple of 16"
    if in_features % 2:
        return f"in_features {in_features} is odd"
    if kernel_group(width, in_features) is None:
        return (f"groups of {width} columns over {in_features} inputs (the kernel needs equal groups that are a "
                f"multiple of one of {KERNEL_GROUPS[::-1]})")
    return None


def to_int4_weight(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, width: int,
                   bits: int = 4) -> Int4Weight:
    """Repack ``bits``-bit codes ``[N, K]``, scales and integer zeros ``[N, K/width]`` for the op.

    Codes narrower than 4 bits are shifted up by ``8 − 2^(bits−1)`` (their zero points likewise), which centres
    them on the kernel's 8: the bf16 ``zero = (8 − z)·s`` term is then small, and so is its rounding error
    (unshifted, 2-bit outputs missed the bf16 tolerance of the tests; the shift is exact in the arithmetic)."""
    n, k = codes.shape
    return to_int4_weight_by_rows(lambda r0, r1: codes[r0:r1], n, k, scales, zeros, width, bits)


CONVERT_ROWS = 4096  # rows converted at a time (a multiple of the op's 64-row tiles): a 49152-row head would otherwise need a 113 MB int32 copy at once


def to_int4_weight_by_rows(codes_rows, n: int, k: int, scales, zeros, width: int, bits: int = 4) -> Int4Weight:
    """As :func:`to_int4_weight`, reading codes ``codes_rows(r0, r1) -> [r1 − r0, K]`` a block of rows at a time
    (the op tiles rows in blocks of 64, so blocks of a multiple of 64 rows convert independently; checked in the tests), so converting a large module
    never holds more than one block of unpacked codes."""
    group = kernel_group(width, k)
    repeat = width // group
    shift = 8 - 2 ** (bits - 1)
    s = scales.float().repeat_interleave(repeat, dim=1)
    z = zeros.float().repeat_interleave(repeat, dim=1) + shift
    scale_zero = torch.stack([s, (8 - z) * s], dim=-1).transpose(0, 1).contiguous().to(COMPUTE_DTYPE)
    convert = torch.ops.aten._convert_weight_to_int4pack_for_cpu
    packed = torch.cat([convert((codes_rows(r0, min(n, r0 + CONVERT_ROWS)).to(torch.int32) + shift).contiguous(), 1)
                        for r0 in range(0, n, CONVERT_ROWS)])
    return Int4Weight(packed, scale_zero, group, k)


def int4_matmul(x: torch.Tensor, weight: Int4Weight) -> torch.Tensor:
    """``x [..., K] @ Wᵀ`` in bf16 (the caller casts back)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, weight.in_features).to(COMPUTE_DTYPE).contiguous()
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, weight.packed, weight.group, weight.scale_zero)
    return y.view(*lead, y.shape[-1])
