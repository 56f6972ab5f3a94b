"""BAQ: Bit Allocation Quantization."""

from hf_compress.registry import Method, register_method

register_method(Method(
    title="BAQ bit allocation", name="baq", summary="BAQ: equal-loss bit widths per input column (or module) from GPTQ column losses",
    paper="[arXiv 2506.05664](https://arxiv.org/abs/2506.05664)",
    config="hf_compress.methods.baq.config:BAQConfig",
))
