"""Bit-packing of integer codes into a flat uint8 stream.

Codes are packed little-endian within each byte run, so that a stream of ``n`` codes of ``bits`` bits takes
exactly ``ceil(n * bits / 8)`` bytes. 3-bit codes are packed 8 at a time into 3 bytes; 2/4/8-bit codes
``8 // bits`` to a byte. The packed tensor is deliberately 1-D: no dense loader can mistake it for a weight
matrix, so a checkpoint opened without hf-compress fails on shape instead of loading garbage.
"""

from __future__ import annotations

import torch

SUPPORTED_BITS = (2, 3, 4, 8)


def check_bits(bits: int) -> int:
    """Return ``bits`` if the packed format supports it, else raise a ValueError naming the choices."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise ValueError(f"unsupported bit width {bits!r}: hf-compress packs {SUPPORTED_BITS} bits")
    return bits


def packed_numel(n_codes: int, bits: int) -> int:
    """Bytes needed for ``n_codes`` codes of ``bits`` bits (the stream is padded to whole code runs)."""
    codes_per_run = 8 if bits == 3 else 8 // bits
    runs = -(-n_codes // codes_per_run)
    return runs * (3 if bits == 3 else 1)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in ``[0, 2**bits)`` (any shape, flattened row-major) into a 1-D uint8 tensor."""
    check_bits(bits)
    flat = codes.reshape(-1).to(torch.int32)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 2**bits):
        raise ValueError(f"codes out of range for {bits}-bit packing")
    if bits == 8:
        return flat.to(torch.uint8)
    run = 8 if bits == 3 else 8 // bits
    pad = (-flat.numel()) % run
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    groups = flat.view(-1, run)
    shifts = torch.arange(run, dtype=torch.int32, device=flat.device) * bits
    word = (groups << shifts).sum(dim=1)  # bits * run <= 24, fits in int32
    if bits == 3:
        out = torch.stack([(word >> (8 * i)) & 0xFF for i in range(3)], dim=1)
        return out.reshape(-1).to(torch.uint8)
    return word.to(torch.uint8)


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
    raw = packed.to(torch.int32)
    if bits == 3:
        triples = raw.view(-1, 3)
        word = triples[:, 0] | (triples[:, 1] << 8) | (triples[:, 2] << 16)
        run = 8
    else:
        word = raw
        run = 8 // bits
    shifts = torch.arange(run, dtype=torch.int32, device=packed.device) * bits
    codes = (word.unsqueeze(1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(-1)[:n_codes].to(torch.uint8)
