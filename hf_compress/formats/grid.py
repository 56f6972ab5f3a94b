"""Group-wise uniform quantization grids: parameters, codes and dequantization.

Convention (shared by every solver and the packed module): ``W ≈ (q - z) · s`` with integer codes
``q ∈ [0, 2^b − 1]``, an integer zero point ``z`` and a float16 scale ``s`` per (row, group). Groups run along
the input dimension; when ``group_size`` does not divide it, the last group is short (no padding is stored).
Symmetric grids fix ``z = 2^(b−1)`` so no zero points need storing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hf_compress.formats.packing import check_bits

SCALE_DTYPE = torch.float16  # stored scale precision; codes are always computed against the rounded scale


@dataclass(frozen=True)
class QuantSpec:
    """What one module is quantized to: the unit of a plan.

    ``bit_groups`` makes the width vary per input column: ``((bits, n_columns), …)`` in ascending width, e.g.
    BAQ's allocation or high-impact channels. Which columns have which width is data (the module's
    ``col_bits`` buffer); the plan only needs the counts to know every tensor's shape before loading.
    ``bits`` is then the widest width.
    """

    bits: int
    group_size: int = 128  # -1: one group per row
    sym: bool = False
    bit_groups: tuple[tuple[int, int], ...] | None = None

    def __post_init__(self):
        check_bits(self.bits)
        if not isinstance(self.group_size, int) or (self.group_size != -1 and self.group_size < 1):
            raise ValueError(f"group_size must be a positive integer or -1 (per row), got {self.group_size!r}")
        if self.bit_groups is not None:
            widths = [b for b, _ in self.bit_groups]
            for b, n in self.bit_groups:
                check_bits(b)
                if not isinstance(n, int) or n < 1:
                    raise ValueError(f"bit group {b}-bit has {n!r} columns; counts must be positive integers")
            if widths != sorted(set(widths)) or widths[-1] != self.bits:
                raise ValueError(f"bit_groups {self.bit_groups} must list distinct widths in ascending order, the widest = bits ({self.bits})")

    @property
    def is_mixed(self) -> bool:
        return self.bit_groups is not None

    def groups(self, in_features: int) -> int:
        return 1 if self.group_size == -1 else -(-in_features // self.group_size)

    def width(self, in_features: int) -> int:
        """Columns per group; a group larger than the row is the row (one group, nothing padded in memory)."""
        return in_features if self.group_size == -1 else min(self.group_size, in_features)

    def uniform(self, bits: int) -> "QuantSpec":
        """The same grid at one width (a segment of a mixed spec)."""
        return QuantSpec(bits, self.group_size, self.sym)

    def code_bits(self, in_features: int) -> float:
        """Average code width over the columns (excluding scales and zero points)."""
        if not self.is_mixed:
            return float(self.bits)
        return sum(b * n for b, n in self.bit_groups) / in_features

    def to_dict(self) -> dict:
        out = {"bits": self.bits, "group_size": self.group_size, "sym": self.sym}
        if self.is_mixed:
            out["bit_groups"] = {str(b): n for b, n in self.bit_groups}
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "QuantSpec":
        unknown = set(d) - {"bits", "group_size", "sym", "bit_groups"}
        if unknown:
            raise ValueError(f"unknown keys in a module's quantization spec: {sorted(unknown)}")
        groups = d.get("bit_groups")
        if groups is not None:
            try:
                groups = tuple(sorted((int(b), n) for b, n in dict(groups).items()))
            except (TypeError, ValueError):
                raise ValueError(f"bit_groups must map widths to column counts, got {groups!r}") from None
        return cls(bits=d["bits"], group_size=d.get("group_size", 128), sym=d.get("sym", False), bit_groups=groups)


def _grouped(W: torch.Tensor, width: int, fill: float):
    """View ``W [rows, cols]`` as ``[rows, groups, width]``, padding the short last group with ``fill``."""
    rows, cols = W.shape
    pad = (-cols) % width
    if pad:
        W = torch.cat([W, W.new_full((rows, pad), fill)], dim=1)
    return W.view(rows, -1, width)


def _params_from_range(lo, hi, spec: QuantSpec):
    maxq = 2**spec.bits - 1
    if spec.sym:
        hi = torch.maximum(lo.abs(), hi)
        lo = -hi
    lo = torch.minimum(lo, torch.zeros_like(lo))  # keep 0 representable so the zero point lies on the grid
    hi = torch.maximum(hi, torch.zeros_like(hi))
    # clamp *after* the cast: a range below fp16's smallest subnormal would otherwise store a zero scale
    scale = ((hi - lo) / maxq).to(SCALE_DTYPE).float().clamp(min=2.0**-24)
    if spec.sym:
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        zero = torch.round(-lo / scale).clamp(0, maxq)
    return scale, zero


def group_params(
    W: torch.Tensor,
    spec: QuantSpec,
    importance: torch.Tensor | None = None,
    clip_grid: int = 0,
    min_shrink: float = 0.75,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and zero points ``[rows, groups]`` for ``W``.

    With ``clip_grid > 0`` the range of each (row, group) is shrunk by the factor in
    ``linspace(1, min_shrink, clip_grid)`` that minimises ``Σ_j importance_j (w_j − ŵ_j)²`` — the diagonal
    of the layer Hessian makes this the first-order output error rather than plain weight MSE.
    """
    W = W.float()
    width = spec.width(W.shape[1])
    valid = _grouped(torch.ones_like(W[:1]), width, 0.0)  # [1, groups, width]
    lo = _grouped(W, width, float("inf")).amin(dim=2)
    hi = _grouped(W, width, float("-inf")).amax(dim=2)
    scale, zero = _params_from_range(lo, hi, spec)
    if clip_grid <= 0:
        return scale, zero
    imp = torch.ones(W.shape[1], device=W.device) if importance is None else importance.float().clamp(min=0)
    imp = _grouped(imp.view(1, -1), width, 0.0) * valid
    Wg = _grouped(W, width, 0.0)
    best = torch.full_like(scale, float("inf"))
    for shrink in torch.linspace(1.0, min_shrink, clip_grid).tolist():
        s, z = _params_from_range(lo * shrink, hi * shrink, spec)
        deq = _fake_quant(Wg, s.unsqueeze(2), z.unsqueeze(2), spec.bits)
        err = ((deq - Wg) ** 2 * imp).sum(dim=2)
        better = err < best
        best = torch.where(better, err, best)
        scale = torch.where(better, s, scale)
        zero = torch.where(better, z, zero)
    return scale, zero


