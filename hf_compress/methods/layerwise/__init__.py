"""Layer-wise Quantization: whole decoder layers at two widths, ranked by LIM or ZD."""

from hf_compress.registry import Method, register_method

register_method(Method(
    title="Layer-wise Quantization", name="layerwise", summary="Layer-wise Quantization: least important layers (LIM/ZD/random) at the low width",
    paper="[Dumitru et al., arXiv 2406.17415](https://arxiv.org/abs/2406.17415)",
    config="hf_compress.methods.layerwise.config:LayerwiseQuantConfig",
))
