"""Bit-packing of integer codes into a flat uint8 stream.

Codes form one little-endian bitstream: code ``i`` occupies bits ``[i·b, i·b + b)``. Widths that divide 8 pack
``8 // bits`` codes to a byte; the others (3, 5, 6, 7) pack 8 codes into ``bits`` bytes, so a stream is padded
to whole runs only. The packed tensor is deliberately 1-D: no dense loader can mistake it for a weight
matrix, so a checkpoint opened without hf-compress fails on shape instead of loading garbage.
"""

from __future__ import annotations

import torch

SUPPORTED_BITS = (1, 2, 3, 4, 5, 6, 7, 8)


def check_bits(bits: int) -> int:
    """Return ``bits`` if the packed format supports it, else raise a ValueError naming the choices."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise ValueError(f"unsupported bit width {bits!r}: hf-compress packs {SUPPORTED_BITS} bits")
    return bits


def packed_numel(n_codes: int, bits: int) -> int:
    """Bytes needed for ``n_codes`` codes of ``bits`` bits (the stream is padded to whole code runs)."""
    codes_per_run, run_bytes = _run(bits)
    return -(-n_codes // codes_per_run) * run_bytes


def _run(bits: int) -> tuple[int, int]:
    """(codes, bytes) of one packing run."""
    return (8 // bits, 1) if 8 % bits == 0 else (8, bits)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in ``[0, 2**bits)`` (any shape, flattened row-major) into a 1-D uint8 tensor."""
    check_bits(bits)
    flat = codes.reshape(-1).to(torch.int32)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 2**bits):
        raise ValueError(f"codes out of range for {bits}-bit packing")
    if bits == 8:
        return flat.to(torch.uint8)
    run, run_bytes = _run(bits)
    pad = (-flat.numel()) % run
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    groups = flat.view(-1, run).to(torch.int64)
    shifts = torch.arange(run, dtype=torch.int64, device=flat.device) * bits
    word = (groups << shifts).sum(dim=1)  # at most 8 codes of 7 bits = 56 bits: fits in int64
    if run_bytes == 1:
        return word.to(torch.uint8)
    out = torch.stack([(word >> (8 * i)) & 0xFF for i in range(run_bytes)], dim=1)
    return out.reshape(-1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, n_codes: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: return the first ``n_codes`` codes as a 1-D uint8 tensor."""
    check_bits(bits)
    expected = packed_numel(n_codes, bits)
    if packed.dim() != 1 or packed.numel() != expected:
        raise ValueError(
            f"packed {bits}-bit stream has shape {tuple(packed.shape)}, expected ({expected},) for {n_codes} codes"
        )
    if bits == 8:
        return packed[:n_codes]
    run, run_bytes = _run(bits)
    raw = packed.to(torch.int64).view(-1, run_bytes)
    word = raw[:, 0]
    for i in range(1, run_bytes):
        word = word | (raw[:, i] << (8 * i))
    shifts = torch.arange(run, dtype=torch.int64, device=packed.device) * bits
    codes = (word.unsqueeze(1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(-1)[:n_codes].to(torch.uint8)


def pack_int32_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes ``[R, C]`` as int32 words ``[R, ceil(C·bits/32)]``: each row its own little-endian bitstream (code ``j``
    at bit ``j·bits``), zero-padded to a whole word — the dense int32 packing serving formats use."""
    rows, cols = codes.shape
    words = -(-cols * bits // 32)
    pad = (-cols) % 32  # 32 codes fill exactly `bits` words, so every row starts on a word boundary
    padded = torch.cat([codes.to(torch.int32), codes.new_zeros(rows, pad, dtype=torch.int32)], dim=1) if pad else codes
    stream = pack_codes(padded, bits)  # rows · (cols + pad) · bits / 8 bytes, a multiple of 4 per row
    return stream.view(torch.int32).view(rows, -1)[:, :words].contiguous()
