"""``PackedLinear``: a drop-in ``nn.Linear`` whose weight is stored as packed integer codes.

State (all buffers, saved as safetensors):
- ``weight``  uint8 [ceil(out·in·b/8)]  packed codes, row-major; 1-D on purpose (see ``packing``)
- ``scales``  float16 [out, groups]
- ``qzeros``  uint8 [ceil(out·groups·b/8)]  packed integer zero points (asymmetric grids only)
- ``bias``    float [out] (when the original layer had one)
- ``col_bits`` uint8 [in]  width of each input column (mixed-width modules only; see ``columns``)

A mixed-width module concatenates its segments: ``weight`` and ``qzeros`` hold each segment's packed stream
in turn, ``scales`` holds their groups side by side.

The forward runs through :mod:`hf_compress.kernels` (``packed_linear``): on CPU a kernel over the packed codes
in bf16, repacked once at the first call; its torch reference (``HF_COMPRESS_KERNELS=reference``) defines the
numerics.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager

import torch
from torch import nn

from hf_compress.formats.columns import Segment, segments, split_stored
from hf_compress.formats.grid import SCALE_DTYPE, QuantSpec
from hf_compress.formats.packing import pack_codes, packed_numel, unpack_codes
from hf_compress.kernels.dispatch import fast_cpu_forward, packed_linear


_cache_depth = 0
_cached_modules: "weakref.WeakSet[PackedLinear]" = weakref.WeakSet()


@contextmanager
def dequantization_cache():
    """Within the ``with`` block, each packed module dequantizes once and reuses the dense weight.

    Calibration and perplexity run the same frozen modules over many samples; re-unpacking codes per call
    dominated their time on CPU. Dense copies are dropped on exit, so memory returns to the packed size; a caller
    that is done with part of the model earlier (the calibration runner, block by block) drops that part's copies
    with :func:`drop_dense_copies`, so at most the part in use is held dense.
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


def drop_dense_copies(module: nn.Module) -> None:
    """Free the dense weights cached by the packed modules under ``module``."""
    for mod in module.modules():
        if isinstance(mod, PackedLinear) and mod._dense_cache is not None:
            mod._dense_cache = None
            _cached_modules.discard(mod)


class PackedLinear(nn.Module):
    """Weight-only quantized linear layer with the ``nn.Linear`` call signature."""

    def __init__(self, in_features: int, out_features: int, spec: QuantSpec, bias: bool = True, dtype=None, device=None):
        super().__init__()
        self.in_features, self.out_features, self.spec = in_features, out_features, spec
        layout = self._layout()
        n_codes = sum(packed_numel(out_features * n, b) for b, n, _ in layout)
        n_zeros = sum(packed_numel(out_features * g, b) for b, _, g in layout)
        self.register_buffer("weight", torch.zeros(n_codes, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.zeros(out_features, sum(g for *_, g in layout), dtype=SCALE_DTYPE, device=device))
        if not spec.sym:
            self.register_buffer("qzeros", torch.zeros(n_zeros, dtype=torch.uint8, device=device))
        else:
            self.qzeros = None
        if spec.is_mixed:
            self.register_buffer("col_bits", torch.zeros(in_features, dtype=torch.uint8, device=device))
        else:
            self.col_bits = None
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype or torch.float32, device=device)) if bias else None
        self._dense_cache = None

    def _layout(self) -> list[tuple[int, int, int]]:
        """(bits, columns, groups) per segment, from the spec alone (shapes must be known before loading)."""
        spec = self.spec
        widths = spec.bit_groups if spec.is_mixed else ((spec.bits, self.in_features),)
        if sum(n for _, n in widths) != self.in_features:
            raise ValueError(f"plan's bit groups cover {sum(n for _, n in widths)} columns, the module has {self.in_features}")
        return [(b, n, spec.groups(n)) for b, n in widths]

    @classmethod
    def from_codes(cls, codes, scales, zeros, spec: QuantSpec, bias=None, col_bits=None) -> "PackedLinear":
        """Build a module from solver output: codes ``[out, in]``; scales and zeros ``[out, Σ groups]`` in segment
        order (just ``[out, groups]`` for a uniform spec); ``col_bits [in]`` for a mixed spec."""
        out_f, in_f = codes.shape
        mod = cls(in_f, out_f, spec, bias=bias is not None, dtype=None if bias is None else bias.dtype, device=codes.device)
        if spec.is_mixed:
            mod.col_bits.copy_(col_bits.to(torch.uint8))
        segs = mod.segments()
        mod.weight.copy_(torch.cat([pack_codes(codes if seg.cols is None else codes[:, seg.cols], seg.spec.bits)
                                    for seg in segs]))
        mod.scales.copy_(scales.to(SCALE_DTYPE))
        if not spec.sym:
            parts = split_stored(zeros.round().to(torch.int32), segs)
            mod.qzeros.copy_(torch.cat([pack_codes(z, seg.spec.bits) for z, seg in zip(parts, segs)]))
        if bias is not None:
            mod.bias.data.copy_(bias.detach())
        return mod

    def segments(self) -> list[Segment]:
        return segments(self.spec, self.in_features, self.col_bits)

    def segment_tensors(self):
        """Per segment: (segment, packed codes, scales ``[out, groups]``, packed zeros or None)."""
        segs = self.segments()
        out, c0, z0 = [], 0, 0
        for seg, scales in zip(segs, split_stored(self.scales, segs)):
            nc = packed_numel(self.out_features * seg.n_cols, seg.spec.bits)
            nz = packed_numel(self.out_features * scales.shape[1], seg.spec.bits)
            zeros = None if self.qzeros is None else self.qzeros[z0:z0 + nz]
            out.append((seg, self.weight[c0:c0 + nc], scales, zeros))
            c0, z0 = c0 + nc, z0 + nz
        return out

    def segment_codes(self) -> list[torch.Tensor]:
        return [unpack_codes(w, seg.spec.bits, self.out_features * seg.n_cols).view(self.out_features, seg.n_cols)
                for seg, w, _, _ in self.segment_tensors()]

    def segment_zeros(self) -> list[torch.Tensor]:
        out = []
        for seg, _, scales, zeros in self.segment_tensors():
            if zeros is None:
                out.append(torch.full_like(scales, 2 ** (seg.spec.bits - 1), dtype=torch.uint8))
            else:
                out.append(unpack_codes(zeros, seg.spec.bits, scales.numel()).view(scales.shape))
        return out

    def codes(self) -> torch.Tensor:
        from hf_compress.formats.columns import scatter_columns

        return scatter_columns(self.segment_codes(), self.segments(), self.in_features)

    def zeros(self) -> torch.Tensor:
        """Zero points ``[out, Σ groups]`` in stored (segment) order."""
        return torch.cat(self.segment_zeros(), dim=1)

    def dequantized_weight(self, dtype=torch.float32) -> torch.Tensor:
        from hf_compress.kernels.dispatch import dequantize

        return dequantize(self, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _cache_depth:
            if self._dense_cache is None or self._dense_cache.dtype != x.dtype:
                self._dense_cache = self.dequantized_weight(x.dtype)
                _cached_modules.add(self)
            w = self._dense_cache
            return nn.functional.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))
        y = fast_cpu_forward(self, x)
        if y is None:
            y = packed_linear(self, x)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        bits = self.spec.bits if not self.spec.is_mixed else f"{self.spec.code_bits(self.in_features):.3g} (mixed {dict(self.spec.bit_groups)})"
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={bits}, group_size={self.spec.group_size}, sym={self.spec.sym}"
