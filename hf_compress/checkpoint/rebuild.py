"""Rebuild a quantized model's packed modules from its plan, before transformers loads the weights."""

from __future__ import annotations

from torch import nn

from hf_compress.calibration.discovery import is_linear_like, set_submodule, weight_matrix
from hf_compress.formats.embedding import PackedEmbedding
from hf_compress.formats.linear import PackedLinear


def build_packed_modules(model, plan, dtype=None) -> None:
    """Swap every planned module of a (meta) model for an empty ``PackedLinear`` (``PackedEmbedding`` for an
    embedding table) whose buffers have exactly the checkpoint's shapes and dtypes."""
    for name, spec in plan.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"the checkpoint's plan names module {name!r}, which this model does not have") from None
        if type(module) is nn.Embedding:
            set_submodule(model, name, PackedEmbedding(module.num_embeddings, module.embedding_dim, spec,
                                                       padding_idx=module.padding_idx, dtype=dtype, device="meta"))
            continue
        if not is_linear_like(module):
            raise ValueError(f"the checkpoint's plan names {name!r}, a {type(module).__name__}, not a linear layer")
        out_f, in_f = weight_matrix(module).shape
        has_bias = getattr(module, "bias", None) is not None
        set_submodule(model, name, PackedLinear(in_f, out_f, spec, bias=has_bias, dtype=dtype, device="meta"))


def check_mixed_segments(model) -> None:
    """Per-column widths must agree with the plan (else the checkpoint is corrupt)."""
    for module in model.modules():
        if isinstance(module, PackedLinear) and module.spec.is_mixed:
            module.segments()
