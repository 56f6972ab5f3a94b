"""RSQ: rotate, scale tokens by importance, then quantize. Its rotation and token weighting are an option group,
so every quantization config can use them."""

from hf_compress.registry import Method, OptionGroup, register_method, register_option_group

register_method(Method(
    title="RSQ (rotate, scale, then quantize)", name="rsq", summary="RSQ: rotated model + attention-weighted GPTQ Hessians (rotation/weighting work with every method)",
    paper="[Sung et al., arXiv 2503.01820](https://arxiv.org/abs/2503.01820)",
    config="hf_compress.methods.rsq.config:RSQConfig",
))
register_option_group(OptionGroup(
    name="rotation and token weighting (RSQ; any method)",
    defaults={"rotate": False, "rotation_seed": 0, "token_weighting": None, "r_min": 0.01},
    validate="hf_compress.methods.rsq.options:validate",
    prepare_model="hf_compress.methods.rsq.options:rotate_if_asked",
    token_weights="hf_compress.methods.rsq.options:token_weights",
    help={"rotate": "fold norms and rotate the residual stream before quantizing (Llama family)",
          "rotation_seed": "seed of the random orthogonal rotation",
          "token_weighting": "'attention': weight calibration tokens by the attention they receive",
          "r_min": "smallest token weight after min-max scaling"},
))
