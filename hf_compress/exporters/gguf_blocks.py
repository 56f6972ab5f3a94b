"""Our packed grids as GGUF (ggml) blocks of 32 weights, exactly where a block type can hold them.

ggml stores a row as blocks of 32 weights: ``Q4_0`` = fp16 ``d`` + 16 bytes of nibbles, ``w = d·(q − 8)``;
``Q4_1`` = fp16 ``d``, fp16 ``m`` + nibbles, ``w = d·q + m``; ``Q8_0`` = fp16 ``d`` + 32 int8, ``w = d·q``. In a
block, byte ``j`` holds element ``j`` in its low nibble and element ``j + 16`` in its high one. Our grid
``w = s·(q − z)`` with fp16 ``s`` per group (groups a multiple of 32) maps onto them:

* codes of 1–3 bits (any zero point) and 4-bit symmetric → ``Q4_0`` with ``q' = q − z + 8`` (always in 0..15),
  ``d = s``: exact;
* 4-bit asymmetric → ``Q4_1`` with ``d = s``, ``m = −s·z`` (exact up to the fp16 rounding of ``m``);
* 8-bit symmetric → ``Q8_0`` with ``q' = q − 128``, ``d = s``: exact.

Anything else (5–7 bits, 8-bit asymmetric, per-column mixed widths, groups that are not whole blocks) has no
exact block type; :func:`block_type` says why, and the exporter refuses or widens it to F16 on request.
Why our own packing: the ``gguf`` package's quantizers re-fit the weights (new scales, new rounding); carrying our
solver's codes over unchanged is the point of the export.
"""

from __future__ import annotations

import numpy as np
import torch

BLOCK = 32


def block_type(module) -> tuple[str | None, str | None]:
    """``(ggml type name, None)`` for a module with an exact block mapping, else ``(None, reason)``."""
    spec, k = module.spec, module.in_features
    if spec.is_mixed:
        return None, "per-column mixed widths"
    width = spec.width(k)
    if k % BLOCK or width % BLOCK:  # then every block lies inside one group (a short last group included)
        return None, f"groups of {width} over {k} inputs are not whole blocks of {BLOCK}"
    if spec.bits <= 3 or (spec.bits == 4 and spec.sym):
        return "Q4_0", None
    if spec.bits == 4:
        return "Q4_1", None
    if spec.bits == 8 and spec.sym:
        return "Q8_0", None
    return None, f"{spec.bits}-bit {'symmetric' if spec.sym else 'asymmetric'} codes have no exact ggml block type"


def _per_block(values: torch.Tensor, width: int, k: int) -> torch.Tensor:
    return values.repeat_interleave(width // BLOCK, dim=1)[:, : k // BLOCK]  # [N, groups] -> [N, K/32]


def _nibbles(codes: np.ndarray) -> np.ndarray:
    """``[N, K]`` codes 0..15 → ``[N, K/32, 16]`` bytes in ggml's in-block order."""
    blocks = codes.reshape(codes.shape[0], -1, 2, 16)
    return (blocks[:, :, 0, :] | (blocks[:, :, 1, :] << 4)).astype(np.uint8)


def encode(module, kind: str) -> np.ndarray:
    """Row-major ggml blocks ``[N, K/32 · block bytes]`` (uint8) of a packed module's weight."""
    codes = module.codes().to(torch.int16)
    n, k = codes.shape
    width = module.spec.width(k)
    s = _per_block(module.scales.to(torch.float16), width, k)
    z = _per_block(module.zeros().to(torch.int16), width, k)
    z_cols = z.repeat_interleave(BLOCK, dim=1)
    d = s.numpy().view(np.uint8).reshape(n, k // BLOCK, 2)
    if kind == "Q4_0":
        q = (codes - z_cols + 8).numpy().astype(np.uint8)
        return np.concatenate([d, _nibbles(q)], axis=2).reshape(n, -1)
    if kind == "Q4_1":
        m = (-(s.float() * z.float())).to(torch.float16).numpy().view(np.uint8).reshape(n, k // BLOCK, 2)
        return np.concatenate([d, m, _nibbles(codes.numpy().astype(np.uint8))], axis=2).reshape(n, -1)
    if kind == "Q8_0":
        q = (codes - 128).numpy().astype(np.int8).view(np.uint8).reshape(n, k // BLOCK, BLOCK)
        return np.concatenate([d, q], axis=2).reshape(n, -1)
    raise ValueError(f"no encoder for ggml type {kind}")
