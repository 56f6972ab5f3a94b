"""Rebuild a pruned model's ``SparseLinear`` modules from its plan, before transformers loads the weights."""

from __future__ import annotations

from hf_compress.calibration.discovery import is_linear_like, set_submodule, weight_matrix
from hf_compress.checkpoint.rebuild import build_packed_modules
from hf_compress.formats.linear import PackedLinear
from hf_compress.formats.sparse import SparseLinear, SparseSpec


def build_sparse_modules(model, plan: dict, dtype=None) -> tuple[type, ...]:
    """Swap every sparse plan entry for an empty ``SparseLinear`` with the checkpoint's exact buffer shapes (packed
    entries — a quantized head or embedding table — go through ``build_packed_modules``). Returns the module types
    built, whose stored tensors the loader then checks."""
    packed = {n: s for n, s in plan.items() if not isinstance(s, SparseSpec)}
    for name, spec in plan.items():
        if name in packed:
            continue
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"the checkpoint's plan names module {name!r}, which this model does not have") from None
        if not is_linear_like(module):
            raise ValueError(f"the checkpoint's plan names {name!r}, a {type(module).__name__}, not a linear layer")
        out_f, in_f = weight_matrix(module).shape
        spec.check_shape(name, out_f, in_f)
        has_bias = getattr(module, "bias", None) is not None
        set_submodule(model, name, SparseLinear(in_f, out_f, spec, bias=has_bias, dtype=dtype, device="meta"))
    if packed:
        build_packed_modules(model, packed, dtype=dtype)
    return (SparseLinear, PackedLinear) if packed else (SparseLinear,)
