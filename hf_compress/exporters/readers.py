"""What each serving runtime reads, as :class:`~hf_compress.exporters.fitting.Reader` rules.

Facts (``../shared/notes/deployment.md``; vLLM's ``CompressedTensorsWNA16`` of 2026): vLLM's weight-only integer
path serves symmetric codes of 2–8 bits and asymmetric ones only at 4 and 8; fused q/k/v and gate/up must share
one scheme; the output head and the embedding table are served unquantized by the compressed-tensors path.
Marlin (the fast CUDA kernel) takes symmetric 4/8-bit or asymmetric 4-bit with groups of 32/64/128 or per row;
other widths need vLLM's optional kernels. GPTQ checkpoints hold 2, 3, 4 or 8 bits, either symmetry.
"""

from __future__ import annotations

from hf_compress.exporters.fitting import Reader
from hf_compress.exporters.grids import Scheme

MARLIN_GROUPS = (32, 64, 128)


def _vllm_accept(s: Scheme, shape) -> str | None:
    if s.sym and not 2 <= s.bits <= 8:
        return f"vLLM serves symmetric codes of 2-8 bits, not {s.bits}"
    if not s.sym and s.bits not in (4, 8):
        return f"vLLM serves asymmetric codes only at 4 or 8 bits, not {s.bits}"
    return None


def _vllm_widen(s: Scheme) -> Scheme:
    if s.sym:
        return Scheme(max(s.bits, 2), s.group_size, True)
    return Scheme(4 if s.bits <= 4 else 8, s.group_size, False)


def vllm_kernel(s: Scheme, in_features: int) -> str:
    """Which vLLM kernel family runs a servable scheme (informational: shown in the report and the card)."""
    marlin_bits = s.bits in (4, 8) if s.sym else s.bits == 4
    if marlin_bits and (s.group_size in MARLIN_GROUPS or s.group_size == in_features):
        return "Marlin"
    return "non-Marlin (optional kernel package for 2/3-bit)" if s.bits < 4 else "non-Marlin"


def _ct_accept(s: Scheme, shape) -> str | None:
    return None if 1 <= s.bits <= 8 else f"compressed-tensors packs 1-8 bit codes, not {s.bits}"


def _gptq_accept(s: Scheme, shape) -> str | None:
    if s.bits not in (2, 3, 4, 8):
        return f"GPTQ checkpoints hold 2, 3, 4 or 8 bits, not {s.bits}"
    n, k = shape  # qweight packs whole int32 words along the inputs, qzeros along the outputs
    if (k * s.bits) % 32 or (n * s.bits) % 32:
        return f"{n}x{k} does not pack into whole int32 words at {s.bits} bits"
    return None


def _gptq_widen(s: Scheme) -> Scheme:
    return Scheme(next(b for b in (2, 3, 4, 8) if b >= s.bits), s.group_size, s.sym)


VLLM = Reader("vLLM (compressed-tensors)", _vllm_accept, _vllm_widen, fused_share_scheme=True, packed_head=False)
TRANSFORMERS_CT = Reader("transformers (compressed-tensors)", _ct_accept, lambda s: s)
GPTQ = Reader("GPTQ (GPTQModel / transformers)", _gptq_accept, _gptq_widen, packed_head=False)
