"""``PackedLinear``: a drop-in ``nn.Linear`` whose weight is stored as packed integer codes.

State (all buffers, saved as safetensors):
- ``weight``  uint8 [ceil(out·in·b/8)]  packed codes, row-major; 1-D on purpose (see ``packing``)
- ``scales``  float16 [out, groups]
- ``qzeros``  uint8 [ceil(out·groups·b/8)]  packed integer zero points (asymmetric grids only)
- ``bias``    float [out] (when the original layer had one)

The forward dequantizes through :mod:`hf_compress.kernels`, whose torch reference defines the numerics.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager

import torch
from torch import nn

from .grid import SCALE_DTYPE, QuantSpec
from .packing import pack_codes, packed_numel, unpack_codes


_cache_depth = 0
_cached_modules: "weakref.WeakSet[PackedLinear]" = weakref.WeakSet()


@contextmanager
def dequantization_cache():
    """Within the block, each packed module dequantizes once and reuses the dense weight.

    Calibration and perplexity run the same frozen modules over many samples; re-unpacking codes per call
    dominated their time on CPU. Dense copies are dropped on exit, so memory returns to the packed size.
    """
    global _cache_depth
    _cache_depth += 1
    try:
        yield
    finally:
        _cache_depth -= 1
        if _cache_depth == 0:
            for mod in list(_cached_modules):
                mod._dense_cache = None
            _cached_modules.clear()


class PackedLinear(nn.Module):
    """Weight-only quantized linear layer with the ``nn.Linear`` call signature."""

    def __init__(self, in_features: int, out_features: int, spec: QuantSpec, bias: bool = True, dtype=None, device=None):
        super().__init__()
        self.in_features, self.out_features, self.spec = in_features, out_features, spec
        groups = spec.groups(in_features)
        self.register_buffer("weight", torch.zeros(packed_numel(out_features * in_features, spec.bits), dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.zeros(out_features, groups, dtype=SCALE_DTYPE, device=device))
        if not spec.sym:
            self.register_buffer("qzeros", torch.zeros(packed_numel(out_features * groups, spec.bits), dtype=torch.uint8, device=device))
        else:
            self.qzeros = None
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype or torch.float32, device=device)) if bias else None
        self._dense_cache = None

    @classmethod
    def from_codes(cls, codes, scales, zeros, spec: QuantSpec, bias=None) -> "PackedLinear":
        """Build a module from solver output: codes ``[out, in]``, scales and zeros ``[out, groups]``."""
        out_f, in_f = codes.shape
        mod = cls(in_f, out_f, spec, bias=bias is not None, dtype=None if bias is None else bias.dtype, device=codes.device)
        mod.weight.copy_(pack_codes(codes, spec.bits))
        mod.scales.copy_(scales.to(SCALE_DTYPE))
        if not spec.sym:
            mod.qzeros.copy_(pack_codes(zeros.round().to(torch.int32), spec.bits))
        if bias is not None:
            mod.bias.data.copy_(bias.detach())
        return mod

    def codes(self) -> torch.Tensor:
        return unpack_codes(self.weight, self.spec.bits, self.out_features * self.in_features).view(self.out_features, self.in_features)

    def zeros(self) -> torch.Tensor:
        if self.spec.sym:
            return torch.full_like(self.scales, 2 ** (self.spec.bits - 1), dtype=torch.uint8)
        groups = self.scales.shape[1]
        return unpack_codes(self.qzeros, self.spec.bits, self.out_features * groups).view(self.out_features, groups)

    def dequantized_weight(self, dtype=torch.float32) -> torch.Tensor:
        from ..kernels import dequantize

        return dequantize(self, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _cache_depth:
            if self._dense_cache is None or self._dense_cache.dtype != x.dtype:
                self._dense_cache = self.dequantized_weight(x.dtype)
                _cached_modules.add(self)
            w = self._dense_cache
        else:
            w = self.dequantized_weight(x.dtype)
        return nn.functional.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.spec.bits}, group_size={self.spec.group_size}, sym={self.spec.sym}"