def _fake_quant(w, scale, zero, bits):
    q = torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1)
    return (q - zero) * scale


def quantize_column(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int):
    """Codes and dequantized values of one column ``w [rows]`` on the grid of its group."""
    q = torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1)
    return q, (q - zero) * scale


def expand_groups(t: torch.Tensor, spec: QuantSpec, in_features: int) -> torch.Tensor:
    """Repeat per-group values ``[rows, groups]`` to per-column ``[rows, in_features]``."""
    width = spec.width(in_features)
    return t.repeat_interleave(width, dim=1)[:, :in_features]


def quantize_weight(W: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Integer codes ``[rows, cols]`` of ``W`` on a given grid (round to nearest)."""
    cols = W.shape[1]
    s, z = expand_groups(scale, spec, cols), expand_groups(zero, spec, cols)
    return torch.clamp(torch.round(W.float() / s) + z, 0, 2**spec.bits - 1).to(torch.uint8)


def dequantize_weight(codes, scale, zero, spec: QuantSpec, dtype=torch.float32) -> torch.Tensor:
    """Reference dequantization ``(q − z) · s``; the precision contract every fast path must match."""
    cols = codes.shape[1]
    s = expand_groups(scale.to(dtype), spec, cols)
    z = expand_groups(zero.to(dtype), spec, cols)
    return (codes.to(dtype) - z) * s
