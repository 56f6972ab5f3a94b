"""``FakeQuantLinear``: a trainable linear whose forward uses its weight rounded onto *our* packed grid.

The forward value is computed with the very functions the packed format uses (``formats.grid.quantize_weight`` and
``dequantize_weight``) on the fp16-rounded scales that ``PackedLinear`` stores, so :func:`export_packed` yields codes,
scales and zero points whose forward is bit-identical (reference kernels). Gradients are straight-through (STE):
``∂ŵ/∂w = 1`` inside the clipping range, ``0`` outside; with ``learn_scales`` the per-group scales get LSQ's gradient
(Esser et al., ICLR'20: ``round(w/s) − w/s`` inside the range, the clip bound outside, scaled by
``1/√(numel · q_max)``).

Ternary weights (TWN: ``{−α, 0, +α}``) are stored as 2-bit symmetric codes restricted to ``{1, 2, 3}`` (the
symmetric 2-bit zero point is 2, so the values are ``−s, 0, +s``): the packed format needs no new storage kind and
a ternary checkpoint costs exactly what a 2-bit one does.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from hf_compress.formats.grid import SCALE_DTYPE, QuantSpec, dequantize_weight, expand_groups, group_params, quantize_weight

MIN_SCALE = 2.0**-24  # fp16's smallest subnormal: a smaller stored scale would be zero


def ternary_spec(group_size: int) -> QuantSpec:
    """The grid a ternary module is stored on."""
    return QuantSpec(2, group_size, sym=True)


def ternary_params(W: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """TWN initialisation per (row, group): threshold ``Δ = 0.7·mean|w|``, scale ``α = mean(|w| : |w| > Δ)``."""
    W = W.float()
    cols, width = W.shape[1], spec.width(W.shape[1])
    pad = (-cols) % width
    A = torch.cat([W.abs(), W.new_full((W.shape[0], pad), float("nan"))], dim=1).view(W.shape[0], -1, width)
    delta = 0.7 * A.nanmean(dim=2, keepdim=True)
    keep = A > delta  # NaN padding compares False
    alpha = (A.nan_to_num() * keep).sum(dim=2) / keep.sum(dim=2).clamp(min=1)
    scale = alpha.to(SCALE_DTYPE).float().clamp(min=MIN_SCALE)
    return scale, torch.full_like(scale, 2.0)


class FakeQuantLinear(nn.Module):
    """Linear layer trained through the quantizer of one :class:`QuantSpec` (uniform widths only).

    Args:
        weight: the latent full-precision weight ``[out, in]`` (trained).
        scale, zero: the grid ``[out, groups]`` (``scale`` is trained when ``learn_scales``).
        spec: the stored grid.
        bias: optional bias (trained).
        ternary: restrict codes to ``{1, 2, 3}`` of the 2-bit symmetric grid.
    """

    def __init__(self, weight, scale, zero, spec: QuantSpec, bias=None, ternary: bool = False, learn_scales: bool = False):
        super().__init__()
        if spec.is_mixed:
            raise ValueError("fake quantization supports uniform-width modules only; this spec has bit groups "
                             f"{spec.bit_groups}")
        if ternary and (spec.bits != 2 or not spec.sym):
            raise ValueError(f"ternary codes are stored on the 2-bit symmetric grid, got bits={spec.bits}, sym={spec.sym}")
        self.spec, self.ternary = spec, ternary
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight.detach().float().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone())
        scale = scale.detach().float().clone()
        self.scale = nn.Parameter(scale, requires_grad=learn_scales)
        self.register_buffer("zero", zero.detach().float().clone())
        self.qmin, self.qmax = (1, 3) if ternary else (0, 2**spec.bits - 1)

    @classmethod
    def from_linear(cls, linear: nn.Module, spec: QuantSpec, ternary: bool = False, learn_scales: bool = False,
                    clip_grid: int = 0) -> "FakeQuantLinear":
        """Start from a dense layer: min-max grid (``clip_grid`` candidates searched, as RTN does), or TWN's."""
        W = linear.weight.detach().float()
        scale, zero = ternary_params(W, spec) if ternary else group_params(W, spec, clip_grid=clip_grid)
        return cls(W, scale, zero, spec, getattr(linear, "bias", None), ternary, learn_scales)

    @classmethod
    def from_packed(cls, packed: nn.Module, ternary: bool = False, learn_scales: bool = False) -> "FakeQuantLinear":
        """Start from a ``PackedLinear`` (e.g. a GPTQ/BAQ checkpoint): same codes, scales and zero points, so the
        fake-quant forward equals the packed one before any step."""
        spec = packed.spec
        if spec.is_mixed:
            raise ValueError(f"cannot start QAT from a mixed-width module (bit groups {spec.bit_groups}); "
                             "fake quantization trains one width per module")
        W = packed.dequantized_weight(torch.float32)
        return cls(W, packed.scales.float(), packed.zeros().float(), spec, packed.bias, ternary, learn_scales)

    # -- the grid -------------------------------------------------------------------------------------------------
    def stored_scale(self) -> torch.Tensor:
        """Scales as ``PackedLinear`` stores them (fp16 values, floored at the smallest fp16 subnormal)."""
        return self.scale.detach().clamp(min=MIN_SCALE).to(SCALE_DTYPE).float()

    def codes(self) -> torch.Tensor:
        """Integer codes ``[out, in]`` (uint8) of the current weight: what :func:`export_packed` stores."""
        q = quantize_weight(self.weight.detach(), self.stored_scale(), self.zero, self.spec)
        return q.clamp(self.qmin, self.qmax) if self.ternary else q

    def quantized_weight(self, dtype=torch.float32) -> torch.Tensor:
        """``ŵ`` in ``dtype``: the value ``PackedLinear`` dequantizes to in that dtype, with STE/LSQ gradients."""
        exact = dequantize_weight(self.codes(), self.stored_scale(), self.zero, self.spec, dtype=dtype)
        s = self.scale.clamp(min=MIN_SCALE)
        s = s + (s.to(SCALE_DTYPE).float() - s).detach()  # train in fp32, forward the stored fp16 value
        if self.scale.requires_grad:  # LSQ gradient scale: keeps step-size updates in proportion to weight updates
            g = 1.0 / math.sqrt(self.weight.numel() / s.numel() * self.qmax)
            s = s * g + (s - s * g).detach()
        s, z = expand_groups(s, self.spec, self.in_features), expand_groups(self.zero, self.spec, self.in_features)
        v = self.weight / s
        v = v + (torch.round(v) - v).detach()
        ste = (torch.clamp(v + z, self.qmin, self.qmax) - z) * s
        return exact + (ste - ste.detach()).to(dtype)  # adds an exact zero: the value stays the stored one

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the bias is added after the matmul, as PackedLinear does, so the export's output is bit-identical
        y = nn.functional.linear(x, self.quantized_weight(x.dtype))
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        kind = "ternary" if self.ternary else f"bits={self.spec.bits}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, {kind}, "
                f"group_size={self.spec.group_size}, sym={self.spec.sym}, learn_scales={self.scale.requires_grad}")
