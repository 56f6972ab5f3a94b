"""GPTQ."""

from hf_compress.registry import Method, OptionGroup, register_method, register_option_group

register_method(Method(
    title="GPTQ", name="gptq", summary="GPTQ: Hessian-aware rounding per module from calibration data",
    paper="[Frantar et al., 2022](https://arxiv.org/abs/2210.17323)",
    config="hf_compress.methods.gptq.config:GPTQConfig",
))
register_option_group(OptionGroup(
    name="grid refit (any GPTQ/RTN-solved method)",
    defaults={"refit": 0},
    validate="hf_compress.solvers.refit:validate",
    help={"refit": "rounds of refitting scales/zero points to the chosen codes under the full Hessian "
                   "(0: off; each round after the first re-solves on the refitted grid); costs no stored bits"},
))
