"""Per-layer quantized KV cache layers for transformers' ``Cache(layers=[...])``.

Each layer holds two independent streams (keys, values), each with its own width: 16 stores the states untouched
(exactly what ``DynamicLayer`` stores), 2/4/8 quantize them KIVI-style into packed blocks of ``group`` tokens. The
most recent ``residual_length`` tokens (and at most ``group − 1`` more, waiting to fill a block) stay in full
precision: the next tokens attend to them most, and keys need whole token groups to be quantized per channel.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import CacheLayerMixin

from hf_compress.kv_cache.quantizer import QuantizedBlocks, check_kv_bits, pair_name


class QuantizedStream:
    """Keys or values of one layer: quantized blocks (oldest tokens) + a full-precision tail (newest)."""

    def __init__(self, bits: int, axis: str, group: int, residual_length: int):
        self.bits, self.axis, self.group, self.residual_length = bits, axis, group, residual_length
        self.blocks = QuantizedBlocks(bits, axis, group) if bits < 16 else None
        self.tail: torch.Tensor | None = None

    def append(self, states: torch.Tensor) -> torch.Tensor:
        """Add ``states`` (``[B, H, T, D]``) and return the whole stream in ``states``' dtype."""
        self.tail = states if self.tail is None else torch.cat([self.tail, states], dim=-2)
        if self.blocks is None:
            return self.tail
        # Everything before the newest `residual_length` tokens goes into whole blocks; the returned states are
        # assembled before flushing, so the new tokens attend to the old ones exactly as they are stored.
        old = self.blocks.dequantize(states.dtype) if self.blocks.tokens else None
        out = self.tail if old is None else torch.cat([old, self.tail], dim=-2)
        flush = (self.tail.shape[-2] - self.residual_length) // self.group * self.group
        if flush > 0:
            self.blocks.append(self.tail[..., :flush, :])
            self.tail = self.tail[..., flush:, :]
            # Return what is stored now: the flushed tokens as the cache will give them back from here on.
            out = torch.cat([self.blocks.dequantize(states.dtype), self.tail], dim=-2)
        return out

    def index_batch(self, index: torch.Tensor) -> None:
        if self.tail is not None:
            self.tail = self.tail.index_select(0, index.to(self.tail.device))
        if self.blocks is not None:
            self.blocks.index_batch(index)

    def repeat_batch(self, repeats: int) -> None:
        if self.tail is not None:
            self.tail = self.tail.repeat_interleave(repeats, dim=0)
        if self.blocks is not None:
            self.blocks.repeat_batch(repeats)

    def nbytes(self) -> int:
        tail = 0 if self.tail is None else self.tail.numel() * self.tail.element_size()
        return tail + (self.blocks.nbytes() if self.blocks is not None else 0)


class QuantizedKVLayer(CacheLayerMixin):
    """One decoder layer's cache with its own key and value widths.

    Args:
        key_bits: 2, 4, 8, or 16 (keys stored untouched).
        value_bits: likewise for values.
        group_size: tokens per key group (per channel) and channels per value group (per token); KIVI uses 32.
        residual_length: newest tokens always kept in full precision.
    """

    is_sliding = False
    is_croppable = False

    def __init__(self, key_bits: int = 16, value_bits: int = 16, group_size: int = 32, residual_length: int = 32):
        super().__init__()
        self.key_bits = check_kv_bits(key_bits, "key bits")
        self.value_bits = check_kv_bits(value_bits, "value bits")
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size must be a positive integer, got {group_size!r}")
        if isinstance(residual_length, bool) or not isinstance(residual_length, int) or residual_length < 0:
            raise ValueError(f"residual_length must be a non-negative integer, got {residual_length!r}")
        self.group_size, self.residual_length = group_size, residual_length
        self.reset()

    def __repr__(self):
        return f"QuantizedKVLayer({pair_name(self.key_bits, self.value_bits)}, group={self.group_size}, residual={self.residual_length})"

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Store the new states; return all keys and values (``[B, H, T_total, D]``). The extra arguments cover
        every ``update`` signature transformers 5.x uses (``cache_kwargs`` / ``kwargs=``)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        # The returned full-width states are not kept: holding them would undo the compression.
        return self._keys.append(key_states), self._values.append(value_states)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cumulative_length + query_length, 0

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self._keys = QuantizedStream(self.key_bits, "channel", self.group_size, self.residual_length)
        self._values = QuantizedStream(self.value_bits, "token", self.group_size, self.residual_length)
        self.keys = self.values = None
        self.is_initialized = False
        self.cumulative_length = 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        for stream in (self._keys, self._values):
            stream.index_batch(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        for stream in (self._keys, self._values):
            stream.repeat_batch(repeats)

    def offload(self):  # the streams stay where they are; offloading a quantized cache is not supported
        pass

    def prefetch(self):
        pass

    def nbytes(self) -> int:
        """Bytes this layer really holds: packed codes, float16 scales/zeros and the full-precision tail."""
        return self._keys.nbytes() + self._values.nbytes()
