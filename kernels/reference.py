"""Pure-torch dequantization of a ``PackedLinear``: the precision contract every kernel must meet."""

from __future__ import annotations

import torch

from hf_compress.formats.columns import scatter_columns
from hf_compress.formats.grid import dequantize_weight


def dequantize_reference(module, dtype=torch.float32) -> torch.Tensor:
    segs = module.segments()
    parts = [dequantize_weight(codes, scales, zeros, seg.spec, dtype=dtype)
             for seg, codes, (_, _, scales, _), zeros in zip(segs, module.segment_codes(), module.segment_tensors(), module.segment_zeros())]
    return scatter_columns(parts, segs, module.in_features)
