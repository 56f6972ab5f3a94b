"""``PackedEmbedding``: a drop-in ``nn.Embedding`` whose table is stored as packed integer codes.

The table ``[num_embeddings, embedding_dim]`` is stored exactly like a ``PackedLinear`` weight with
``out_features = num_embeddings`` rows and ``in_features = embedding_dim`` columns (same buffers, same plan entry,
same load-time checks), so everything that reads packed modules reads it. Only the forward differs: a lookup
dequantizes just the rows it needs — the whole table per call would cost more than the model's first block.
"""

from __future__ import annotations

import torch
from torch import nn

from hf_compress.formats.grid import QuantSpec, dequantize_weight
from hf_compress.formats.linear import PackedLinear
from hf_compress.formats.packing import _run, unpack_codes


class PackedEmbedding(PackedLinear):
    """Weight-only quantized embedding table with the ``nn.Embedding`` call signature (lookup of ids)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, spec: QuantSpec, padding_idx=None, dtype=None,
                 device=None):
        if spec.is_mixed:
            raise ValueError("an embedding table takes one uniform width (bits, group_size, sym), not bit groups")
        super().__init__(embedding_dim, num_embeddings, spec, bias=False, device=device)
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        # the dtype the dense table had: what the next layer expects (set again when dense parts are cast)
        self.output_dtype = dtype or torch.float32

    @classmethod
    def from_embedding_codes(cls, codes, scales, zeros, spec: QuantSpec, padding_idx=None,
                             dtype=None) -> "PackedEmbedding":
        packed = PackedLinear.from_codes(codes, scales, zeros, spec)
        mod = cls(codes.shape[0], codes.shape[1], spec, padding_idx=padding_idx, dtype=dtype, device=codes.device)
        mod.load_state_dict(packed.state_dict())
        return mod

    def _row_bytes(self) -> int | None:
        """Bytes per table row when every row starts on a byte (then a lookup unpacks only its rows)."""
        codes_per_run, run_bytes = _run(self.spec.bits)
        if self.embedding_dim % codes_per_run:
            return None
        return self.embedding_dim // codes_per_run * run_bytes

    def rows(self, ids: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
        """Dense rows ``[len(ids), embedding_dim]`` of the table."""
        flat = ids.reshape(-1)
        row_bytes = self._row_bytes()
        if row_bytes is None:  # rows straddle bytes: dequantize the table (correct, slower)
            return self.dequantized_weight(dtype)[flat]
        bits, dim = self.spec.bits, self.embedding_dim
        picked = self.weight.view(self.num_embeddings, row_bytes)[flat].reshape(-1)
        codes = unpack_codes(picked, bits, flat.numel() * dim).view(-1, dim)
        zeros = self.zeros()[flat]
        return dequantize_weight(codes, self.scales[flat], zeros, self.spec, dtype=dtype)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.is_floating_point():
            raise TypeError(f"PackedEmbedding takes integer ids, got a {input_ids.dtype} tensor")
        return self.rows(input_ids, self.output_dtype).view(*input_ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, bits={self.spec.bits}, "
                f"group_size={self.spec.group_size}, sym={self.spec.sym}")
