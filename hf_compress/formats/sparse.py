"""Sparse weight storage: ``SparseSpec`` (one module's entry in a pruning plan) and ``SparseLinear``.

Only the kept weights are stored, plus where they sit:

- **N:M** (2:4, 4:8): the kept values row-major and, per kept value, its position inside its group of ``M``
  input columns as a ``log2(M)``-bit index (2 bits for 2:4) — ``N/M`` of the values plus ``N·log2(M)/M`` bits per
  weight (2:4 in fp32: 2.06 of 4 bytes per weight).
- **unstructured**: a 1-bit mask over ``[out, in]`` plus the kept values row-major; the number kept (``nnz``) is
  in the plan, so every tensor's shape is known before loading, as for the packed formats.

Both compose with the integer grids of :mod:`formats.grid`: with ``bits`` set, the grid (scales, zero points) is
fitted on the *dense* column layout and only the kept codes are stored (the kept values' codes, packed by
:mod:`formats.packing`). A pruned weight needs no code: the grid keeps 0 exactly representable (``q = z``).

ARMOR (``factor_block``) adds block-diagonal factors: ``Ŵ = A · core · B``, ``A [out/b, b, b]``, ``B [in/b, b, b]``.

State (all buffers, safetensors; 1-D streams so no dense loader mistakes them for a weight matrix):
``weight`` (kept values, or their packed codes), ``indices`` (N:M) or ``mask`` (unstructured), ``scales`` and
``qzeros`` (with ``bits``), ``factor_a``/``factor_b`` (with ``factor_block``), ``bias``.

Forward: torch has no CPU sparse kernel faster than dense GEMM at these ratios (its semi-structured kernels are
CUDA-only), so the first forward decompresses the stored weight once into a dense matrix on the input's device and
dtype and runs ``F.linear`` on it. Disk and load size are sparse; run-time memory is the dense layer's.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from hf_compress.formats.grid import SCALE_DTYPE, QuantSpec, dequantize_weight, group_params, quantize_weight
from hf_compress.formats.packing import pack_codes, packed_numel, unpack_codes

_NM = re.compile(r"^(\d+):(\d+)$")


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """``"2:4"`` → (2, 4); ``"unstructured"`` → None; anything else is a ValueError."""
    if pattern == "unstructured":
        return None
    match = _NM.match(str(pattern))
    if not match:
        raise ValueError(f"sparsity pattern must be 'unstructured' or 'N:M' (e.g. '2:4', '4:8'), got {pattern!r}")
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m or m > 256 or m & (m - 1):
        raise ValueError(f"N:M pattern {pattern!r} needs 0 < N < M and M a power of two up to 256 (indices are "
                         f"log2(M)-bit codes)")
    return n, m


@dataclass(frozen=True)
class SparseSpec:
    """How one pruned module is stored: the unit of a pruning plan (``config.json``'s ``plan`` entries).

    Args:
        pattern: ``"unstructured"`` or ``"N:M"``.
        nnz: weights kept (required for unstructured: it sizes the stored values; N:M derives it).
        sparsity: fraction pruned, informational (cards, plots); shapes never depend on it.
        bits, group_size, sym: an integer grid for the kept values (``None``: values stored in the model's dtype).
        factor_block: ARMOR's block size of the block-diagonal factors (``None``: no factors).
    """

    pattern: str
    nnz: int | None = None
    sparsity: float | None = None
    bits: int | None = None
    group_size: int = 128
    sym: bool = False
    factor_block: int | None = None

    def __post_init__(self):
        parse_pattern(self.pattern)
        if self.nm is None and (not isinstance(self.nnz, int) or self.nnz < 0):
            raise ValueError(f"an unstructured plan entry needs nnz (weights kept) as a non-negative integer, got {self.nnz!r}")
        if self.bits is not None:
            QuantSpec(self.bits, self.group_size, self.sym)
        if self.factor_block is not None and (not isinstance(self.factor_block, int) or self.factor_block < 1):
            raise ValueError(f"factor_block must be a positive integer, got {self.factor_block!r}")

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern)

    @property
    def grid(self) -> QuantSpec | None:
        return None if self.bits is None else QuantSpec(self.bits, self.group_size, self.sym)

    def kept(self, out_features: int, in_features: int) -> int:
        if self.nm is None:
            return self.nnz
        n, m = self.nm
        return out_features * in_features // m * n

    def check_shape(self, name: str, out_features: int, in_features: int) -> None:
        """Refuse a pattern or factor block that does not fit the module, naming it."""
        if self.nm is not None and in_features % self.nm[1]:
            raise ValueError(f"{name}: N:M pattern {self.pattern} needs in_features divisible by {self.nm[1]}, "
                             f"got {in_features}")
        if self.nm is None and self.nnz > out_features * in_features:
            raise ValueError(f"{name}: plan keeps {self.nnz} weights, the module has {out_features * in_features}")
        b = self.factor_block
        if b is not None and (in_features % b or out_features % b):
            raise ValueError(f"{name}: factor_block {b} must divide both in_features {in_features} and out_features "
                             f"{out_features}")

    def to_dict(self) -> dict:
        out = {"pattern": self.pattern, "sparsity": self.sparsity}
        if self.nm is None:
            out["nnz"] = self.nnz
        if self.bits is not None:
            out.update(bits=self.bits, group_size=self.group_size, sym=self.sym)
        if self.factor_block is not None:
            out["factor_block"] = self.factor_block
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "SparseSpec":
        unknown = set(d) - {"pattern", "nnz", "sparsity", "bits", "group_size", "sym", "factor_block"}
        if unknown:
            raise ValueError(f"unknown keys in a module's sparsity spec: {sorted(unknown)}")
        if "pattern" not in d:
            raise ValueError(f"a sparsity spec needs a 'pattern', got {sorted(d)}")
        return cls(**d)


def index_bits(m: int) -> int:
    return max(1, int(math.log2(m)))


class SparseLinear(nn.Module):
    """A pruned linear layer storing only its kept weights, with the ``nn.Linear`` call signature."""

    def __init__(self, in_features: int, out_features: int, spec: SparseSpec, bias: bool = True, dtype=None,
                 device=None):
        super().__init__()
        spec.check_shape("SparseLinear", out_features, in_features)
        self.in_features, self.out_features, self.spec = in_features, out_features, spec
        dtype = dtype or torch.float32
        kept = spec.kept(out_features, in_features)
        grid = spec.grid
        if grid is None:
            self.register_buffer("weight", torch.zeros(kept, dtype=dtype, device=device))
        else:
            groups = grid.groups(in_features)
            self.register_buffer("weight", torch.zeros(packed_numel(kept, grid.bits), dtype=torch.uint8, device=device))
            self.register_buffer("scales", torch.zeros(out_features, groups, dtype=SCALE_DTYPE, device=device))
            if not grid.sym:
                self.register_buffer("qzeros", torch.zeros(packed_numel(out_features * groups, grid.bits),
                                                           dtype=torch.uint8, device=device))
        if spec.nm is not None:
            self.register_buffer("indices", torch.zeros(packed_numel(kept, index_bits(spec.nm[1])), dtype=torch.uint8,
                                                        device=device))
        else:
            self.register_buffer("mask", torch.zeros(packed_numel(out_features * in_features, 1), dtype=torch.uint8,
                                                     device=device))
        b = spec.factor_block
        if b is not None:
            self.register_buffer("factor_a", torch.zeros(out_features // b, b, b, dtype=dtype, device=device))
            self.register_buffer("factor_b", torch.zeros(in_features // b, b, b, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        self._dense = None

    # -- building ----------------------------------------------------------------------------------------------
    @classmethod
    def from_dense(cls, weight: torch.Tensor, mask: torch.Tensor, spec: SparseSpec, bias=None, factors=None,
                   dtype=None) -> "SparseLinear":
        """Store ``weight ⊙ mask`` (``mask`` bool ``[out, in]``, True = kept) as ``spec`` says; ``factors`` = (A, B)
        block stacks for ARMOR. With a grid the kept values are rounded to nearest on it."""
        out_f, in_f = weight.shape
        dtype = dtype or (weight.dtype if bias is None else bias.dtype)
        spec.check_shape("weight", out_f, in_f)
        check_mask(mask, spec)
        mod = cls(in_f, out_f, spec, bias=bias is not None, dtype=dtype, device=weight.device)
        W = torch.where(mask, weight.float(), torch.zeros((), device=weight.device))
        grid = spec.grid
        if grid is None:
            mod.weight.copy_(W[mask].to(dtype))
        else:
            scale, zero = group_params(W, grid)
            codes = quantize_weight(W, scale, zero, grid)
            mod.weight.copy_(pack_codes(codes[mask], grid.bits))
            mod.scales.copy_(scale.to(SCALE_DTYPE))
            if not grid.sym:
                mod.qzeros.copy_(pack_codes(zero.round().to(torch.int32), grid.bits))
        if spec.nm is not None:
            n, m = spec.nm
            slots = torch.arange(in_f, device=mask.device).remainder(m).expand(out_f, in_f)
            mod.indices.copy_(pack_codes(slots[mask], index_bits(m)))
        else:
            mod.mask.copy_(pack_codes(mask.to(torch.uint8), 1))
        if factors is not None:
            mod.factor_a.copy_(factors[0].to(dtype))
            mod.factor_b.copy_(factors[1].to(dtype))
        if bias is not None:
            mod.bias.data.copy_(bias.detach())
        return mod

    # -- reading -----------------------------------------------------------------------------------------------
    def kept_mask(self) -> torch.Tensor:
        """Bool ``[out, in]``, True where a weight is stored."""
        out_f, in_f = self.out_features, self.in_features
        if self.spec.nm is None:
            return unpack_codes(self.mask, 1, out_f * in_f).view(out_f, in_f).bool()
        n, m = self.spec.nm
        slot = unpack_codes(self.indices, index_bits(m), self.spec.kept(out_f, in_f)).long().view(out_f, in_f // m, n)
        mask = torch.zeros(out_f, in_f // m, m, dtype=torch.bool, device=slot.device)
        mask.scatter_(2, slot, True)
        return mask.view(out_f, in_f)

    def core_weight(self, dtype=torch.float32) -> torch.Tensor:
        """The sparse matrix ``[out, in]`` (ARMOR: the core between the factors), zeros where pruned."""
        mask = self.kept_mask()
        grid = self.spec.grid
        if grid is None:
            W = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
            W[mask] = self.weight.to(dtype)
            return W
        groups = self.scales.shape[1]
        zero = (torch.full((self.out_features, groups), 2 ** (grid.bits - 1), dtype=torch.uint8, device=mask.device)
                if grid.sym else unpack_codes(self.qzeros, grid.bits, self.out_features * groups).view(self.out_features, groups))
        codes = zero.repeat_interleave(grid.width(self.in_features), dim=1)[:, :self.in_features].clone()
        codes[mask] = unpack_codes(self.weight, grid.bits, self.spec.kept(self.out_features, self.in_features))
        return dequantize_weight(codes, self.scales, zero, grid, dtype) * mask

    def dense_weight(self, dtype=torch.float32) -> torch.Tensor:
        """``Ŵ [out, in]`` as the forward applies it (``A · core · B`` with factors)."""
        W = self.core_weight(torch.float32)
        if self.spec.factor_block is not None:
            W = block_diag_left(self.factor_a.float(), block_diag_right(W, self.factor_b.float()))
        return W.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cache = self._dense
        if cache is None or cache.dtype != x.dtype or cache.device != x.device:
            with torch.no_grad():
                cache = self._dense = self.dense_weight(x.dtype).to(x.device)
        return nn.functional.linear(x, cache, None if self.bias is None else self.bias.to(x.dtype))

    def kernel_description(self) -> tuple[list[str], list[str]]:
        """For ``hf_compress.kernel_report``: what runs this module, and why it is no sparse kernel."""
        what = f"dense F.linear on a copy decompressed once ({self.spec.pattern}"
        what += f" + {self.spec.bits}-bit codes" if self.spec.bits else ""
        what += ", A·core·B folded" if self.spec.factor_block else ""
        return [what + ")"], ["no sparse kernel faster than dense GEMM here: torch's 2:4 kernels are CUDA-only and "
                              "measured slower than dense at this model's sizes (benchmarks/gpu_sparse.py)"]

    def stored_bytes(self) -> int:
        """Bytes of the stored weight tensors (bias excluded, as for ``PackedLinear``)."""
        return sum(t.numel() * t.element_size() for _, t in self.named_buffers(recurse=False) if t is not None)

    def _apply(self, fn, recurse=True):
        self._dense = None  # a move or cast invalidates the decompressed copy
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        s = self.spec
        return (f"in_features={self.in_features}, out_features={self.out_features}, pattern={s.pattern}, "
                f"sparsity={s.sparsity}, bits={s.bits}" + (f", factor_block={s.factor_block}" if s.factor_block else ""))


def check_mask(mask: torch.Tensor, spec: SparseSpec) -> None:
    """The mask must match the spec exactly: N of every M, or ``nnz`` kept (else the stored shapes would lie)."""
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
    if spec.nm is not None:
        n, m = spec.nm
        counts = mask.view(mask.shape[0], -1, m).sum(dim=2)
        if not bool((counts == n).all()):
            raise ValueError(f"mask is not {spec.pattern}: groups keep between {int(counts.min())} and "
                             f"{int(counts.max())} of {m}")
    elif int(mask.sum()) != spec.nnz:
        raise ValueError(f"mask keeps {int(mask.sum())} weights, the spec says nnz={spec.nnz}")


def block_diag_left(A: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """``blockdiag(A) @ W`` for ``A [k, b, b]``, ``W [k·b, n]``."""
    k, b, _ = A.shape
    return torch.bmm(A, W.reshape(k, b, -1)).reshape(k * b, -1)


def block_diag_right(W: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``W @ blockdiag(B)`` for ``W [m, k·b]``, ``B [k, b, b]``."""
    k, b, _ = B.shape
    return torch.bmm(W.reshape(-1, k, b).transpose(0, 1), B).transpose(0, 1).reshape(W.shape[0], k * b)
