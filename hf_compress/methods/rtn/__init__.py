"""Round-to-nearest (RTN)."""

from hf_compress.registry import Method, register_method

register_method(Method(
    title="round-to-nearest (RTN)", name="rtn", summary="round-to-nearest per group; no calibration data (the baseline)",
    config="hf_compress.methods.rtn.config:RTNConfig",
))
