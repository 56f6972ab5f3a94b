"""GPTQ."""

from hf_compress.registry import Method, register_method

register_method(Method(
    title="GPTQ", name="gptq", summary="GPTQ: Hessian-aware rounding per module from calibration data",
    paper="[Frantar et al., 2022](https://arxiv.org/abs/2210.17323)",
    config="hf_compress.methods.gptq.config:GPTQConfig",
))
