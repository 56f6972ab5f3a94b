"""KIVI-style asymmetric group quantization of key/value blocks, codes bit-packed.

Keys are quantized **per channel** (one scale/zero per head-dim channel over a group of ``G`` consecutive tokens):
key outliers live in a few fixed channels, so sharing a scale across channels would waste the grid on them (KIVI,
arXiv 2402.02750, §3). Values are quantized **per token** (groups of ``G`` channels of one token): their error
is averaged by the attention weights, which mix tokens, not channels.

A block is ``[batch, heads, G, head_dim]``. Codes are packed with :mod:`hf_compress.formats.packing`, one
bitstream per (batch, head) row, so a 2-bit cache really holds 2 bits per element (plus its scales). Scales and
zero points are kept in float16, as in KIVI; they are counted in :func:`QuantizedBlocks.nbytes`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hf_compress.formats.packing import pack_codes

KV_BITS = (2, 4, 8, 16)  # 16 = stored untouched
AXES = ("channel", "token")
STAT_DTYPE = torch.float16


def pair_name(key_bits: int, value_bits: int) -> str:
    """``"KV4"`` / ``"K8V4"``: the names KVTuner's candidate lists use."""
    return f"KV{key_bits}" if key_bits == value_bits else f"K{key_bits}V{value_bits}"


def check_kv_bits(bits, what: str = "bits") -> int:
    """Return ``bits`` if it is a supported KV width, else raise a ValueError naming the choices."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in KV_BITS:
        raise ValueError(f"unsupported KV cache {what} {bits!r}: choose one of {KV_BITS} (16 = not quantized)")
    return bits


def quantize_blocks(block: torch.Tensor, bits: int, axis: str, group: int):
    """Asymmetric min/max quantization ``x ≈ scale·q + zero``, ``q ∈ [0, 2^bits)``, of ``k`` consecutive
    ``G``-token blocks (``[B, H, k·G, D]``). Returns packed ``[B, H, nbytes]`` uint8 (codes in token-major order)
    and scale/zero ``[B, H, n_groups]`` float16, block after block so blocks can be appended."""
    b, h, t, d = block.shape
    if axis == "channel":  # one group = the G tokens of one channel of one block: reduce over G in [B, H, k, G, D]
        x, dim = block.reshape(b, h, t // group, group, d).float(), -2
    else:  # one group = G consecutive channels of one token: reduce over the last dim of [B, H, T, D/G, G]
        if d % group:
            raise ValueError(f"head_dim {d} is not a multiple of the value group size {group}")
        x, dim = block.reshape(b, h, t, d // group, group).float(), -1
    lo, hi = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    # Round the statistics to their storage dtype *before* computing codes, so dequantization uses exactly the
    # values the codes were fitted to (float16 rounding would otherwise add a bias per group).
    zero = lo.to(STAT_DTYPE)
    scale = ((hi - zero.float()) / (2**bits - 1)).clamp_min(1e-6).to(STAT_DTYPE)
    q = ((x - zero.float()) / scale.float()).round_().clamp_(0, 2**bits - 1)
    packed = pack_codes(q.to(torch.uint8), bits).view(b, h, -1)
    return packed, scale.reshape(b, h, -1), zero.reshape(b, h, -1)


def _dequantize_chunks(codes, scale, zero, axis, group, shape, dtype):
    """Codes in storage order (token-major in both layouts, so no transpose) → ``[B, H, T, D]``."""
    b, h, t, d = shape
    if axis == "channel":
        view, stat = (b, h, t // group, group, d), (b, h, t // group, 1, d)
    else:
        view, stat = (b, h, t, d // group, group), (b, h, t, d // group, 1)
    x = torch.addcmul(zero.view(stat).to(dtype), codes.view(view).to(dtype), scale.view(stat).to(dtype))
    return x.view(b, h, t, d)


@dataclass
class QuantizedBlocks:
    """A growing run of quantized ``G``-token blocks of one stream (keys or values) of one layer."""

    bits: int
    axis: str
    group: int
    packed: torch.Tensor | None = None  # [B, H, n·nbytes] uint8
    scale: torch.Tensor | None = None  # [B, H, n·groups] float16
    zero: torch.Tensor | None = None
    tokens: int = 0
    head_dim: int = 0

    def append(self, block: torch.Tensor) -> None:
        """Quantize ``block`` (``[B, H, k·G, D]``) and add it."""
        packed, scale, zero = quantize_blocks(block, self.bits, self.axis, self.group)
        cat = (lambda old, new: new if old is None else torch.cat([old, new], dim=2))
        self.packed, self.scale, self.zero = cat(self.packed, packed), cat(self.scale, scale), cat(self.zero, zero)
        self.tokens += block.shape[-2]
        self.head_dim = block.shape[-1]

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        b, h = self.packed.shape[:2]
        shape = (b, h, self.tokens, self.head_dim)
        codes = unpack_byte_aligned(self.packed, self.bits)
        return _dequantize_chunks(codes, self.scale, self.zero, self.axis, self.group, shape, dtype)

    def index_batch(self, index: torch.Tensor) -> None:
        if self.packed is not None:
            self.packed, self.scale, self.zero = (t.index_select(0, index.to(t.device))
                                                  for t in (self.packed, self.scale, self.zero))

    def repeat_batch(self, repeats: int) -> None:
        if self.packed is not None:
            self.packed, self.scale, self.zero = (t.repeat_interleave(repeats, dim=0)
                                                  for t in (self.packed, self.scale, self.zero))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scale, self.zero) if t is not None)


def unpack_byte_aligned(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """:func:`~hf_compress.formats.packing.unpack_codes` for widths that divide 8, on uint8 without widening: the
    cache unpacks every stored code at every decode step, so this path is the decode cost (same bit layout: code
    ``i`` in byte ``i·bits // 8`` at shift ``(i·bits) % 8``)."""
    flat = packed.reshape(-1)
    if bits == 8:
        return flat
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    return ((flat.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).reshape(-1)


def fake_quantize(x: torch.Tensor, bits: int, axis: str, group: int) -> torch.Tensor:
    """Quantize-dequantize ``x`` (``[B, H, T, D]``, ``T`` a multiple of ``group`` for keys) without packing: the
    error model the KVTuner sensitivity pass measures."""
    if bits == 16:
        return x
    blocks = QuantizedBlocks(bits, axis, group)
    blocks.append(x)
    return blocks.dequantize(x.dtype)
