"""DiffRate (Chen et al., ICCV 2023): per-layer token pruning + merging in vision transformers, with each layer's
kept-token count learned by gradient descent under a FLOPs constraint, then fixed as integers in the config of a
registered architecture (``hfc_diffrate_vit`` / ``hfc_diffrate_deit``) that loads with plain ``from_pretrained``.

Submodules load lazily: the configurations must be importable while transformers itself is still importing.
"""

from __future__ import annotations

from hf_compress._imports import lazy_attributes
from hf_compress.registry import Method, register_method

PAPER = "[Chen et al., ICCV 2023 (arXiv 2305.17997)](https://arxiv.org/abs/2305.17997)"
register_method(Method(
    title="DiffRate token compression", name="diffrate", kind="architecture", paper=PAPER,
    summary="DiffRate: learned per-layer token pruning + merging for ViTs under a FLOPs target",
    cli="hf_compress.methods.diffrate.cli:add_command",
    model_types={"hfc_diffrate_vit": "diffrate", "hfc_diffrate_deit": "diffrate"},
    register_architecture="hf_compress.methods.diffrate.configuration:register",
    card={"diffrate": "hf_compress.methods.diffrate.card:diffrate_card"},
))

_LAZY = {
    "DiffRateViTConfig": "configuration",
    "DiffRateDeiTConfig": "configuration",
    "DiffRateViTForImageClassification": "modeling",
    "DiffRateDeiTForImageClassification": "modeling",
    "compress": "modeling",
    "register": "modeling",
    "apply_token_reduction": "reduction",
    "remove_token_reduction": "reduction",
    "kept_schedule": "reduction",
    "RateProxy": "search",
    "RateSearch": "search",
    "search_rates": "search",
    "FlopsSpec": "flops",
    "count_flops": "flops",
    "check_schedule": "rates",
    "monotone_schedule": "rates",
    "uniform_schedule": "rates",
    "importance_order": "merging",
    "merge_tokens": "merging",
    "digits": "data",
    "load_images": "data",
}

__all__ = list(_LAZY)
__getattr__ = lazy_attributes(__name__, _LAZY)
