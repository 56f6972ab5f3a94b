"""A packed module's weight as one uniform grid, and the exact re-expressions of it that serving formats need.

Serving formats describe a module by one scheme — width, group size, symmetric or not — over the columns in
their natural order. Our uniform-width modules are exactly that; mixed-width modules (per-column widths, stored
as column segments) are not, and no exact re-expression exists (their groups run over permuted columns).

A uniform grid ``W = s·(u − z)`` can be rewritten without changing a single weight:

* wider codes: asymmetric codes and zeros stay as they are (``0..2^b−1`` lies inside ``0..2^b'−1``); symmetric
  codes shift by ``2^(b'−1) − 2^(b−1)`` so the implicit zero stays at the new midpoint;
* symmetric → asymmetric: the implicit zero ``2^(b−1)`` becomes an explicit one;
* smaller groups: a group of ``g`` columns splits into groups of ``g'`` (``g' | g``) sharing its scale and zero.

That is what "widening" means in every exporter: the weights a reader dequantizes are the ones we quantized.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hf_compress.formats.linear import PackedLinear


@dataclass(frozen=True)
class Scheme:
    """What a serving format records per module. ``group_size`` is the columns per group (the row, for one group)."""

    bits: int
    group_size: int
    sym: bool

    def describe(self, in_features: int | None = None) -> str:
        group = "per-row" if in_features is not None and self.group_size == in_features else f"g{self.group_size}"
        return f"{self.bits}-bit {'sym' if self.sym else 'asym'} {group}"


@dataclass
class UniformGrid:
    """Codes ``[N, K]`` (unsigned, ``0..2^bits−1``), fp16 scales and integer zeros ``[N, K / group_size]``."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    scheme: Scheme

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def dequantize(self) -> torch.Tensor:
        g = self.scheme.group_size
        s = self.scales.float().repeat_interleave(g, dim=1)
        z = self.zeros.float().repeat_interleave(g, dim=1)
        return (self.codes.float() - z) * s


def module_scheme(module: PackedLinear) -> tuple[Scheme | None, str | None]:
    """``(scheme, None)`` for a module one scheme describes exactly, else ``(None, why not)``."""
    spec, k = module.spec, module.in_features
    if spec.is_mixed:
        return None, "per-column mixed widths"
    width = spec.width(k)
    if k % width:
        return None, f"a short last group ({k} inputs in groups of {width})"
    return Scheme(spec.bits, width, spec.sym), None


def module_grid(module: PackedLinear) -> UniformGrid:
    scheme, why = module_scheme(module)
    if scheme is None:
        raise ValueError(f"no uniform grid for this module: {why}")
    return UniformGrid(module.codes().to(torch.int32), module.scales.to(torch.float16),
                       module.zeros().to(torch.int32), scheme)


def can_rewrite(source: Scheme, target: Scheme) -> bool:
    """Whether ``target`` holds ``source``'s weights exactly (see the module docstring)."""
    return (target.bits >= source.bits and source.group_size % target.group_size == 0
            and (source.sym or not target.sym))


def rewrite(grid: UniformGrid, target: Scheme) -> UniformGrid:
    """The same weights on ``target``'s grid; ValueError where that is not exact."""
    source = grid.scheme
    if not can_rewrite(source, target):
        raise ValueError(f"{source.describe()} cannot be rewritten exactly as {target.describe()}")
    codes, zeros = grid.codes, grid.zeros
    if source.sym and target.sym and target.bits > source.bits:
        shift = 2 ** (target.bits - 1) - 2 ** (source.bits - 1)
        codes, zeros = codes + shift, zeros + shift
    split = source.group_size // target.group_size
    scales = grid.scales.repeat_interleave(split, dim=1)
    zeros = zeros.repeat_interleave(split, dim=1)
    return UniformGrid(codes, scales, zeros, target)


def join(schemes: list[Scheme]) -> Scheme:
    """The narrowest scheme every one of ``schemes`` rewrites into exactly (for modules that must share one)."""
    return Scheme(max(s.bits for s in schemes), math.gcd(*[s.group_size for s in schemes]),
                  all(s.sym for s in schemes))


def stored_bytes(module) -> int:
    return sum(t.numel() * t.element_size() for t in module.buffers() if t is not None)


def packed_bytes(scheme: Scheme, shape: tuple[int, int]) -> int:
    """Bytes of codes, fp16 scales and (asymmetric) packed zeros of a ``shape`` weight on ``scheme``."""
    n, k = shape
    groups = n * (k // scheme.group_size)
    zeros = 0 if scheme.sym else math.ceil(groups * scheme.bits / 8)
    return math.ceil(n * k * scheme.bits / 8) + 2 * groups + zeros
