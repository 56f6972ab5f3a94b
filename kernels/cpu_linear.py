"""The CPU forward of a packed module: each segment repacked once into the fastest layout that serves it.

A module (or each width segment of a mixed module) gets, in order of preference:

* ``int4``: 1–4-bit codes through PyTorch's int4 kernel (``cpu_int4``); memory ≈ the packed size;
* ``int8``: 5–8-bit codes with one group per row through ``_weight_int8pack_mm`` (per-channel scales; the zero
  point is folded in as ``− Σx · s·z``); memory ≈ one byte per weight;
* ``dense``: anything else (grouped 5–8-bit, groups the int4 kernel refuses, odd shapes) keeps one bf16 copy of
  that segment, dequantized once — never re-dequantized per call; logged once with the module names. For grouped
  8-bit this is the best measured alternative (benchmarks/cpu_kernels.py: faster than one int8 call per group or
  a dequantize per call, at 1 and at 512 rows).

The plan is built at the first forward (after loading or quantizing) and lives on the module outside its
state dict, so checkpoints do not change. Activations run in bf16 and results are cast back to the caller's
dtype.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch

from hf_compress.kernels import cpu_int4

COMPUTE_DTYPE = cpu_int4.COMPUTE_DTYPE
# _weight_int8pack_mm (torch 2.13 CPU) is only correct when K is a multiple of 16 (K=40: 55 % error; K=33 crashed
# the process): inputs are padded to it. Rows from which dequantize-per-call + a bf16 GEMM beats the int4 kernel:
# the crossover on SmolLM2's shapes lies between 128 and 256 rows (576×1536 ties at 256). Both measured by
# benchmarks/cpu_kernels.py (RESULTS.md "CPU kernel choices").
INT8_K_MULTIPLE = 16
LARGE_M = 256


@dataclass
class SegmentKernel:
    kind: str  # "int4" | "int8" | "dense"
    cols: torch.Tensor | None  # input columns of this segment (None: all, in order)
    payload: object
    reason: str | None = None  # why a dense segment could not use a packed kernel
    reads_padding: bool = False  # ``cols`` points at a zero column appended to the input (joined segments)


@dataclass
class CpuPlan:
    segments: list[SegmentKernel] = field(default_factory=list)

    def runner(self, module=None):
        """``x -> x @ Wᵀ`` (bf16). One int4 segment over all columns, the common case, gets a closure with nothing
        but the op around it: it runs once per module per token, where every extra Python step shows. With
        ``LARGE_M`` rows or more (prefill) a module whose codes unpack with shifts alone is dequantized for the call
        and multiplied by a bf16 GEMM instead, which is faster there (see ``LARGE_M``)."""
        if len(self.segments) == 1 and self.segments[0].kind == "int4":
            seg = self.segments[0]
            w, cols, pad = seg.payload, seg.cols, seg.reads_padding
            op, packed, group, scale_zero = torch.ops.aten._weight_int4pack_mm_for_cpu, w.packed, w.group, w.scale_zero
            dense = shift_dequantizer(module) if module is not None and cols is None else None

            def run(x):
                x2 = x.reshape(-1, x.shape[-1]).to(COMPUTE_DTYPE)
                if cols is not None:  # joined segments: gather (and zero-pad) the columns in kernel order
                    x2 = (torch.nn.functional.pad(x2, (0, 1)) if pad else x2).index_select(1, cols)
                if dense is not None and x2.shape[0] >= LARGE_M:
                    y = torch.nn.functional.linear(x2, dense())
                else:
                    y = op(x2.contiguous(), packed, group, scale_zero)
                return y.view(*x.shape[:-1], y.shape[-1])

            return run
        return lambda x: run_plan(self, x)

    @property
    def kinds(self) -> list[str]:
        return [s.kind for s in self.segments]

    @property
    def fallback_reasons(self) -> list[str]:
        return [s.reason for s in self.segments if s.reason]


_local = threading.local()


def _scratch(name: str, numel: int, dtype) -> torch.Tensor:
    """A per-thread buffer of at least ``numel`` elements, reused by every module's prefill dequantize. Why: a
    fresh multi-MB tensor per module per call left glibc holding freed memory (peak RSS of a packed 4-bit SmolLM2
    rose from 753 to 1,435 MB, above the bf16 model's); reuse keeps one buffer of the largest module. The result
    is consumed by the GEMM before the next module runs."""
    buffers = _local.__dict__.setdefault("buffers", {})
    buf = buffers.get(name)
    if buf is None or buf.numel() < numel or buf.dtype != dtype:
        buf = buffers[name] = torch.empty(numel, dtype=dtype)
    return buf[:numel]


def shift_dequantizer(module):
    """``() -> W`` in bf16 straight from the module's own packed stream, for widths that divide 8 (codes unpack with
    shifts and masks, no int64 work) and groups that tile the row; None otherwise. Holds no dense copy: the
    weight is rebuilt per call (prefill only, where the GEMM dwarfs it)."""
    spec, n, k = module.spec, module.out_features, module.in_features
    if spec.is_mixed or 8 % spec.bits or k % spec.width(k) or type(module).__name__ == "PackedEmbedding":
        return None
    bits, width = spec.bits, spec.width(k)
    groups = k // width
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, dtype=torch.uint8) * bits
    mask = (1 << bits) - 1
    packed = module.weight
    scales = module.scales.to(COMPUTE_DTYPE).view(n, groups, 1)
    zeros = module.zeros().to(COMPUTE_DTYPE).view(n, groups, 1)

    n_bytes = packed.numel()

    def dense():  # written into per-thread scratch buffers: no allocation the size of W per call (see _scratch)
        codes = _scratch("codes", n_bytes * per_byte, torch.uint8).view(n_bytes, per_byte)
        torch.bitwise_and(torch.bitwise_right_shift(packed.unsqueeze(1), shifts, out=codes), mask, out=codes)
        out = _scratch("dense", n * k, COMPUTE_DTYPE).view(n, groups, width)
        out.copy_(codes.view(-1)[: n * k].view(n, groups, width))
        return out.sub_(zeros).mul_(scales).view(n, k)

    return dense


def _int8_payload(codes, scales, zeros, bits):
    """Codes centred on ``2^(bits−1)`` as int8 and ``y = x·(s·q)ᵀ − Σx · s·(z − 2^(bits−1))``: centring keeps the
    correction term small, so its rounding does not swamp the result (it is computed in fp32)."""
    center = 2 ** (bits - 1)
    s = scales[:, 0].float()
    q = (codes.to(torch.int16) - center).to(torch.int8)
    pad = (-q.shape[1]) % INT8_K_MULTIPLE  # the op returns garbage (or crashes) otherwise: zero columns, zero inputs
    q = torch.nn.functional.pad(q, (0, pad)).contiguous()
    offset = s * (zeros[:, 0].float() - center)
    return q, s.to(COMPUTE_DTYPE), offset, pad


def build_plan(module) -> CpuPlan:
    """Repack every segment of a ``PackedLinear`` for the CPU kernels (see the module docstring)."""
    from hf_compress.formats.grid import dequantize_weight

    plan = CpuPlan()
    rows = _row_reader(module)
    if rows is not None:  # uniform module, rows on byte boundaries: converted block by block (no full unpack)
        spec, n, k = module.spec, module.out_features, module.in_features
        plan.segments.append(SegmentKernel("int4", None, cpu_int4.to_int4_weight_by_rows(
            rows, n, k, module.scales, module.zeros(), spec.width(k), spec.bits)))
        return plan
    parts = list(zip(module.segments(), module.segment_codes(), module.segment_tensors(), module.segment_zeros()))
    n, group = module.out_features, module.spec.group_size
    if _can_join(module):  # all ≤4-bit segments (each padded to whole groups) in one int4 call
        narrow = [p for p in parts if p[0].spec.bits <= 4]
        plan.segments.append(_joined_int4(narrow, module.in_features))
        parts = [p for p in parts if p[0].spec.bits > 4]
    for seg, codes, (_, _, scales, _), zeros in parts:
        bits, k = seg.spec.bits, seg.n_cols
        width = seg.spec.width(k)
        reason = cpu_int4.unsupported_reason(bits, width, n, k)
        if reason is None:
            plan.segments.append(SegmentKernel("int4", seg.cols, cpu_int4.to_int4_weight(codes, scales, zeros, width, bits)))
            continue
        if width == k and hasattr(torch.ops.aten, "_weight_int8pack_mm"):
            plan.segments.append(SegmentKernel("int8", seg.cols, _int8_payload(codes, scales, zeros, bits)))
            continue
        dense = dequantize_weight(codes, scales, zeros, seg.spec, dtype=COMPUTE_DTYPE)
        plan.segments.append(SegmentKernel("dense", seg.cols, dense, reason))
    return plan


def _row_reader(module):
    """``(r0, r1) -> codes [r1 − r0, K]`` for a uniform module the int4 kernel takes whose rows start on bytes
    (then a block of rows is a byte range of the stream); None otherwise."""
    from hf_compress.formats.packing import _run, unpack_codes

    spec, n, k = module.spec, module.out_features, module.in_features
    if spec.is_mixed or cpu_int4.unsupported_reason(spec.bits, spec.width(k), n, k) is not None:
        return None
    codes_per_run, run_bytes = _run(spec.bits)
    if k % codes_per_run:
        return None
    row_bytes = k // codes_per_run * run_bytes
    stream = module.weight

    def rows(r0, r1):
        return unpack_codes(stream[r0 * row_bytes:r1 * row_bytes], spec.bits, (r1 - r0) * k).view(r1 - r0, k)

    return rows


def _can_join(module) -> bool:
    """Grouped modules whose groups the int4 kernel can take, needing a join: a mixed module with several ≤4-bit
    segments, or a short last group (both handled by padding each segment to whole groups with zero inputs)."""
    g, spec = module.spec.group_size, module.spec
    if g == -1 or cpu_int4.kernel_group(g, g) is None or cpu_int4.unsupported_reason(
            1, g, module.out_features, g) is not None:
        return False
    narrow = [seg for seg in module.segments() if seg.spec.bits <= 4]
    return len(narrow) > 1 or (len(narrow) == 1 and (narrow[0].n_cols % g != 0 or spec.is_mixed))


def _joined_int4(parts, in_features: int) -> SegmentKernel:
    """One int4 weight over the ≤4-bit segments laid side by side, each padded to whole groups.

    Padding columns read input index ``in_features`` (a zero appended to the activations), so their codes
    contribute nothing and the product is exact; the gather costs one ``index_select`` of the input."""
    g = parts[0][0].spec.group_size
    index, codes_all, scales_all, zeros_all = [], [], [], []
    for seg, codes, (_, _, scales, _), zeros in parts:
        k = seg.n_cols
        pad = (-k) % g
        cols = seg.cols if seg.cols is not None else torch.arange(k)
        index.append(torch.cat([cols.to(torch.int64), torch.full((pad,), in_features, dtype=torch.int64)]))
        shift = 8 - 2 ** (seg.spec.bits - 1)  # centre every width on the kernel's 8 (see cpu_int4.to_int4_weight)
        codes_all.append(torch.nn.functional.pad(codes.to(torch.int32) + shift, (0, pad), value=8))
        scales_all.append(scales.float())
        zeros_all.append(zeros.float() + shift)
    weight = cpu_int4.to_int4_weight(torch.cat(codes_all, 1), torch.cat(scales_all, 1), torch.cat(zeros_all, 1), g,
                                     bits=4)
    index = torch.cat(index)
    return SegmentKernel("int4", index, weight, None, reads_padding=bool((index == in_features).any()))


def run_plan(plan: CpuPlan, x: torch.Tensor) -> torch.Tensor:
    """``x @ Wᵀ`` in bf16 over the plan's segments (a mixed module sums its segments' partial products)."""
    xb = x.to(COMPUTE_DTYPE)
    padded = None
    out = None
    for seg in plan.segments:
        if seg.reads_padding:
            if padded is None:  # a zero input column for the padding of joined segments
                padded = torch.nn.functional.pad(xb, (0, 1))
            xs = padded.index_select(-1, seg.cols)
        else:
            xs = xb if seg.cols is None else xb.index_select(-1, seg.cols)
        if seg.kind == "int4":
            y = cpu_int4.int4_matmul(xs, seg.payload)
        elif seg.kind == "int8":
            q, scales, offset, pad = seg.payload
            x2 = xs.reshape(-1, xs.shape[-1])
            x2 = (torch.nn.functional.pad(x2, (0, pad)) if pad else x2).contiguous()
            y = torch.ops.aten._weight_int8pack_mm(x2, q, scales)
            y = (y.float() - x2.float().sum(-1, keepdim=True) * offset).to(COMPUTE_DTYPE).view(*xs.shape[:-1], -1)
        else:
            y = torch.nn.functional.linear(xs, seg.payload)
        out = y if out is None else out + y
    return out
