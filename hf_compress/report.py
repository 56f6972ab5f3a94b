"""Size accounting: realised bits per weight and checkpoint bytes, next to fp16/fp32 sizes.

Realised bits count everything a quantized weight costs on disk: packed codes, float16 scales and packed
zero points (and whatever later formats add), divided by the number of weights those tensors represent.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from torch import nn

from hf_compress.formats.linear import PackedLinear


@dataclass
class SizeReport:
    quantized_weights: int  # weights represented by packed modules
    quantized_bits: int  # bits spent on them (codes + scales + zeros)
    dense_params: int  # parameters kept in floating point (unique storage)
    dense_bytes: int
    ideal_bytes: int  # quantized_bits / 8 + dense_bytes
    fp16_bytes: int  # the same model with every parameter in fp16
    fp32_bytes: int
    largest_dense: list = field(default_factory=list)  # [(tensor name, bytes)], the biggest dense tensors

    @property
    def packed_bytes(self) -> int:
        return self.quantized_bits // 8

    def split(self) -> str:
        """``packed X + dense Y (largest: name Z, …)``: where the bytes of a checkpoint go."""
        top = ", ".join(f"{n} {format_bytes(b)}" for n, b in self.largest_dense[:2])
        return f"packed {format_bytes(self.packed_bytes)} + dense {format_bytes(self.dense_bytes)}" + (
            f" (largest dense: {top})" if top else "")

    @property
    def bits_per_weight(self) -> float:
        return self.quantized_bits / max(self.quantized_weights, 1)

    def to_dict(self) -> dict:
        return {**asdict(self), "packed_bytes": self.packed_bytes, "bits_per_weight": round(self.bits_per_weight, 4)}


def module_bits(module: PackedLinear) -> int:
    """Bits one packed module stores for its weight (bias excluded: it is a dense parameter)."""
    return sum(t.numel() * t.element_size() * 8 for n, t in module.named_buffers(recurse=False) if t is not None)


def size_report(model: nn.Module) -> SizeReport:
    """Account every unique tensor of ``model`` once (tied embeddings are stored once)."""
    q_weights = q_bits = 0
    packed_buffers = set()
    for mod in model.modules():
        if isinstance(mod, PackedLinear):
            q_weights += mod.in_features * mod.out_features
            q_bits += module_bits(mod)
            packed_buffers.update(t.data_ptr() for _, t in mod.named_buffers(recurse=False) if t is not None)
    seen, dense_params, dense_bytes, sizes = set(), 0, 0, []
    for name, t in model.state_dict().items():  # what save_pretrained writes: persistent tensors only
        key = (t.data_ptr(), t.numel(), t.dtype)
        if t.data_ptr() in packed_buffers or key in seen or not t.is_floating_point():
            continue
        seen.add(key)
        dense_params += t.numel()
        dense_bytes += t.numel() * t.element_size()
        sizes.append((name, t.numel() * t.element_size()))
    total = q_weights + dense_params
    largest = sorted(sizes, key=lambda x: -x[1])[:3]
    return SizeReport(q_weights, q_bits, dense_params, dense_bytes, q_bits // 8 + dense_bytes, total * 2, total * 4,
                      largest)


def checkpoint_bytes(path: str | Path) -> int:
    """Bytes of the weight files (``*.safetensors``) of a saved checkpoint."""
    files = list(Path(path).glob("*.safetensors"))
    if not files:
        raise ValueError(f"no safetensors files in {path}")
    return sum(f.stat().st_size for f in files)


def format_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1000
    return f"{n:.1f} GB"
