"""CSKV's bi-branch cache layer: compressed pre-RoPE latents for every token, full K/V for the newest ``window``.

Old tokens live only as latents ``c = A·x`` (optionally quantized KIVI-style: channels of the key latent per
channel, the value latent per token); the attention reconstructs ``K = RoPE(B_k c_k)`` and ``V = B_v c_v`` for them.
The cache is pre-RoPE, so ``B_k`` cannot be folded into the query, and each token's position is stored (int16
when the model's positions fit) to re-apply RoPE. The newest ``window`` tokens keep their exact K/V (CSKV §3.3).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import CacheLayerMixin

from hf_compress.kv_cache.layers import QuantizedStream


def _value_group(rank: int, group: int) -> int:
    """Largest divisor of ``rank`` that is at most ``group``: value latents are quantized in whole channel groups."""
    return max(d for d in range(1, min(rank, group) + 1) if rank % d == 0)


class CSKVCacheLayer(CacheLayerMixin):
    """One layer's CSKV cache (see the module docstring). Filled by the CSKV attention's ``update_cskv``."""

    is_sliding = False
    is_croppable = False

    def __init__(self, rank_k: int, rank_v: int, window: int = 32, latent_bits: int = 16, group_size: int = 32,
                 position_dtype: torch.dtype = torch.int32):
        super().__init__()
        self.rank_k, self.rank_v, self.window = rank_k, rank_v, window
        self.latent_bits, self.group_size, self.position_dtype = latent_bits, group_size, position_dtype
        self.reset()

    def __repr__(self):
        return f"CSKVCacheLayer(rank_k={self.rank_k}, rank_v={self.rank_v}, window={self.window}, bits={self.latent_bits})"

    def reset(self) -> None:
        self._ck = QuantizedStream(self.latent_bits, "channel", self.group_size, self.window)
        self._cv = QuantizedStream(self.latent_bits, "token", _value_group(self.rank_v, self.group_size), self.window)
        self._wk = self._wv = self._pos = None
        self.keys = self.values = None
        self.is_initialized = False
        self.cumulative_length = 0

    def lazy_initialization(self, key_states, value_states) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        raise TypeError("a CSKV cache layer stores latents: it is filled by a CSKV attention (update_cskv), not by "
                        "a standard attention's cache.update")

    def update_cskv(self, keys, values, latent_k, latent_v, positions):
        """Add the new tokens (``keys``/``values`` ``[B, H, T, D]`` after RoPE, latents ``[B, T, r]``, positions
        ``[B, T]``); return (old key latents, old value latents, old positions, window keys, window values) where
        "old" are the tokens outside the window (None when there are none)."""
        if not self.is_initialized:
            self.lazy_initialization(keys, values)
        self.cumulative_length += keys.shape[-2]
        ck = self._ck.append(latent_k[:, None])[:, 0]
        cv = self._cv.append(latent_v[:, None])[:, 0]
        positions = positions.to(self.position_dtype)
        self._pos = positions if self._pos is None else torch.cat([self._pos, positions], dim=-1)
        self._wk = keys if self._wk is None else torch.cat([self._wk, keys], dim=-2)
        self._wv = values if self._wv is None else torch.cat([self._wv, values], dim=-2)
        # Exact K/V this step: the window, or all new tokens of a prefill longer than it (the paper's prefill sees
        # the full K/V of the prompt); only the window is kept for later steps.
        keep = min(max(self.window, keys.shape[-2]), self.cumulative_length)
        out_wk, out_wv = self._wk[..., -keep:, :], self._wv[..., -keep:, :]
        stored = self._wk.shape[-2]
        self._wk, self._wv = self._wk[..., max(0, stored - self.window):, :], self._wv[..., max(0, stored - self.window):, :]
        old = self.cumulative_length - keep
        if old == 0:
            return None, None, None, out_wk, out_wv
        return ck[:, :old], cv[:, :old], self._pos[:, :old].long(), out_wk, out_wv

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cumulative_length + query_length, 0

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return -1

    def reorder_cache(self, beam_idx) -> None:
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices) -> None:
        self._ck.index_batch(indices), self._cv.index_batch(indices)
        self._wk, self._wv, self._pos = (None if t is None else t.index_select(0, indices.to(t.device))
                                         for t in (self._wk, self._wv, self._pos))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._ck.repeat_batch(repeats), self._cv.repeat_batch(repeats)
        self._wk, self._wv, self._pos = (None if t is None else t.repeat_interleave(repeats, dim=0)
                                         for t in (self._wk, self._wv, self._pos))

    def offload(self):
        pass

    def prefetch(self):
        pass

    def nbytes(self) -> int:
        """Latents (packed or not), the window's K/V and the stored positions, in bytes."""
        tensors = [t for t in (self._wk, self._wv, self._pos) if t is not None]
        return self._ck.nbytes() + self._cv.nbytes() + sum(t.numel() * t.element_size() for t in tensors)
