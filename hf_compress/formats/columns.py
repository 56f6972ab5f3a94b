"""Per-column bit widths stored in *bit-width groups*.

A mixed module's columns are split by width into segments (ascending width, columns in their original order
inside a segment). Each segment is an ordinary group-quantized matrix at one width: its own packed codes,
scales and zero points, with groups of ``group_size`` consecutive columns *of the segment*. So every segment
decodes with the uniform kernel, and the only extra storage is the ``col_bits`` vector (one byte per input
column) that says where each column goes back. Uniform modules are the one-segment case with no scatter.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from hf_compress.formats.grid import QuantSpec, expand_groups, group_params


@dataclass(frozen=True)
class Segment:
    """The columns of one width: ``cols`` is ``None`` for a uniform module (all columns, in order)."""

    spec: QuantSpec  # uniform spec of this segment
    cols: torch.Tensor | None
    n_cols: int


def bit_groups_of(col_bits: torch.Tensor) -> tuple[tuple[int, int], ...]:
    counts = Counter(int(b) for b in col_bits.tolist())
    return tuple(sorted(counts.items()))


def mixed_spec(col_bits: torch.Tensor, group_size: int, sym: bool) -> QuantSpec:
    """The plan entry for a module whose column widths are ``col_bits`` (uniform if all widths agree)."""
    groups = bit_groups_of(col_bits)
    if len(groups) == 1:
        return QuantSpec(groups[0][0], group_size, sym)
    return QuantSpec(groups[-1][0], group_size, sym, bit_groups=groups)


def segments(spec: QuantSpec, in_features: int, col_bits: torch.Tensor | None = None) -> list[Segment]:
    """Segments of a module, checked against the plan's counts (a mismatch means a corrupt checkpoint)."""
    if not spec.is_mixed:
        return [Segment(spec, None, in_features)]
    if col_bits is None or col_bits.numel() != in_features:
        raise ValueError(f"per-column widths missing or of the wrong length for a {in_features}-column module")
    found = bit_groups_of(col_bits)
    if found != spec.bit_groups:
        raise ValueError(f"per-column widths {dict(found)} do not match the plan's bit groups {dict(spec.bit_groups)}: corrupt checkpoint?")
    out = []
    for bits, n in spec.bit_groups:
        cols = torch.nonzero(col_bits.to(torch.int64) == bits).flatten()
        out.append(Segment(spec.uniform(bits), cols, n))
    return out


def _take(W: torch.Tensor, seg: Segment) -> torch.Tensor:
    return W if seg.cols is None else W[:, seg.cols.to(W.device)]


@dataclass
class ColumnGrid:
    """A fitted grid: stored form (per-segment parameters, concatenated) and per-column expansion for solvers."""

    scales: torch.Tensor  # [rows, Σ groups] in segment order, as stored
    zeros: torch.Tensor  # [rows, Σ groups]
    col_scale: torch.Tensor  # [rows, cols]
    col_zero: torch.Tensor  # [rows, cols]
    col_maxq: torch.Tensor  # [cols] largest code per column

    def quantize(self, W: torch.Tensor, cols=slice(None)) -> torch.Tensor:
        """Codes of (columns ``cols`` of) ``W`` on this grid, round to nearest."""
        q = torch.round(W.float() / self.col_scale[:, cols]) + self.col_zero[:, cols]
        return torch.minimum(q.clamp(min=0), self.col_maxq[cols].to(q.dtype)).to(torch.uint8)

    def dequantize(self, codes: torch.Tensor, cols=slice(None)) -> torch.Tensor:
        return (codes.float() - self.col_zero[:, cols]) * self.col_scale[:, cols]


def fit_column_grid(W: torch.Tensor, spec: QuantSpec, col_bits: torch.Tensor | None = None,
                    importance: torch.Tensor | None = None, clip_grid: int = 0) -> ColumnGrid:
    """Fit every segment's group parameters on ``W`` (static groups) and expand them per column."""
    W = W.float()
    rows, n = W.shape
    segs = segments(spec, n, col_bits)
    col_scale, col_zero = torch.empty_like(W), torch.empty_like(W)
    col_maxq = torch.empty(n, dtype=torch.int64)
    scales, zeros = [], []
    for seg in segs:
        imp = None if importance is None else (importance if seg.cols is None else importance[seg.cols])
        s, z = group_params(_take(W, seg), seg.spec, imp, clip_grid)
        scales.append(s), zeros.append(z)
        idx = slice(None) if seg.cols is None else seg.cols
        col_scale[:, idx] = expand_groups(s, seg.spec, seg.n_cols)
        col_zero[:, idx] = expand_groups(z, seg.spec, seg.n_cols)
        col_maxq[idx] = 2**seg.spec.bits - 1
    return ColumnGrid(torch.cat(scales, 1), torch.cat(zeros, 1), col_scale, col_zero, col_maxq)


def split_stored(t: torch.Tensor, segs: list[Segment]) -> list[torch.Tensor]:
    """Split a stored ``[rows, Σ groups]`` tensor into per-segment parts."""
    sizes = [seg.spec.groups(seg.n_cols) for seg in segs]
    return list(torch.split(t, sizes, dim=1))


def scatter_columns(parts: list[torch.Tensor], segs: list[Segment], in_features: int) -> torch.Tensor:
    """Reassemble per-segment ``[rows, n_s]`` matrices into ``[rows, in_features]`` in original column order."""
    if len(segs) == 1 and segs[0].cols is None:
        return parts[0]
    out = parts[0].new_empty(parts[0].shape[0], in_features)
    for part, seg in zip(parts, segs):
        out[:, seg.cols.to(out.device)] = part
    return out
